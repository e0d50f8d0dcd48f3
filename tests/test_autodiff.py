"""Beyond first-order reverse mode: double backward, forward-mode AD, the
torch.func transforms, autocast's dtype rules and overflow. Each result is
compared with the same computation on the reference (the official maths)."""
import pytest
import torch
from torch.autograd import forward_ad

import danet_ext
from danet_ext import reference

pytestmark = pytest.mark.needs_extension


def pam_inputs(dtype=torch.float64, requires_grad=True, B=2, Cq=3, C=4, H=3, W=4):
    g = torch.Generator().manual_seed(1)
    make = lambda c: torch.randn(B, c, H, W, dtype=dtype, generator=g).requires_grad_(requires_grad)  # noqa: E731
    return make(Cq), make(Cq), make(C)


def cam_input(dtype=torch.float64, requires_grad=True):
    return (torch.randn(2, 4, 3, 3, dtype=dtype, generator=torch.Generator().manual_seed(2)) * 0.5) \
        .requires_grad_(requires_grad)


def pam(q, k, v):
    return danet_ext.position_attention(q, k, v)


def cam(x):
    return danet_ext.channel_attention(x)


# ---------------------------------------------------------------- double backward

def test_gradgradcheck_position_attention():
    assert torch.autograd.gradgradcheck(pam, pam_inputs())


def test_gradgradcheck_channel_attention():
    assert torch.autograd.gradgradcheck(cam, (cam_input(),))


def test_second_derivative_matches_the_reference():
    # a gradient penalty, the common use of create_graph=True
    def penalty(fn, inputs):
        out = fn(*inputs)
        grads = torch.autograd.grad(out.square().sum(), inputs, create_graph=True)
        total = sum(g.square().sum() for g in grads)
        return torch.autograd.grad(total, inputs)

    ours = penalty(pam, pam_inputs())
    theirs = penalty(reference.position_attention, pam_inputs())
    for a, b in zip(ours, theirs):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(penalty(cam, (cam_input(),))[0], penalty(reference.channel_attention, (cam_input(),))[0])


def test_first_order_backward_still_runs_the_kernel(monkeypatch):
    # create_graph=False must keep the fused backward, not the reference's N x N one
    calls = []
    real = torch.ops.danet_ext.position_attention_backward

    class Spy:
        def __call__(self, *args):
            calls.append(1)
            return real(*args)

    monkeypatch.setattr(torch.ops.danet_ext, "position_attention_backward", Spy())
    q, k, v = pam_inputs(torch.float32)
    pam(q, k, v).sum().backward()
    assert calls == [1]


# ---------------------------------------------------------------- forward mode and torch.func

def test_jvp_matches_the_reference():
    primals = pam_inputs(requires_grad=False)
    tangents = tuple(torch.randn_like(t) for t in primals)
    out, tangent = torch.func.jvp(pam, primals, tangents)
    ref_out, ref_tangent = torch.func.jvp(reference.position_attention, primals, tangents)
    assert tangent.abs().max() > 0
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(tangent, ref_tangent)

    x, t = cam_input(requires_grad=False), torch.randn(2, 4, 3, 3, dtype=torch.float64)
    _, tangent = torch.func.jvp(cam, (x,), (t,))
    _, ref_tangent = torch.func.jvp(reference.channel_attention, (x,), (t,))
    assert tangent.abs().max() > 0
    torch.testing.assert_close(tangent, ref_tangent)


def test_forward_ad_dual_tensors():
    x, t = cam_input(requires_grad=False), torch.randn(2, 4, 3, 3, dtype=torch.float64)
    with forward_ad.dual_level():
        tangent = forward_ad.unpack_dual(cam(forward_ad.make_dual(x, t))).tangent
        ref_tangent = forward_ad.unpack_dual(reference.channel_attention(forward_ad.make_dual(x, t))).tangent
    assert tangent is not None
    torch.testing.assert_close(tangent, ref_tangent)
    # a dual level with no dual input leaves the kernel in charge
    with forward_ad.dual_level():
        assert danet_ext.ops.use_kernel("auto", (x,), "channel_attention")


@pytest.mark.parametrize("transform", ["grad", "jacrev", "hessian", "vmap"])
def test_func_transforms_match_the_reference(transform):
    x = cam_input(requires_grad=False)

    def loss(fn):
        return lambda x: fn(x).square().sum()

    if transform == "grad":
        ours, theirs = torch.func.grad(loss(cam))(x), torch.func.grad(loss(reference.channel_attention))(x)
    elif transform == "jacrev":
        ours, theirs = torch.func.jacrev(cam)(x), torch.func.jacrev(reference.channel_attention)(x)
    elif transform == "hessian":
        x = x[:1, :2, :2, :2]
        ours, theirs = torch.func.hessian(loss(cam))(x), torch.func.hessian(loss(reference.channel_attention))(x)
    else:
        q, k, v = pam_inputs(requires_grad=False)
        ours = torch.func.vmap(pam)(q[:, None], k[:, None], v[:, None])
        theirs = reference.position_attention(q, k, v)[:, None]
    assert ours.abs().max() > 0
    torch.testing.assert_close(ours, theirs)


def test_extension_backend_refuses_transforms_clearly():
    x = cam_input(requires_grad=False)
    with pytest.raises(RuntimeError, match="torch.func transform .* not support"):
        torch.func.grad(lambda x: danet_ext.channel_attention(x, backend="extension").sum())(x)


# ---------------------------------------------------------------- autocast, overflow

@pytest.mark.parametrize("device_type,dtype", [("cpu", torch.bfloat16)])
def test_autocast_keeps_float64(device_type, dtype):
    q, k, v = pam_inputs(requires_grad=False)
    x = cam_input(requires_grad=False)
    with torch.autocast(device_type=device_type, dtype=dtype):
        assert torch.matmul(x, x).dtype == torch.float64  # what autocast does for matmul
        assert danet_ext.position_attention(q, k, v).dtype == torch.float64
        assert danet_ext.channel_attention(x).dtype == torch.float64
        assert danet_ext.channel_attention(x.float()).dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hw", [(8, 8), (40, 40)])  # one key tile, several key tiles
def test_position_attention_stays_finite_where_the_reference_is(dtype, hw):
    q, k, v = pam_inputs(dtype, requires_grad=False, B=1, Cq=4, C=3, H=hw[0], W=hw[1])
    big = torch.finfo(dtype).max / 8
    v = (v.abs() + 1) * (big / 4)  # every value is within [big/4, big): sums of a few overflow
    expected = reference.position_attention(q, k, v)
    assert torch.isfinite(expected).all()
    out = danet_ext.position_attention(q, k, v, backend="extension")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out / big, expected / big, rtol=1e-5, atol=1e-5)
