"""The position attention (PAM) kernels against the pure-PyTorch reference."""
import itertools

import pytest
import torch

import danet_ext
from danet_ext import reference
from conftest import (DEVICES, HAVE_CUDA_DEVICE, assert_large_logit_grads_close, assert_other_queries_dq_right,
                      assert_within_twice_pytorch, kernel_dtypes, max_err, relative_errors)

pytestmark = pytest.mark.needs_extension

op = torch.ops.danet_ext


def make_inputs(B, Cq, C, H, W, device="cpu", dtype=torch.float32, scale=1.0, requires_grad=False):
    q = (torch.randn(B, Cq, H, W, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    k = (torch.randn(B, Cq, H, W, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    v = torch.randn(B, C, H, W, dtype=torch.float64).to(device=device, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def ext_position_attention(q, k, v):
    return danet_ext.position_attention(q, k, v, backend="extension")


def assert_stats_of_scores(stats, q, k, max_tol, inv_sum_tol):
    """softmax_stats (B, 2, N) hold each query's score maximum and inverse sum of
    exp(score - maximum), for the scores q_i . k_j in float64; tolerances are (rtol, atol)."""
    scores = torch.einsum("bci,bcj->bij", q.flatten(2).double(), k.flatten(2).double())
    row_max = scores.amax(-1)
    torch.testing.assert_close(stats[:, 0].double(), row_max, rtol=max_tol[0], atol=max_tol[1])
    torch.testing.assert_close(stats[:, 1].double(), 1 / torch.exp(scores - row_max[..., None]).sum(-1),
                               rtol=inv_sum_tol[0], atol=inv_sum_tol[1])


def grads_of(fn, inputs, grad_out):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in inputs]


# Small shapes: the full grid. (64, 64) is covered by its own test below.
SMALL_SHAPES = list(itertools.product((1, 3), (1, 8, 64), (1, 5, 64), ((1, 1), (7, 9), (17, 23))))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,Cq,C,HW", SMALL_SHAPES)
def test_forward_and_grads_match_reference(device, B, Cq, C, HW):
    # float64 on the CPU (exact to round-off); float32 on CUDA, whose kernels take no float64
    H, W = HW
    inputs = make_inputs(B, Cq, C, H, W, device, torch.float64)
    grad_out = torch.randn(B, C, H, W, dtype=torch.float64, device=device)
    ref_out, ref_grads = grads_of(reference.position_attention, inputs, grad_out)
    if device == "cpu":
        out, grads = grads_of(ext_position_attention, inputs, grad_out)
        torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
        for name, g, rg in zip("qkv", grads, ref_grads):
            torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {name}: {m}")
    else:
        inputs32 = [t.float() for t in inputs]
        out, grads = grads_of(ext_position_attention, inputs32, grad_out.float())
        same, same_grads = grads_of(reference.position_attention, inputs32, grad_out.float())
        assert_within_twice_pytorch(out, same, ref_out, atol=1e-6)
        for g, sg, rg in zip(grads, same_grads, ref_grads):
            assert_within_twice_pytorch(g, sg, rg, atol=1e-6 * max(1.0, rg.abs().max().item()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,Cq,C,HW", [(1, 64, 512, (64, 64)), (3, 8, 512, (17, 23)), (1, 64, 64, (64, 64)),
                                        (2, 1, 1, (64, 64)), (1, 8, 5, (33, 65))])
def test_float32_within_twice_pytorch_error(device, B, Cq, C, HW):
    H, W = HW
    inputs64 = make_inputs(B, Cq, C, H, W, device, torch.float64)
    grad_out64 = torch.randn(B, C, H, W, dtype=torch.float64, device=device)
    truth, truth_grads = grads_of(reference.position_attention, inputs64, grad_out64)
    inputs32 = [t.float() for t in inputs64]
    out, grads = grads_of(ext_position_attention, inputs32, grad_out64.float())
    ref, ref_grads = grads_of(reference.position_attention, inputs32, grad_out64.float())
    assert_within_twice_pytorch(out, ref, truth, atol=1e-6)
    for g, rg, tg in zip(grads, ref_grads, truth_grads):
        assert_within_twice_pytorch(g, rg, tg, atol=1e-6 * tg.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,Cq,C,HW", [(2, 8, 64, (17, 23)), (1, 64, 512, (32, 32)), (1, 1, 5, (7, 9))])
def test_half_precision_within_twice_pytorch_error(device, dtype, B, Cq, C, HW):
    H, W = HW
    inputs = make_inputs(B, Cq, C, H, W, device, dtype, scale=0.5)
    grad_out = torch.randn(B, C, H, W, device=device).to(dtype)
    truth, truth_grads = grads_of(reference.position_attention, [t.double() for t in inputs], grad_out.double())
    out, grads = grads_of(ext_position_attention, inputs, grad_out)
    ref, ref_grads = grads_of(reference.position_attention, inputs, grad_out)
    assert out.dtype == dtype
    assert_within_twice_pytorch(out, ref, truth)
    for g, rg, tg in zip(grads, ref_grads, truth_grads):
        assert g.dtype == dtype
        assert_within_twice_pytorch(g, rg, tg)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    if device == "cuda":
        pytest.skip("the CUDA kernels take float32/float16/bfloat16; gradcheck needs float64")
    for B, Cq, C, H, W in [(2, 3, 4, 3, 5), (1, 1, 1, 1, 1), (1, 2, 3, 1, 7)]:
        inputs = make_inputs(B, Cq, C, H, W, device, torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(ext_position_attention, inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_saved_softmax_stats_are_row_max_and_inverse_sum(device):
    q, k, v = make_inputs(2, 8, 5, 9, 11, device)
    out, stats = op.position_attention_forward(q, k, v)
    assert stats.dtype == torch.float32 and stats.shape == (2, 2, 99)
    assert_stats_of_scores(stats, q, k, max_tol=(1e-5, 1e-5), inv_sum_tol=(1e-5, 1e-6))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_large_logits_are_stable(device, dtype):
    # |q . k| in the thousands: a softmax without max-subtraction overflows.
    q, k, v = make_inputs(2, 16, 32, 9, 13, device, torch.float64, scale=12.0)
    truth = reference.position_attention(q, k, v)
    assert torch.einsum("bci,bcj->bij", q.flatten(2), k.flatten(2)).abs().max() > 1000
    out = ext_position_attention(q.to(dtype), k.to(dtype), v.to(dtype))
    assert torch.isfinite(out).all()
    # Rounding the inputs moves logits of size ~3000 by up to ~3000 * eps, which changes
    # which key wins: compare against the truth for the rounded inputs.
    truth = reference.position_attention(*(t.to(dtype).double() for t in (q, k, v)))
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    assert max_err(out, truth) < tol
    grad_out = torch.randn_like(v).to(dtype)
    inputs = [t.to(dtype) for t in (q, k, v)]
    assert_large_logit_grads_close(grads_of(ext_position_attention, inputs, grad_out)[1], *inputs, out, grad_out)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_channels_last(device):
    q, k, v = make_inputs(2, 8, 16, 11, 13, device)
    expected = reference.position_attention(q, k, v)
    cl = [t.to(memory_format=torch.channels_last) for t in (q, k, v)]
    torch.testing.assert_close(danet_ext.position_attention(*cl), expected, rtol=1e-5, atol=1e-5)
    # transposed spatial dims, and a channel slice with a gap
    qt, kt, vt = (t.transpose(2, 3).contiguous().transpose(2, 3) for t in (q, k, v))
    assert not qt.is_contiguous()
    torch.testing.assert_close(danet_ext.position_attention(qt, kt, vt), expected, rtol=1e-5, atol=1e-5)
    wide = torch.randn(2, 32, 11, 13, device=device)
    v_strided = wide[:, ::2]
    torch.testing.assert_close(danet_ext.position_attention(q, k, v_strided),
                               reference.position_attention(q, k, v_strided), rtol=1e-5, atol=1e-5)
    # gradients of strided inputs, with a strided gradient of the output, equal the
    # reference's (a kernel writing NCHW order into NHWC strides would not)
    grad_out = torch.randn_like(v)
    _, expected_grads = grads_of(reference.position_attention, (q, k, v), grad_out)
    for inputs in (cl, (qt, kt, vt)):
        for g in (grad_out.to(memory_format=torch.channels_last), grad_out.transpose(2, 3).contiguous().transpose(2, 3)):
            _, grads = grads_of(danet_ext.position_attention, inputs, g)
            for grad, expected_grad in zip(grads, expected_grads):
                torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_single_position_and_empty_batch(device):
    q, k, v = make_inputs(2, 4, 3, 1, 1, device)
    # one position: softmax over a single key is 1, so out == value
    torch.testing.assert_close(danet_ext.position_attention(q, k, v), v)
    q, k, v = make_inputs(0, 4, 3, 5, 6, device, requires_grad=True)
    out = danet_ext.position_attention(q, k, v)
    assert out.shape == (0, 3, 5, 6)
    out.sum().backward()
    assert q.grad.shape == q.shape


def test_validation_errors_name_the_argument():
    q, k, v = make_inputs(2, 8, 16, 5, 6)
    cases = [
        ((q[0], k, v), ValueError, "`query` must be a 4-D"),
        ((q, k, v.flatten(2)), ValueError, "`value` must be a 4-D"),
        ((q, k[:, :4], v), ValueError, "same number of channels"),
        ((q, k, v[:1]), ValueError, "share batch and spatial sizes"),
        ((q, k, v[..., :5]), ValueError, "share batch and spatial sizes"),
        ((q.double(), k, v), TypeError, "`query` has dtype torch.float64"),
        ((q, k.half(), v), TypeError, "`key` has dtype torch.float16"),
        ((q.long(), k.long(), v.long()), TypeError, "`query` must be a float32, float64, float16 or bfloat16"),
        ((q, k, "v"), TypeError, "`value` must be a torch.Tensor"),
        ((q[:, :0], k[:, :0], v), ValueError, "at least one channel"),
        ((q.to_sparse(), k, v), TypeError, r"`query` must be a dense \(strided\) tensor, got layout torch.sparse_coo"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            danet_ext.position_attention(*args)
    with pytest.raises(TypeError, match="`x` must be a dense"):
        danet_ext.channel_attention(v.to_sparse())
    with pytest.raises(ValueError, match="backend must be one of"):
        danet_ext.position_attention(q, k, v, backend="fast")


def test_direct_op_call_validates_in_cpp():
    # C++ users and direct torch.ops calls get the same checks from TORCH_CHECK.
    q, k, v = make_inputs(2, 8, 16, 5, 6)
    with pytest.raises(RuntimeError, match="`query` and `key` must have the same number of channels"):
        op.position_attention_forward(q, k[:, :4], v)
    with pytest.raises(RuntimeError, match="`value` must be a 4-D"):
        op.position_attention_forward(q, k, v[0])
    out, stats = op.position_attention_forward(q, k, v)
    with pytest.raises(RuntimeError, match="`softmax_stats` must have shape"):
        op.position_attention_backward(out, q, k, v, out, stats[:, :, :3])


def test_opcheck():
    for shape in [(2, 8, 16, 5, 7), (1, 1, 1, 1, 1)]:
        q, k, v = make_inputs(*shape, requires_grad=True)
        torch.library.opcheck(op.position_attention_forward.default, (q, k, v))
        out, stats = op.position_attention_forward(q, k, v)
        torch.library.opcheck(op.position_attention_backward.default,
                              (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), stats))


def test_torch_compile_fullgraph():
    q, k, v = make_inputs(2, 8, 16, 9, 7, requires_grad=True)

    def f(q, k, v):
        return (danet_ext.position_attention(q, k, v) * 2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    loss.backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    expected, expected_grads = grads_of(reference.position_attention, [q, k, v], torch.full((2, 16, 9, 7), 2.0))
    torch.testing.assert_close(loss, (expected * 2).sum(), rtol=1e-4, atol=1e-4)
    for g, eg in zip(grads, expected_grads):
        torch.testing.assert_close(g, eg, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast(device):
    q, k, v = make_inputs(2, 8, 16, 9, 7, device)
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    with torch.autocast(device_type=device, dtype=dtype):
        out = danet_ext.position_attention(q, k, v, backend="extension")  # the kernel, whatever auto picks
    assert out.dtype == dtype
    truth = reference.position_attention(*(t.to(dtype).double() for t in (q, k, v)))
    assert max_err(out, truth) < 2e-2


def test_backend_choice():
    q, k, v = make_inputs(1, 4, 6, 5, 5)
    torch.testing.assert_close(danet_ext.position_attention(q, k, v, backend="reference"),
                               reference.position_attention(q, k, v))
    torch.testing.assert_close(danet_ext.position_attention(q, k, v, backend="extension"),
                               reference.position_attention(q, k, v), rtol=1e-5, atol=1e-5)
    reason = danet_ext.ops.kernel_unavailable_reason(torch.device("cuda"), torch.float64)
    assert reason is not None and ("cuda" in reason)


def _cuda_capability_major():
    return torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else 0


# The tensor-core kernels (float16/bfloat16, compute capability >= 8.0, the
# default there; DANET_EXT_TENSOR_CORES=0 forces the CUDA cores): odd N
# (partial key and query tiles), Cq off the 16-channel step, C off the
# 128-channel block, N = 1, logits in the thousands; Cq = 100 takes the
# tensor-core forward and the CUDA-core backward.
TENSOR_CORE_CASES = [(2, 8, 64, (17, 23), 0.5), (1, 64, 512, (64, 64), 0.5), (1, 1, 5, (7, 9), 0.5),
                     (3, 33, 130, (9, 11), 0.5), (1, 100, 300, (31, 33), 0.3), (2, 8, 16, (1, 1), 1.0),
                     (1, 16, 32, (9, 13), 12.0)]


@pytest.mark.cuda
@pytest.mark.skipif(not HAVE_CUDA_DEVICE, reason="needs a CUDA device and CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,Cq,C,HW,scale", TENSOR_CORE_CASES)
def test_tensor_core_kernels(monkeypatch, dtype, B, Cq, C, HW, scale):
    if _cuda_capability_major() < 8:
        pytest.skip("the tensor-core kernels need compute capability 8.0")
    monkeypatch.delenv("DANET_EXT_TENSOR_CORES", raising=False)
    H, W = HW
    inputs = make_inputs(B, Cq, C, H, W, "cuda", dtype, scale=scale)
    grad_out = torch.randn(B, C, H, W, device="cuda").to(dtype)
    rounded64 = [t.double() for t in inputs]
    truth, truth_grads = grads_of(reference.position_attention, rounded64, grad_out.double())
    out, grads = grads_of(ext_position_attention, inputs, grad_out)
    assert out.dtype == dtype and torch.isfinite(out).all()
    if scale > 1.0:  # PyTorch's own half-precision path is no yardstick at these logits
        tol = {torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
        assert max_err(out, truth) < tol
        assert_large_logit_grads_close(grads, *inputs, out, grad_out)
        return
    ulps = 4 * torch.finfo(dtype).eps  # slack where PyTorch's own error is 0 (N = 1)
    ref, ref_grads = grads_of(reference.position_attention, inputs, grad_out)
    assert_within_twice_pytorch(out, ref, truth, atol=ulps * truth.abs().max().item())
    for g, rg, tg in zip(grads, ref_grads, truth_grads):
        assert_within_twice_pytorch(g, rg, tg, atol=ulps * max(1.0, tg.abs().max().item()))
    # the saved statistics are those of the rounded inputs' scores
    _, stats = op.position_attention_forward(*inputs)
    assert_stats_of_scores(stats, inputs[0], inputs[1], max_tol=(1e-5, 1e-4), inv_sum_tol=(1e-4, 1e-6))


@pytest.mark.cuda
@pytest.mark.skipif(not HAVE_CUDA_DEVICE, reason="needs a CUDA device and CUDA kernels")
@pytest.mark.parametrize("B,Cq,C,HW", [(2, 8, 64, (17, 23)), (1, 64, 512, (32, 32)), (3, 33, 130, (9, 11))])
def test_float32_on_tf32_where_allowed(B, Cq, C, HW):
    """With torch.backends.cuda.matmul.allow_tf32, float32 position attention runs on
    TF32 tensor cores (compute capability 8.0+): its error against float64 within
    twice that of the official code under the same setting (TF32 bmm)."""
    if _cuda_capability_major() < 8:
        pytest.skip("TF32 needs compute capability 8.0")
    inputs = make_inputs(B, Cq, C, *HW, "cuda", torch.float32, scale=0.5)
    grad_out = torch.randn(B, C, *HW, device="cuda")
    truth, truth_grads = grads_of(reference.position_attention, [t.double() for t in inputs], grad_out.double())
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        out, grads = grads_of(ext_position_attention, inputs, grad_out)
        ref, ref_grads = grads_of(reference.position_attention, inputs, grad_out)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert_within_twice_pytorch(out, ref, truth, atol=1e-5)
    for g, rg, tg in zip(grads, ref_grads, truth_grads):
        assert_within_twice_pytorch(g, rg, tg, atol=1e-5 * max(1.0, tg.abs().max().item()))


@pytest.mark.cuda
@pytest.mark.skipif(not HAVE_CUDA_DEVICE, reason="needs a CUDA device and CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_tensor_core_paths_are_taken(monkeypatch, dtype):
    """On compute capability 8.0+ the tensor-core kernels run by default (float32: where TF32
    is allowed): their results differ from the CUDA cores' (DANET_EXT_TENSOR_CORES=0, or TF32
    disallowed) in rounding, so a dispatch that silently fell back would show here, while
    the accuracy tests above pass on either path."""
    if _cuda_capability_major() < 8:
        pytest.skip("the tensor-core kernels need compute capability 8.0")
    monkeypatch.delenv("DANET_EXT_TENSOR_CORES", raising=False)
    inputs = make_inputs(1, 16, 64, 48, 48, "cuda", dtype, scale=0.5)
    grad_out = torch.randn(1, 64, 48, 48, device="cuda").to(dtype)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        fast, fast_grads = grads_of(ext_position_attention, inputs, grad_out)
        if dtype == torch.float32:
            torch.backends.cuda.matmul.allow_tf32 = False
        else:
            monkeypatch.setenv("DANET_EXT_TENSOR_CORES", "0")
        plain, plain_grads = grads_of(ext_position_attention, inputs, grad_out)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert not torch.equal(fast, plain)
    assert not torch.equal(fast_grads[0], plain_grads[0])
    truth = reference.position_attention(*(t.double() for t in inputs))
    for out in (fast, plain):
        assert max_err(out, truth) < 2e-2 * truth.abs().max().item()


@pytest.mark.cuda
@pytest.mark.skipif(not HAVE_CUDA_DEVICE, reason="needs a CUDA device and CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_backward_is_refused_under_deterministic_algorithms(dtype):
    """dQ is accumulated with float32 atomics: under torch.use_deterministic_algorithms
    the CUDA backward raises instead of being silently nondeterministic."""
    q, k, v = (t.requires_grad_() for t in make_inputs(1, 8, 16, 5, 5, "cuda", dtype))
    out = ext_position_attention(q, k, v)
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="position_attention_backward.*deterministic"):
            out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)


# bfloat16 on the CPU has three paths: products in bfloat16 on CPUs with bfloat16 hardware
# (csrc/cpu/reduced_precision_gemm.h), their score tiles from bfloat16 pairs on AVX512-BF16
# (csrc/cpu/bf16_scores.h) or from a float32 GEMM, and float32 throughout elsewhere. All
# run here, forced by the switches (the AVX512-BF16 one only where the CPU has it).
CPU_BF16_PATHS = {
    "bfloat16-products-avx512bf16-scores": {"DANET_EXT_CPU_BF16_GEMM": "1", "DANET_EXT_CPU_BF16_SCORES": "1"},
    "bfloat16-products-float32-scores": {"DANET_EXT_CPU_BF16_GEMM": "1", "DANET_EXT_CPU_BF16_SCORES": "0"},
    "float32-products": {"DANET_EXT_CPU_BF16_GEMM": "0"},
}


def set_cpu_bf16_path(monkeypatch, path):
    if "avx512bf16" in path and not danet_ext.hardware.has_avx512_bf16():
        pytest.skip("this CPU has no AVX512-BF16")
    for name, value in CPU_BF16_PATHS[path].items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("path", CPU_BF16_PATHS)
@pytest.mark.parametrize("B,Cq,C,HW,scale", [(2, 8, 64, (17, 23), 0.5), (1, 64, 512, (32, 32), 0.5),
                                             (1, 1, 5, (7, 9), 0.5), (1, 16, 24, (65, 65), 0.5),
                                             (2, 16, 32, (9, 13), 3.0), (3, 17, 20, (11, 7), 1.0)])
def test_cpu_bfloat16_paths_within_twice_pytorch_error(monkeypatch, path, B, Cq, C, HW, scale):
    # (65, 65): 4225 keys, more than one key tile of the bfloat16 path; scale 3: logits near 100;
    # Cq = 17 and 1: an odd last pair in the packed scores; N = 77, 117: partial key panels
    set_cpu_bf16_path(monkeypatch, path)
    inputs = make_inputs(B, Cq, C, *HW, "cpu", torch.bfloat16, scale=scale)
    grad_out = torch.randn(B, C, *HW).bfloat16()
    truth, truth_grads = grads_of(reference.position_attention, [t.double() for t in inputs], grad_out.double())
    out, grads = grads_of(ext_position_attention, inputs, grad_out)
    ref, ref_grads = grads_of(reference.position_attention, inputs, grad_out)
    assert out.dtype == torch.bfloat16
    assert_within_twice_pytorch(out, ref, truth)
    for g, rg, tg in zip(grads, ref_grads, truth_grads):
        assert_within_twice_pytorch(g, rg, tg)
    _, stats = op.position_attention_forward(*inputs)
    assert_stats_of_scores(stats, *inputs[:2], max_tol=(1e-5, 1e-4), inv_sum_tol=(1e-4, 1e-6))


@pytest.mark.skipif(not danet_ext.hardware.has_avx512_bf16() or
                    not danet_ext.build_info().get("cpu_bf16_score_kernel"),
                    reason="this CPU or build has no AVX512-BF16 score kernel")
@pytest.mark.parametrize("Cq,HW", [(64, (32, 32)), (7, (5, 13)), (1, (1, 1)), (33, (9, 9)), (16, (65, 65))])
def test_cpu_avx512bf16_scores_are_float32_sums_of_exact_products(monkeypatch, Cq, HW):
    """The score kernel's statistics equal those of the exact scores up to float32 summation
    error (bfloat16 x bfloat16 products are exact in float32), as the float32 GEMM's do; the
    switch really changes the path. (65, 65): a second key tile (offset 4096)."""
    monkeypatch.setenv("DANET_EXT_CPU_BF16_GEMM", "1")
    q, k, v = make_inputs(2, Cq, 16, *HW, "cpu", torch.bfloat16, scale=1.0)
    scores = torch.einsum("bci,bcj->bij", q.double().flatten(2), k.double().flatten(2))
    magnitude = torch.einsum("bci,bcj->bij", q.double().abs().flatten(2), k.double().abs().flatten(2))
    found, kinds = {}, {}
    for flag in ("1", "0"):
        monkeypatch.setenv("DANET_EXT_CPU_BF16_SCORES", flag)
        found[flag] = op.position_attention_forward(q, k, v)[1]
        kinds[flag] = danet_ext.build_info()["cpu_bfloat16"]["position_attention scores"]
    # per row: float32 sums of Cq exact products
    tol = Cq * 1.2e-7 * magnitude.amax(-1)
    for stats in found.values():
        assert ((stats[:, 0].double() - scores.amax(-1)).abs() <= tol).all()
        assert_stats_of_scores(stats, q, k, max_tol=(1e-5, 1e-4), inv_sum_tol=(1e-4, 1e-6))
    assert "AVX512-BF16" in kinds["1"] and kinds["0"] == "float32 GEMM"
    if Cq == 64:  # 2048 sums of 64 products: the two summation orders differ somewhere
        assert not torch.equal(found["1"], found["0"])


# float16 on the CPU: products in float16 where the CPU has AVX512-FP16 or AMX-FP16,
# float32 elsewhere (csrc/cpu/reduced_precision_gemm.h); both run here, forced.
CPU_FP16_PATHS = {"float16-products": "1", "float32-products": "0"}


@pytest.mark.parametrize("path", CPU_FP16_PATHS)
@pytest.mark.parametrize("B,Cq,C,HW,scale", [(2, 8, 64, (17, 23), 0.5), (1, 64, 512, (32, 32), 0.5),
                                             (1, 1, 5, (7, 9), 0.5), (1, 16, 24, (65, 65), 0.5),
                                             (2, 16, 32, (9, 13), 2.0)])
def test_cpu_float16_paths_within_twice_pytorch_error(monkeypatch, path, B, Cq, C, HW, scale):
    monkeypatch.setenv("DANET_EXT_CPU_FP16_GEMM", CPU_FP16_PATHS[path])
    inputs = make_inputs(B, Cq, C, *HW, "cpu", torch.float16, scale=scale)
    grad_out = torch.randn(B, C, *HW).half()
    truth, truth_grads = grads_of(reference.position_attention, [t.double() for t in inputs], grad_out.double())
    out, grads = grads_of(ext_position_attention, inputs, grad_out)
    ref, ref_grads = grads_of(reference.position_attention, inputs, grad_out)
    assert out.dtype == torch.float16
    assert_within_twice_pytorch(out, ref, truth)
    for g, rg, tg in zip(grads, ref_grads, truth_grads):
        assert_within_twice_pytorch(g, rg, tg)
    _, stats = op.position_attention_forward(*inputs)
    assert_stats_of_scores(stats, *inputs[:2], max_tol=(1e-5, 1e-4), inv_sum_tol=(1e-4, 1e-6))


@pytest.mark.parametrize("path", CPU_FP16_PATHS)
def test_cpu_float16_paths_keep_small_gradients(monkeypatch, path):
    """At |dO| ~ 1e-4 and N ~ 4096, dS (near P |dP|, P ~ 1/N), P and their products lie below
    float16's normal range (6.1e-5); the float16-product path scales each product's operand by
    a power of two and undoes it in float32. Each gradient's error must be what rounding the
    true gradient to float16 costs plus twice its error at |dO| ~ 1 (unscaled, dQ's was 1.3e-2
    against a bound of 2.2e-3)."""
    monkeypatch.setenv("DANET_EXT_CPU_FP16_GEMM", CPU_FP16_PATHS[path])
    q, k, v = make_inputs(1, 8, 8, 61, 67, "cpu", torch.float16, scale=1.0)  # 4087: a partial last stack
    errors, rounding = {}, {}
    for scale in (1.0, 1e-4):
        grad_out = (torch.randn(1, 8, 61, 67) * scale).half()
        _, truth = grads_of(reference.position_attention, [t.double() for t in (q, k, v)], grad_out.double())
        _, grads = grads_of(ext_position_attention, [q, k, v], grad_out)
        errors[scale] = relative_errors(grads, truth)
        rounding[scale] = relative_errors([t.half() for t in truth], truth)
    for i, name in enumerate("qkv"):
        assert errors[1e-4][i] <= rounding[1e-4][i] + 2 * errors[1.0][i], (name, errors, rounding)


def test_cpu_float16_products_forward_at_65536_positions(monkeypatch):
    """P averages 1/N: at N = 65536 it lies below float16's normal range (6.1e-5), and rounded
    unscaled for O = V P^T it gave 4.7x the error of rounding the true output to float16 (2.2x
    scaled). The float16-product forward rounds P times a power of two and divides the product
    by it."""
    monkeypatch.setenv("DANET_EXT_CPU_FP16_GEMM", "1")
    q, k, v = make_inputs(1, 4, 4, 256, 256, "cpu", torch.float16, scale=0.1)
    out = op.position_attention_forward(q, k, v)[0]
    # the float32 kernel (1e-7 relative error, O(N) memory) as the truth: float64 takes 13 s here
    truth = op.position_attention_forward(q.float(), k.float(), v.float())[0].double()
    error = relative_errors([out], [truth])[0]
    rounding = relative_errors([truth.half()], [truth])[0]
    assert error <= 3 * rounding, (error, rounding)


@pytest.mark.parametrize("path", CPU_FP16_PATHS)
def test_cpu_float16_paths_with_an_infinite_grad_out(monkeypatch, path):
    """An infinite dO entry makes its query's dS row non-finite; the other queries' dQ must stay
    finite and right (a product whose operand holds inf or NaN is not scaled)."""
    monkeypatch.setenv("DANET_EXT_CPU_FP16_GEMM", CPU_FP16_PATHS[path])
    q, k, v = make_inputs(1, 8, 8, 16, 16, "cpu", torch.float16, scale=0.5)
    grad_out = torch.randn(1, 8, 16, 16).half()
    grad_out[0, 3, 5, 7] = float("inf")
    _, (dq, _, _) = grads_of(ext_position_attention, [q, k, v], grad_out)
    assert_other_queries_dq_right(dq, q, k, v, grad_out, (5, 7), tol=3e-3)


def test_cpu_float16_switch_changes_the_path(monkeypatch):
    inputs = make_inputs(1, 8, 64, 16, 16, "cpu", torch.float16)
    outs = []
    for flag in CPU_FP16_PATHS.values():
        monkeypatch.setenv("DANET_EXT_CPU_FP16_GEMM", flag)
        outs.append(op.position_attention_forward(*inputs)[0])
    assert not torch.equal(outs[0], outs[1])  # P rounded to float16 before the product, or not
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-3, atol=2e-3)
    assert set(danet_ext.build_info()["cpu_float16"]) == {"position_attention products",
                                                         "channel_attention products"}


def test_cpu_bfloat16_switch_changes_the_path(monkeypatch):
    inputs = make_inputs(1, 8, 64, 16, 16, "cpu", torch.bfloat16)
    outs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("DANET_EXT_CPU_BF16_GEMM", flag)
        outs.append(op.position_attention_forward(*inputs)[0])
    # the two paths round differently (P to bfloat16 before the product, or not)
    assert not torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("cpu", ["avx512bf16", "avx512bf16-binary-without-kernel", "amx", "none"])
def test_auto_takes_the_reference_where_it_is_faster(monkeypatch, cpu):
    # on bfloat16 hardware, small PAM maps in bfloat16 run the reference (measured faster
    # there) and larger maps keep the O(N)-memory kernel; bfloat16 CAM runs the kernel on
    # AVX512-BF16 and the reference where AMX's oneDNN bmm is the faster one
    hw = danet_ext.hardware
    monkeypatch.setattr(hw, "has_fast_bfloat16", lambda: cpu != "none")
    monkeypatch.setattr(hw, "has_avx512_bf16", lambda: cpu != "none")
    monkeypatch.setattr(hw, "has_amx_bf16", lambda: cpu == "amx")
    built = cpu != "avx512bf16-binary-without-kernel"
    monkeypatch.setattr(danet_ext.ops, "bf16_kernel_built", lambda: built)
    monkeypatch.setattr(danet_ext._build, "bf16_kernel_built", lambda: built)
    fast_bf16 = cpu != "none"
    cam_kernel = cpu == "avx512bf16"
    ops = danet_ext.ops
    n = ops.AUTO_REFERENCE_MAX_POSITIONS
    small = make_inputs(1, 4, 8, 32, n // 32, "cpu", torch.bfloat16)
    large = make_inputs(1, 4, 8, 32, n // 32 + 1, "cpu", torch.bfloat16)
    assert ops.use_kernel("auto", tuple(small), "position_attention") is (not fast_bf16)
    assert ops.use_kernel("auto", tuple(large), "position_attention")
    assert ops.use_kernel("auto", (small[2],), "channel_attention") is (cam_kernel or not fast_bf16)
    assert ops.use_kernel("auto", (large[2],), "channel_attention") is (cam_kernel or not fast_bf16)
    assert ops.use_kernel("extension", tuple(small), "position_attention")  # never overridden
    assert ops.use_kernel("extension", (small[2],), "channel_attention")
    assert ops.use_kernel("auto", tuple(t.float() for t in small), "position_attention")  # float32: kernel
    taken = danet_ext.build_info()["cpu_bfloat16"]["auto_takes_reference_for"]
    assert ("channel_attention" in taken) is (fast_bf16 and not cam_kernel)
    assert any(t.startswith("position_attention") for t in taken) is fast_bf16


def test_torch_compile_fullgraph_in_bfloat16():
    # the backend choice for bfloat16 consults the CPU's flags: it must not break the graph
    q, k, v = make_inputs(1, 4, 8, 50, 50, "cpu", torch.bfloat16)
    x = v[:, :, :6, :7].contiguous()

    def f(q, k, v, x):
        return danet_ext.position_attention(q, k, v) * 2, danet_ext.channel_attention(x) * 2

    pam, cam = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, x)
    torch.testing.assert_close(pam, danet_ext.position_attention(q, k, v) * 2)
    torch.testing.assert_close(cam, danet_ext.channel_attention(x) * 2)
    # and what both compute is attention: float64 arithmetic on the same bfloat16 inputs
    truth = reference.position_attention(q.double(), k.double(), v.double()) * 2
    assert max_err(pam, truth) < 2e-2 * truth.abs().max().item()
    truth = reference.channel_attention(x.double()) * 2
    assert max_err(cam, truth) < 2e-2 * truth.abs().max().item()


@pytest.mark.parametrize("dtype,N,path", [(torch.float64, 1100, None), (torch.float32, 1100, None),
                                          (torch.float32, 300, None)]
                         + [(torch.bfloat16, 4225, p) for p in CPU_BF16_PATHS])
def test_cpu_keys_at_minus_infinity(monkeypatch, dtype, N, path):
    """Scores of -inf over a whole leading key tile (256 keys in float32/float64 past 1024
    keys, 4096 on the bfloat16 path) leave the softmax over the other keys, as in the
    reference, not NaN (the tile's 1 / sum was inf, and 0 * inf spoilt the row); a query
    whose scores are all -inf gives NaN, as the reference's softmax does."""
    if path is not None:
        set_cpu_bf16_path(monkeypatch, path)
    g = torch.Generator().manual_seed(0)
    # score(i, j) = q0_i k0_j + q1_i k1_j with q0 = 1, q1 = 0: k0_j, -inf for the leading keys;
    # query 7 has q1 = -inf against k1 > 0: -inf for every key
    q = torch.stack([torch.ones(N), torch.zeros(N)]).view(1, 2, 1, N)
    q[0, 1, 0, 7] = float("-inf")
    k = torch.rand(1, 2, 1, N, generator=g) + 0.5
    k[0, 0, 0, :min(4096, N - 10)] = float("-inf")
    v = torch.randn(1, 3, 1, N, generator=g)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    expected = reference.position_attention(q.double(), k.double(), v.double())
    got = danet_ext.position_attention(q, k, v, backend="extension")
    assert torch.equal(got.isnan(), expected.isnan())
    finite = ~expected.isnan()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.double()[finite], expected[finite], rtol=tol, atol=tol)
