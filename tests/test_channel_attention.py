"""The channel attention (CAM) kernels against the pure-PyTorch reference."""
import itertools

import pytest
import torch

import danet_ext
from danet_ext import reference
from conftest import DEVICES, assert_within_twice_pytorch, max_err

pytestmark = pytest.mark.needs_extension

op = torch.ops.danet_ext


def ext_channel_attention(x):
    return danet_ext.channel_attention(x, backend="extension")


def grads_of(fn, x, grad_out):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    out.backward(grad_out)
    return out.detach(), x.grad


SHAPES = list(itertools.product((1, 2), (1, 3, 64, 259, 512), ((1, 1), (5, 7), (33, 31))))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,C,HW", SHAPES)
def test_forward_and_grad_match_reference_float64(device, B, C, HW):
    x = torch.randn(B, C, *HW, dtype=torch.float64, device=device)
    if device == "cuda":
        x = x.float()
    grad_out = torch.randn_like(x)
    out, grad = grads_of(ext_channel_attention, x, grad_out)
    truth, truth_grad = grads_of(reference.channel_attention, x.double(), grad_out.double())
    if x.dtype == torch.float64:
        torch.testing.assert_close(out, truth, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(grad, truth_grad, rtol=1e-8, atol=1e-8)
    else:
        ref, ref_grad = grads_of(reference.channel_attention, x, grad_out)
        assert_within_twice_pytorch(out, ref, truth, atol=1e-6)
        assert_within_twice_pytorch(grad, ref_grad, truth_grad, atol=1e-6 * truth_grad.abs().max().item())


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("C", [200, 259, 515])
def test_cpu_gram_blocking_for_any_thread_count(threads, C):
    # The CPU Gram matrix is split into paired block rows by the thread count (one
    # full GEMM below two blocks of 64 rows per thread); every split gives E exactly.
    x = torch.randn(2, C, 9, 7, dtype=torch.float64)
    grad_out = torch.randn_like(x)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out, grad = grads_of(ext_channel_attention, x, grad_out)
    finally:
        torch.set_num_threads(before)
    truth, truth_grad = grads_of(reference.channel_attention, x, grad_out)
    torch.testing.assert_close(out, truth, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grad, truth_grad, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("threads,C", [(17, 2200), (36, 4610)])
def test_cpu_gram_blocking_for_many_threads(threads, C):
    # Many threads (oversubscribed here): 34 block rows of 65 at 17 threads, and at 36
    # threads 72 block rows of 65 whose last one starts past C = 4610 and must be skipped.
    x = torch.randn(1, C, 5, 7, dtype=torch.float64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out = ext_channel_attention(x)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out, reference.channel_attention(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,C,HW", [(2, 64, (33, 31)), (1, 512, (64, 64)), (2, 3, (5, 7))])
def test_float32_within_twice_pytorch_error(device, B, C, HW):
    # Realistic post-ReLU features: non-negative, so E = X X^T is large and positive.
    x64 = torch.randn(B, C, *HW, dtype=torch.float64).relu().to(device) / 4
    grad_out64 = torch.randn_like(x64)
    truth, truth_grad = grads_of(reference.channel_attention, x64, grad_out64)
    x, grad_out = x64.float(), grad_out64.float()
    out, grad = grads_of(ext_channel_attention, x, grad_out)
    ref, ref_grad = grads_of(reference.channel_attention, x, grad_out)
    assert_within_twice_pytorch(out, ref, truth, atol=1e-6)
    assert_within_twice_pytorch(grad, ref_grad, truth_grad, atol=1e-6 * truth_grad.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,C,HW", [(2, 64, (17, 23)), (1, 3, (5, 7))])
def test_half_precision_within_twice_pytorch_error(device, dtype, B, C, HW):
    x = (torch.randn(B, C, *HW, device=device) / 8).to(dtype)
    grad_out = torch.randn_like(x)
    truth, truth_grad = grads_of(reference.channel_attention, x.double(), grad_out.double())
    out, grad = grads_of(ext_channel_attention, x, grad_out)
    ref, ref_grad = grads_of(reference.channel_attention, x, grad_out)
    assert out.dtype == dtype and grad.dtype == dtype
    assert_within_twice_pytorch(out, ref, truth)
    assert_within_twice_pytorch(grad, ref_grad, truth_grad)


@pytest.mark.parametrize("device", DEVICES)
def test_float16_realistic_size_stays_finite(device):
    # C = 512, N = 97 x 97 post-ReLU values: E reaches ~5000, beyond nothing in
    # float16 but close to its range; E and the softmax must stay in float32.
    x = torch.randn(1, 512, 97, 97, device=device).relu()
    out = ext_channel_attention(x.half())
    assert torch.isfinite(out).all()
    truth = reference.channel_attention(x.half().double())
    assert max_err(out, truth) < 2e-2 * truth.abs().max().item()


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    if device == "cuda":
        pytest.skip("the CUDA kernels take float32/float16/bfloat16; gradcheck needs float64")
    for shape in [(2, 3, 4, 5), (1, 1, 1, 1), (1, 5, 1, 3)]:
        x = torch.randn(*shape, dtype=torch.float64, device=device, requires_grad=True)
        assert torch.autograd.gradcheck(ext_channel_attention, (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_large_magnitude_inputs(device):
    # values ~ 100: E ~ 1e4 * N; a softmax without the min-shift overflows.
    x = torch.randn(2, 16, 6, 7, dtype=torch.float64, device=device) * 100
    truth, truth_grad = grads_of(reference.channel_attention, x, torch.ones_like(x))
    dtypes = (torch.float32, torch.float64) if device == "cpu" else (torch.float32,)
    for dtype in dtypes:
        out, grad = grads_of(ext_channel_attention, x.to(dtype), torch.ones_like(x).to(dtype))
        assert torch.isfinite(out).all() and torch.isfinite(grad).all()
        truth_r = reference.channel_attention(x.to(dtype).double())
        assert max_err(out, truth_r) < 1e-3 * truth_r.abs().max().item()
    if device == "cpu":
        torch.testing.assert_close(grads_of(ext_channel_attention, x, torch.ones_like(x))[1], truth_grad)


@pytest.mark.parametrize("device", DEVICES)
def test_saved_attention_rows_are_softmax_of_negated_energy(device):
    x = torch.randn(2, 6, 5, 4, device=device)
    out, attention = op.channel_attention_forward(x)
    X = x.flatten(2).double()
    E = X @ X.transpose(1, 2)
    assert attention.dtype == torch.float32 and attention.shape == (2, 6, 6)
    torch.testing.assert_close(attention.double(), torch.softmax(-E, -1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 6, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_channels_last_and_empty(device):
    x = torch.randn(2, 8, 9, 11, device=device)
    expected = reference.channel_attention(x)
    torch.testing.assert_close(danet_ext.channel_attention(x.to(memory_format=torch.channels_last)), expected,
                               rtol=1e-5, atol=1e-5)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)
    torch.testing.assert_close(danet_ext.channel_attention(xt), expected, rtol=1e-5, atol=1e-5)
    # gradients of strided inputs, with gradients of the output that are strided too, come
    # back equal to the reference's (a kernel writing NCHW order into NHWC strides would not)
    grad_out = torch.randn_like(x)
    _, expected_grad = grads_of(reference.channel_attention, x, grad_out)
    for strided in (x.to(memory_format=torch.channels_last), xt):
        for g in (grad_out.to(memory_format=torch.channels_last), grad_out.transpose(2, 3).contiguous().transpose(2, 3)):
            _, grad = grads_of(danet_ext.channel_attention, strided, g)
            torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5 * expected_grad.abs().max().item())
    assert danet_ext.channel_attention(torch.randn(0, 8, 3, 3, device=device)).shape == (0, 8, 3, 3)
    # one channel: the softmax over one entry is 1, so out == x
    x1 = torch.randn(2, 1, 3, 3, device=device)
    torch.testing.assert_close(danet_ext.channel_attention(x1), x1)


def test_validation_errors_name_the_argument():
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="`x` must be a 4-D"):
        danet_ext.channel_attention(x[0])
    with pytest.raises(TypeError, match="`x` must be a float32, float64, float16 or bfloat16"):
        danet_ext.channel_attention(x.long())
    with pytest.raises(TypeError, match="`x` must be a torch.Tensor"):
        danet_ext.channel_attention([1.0])
    with pytest.raises(RuntimeError, match="`x` must be a 4-D"):
        op.channel_attention_forward(x[0])
    out, attention = op.channel_attention_forward(x)
    with pytest.raises(RuntimeError, match="`attention` must have shape"):
        op.channel_attention_backward(out, x, attention[:, :2])
    with pytest.raises(RuntimeError, match="`grad_out` must have the shape of `x`"):
        op.channel_attention_backward(out[:1], x, attention)


def test_opcheck():
    for shape in [(2, 5, 4, 3), (1, 1, 1, 1)]:
        x = torch.randn(*shape, requires_grad=True)
        torch.library.opcheck(op.channel_attention_forward.default, (x,))
        out, attention = op.channel_attention_forward(x)
        torch.library.opcheck(op.channel_attention_backward.default, (torch.randn_like(out), x.detach(), attention))


def test_torch_compile_fullgraph_inductor():
    x = torch.randn(2, 8, 5, 6, requires_grad=True)

    def f(x):
        return danet_ext.channel_attention(x).square().sum()

    loss = torch.compile(f, fullgraph=True)(x)
    loss.backward()
    x_ref = x.detach().clone().requires_grad_(True)
    expected = reference.channel_attention(x_ref).square().sum()
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast(device):
    x = torch.randn(2, 8, 5, 6, device=device)
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    with torch.autocast(device_type=device, dtype=dtype):
        out = danet_ext.channel_attention(x, backend="extension")  # the kernel, whatever auto picks
    assert out.dtype == dtype
    assert max_err(out, reference.channel_attention(x.to(dtype).double())) < 5e-2


# bfloat16 on the CPU: on CPUs with bfloat16 hardware, the Gram matrices as float32 sums of exact
# products (AVX512-BF16 kernel, csrc/cpu/bf16_gram.h) or of bfloat16 slices, the other products in
# bfloat16; float32 elsewhere (csrc/cpu/reduced_precision_gemm.h). All run here, forced by the switches.
CPU_BF16_PATHS = {
    "bfloat16-products-avx512bf16-gram": {"DANET_EXT_CPU_BF16_GEMM": "1", "DANET_EXT_CPU_BF16_SCORES": "1"},
    "bfloat16-products-sliced-gram": {"DANET_EXT_CPU_BF16_GEMM": "1", "DANET_EXT_CPU_BF16_SCORES": "0"},
    "float32-products": {"DANET_EXT_CPU_BF16_GEMM": "0"},
}


def set_cpu_bf16_path(monkeypatch, path):
    if "avx512bf16" in path and not (danet_ext.hardware.has_avx512_bf16()
                                     and danet_ext.build_info().get("cpu_bf16_score_kernel")):
        pytest.skip("this CPU or build has no AVX512-BF16 kernel")
    for name, value in CPU_BF16_PATHS[path].items():
        monkeypatch.setenv(name, value)


CPU_BF16_CASES = [(2, 16, (9, 13), False), (1, 64, (48, 48), True), (1, 512, (32, 32), True),
                  (3, 5, (1, 1), False), (1, 77, (13, 11), True), (2, 130, (7, 9), True),
                  (1, 40, (37, 41), False), (1, 24, (67, 65), True), (2, 20, (64, 66), False)]


@pytest.mark.parametrize("path", CPU_BF16_PATHS)
@pytest.mark.parametrize("B,C,HW,relu", CPU_BF16_CASES)
def test_cpu_bfloat16_paths_within_twice_pytorch_error(monkeypatch, path, B, C, HW, relu):
    # post-ReLU features, as in DANet, give Gram entries in the hundreds to thousands;
    # (48, 48): 2304 positions, more than one slice of the bfloat16 Gram product and many
    # depth chunks of the AVX512-BF16 one; C = 77 and 130: partial panels and blocks; odd N.
    # With those entries a rounding of E by a few units moves the softmax's winner, so
    # PyTorch's own bfloat16 error is as large as the output and this bound says little for
    # the ReLU cases: the test below checks every stage of them against its own bound.
    # (37, 41): 1517 positions of small values, where PyTorch's error is small and the bound
    # here is tight, across two slices. (67, 65) and (64, 66): over 4096 positions, so the
    # AVX512-BF16 Gram packs its operands in two ranges of pairs (odd N: both packed; even N:
    # the first operand read in place at an offset).
    set_cpu_bf16_path(monkeypatch, path)
    x = torch.randn(B, C, *HW, dtype=torch.float64)
    x = (x.relu() if relu else x * 0.3).bfloat16()
    grad_out = torch.randn(B, C, *HW).bfloat16()
    truth, truth_grad = grads_of(reference.channel_attention, x.double(), grad_out.double())
    out, grad = grads_of(lambda t: danet_ext.channel_attention(t, backend="extension"), x, grad_out)
    ref, ref_grad = grads_of(reference.channel_attention, x, grad_out)
    assert out.dtype == torch.bfloat16 and grad.dtype == torch.bfloat16
    assert_within_twice_pytorch(out, ref, truth)
    assert_within_twice_pytorch(grad, ref_grad, truth_grad)
    _, attention = op.channel_attention_forward(x)
    assert attention.dtype == torch.float32
    torch.testing.assert_close(attention.sum(-1), torch.ones(B, C), rtol=1e-5, atol=1e-5)


# bfloat16's unit roundoff (8 significant bits): one rounding moves a value by at most this fraction
BF16_U = 2.0 ** -8


@pytest.mark.parametrize("path", CPU_BF16_PATHS)
@pytest.mark.parametrize("B,C,HW,relu", CPU_BF16_CASES)
def test_cpu_bfloat16_every_stage_within_its_rounding_bound(monkeypatch, path, B, C, HW, relu):
    """Each stage of the bfloat16 CPU paths against float64 arithmetic on the same inputs,
    within twice the worst case of the roundings that stage does, element by element:
    - the saved attention: softmax(-E) of the exact Gram matrix, E off by at most
      u (|X| |X|^T) where the Gram is summed from bfloat16 slices, N 2^-24 (|X| |X|^T)
      where it is summed in float32 (a change dE moves log A by at most 2 max|dE| a row);
    - out = A X from the kernel's own saved A: A rounded to bfloat16, the output rounded;
    - dX = A^T dO + (dE + dE^T) X from the kernel's A: dA = dO X^T off as E, the
      roundings of A, of dE + dE^T, of both products and of the sum.
    These hold for ill-conditioned post-ReLU inputs too, where the comparison with
    PyTorch's own error above cannot tell a wrong answer (an output 5 % small fails here)."""
    set_cpu_bf16_path(monkeypatch, path)
    u = BF16_U
    x = torch.randn(B, C, *HW, dtype=torch.float64)
    x = (x.relu() if relu else x * 0.3).bfloat16()
    grad_out = torch.randn(B, C, *HW).bfloat16()
    out, attention = op.channel_attention_forward(x)
    grad = op.channel_attention_backward(grad_out, x, attention)
    X, dO, A = x.double().flatten(2), grad_out.double().flatten(2), attention.double()
    n = X.shape[-1]
    aX, adO, aA = X.abs(), dO.abs(), A.abs()
    t = lambda m: m.transpose(1, 2)  # noqa: E731

    gram_u = u if path == "bfloat16-products-sliced-gram" else n * 2.0 ** -24
    E = X @ t(X)
    log_bound = 2 * 2 * (gram_u * (aX @ t(aX))).amax(-1, keepdim=True)
    expected_a = torch.softmax(-E, -1)
    tiny = expected_a > 1e-30
    log_err = (A[tiny].log() - expected_a[tiny].log()).abs()
    assert (log_err <= log_bound.expand_as(A)[tiny] + 1e-5).all(), log_err.max()

    expected = A @ X
    bound = u * (aA @ aX + expected.abs())
    err = (out.double().flatten(2) - expected).abs()
    assert (err <= 2 * bound).all(), (err / bound).max()

    dA = dO @ t(X)
    dE = -A * (dA - (dA * A).sum(-1, keepdim=True))
    S = dE + t(dE)
    expected_grad = t(A) @ dO + S @ X
    dA_bound = gram_u * (adO @ t(aX))
    dE_bound = aA * (dA_bound + (dA_bound * aA).sum(-1, keepdim=True))
    S_bound = dE_bound + t(dE_bound) + u * S.abs()
    grad_bound = (u * (t(aA) @ adO + (t(A) @ dO).abs() + (S @ X).abs() + expected_grad.abs())
                  + S_bound @ aX)
    grad_err = (grad.double().flatten(2) - expected_grad).abs()
    assert (grad_err <= 2 * grad_bound).all(), (grad_err / grad_bound).max()


@pytest.mark.skipif(not danet_ext.hardware.has_avx512_bf16() or
                    not danet_ext.build_info().get("cpu_bf16_score_kernel"),
                    reason="this CPU or build has no AVX512-BF16 kernel")
@pytest.mark.parametrize("B,C,HW", [(1, 512, (32, 32)), (2, 77, (13, 11)), (1, 130, (1, 1)), (1, 16, (65, 65))])
def test_cpu_avx512bf16_gram_is_float32_sums_of_exact_products(monkeypatch, B, C, HW):
    """The saved attention comes from E = X X^T summed in float32 from exact bfloat16 products:
    its rows match the softmax of the float64 Gram matrix within the float32 summation bound
    (N products per entry), and the switch really changes the path."""
    monkeypatch.setenv("DANET_EXT_CPU_BF16_GEMM", "1")
    x = torch.randn(B, C, *HW).relu().bfloat16()
    xd = x.double().flatten(2)
    gram = xd @ xd.transpose(1, 2)
    n = xd.shape[-1]
    # attention = softmax(-E): a change dE in E moves log A by at most 2 max|dE|
    expected = torch.softmax(-gram, -1)
    found, kinds = {}, {}
    for flag in ("1", "0"):
        monkeypatch.setenv("DANET_EXT_CPU_BF16_SCORES", flag)
        found[flag] = op.channel_attention_forward(x)[1]
        kinds[flag] = danet_ext.build_info()["cpu_bfloat16"]["channel_attention Gram"]
    bound = 2 * (n * 1.2e-7 * gram.abs().amax(-1, keepdim=True))  # per row
    a = found["1"].double()
    tiny = expected > 1e-30
    log_err = (a[tiny].log() - expected[tiny].log()).abs()
    assert (log_err <= (bound.expand_as(a)[tiny] + 1e-5)).all(), log_err.max()
    assert "AVX512-BF16" in kinds["1"] and "slices" in kinds["0"]
    if C == 512:  # the sliced bfloat16 path rounds each slice: the two differ
        assert not torch.equal(found["1"], found["0"])


@pytest.mark.parametrize("backend", ["reference", "extension", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_inputs_on_every_backend(backend, dtype):
    # an empty batch, no channels, no positions: empty outputs and gradients, on every backend
    # ("auto" takes the reference for bfloat16 on CPUs with bfloat16 hardware)
    for shape in [(0, 4, 3, 3), (2, 0, 3, 3), (2, 4, 0, 3)]:
        x = torch.randn(shape, dtype=dtype, requires_grad=True)
        out = danet_ext.channel_attention(x, backend=backend)
        out.sum().backward()
        assert out.shape == shape and x.grad.shape == shape
    for q_shape, v_shape in [((0, 2, 3, 3), (0, 4, 3, 3)), ((2, 2, 0, 3), (2, 4, 0, 3)), ((2, 2, 3, 3), (2, 0, 3, 3))]:
        q, k = torch.randn(q_shape, dtype=dtype), torch.randn(q_shape, dtype=dtype)
        v = torch.randn(v_shape, dtype=dtype, requires_grad=True)
        out = danet_ext.position_attention(q, k, v, backend=backend)
        out.sum().backward()
        assert out.shape == v_shape and v.grad.shape == v_shape
