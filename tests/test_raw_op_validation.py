"""The raw ops (torch.ops.danet_ext.*) validate like the public API: mixed devices,
wrong dtypes of the saved tensors and unsupported dtypes are errors, never
uninitialised memory or garbage gradients. Also the modules' constructor checks."""
import pytest
import torch

import danet_ext

pytestmark = pytest.mark.needs_extension

op = torch.ops.danet_ext


def pam_backward_args(dtype=torch.float32):
    q, k = torch.randn(2, 4, 3, 5, dtype=dtype), torch.randn(2, 4, 3, 5, dtype=dtype)
    v = torch.randn(2, 6, 3, 5, dtype=dtype)
    out, stats = op.position_attention_forward(q, k, v)
    return dict(grad_out=torch.randn_like(out), query=q, key=k, value=v, out=out, softmax_stats=stats)


def cam_backward_args(dtype=torch.float32):
    x = torch.randn(2, 5, 3, 4, dtype=dtype)
    out, attention = op.channel_attention_forward(x)
    return dict(grad_out=torch.randn_like(out), x=x, attention=attention)


def call(fn, args):
    return fn(*args.values())


@pytest.mark.parametrize("name", ["softmax_stats", "grad_out", "out", "query", "value"])
def test_pam_backward_rejects_a_meta_tensor_among_cpu_ones(name):
    args = pam_backward_args()
    args[name] = args[name].to("meta")
    with pytest.raises((RuntimeError, ValueError), match="same device|must be on"):
        call(op.position_attention_backward, args)


@pytest.mark.parametrize("name", ["attention", "grad_out", "x"])
def test_cam_backward_rejects_a_meta_tensor_among_cpu_ones(name):
    args = cam_backward_args()
    args[name] = args[name].to("meta")
    with pytest.raises((RuntimeError, ValueError), match="same device|must be on"):
        call(op.channel_attention_backward, args)


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.float16, torch.float64])
def test_saved_tensors_must_be_in_the_accumulate_dtype(device, dtype):
    # float32 inputs save float32 statistics / attention; anything else is refused
    # by the kernels (cpu) and by the fake kernels (meta) alike.
    pam = {k: v.to(device) for k, v in pam_backward_args().items()}
    pam["softmax_stats"] = pam["softmax_stats"].to(dtype)
    with pytest.raises((RuntimeError, TypeError), match="`softmax_stats` must be torch.float32|"
                                                        "`softmax_stats` must be Float"):
        call(op.position_attention_backward, pam)
    cam = {k: v.to(device) for k, v in cam_backward_args().items()}
    cam["attention"] = cam["attention"].to(dtype)
    with pytest.raises((RuntimeError, TypeError), match="`attention` must be torch.float32|`attention` must be Float"):
        call(op.channel_attention_backward, cam)


def test_float64_inputs_need_float64_saved_tensors():
    pam = pam_backward_args(torch.float64)
    pam["softmax_stats"] = pam["softmax_stats"].float()
    with pytest.raises(RuntimeError, match="`softmax_stats` must be Double for Double inputs"):
        call(op.position_attention_backward, pam)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_fake_and_real_backward_check_shapes(device):
    pam = {k: v.to(device) for k, v in pam_backward_args().items()}
    pam["softmax_stats"] = pam["softmax_stats"][:, :, :4]
    with pytest.raises((RuntimeError, ValueError), match="`softmax_stats` must have shape"):
        call(op.position_attention_backward, pam)
    cam = {k: v.to(device) for k, v in cam_backward_args().items()}
    cam["grad_out"] = cam["grad_out"][:1]
    with pytest.raises((RuntimeError, ValueError), match="`grad_out` must have the shape of `x`"):
        call(op.channel_attention_backward, cam)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_is_refused_by_raw_ops_and_the_api(dtype):
    x = torch.randn(1, 4, 3, 3).to(dtype)
    with pytest.raises(RuntimeError, match="must be a float32, float64, float16 or bfloat16 tensor"):
        op.position_attention_forward(x, x, x)
    with pytest.raises(RuntimeError, match="must be a float32, float64, float16 or bfloat16 tensor"):
        op.channel_attention_forward(x)
    with pytest.raises(TypeError, match="must be a float32, float64, float16 or bfloat16 tensor"):
        danet_ext.channel_attention(x)
    with pytest.raises(TypeError, match="must be a float32, float64, float16 or bfloat16 tensor"):
        op.position_attention_forward(x.to("meta"), x.to("meta"), x.to("meta"))


@pytest.mark.parametrize("build", [lambda: danet_ext.DANetHead(64, 0), lambda: danet_ext.DANetHead(64, -3),
                                   lambda: danet_ext.DANet(0, backbone="resnet50"),
                                   lambda: danet_ext.DANetHead(64, 2.5)])
def test_modules_need_at_least_one_class(build):
    with pytest.raises(ValueError, match="num_classes >= 1"):
        build()
