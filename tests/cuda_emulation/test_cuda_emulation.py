"""The CUDA kernels, run on the CPU by the CUDA emulation (cuda_emulation.h),
against the pure-PyTorch reference with the CUDA tests' tolerances; the
emulation's self-tests (broken kernels must be reported); mutated kernels
(barriers removed, a 16-bit or TF32 fragment layout broken, block reductions of
the CAM row kernels skipped) must fail; the tensor-core kernels' host decisions
(query-range splits, V staging, shared memory per device); the
AddressSanitizer and ThreadSanitizer builds on a smaller grid.

Run with `make test-cuda-emulated` (collected only when DANET_EXT_CUDA_EMULATION=1).
"""
import os
import subprocess
import sys

import pytest
import torch

from danet_ext import reference
from conftest import (assert_large_logit_grads_close, assert_other_queries_dq_right,
                      assert_within_twice_pytorch, max_err, relative_errors)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import build  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="session")
def emu():
    return build.load()


def make_inputs(B, Cq, C, H, W, dtype, scale=1.0):
    q = (torch.randn(B, Cq, H, W, dtype=torch.float64) * scale).to(dtype)
    k = (torch.randn(B, Cq, H, W, dtype=torch.float64) * scale).to(dtype)
    v = torch.randn(B, C, H, W, dtype=torch.float64).to(dtype)
    return q, k, v


def reference_grads(fn, inputs, grad_out):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in inputs]


def assert_stats_of_scores(stats, q, k, max_tol, inv_sum_tol):
    scores = torch.einsum("bci,bcj->bij", q.flatten(2).double(), k.flatten(2).double())
    row_max = scores.amax(-1)
    torch.testing.assert_close(stats[:, 0].double(), row_max, rtol=max_tol[0], atol=max_tol[1])
    torch.testing.assert_close(stats[:, 1].double(), 1 / torch.exp(scores - row_max[..., None]).sum(-1),
                               rtol=inv_sum_tol[0], atol=inv_sum_tol[1])


def check_pam(emu, B, Cq, C, H, W, dtype, scale=1.0):
    """Forward, saved statistics and all gradients of the CUDA-core kernels, with the
    CUDA tests' tolerances: error against float64 at most twice PyTorch's own in `dtype`."""
    q, k, v = make_inputs(B, Cq, C, H, W, dtype, scale)
    grad_out = torch.randn(B, C, H, W).to(dtype)
    truth, truth_grads = reference_grads(reference.position_attention, [t.double() for t in (q, k, v)],
                                         grad_out.double())
    same, same_grads = reference_grads(reference.position_attention, [q, k, v], grad_out)
    out, stats = emu.pam_forward(q, k, v)
    grads = emu.pam_backward(grad_out, q, k, v, out, stats)
    assert out.dtype == dtype and torch.isfinite(out).all()
    atol = 1e-6 if dtype == torch.float32 else 0.0
    assert_within_twice_pytorch(out, same, truth, atol=atol)
    for name, g, sg, tg in zip("qkv", grads, same_grads, truth_grads):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        assert_within_twice_pytorch(g, sg, tg, atol=atol * max(1.0, tg.abs().max().item()))
    assert_stats_of_scores(stats, q, k, max_tol=(1e-5, 1e-4), inv_sum_tol=(1e-4, 1e-6))


# (B, Cq, C, (H, W)): N = 1, B > 1, odd N (partial query and key tiles), Cq off the
# 16-channel staging step, C off the 128/64-channel blocks.
PAM_SHAPES = [(1, 1, 1, (1, 1)), (3, 8, 5, (7, 9)), (2, 33, 130, (9, 11)), (1, 64, 64, (8, 9))]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,Cq,C,HW", PAM_SHAPES)
def test_position_attention(emu, dtype, B, Cq, C, HW):
    check_pam(emu, B, Cq, C, *HW, dtype)


@pytest.mark.parametrize("B,Cq,C,HW", [(1, 256, 16, (5, 7)), (1, 16, 2048, (3, 5)), (2, 3, 200, (11, 13))])
def test_position_attention_large_channel_counts(emu, B, Cq, C, HW):
    check_pam(emu, B, Cq, C, *HW, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_position_attention_large_logits(emu, dtype):
    q, k, v = make_inputs(2, 16, 32, 9, 13, torch.float64, scale=12.0)
    assert torch.einsum("bci,bcj->bij", q.flatten(2), k.flatten(2)).abs().max() > 1000
    q, k, v = (t.to(dtype) for t in (q, k, v))
    out, stats = emu.pam_forward(q, k, v)
    truth = reference.position_attention(*(t.double() for t in (q, k, v)))
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    assert torch.isfinite(out).all() and max_err(out, truth) < tol
    grad_out = torch.randn_like(v)
    assert_large_logit_grads_close(emu.pam_backward(grad_out, q, k, v, out, stats), q, k, v, out, grad_out)


@pytest.mark.parametrize("hw", [(5, 6), (9, 11)])  # one key tile; several (32-key tiles)
def test_position_attention_stays_finite_where_the_reference_is(emu, hw):
    # values near the float32 maximum: an accumulator of unnormalised weights overflows
    q, k, v = make_inputs(1, 4, 3, *hw, torch.float32)
    big = torch.finfo(torch.float32).max / 8
    v = (v.abs() + 1) * (big / 4)
    expected = reference.position_attention(q, k, v)
    assert torch.isfinite(expected).all()
    out, _ = emu.pam_forward(q, k, v)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out / big, expected / big, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tensor_cores", [False, True], ids=["cuda_cores", "tensor_cores"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_position_attention_keys_at_minus_infinity(emu, dtype, tensor_cores):
    """Scores of -inf over the leading key tiles (32 keys on the CUDA cores, 64 on the
    tensor cores) leave the softmax over the other keys, as in the reference, not NaN
    (the tile's 1 / sum was inf, and 0 * inf spoilt the row); a query whose scores are
    all -inf gives NaN, as the reference's softmax does."""
    N = 100
    # score(i, j) = q0_i k0_j + q1_i k1_j with q0 = 1, q1 = 0: k0_j, -inf for the first 70 keys;
    # query 7 has q1 = -inf against k1 > 0: -inf for every key
    q = torch.stack([torch.ones(N), torch.zeros(N)]).view(1, 2, 10, 10)
    q.view(2, N)[1, 7] = float("-inf")
    k = torch.rand(1, 2, 10, 10, generator=torch.Generator().manual_seed(0)) + 0.5
    k.view(2, N)[0, :70] = float("-inf")
    v = torch.randn(1, 3, 10, 10, generator=torch.Generator().manual_seed(1))
    q, k, v = (t.to(dtype) for t in (q, k, v))
    expected = reference.position_attention(q.double(), k.double(), v.double())
    out, _ = emu.pam_forward(q, k, v, tensor_cores=tensor_cores)
    assert torch.equal(out.isnan(), expected.isnan())
    finite = ~expected.isnan()
    tol = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(out.double()[finite], expected[finite], rtol=tol, atol=tol)


# The tensor-core kernels (mma.sync / ldmatrix), forward and backward: odd N
# (partial query and key tiles, element-wise staging), N % 8 == 0 (16-byte
# staging), Cq off the 16-channel step, C off the 128-channel block and past
# several 64-channel chunks of the backward (C = 520), N = 1,
# N past one 64-key tile, logits in the thousands. Cq > 64 takes the
# tensor-core forward and the CUDA-core backward, as on the device.
TENSOR_CORE_CASES = [(2, 8, 64, (7, 9), 0.5), (1, 64, 128, (9, 15), 0.5), (1, 1, 5, (7, 9), 0.5),
                     (3, 33, 130, (9, 11), 0.5), (1, 100, 300, (5, 13), 0.3), (2, 8, 16, (1, 1), 1.0),
                     (1, 16, 32, (9, 13), 12.0), (2, 16, 40, (8, 8), 0.5), (1, 64, 136, (8, 17), 0.5),
                     (1, 48, 24, (12, 12), 0.5), (1, 64, 520, (5, 13), 0.5)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("B,Cq,C,HW,scale", TENSOR_CORE_CASES)
def test_tensor_core_kernels(emu, dtype, B, Cq, C, HW, scale):
    """float16/bfloat16 on mma.sync m16n8k16; float32 on TF32 (m16n8k8, the path
    taken where torch.backends.cuda.matmul.allow_tf32 allows it)."""
    q, k, v = make_inputs(B, Cq, C, *HW, dtype, scale)
    truth = reference.position_attention(*(t.double() for t in (q, k, v)))
    out, stats = emu.pam_forward(q, k, v, tensor_cores=True)
    assert out.dtype == dtype and torch.isfinite(out).all()
    backward_on_tensor_cores = Cq <= 64
    grad_out = torch.randn_like(v)
    grads = emu.pam_backward(grad_out, q, k, v, out, stats, tensor_cores=backward_on_tensor_cores)
    assert all(g.dtype == dtype and torch.isfinite(g).all() for g in grads)
    if dtype == torch.float32:
        # TF32 keeps 10 mantissa bits: the yardstick is the official code with its
        # products on TF32 operands, forward and backward (cuBLAS under allow_tf32)
        same, same_grads = reference_grads(reference_tf32, [q, k, v], grad_out)
        assert_within_twice_pytorch(out, same, truth, atol=1e-6)
        if scale > 1.0:
            return
        _, truth_grads = reference_grads(reference.position_attention, [t.double() for t in (q, k, v)],
                                         grad_out.double())
        for g, sg, tg in zip(grads, same_grads, truth_grads):
            assert_within_twice_pytorch(g, sg, tg, atol=1e-6 * max(1.0, tg.abs().max().item()))
        return
    if scale > 1.0:
        tol = {torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
        assert max_err(out, truth) < tol
        return
    ulps = 4 * torch.finfo(dtype).eps
    same = reference.position_attention(q, k, v)
    assert_within_twice_pytorch(out, same, truth, atol=ulps * truth.abs().max().item())
    assert_stats_of_scores(stats, q, k, max_tol=(1e-5, 1e-4), inv_sum_tol=(1e-4, 1e-6))
    _, truth_grads = reference_grads(reference.position_attention, [t.double() for t in (q, k, v)],
                                     grad_out.double())
    _, same_grads = reference_grads(reference.position_attention, [q, k, v], grad_out)
    for name, g, sg, tg in zip("qkv", grads, same_grads, truth_grads):
        assert_within_twice_pytorch(g, sg, tg, atol=ulps * max(1.0, tg.abs().max().item()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_tensor_core_backward_stages_v_either_way(emu, dtype):
    """grad_qk_kernel_tc keeps V's tile resident or stages it in 64-channel chunks
    (C = 150: three chunks, the last partial): the gradients agree to rounding."""
    q, k, v = make_inputs(1, 24, 150, 9, 10, dtype, 0.5)
    out, stats = emu.pam_forward(q, k, v, tensor_cores=True)
    grad_out = torch.randn_like(v)
    resident = emu.pam_backward(grad_out, q, k, v, out, stats, tensor_cores=True, v_resident=1)
    chunked = emu.pam_backward(grad_out, q, k, v, out, stats, tensor_cores=True, v_resident=0)
    for a, b in zip(resident, chunked):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same products in the same order
    # which devices keep V resident: two blocks an SM (H100 at C = 512; not an A100, not past C = 512)
    assert emu.grad_qk_v_resident(64, 512, 232448, 233472)
    assert not emu.grad_qk_v_resident(64, 1024, 232448, 233472)
    assert not emu.grad_qk_v_resident(64, 512, 166912, 167936)


def test_tensor_core_backward_any_query_split_gives_the_same_gradients(emu):
    """grad_qk_kernel_tc's query-range splits (10 query tiles split in 3, 4 and 5:
    ranges of 4, 3 and 2 tiles, the last one short in the first two) change only
    the order of dK's and dQ's float32 sums; dV does not depend on them."""
    q, k, v = make_inputs(2, 16, 24, 20, 32, torch.float32, 0.5)
    out, stats = emu.pam_forward(q, k, v, tensor_cores=True)
    grad_out = torch.randn_like(v)
    whole = emu.pam_backward(grad_out, q, k, v, out, stats, tensor_cores=True, splits=1)
    for splits in [3, 4, 5]:
        split = emu.pam_backward(grad_out, q, k, v, out, stats, tensor_cores=True, splits=splits)
        for name, a, b in zip("qkv", split, whole):
            torch.testing.assert_close(a, b, rtol=0, atol=2e-6 * b.abs().max().item(), msg=f"d{name}, {splits}")
        torch.testing.assert_close(split[2], whole[2], rtol=0, atol=0)


def tf32(t):
    """float32 rounded to TF32 as cvt.rna.tf32.f32 does (10 mantissa bits, ties away from zero)."""
    bits = t.float().contiguous().view(torch.int32)
    finite = (bits & 0x7F800000) != 0x7F800000
    rounded = torch.where(finite, (bits + 0x1000) & ~0x1FFF, bits)
    return rounded.view(torch.float32)


class _Tf32Bmm(torch.autograd.Function):
    """bmm on TF32 operands (float64 sums, float32 result), its gradients likewise:
    what cuBLAS computes for float32 under allow_tf32."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return torch.bmm(tf32(a).double(), tf32(b).double()).float()

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        g64 = tf32(g).double()
        return (torch.bmm(g64, tf32(b).double().transpose(1, 2)).float(),
                torch.bmm(tf32(a).double().transpose(1, 2), g64).float())


def reference_tf32(q, k, v):
    """The official maths (reference.position_attention) with both bmms on TF32."""
    B, C, H, W = v.shape
    energy = _Tf32Bmm.apply(q.flatten(2).transpose(1, 2), k.flatten(2))
    return _Tf32Bmm.apply(v.flatten(2), torch.softmax(energy, -1).transpose(1, 2)).view(B, C, H, W)


def test_tensor_core_backward_matches_the_cuda_core_backward(emu):
    """Both backwards from the same saved statistics: the tensor-core one differs
    only by rounding P and dS to the input dtype before their products."""
    q, k, v = make_inputs(1, 32, 72, 9, 10, torch.bfloat16, 0.5)
    out, stats = emu.pam_forward(q, k, v, tensor_cores=True)
    grad_out = torch.randn_like(v)
    tc = emu.pam_backward(grad_out, q, k, v, out, stats, tensor_cores=True)
    cc = emu.pam_backward(grad_out, q, k, v, out, stats)
    for a, b in zip(tc, cc):
        assert max_err(a, b.double()) <= 3e-2 * b.abs().max().item()


def test_tensor_core_backward_fills_the_gpu(emu):
    """grad_qk_kernel_tc splits the query range where one block per key tile would
    leave SMs idle: about two blocks per SM on an H100 (132 SMs) at B = 1, N = 4096,
    (at most one wave at its occupancy), no split when the images already fill it;
    the test grid above runs split and unsplit launches (N = 99 with B = 2 splits in two)."""
    assert 132 <= 64 * emu.grad_qk_splits(1, 4096, 132) <= 2 * 132
    assert emu.grad_qk_splits(8, 32768, 132) == 1
    assert emu.grad_qk_splits(16, 16384, 132) == 1
    assert emu.grad_qk_splits(1, 1, 132) == 1
    assert emu.grad_qk_splits(1, 0, 132) == 1
    assert emu.grad_qk_splits(2, 99, 132) == 2


def test_tensor_core_backward_split_avoids_a_part_filled_last_wave(emu):
    """At N = 9216 (96 x 96, a 768 x 768 crop at output stride 8) one block per key
    tile is 144 blocks, 0.55 of a wave of 264 on an H100: the split fills the
    rounds it runs in to at least 90 %; at B = 8 (1152 blocks, 4.4 waves) it still
    splits, where the idle part of the last round is worth it. Every split is
    non-empty, at most 16, and never predicted slower than one split."""
    def steps(B, tiles, s, sms):
        per = -(-tiles // s)
        return -(-tiles * B * s // (2 * sms)) * (per + 1)

    for B, N, sms in [(1, 9216, 132), (2, 9216, 132), (1, 6400, 108)]:
        s = emu.grad_qk_splits(B, N, sms)
        tiles = -(-N // 64)
        blocks = tiles * B * s
        assert s > 1 and blocks >= 0.9 * -(-blocks // (2 * sms)) * 2 * sms, (B, N, sms, s)
    assert emu.grad_qk_splits(8, 9216, 132) > 1
    for B in [1, 2, 3, 8, 32]:
        for N in [64, 65, 1000, 4096, 9216, 12321, 20000, 65536]:
            for sms in [46, 108, 132]:
                s = emu.grad_qk_splits(B, N, sms)
                tiles = -(-N // 64)
                assert 1 <= s <= min(16, tiles) and (s - 1) * -(-tiles // s) < tiles, (B, N, sms, s)
                assert steps(B, tiles, s, sms) <= steps(B, tiles, 1, sms)


def test_the_gpu_model_uses_the_kernels_split_rule(emu):
    """benchmarks/gpu_perf_model.py mirrors grad_qk_tc_splits; its predictions hold
    only while the two agree."""
    sys.path.insert(0, os.path.join(HERE, "..", "..", "benchmarks"))
    import gpu_perf_model
    for B in [1, 2, 4, 8, 16]:
        for N in [1, 100, 1024, 2304, 4096, 6400, 9216, 12288, 16384, 32768]:
            for sms in [108, 132]:
                assert emu.grad_qk_splits(B, N, sms) == gpu_perf_model.grad_qk_splits(B, N, sms), (B, N, sms)


# The opt-in shared memory per block of compute capability 8.6/8.9, 8.0 and 9.0.
SHARED_PER_BLOCK = {"sm_86": 101376, "sm_80": 166912, "sm_90": 232448}


@pytest.mark.parametrize("arch", SHARED_PER_BLOCK)
def test_tensor_core_kernels_fit_every_device(emu, arch):
    """DANet's shapes (Cq = 64, any C) take the tensor cores on every device of
    compute capability 8.0+; a forward whose Q and K tiles outgrow the device's
    shared memory is sent to the CUDA cores instead of failing to launch."""
    limit = SHARED_PER_BLOCK[arch]
    assert emu.tensor_core_forward_fits(64, 48 * 1024) and emu.tensor_core_backward_fits(64, 48 * 1024)
    assert emu.tensor_core_forward_fits(256, limit)  # 90 KiB
    assert emu.tensor_core_forward_fits(320, limit) == (arch != "sm_86")  # 108 KiB
    assert emu.tensor_core_forward_fits(512, limit) == (arch != "sm_86")  # 162 KiB
    assert not emu.tensor_core_backward_fits(65, limit) and not emu.tensor_core_forward_fits(513, limit)
    # TF32 tiles hold 4-byte elements: DANet's shapes still fit every device
    assert emu.tensor_core_forward_fits(64, limit, tf32=True) and emu.tensor_core_backward_fits(64, limit, tf32=True)
    assert emu.tensor_core_forward_fits(128, limit, tf32=True) == (arch != "sm_86")  # 102 KiB


def test_tensor_core_limits_are_errors(emu):
    q, k, v = make_inputs(1, 65, 16, 3, 3, torch.float16)
    out, stats = emu.pam_forward(q, k, v, tensor_cores=True)  # the forward takes Cq up to 512
    with pytest.raises(RuntimeError, match="Cq <= 64"):
        emu.pam_backward(torch.randn_like(v), q, k, v, out, stats, tensor_cores=True)
    with pytest.raises(RuntimeError, match="float16/bfloat16/float32"):
        emu.pam_forward(q.double(), k.double(), v.double(), tensor_cores=True)


def check_cam(emu, B, C, H, W, dtype, scale=1.0):
    x = (torch.randn(B, C, H, W, dtype=torch.float64) * scale).to(dtype)
    grad_out = torch.randn(B, C, H, W).to(dtype)
    truth, (truth_grad,) = reference_grads(reference.channel_attention, [x.double()], grad_out.double())
    same, (same_grad,) = reference_grads(reference.channel_attention, [x], grad_out)
    out, attn = emu.cam_forward(x)
    grad = emu.cam_backward(grad_out, x, attn)
    assert out.dtype == dtype and grad.dtype == dtype
    atol = 1e-6 if dtype == torch.float32 else 0.0
    assert_within_twice_pytorch(out, same, truth, atol=atol)
    assert_within_twice_pytorch(grad, same_grad, truth_grad, atol=atol * truth_grad.abs().max().item())
    E = torch.einsum("bcn,bdn->bcd", x.flatten(2).double(), x.flatten(2).double())
    torch.testing.assert_close(attn.double(), torch.softmax(-E, -1), rtol=1e-4, atol=1e-5)


# (1, 33, (17, 19)) at scale 1: Gram entries near 323, where PyTorch's own half-precision
# error is most of the output's size; at scale 0.1 the same shape is well conditioned and
# the bound is tight.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,C,HW,scale", [(1, 1, (1, 1), 1.0), (3, 5, (7, 9), 1.0), (2, 70, (5, 7), 1.0),
                                          (1, 33, (17, 19), 1.0), (1, 33, (17, 19), 0.1)])
def test_channel_attention(emu, dtype, B, C, HW, scale):
    check_cam(emu, B, C, *HW, dtype, scale=scale)


def test_channel_attention_more_channels_and_large_values(emu):
    check_cam(emu, 1, 300, 2, 3, torch.float32)
    x = torch.relu(torch.randn(1, 40, 9, 11) * 30)  # E in the hundred-thousands
    out, _ = emu.cam_forward(x)
    truth = reference.channel_attention(x.double())
    assert torch.isfinite(out).all()
    assert max_err(out, truth) <= 1e-4 * truth.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_channel_attention_keeps_gram_matrix_in_float32(emu, dtype):
    # post-ReLU features: E in the hundreds to thousands, where float16 steps by 0.5
    # and bfloat16 by 4; softmax(-E) turns such steps into relative errors of that size
    torch.manual_seed(0)
    x = (torch.relu(torch.randn(1, 64, 10, 20, dtype=torch.float64)) * 4).to(dtype)
    E = torch.einsum("bcn,bdn->bcd", x.flatten(2).double(), x.flatten(2).double())
    assert E.max() > 1000
    truth = torch.softmax(-E, -1)
    _, attn = emu.cam_forward(x)
    assert attn.dtype == torch.float32
    torch.testing.assert_close(attn.double(), truth, rtol=1e-4, atol=1e-7)
    # the tolerance tells them apart: E rounded to the input dtype fails it
    rounded = torch.softmax(-E.to(dtype).double(), -1)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(rounded, truth, rtol=1e-4, atol=1e-7)


def test_channel_attention_ignores_autocast(emu):
    # the op fixes its own precision; CPU autocast would run at::bmm in bfloat16
    x, grad_out = torch.randn(2, 12, 5, 7), torch.randn(2, 12, 5, 7)
    out, attn = emu.cam_forward(x)
    grad = emu.cam_backward(grad_out, x, attn)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ac, attn_ac = emu.cam_forward(x)
        grad_ac = emu.cam_backward(grad_out, x, attn_ac)
    for ours, plain in [(out_ac, out), (attn_ac, attn), (grad_ac, grad)]:
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, plain, rtol=1e-6, atol=1e-7)


def test_launch_geometry_limits(emu):
    q = torch.randn(65536, 1, 1, 1)
    with pytest.raises(RuntimeError, match="grid.z"):
        emu.pam_forward(q, q, q)


def test_float16_bfloat16_round_to_nearest_even():
    """The emulation's __half/__nv_bfloat16 are c10::Half/BFloat16, whose float
    conversions (the ones torch's .to() uses) round to nearest even like
    __float2half_rn / __float2bfloat16_rn on the device."""
    import numpy as np

    bits = np.random.default_rng(0).integers(0, 2**32, 200000, dtype=np.uint64).astype(np.uint32)
    # ties: for half, the dropped 13 bits are exactly half an ulp; for bfloat16, 16 bits
    ties = np.concatenate([(bits & ~np.uint32(0x1FFF)) | np.uint32(0x1000), (bits & ~np.uint32(0xFFFF)) | np.uint32(0x8000)])
    f = np.concatenate([bits, ties]).view(np.float32)
    f = f[np.isfinite(f)]
    half = torch.from_numpy(f).half().numpy()
    with np.errstate(over="ignore"):  # overflow to inf, in both
        np.testing.assert_array_equal(half.view(np.uint16), f.astype(np.float16).view(np.uint16))
    u = f.view(np.uint32).astype(np.uint64)
    rne = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    ours = torch.from_numpy(f).bfloat16().view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, rne)


# ---- self-tests: broken kernels must be reported ----------------------------

def test_selftest_correct_twins_pass(emu):
    x = torch.randn(64 * 256)
    torch.testing.assert_close(emu.selftest("barrier", x, x), x.view(64, 256).flip(1).flatten())
    x = torch.randn(32)
    torch.testing.assert_close(emu.selftest("shuffle_full_mask", x, x)[:32], x.sum().expand(32),
                               rtol=1e-5, atol=1e-5)
    a, b = torch.randn(16, 16), torch.randn(16, 16)
    truth = a.half().float() @ b.half().float()
    torch.testing.assert_close(emu.selftest("wmma_store", a, b).view(16, 16), truth, rtol=1e-5, atol=1e-5)


def test_selftest_missing_barrier_reads_poison(emu):
    x = torch.randn(64 * 256)
    out = emu.selftest("missing_barrier", x, x)
    assert torch.isnan(out).any() or not torch.equal(out, x.view(64, 256).flip(1).flatten())


@pytest.mark.parametrize("name,message", [
    ("divergent_barrier", r"left the kernel while \d+ thread\(s\) wait at __syncthreads|after thread \d+ left"),
    ("two_barriers", r"divergent __syncthreads"),
    ("shuffle_wrong_mask", r"__shfl_xor_sync with mask 0x0000ffff that leaves out the calling lane"),
    ("wmma_misaligned", r"not 256-bit \(32-byte\) aligned"),
    ("big_shared", r"exceed the limit of 49152 bytes"),
    ("too_many_threads", r"block of 2048 threads"),
    ("grid_y_too_large", r"grid \(1, 65536, 1\) out of range"),
])
def test_selftest_reported_as_error(emu, name, message):
    with pytest.raises(RuntimeError, match=message) as info:
        emu.selftest(name, torch.randn(256), torch.randn(256))
    if "barrier" in name:
        assert "kernel " in str(info.value)  # names the kernel


def test_selftest_deadlock_times_out_instead_of_hanging(emu):
    emu.set_timeout(1.0)
    try:
        with pytest.raises(RuntimeError, match=r"shuffle_barrier_deadlock_kernel.*timeout"):
            emu.selftest("deadlock", torch.randn(256), torch.randn(256))
    finally:
        emu.set_timeout(0.0)  # back to the default


def test_selftest_uninitialised_shared_read_is_nan(emu):
    out = emu.selftest("uninitialised_shared_read", torch.randn(256), torch.randn(256))
    assert torch.isnan(out[:128]).all() and torch.isfinite(out[128:]).all()


def test_selftest_mma_sync_and_ldmatrix(emu):
    """mma.sync m16n8k16 fed by ldmatrix with the PTX ISA's lane layout gives A B;
    exchanging two A registers (rows 8-15 with columns 8-15) gives wrong results."""
    a, bt = torch.randn(16, 16), torch.randn(8, 16)
    truth = a.half().float() @ bt.half().float().T
    torch.testing.assert_close(emu.selftest("mma_tile", a, bt)[:128].view(16, 8), truth, rtol=1e-5, atol=1e-5)
    assert max_err(emu.selftest("mma_swapped_fragment", a, bt)[:128].view(16, 8), truth) > 0.1


@pytest.mark.parametrize("name,message", [
    ("ldmatrix_misaligned", r"row address is not 16-byte aligned"),
    ("ldmatrix_global", r"outside the block's shared memory"),
])
def test_selftest_ldmatrix_addresses_are_checked(emu, name, message):
    with pytest.raises(RuntimeError, match=message):
        emu.selftest(name, torch.randn(16, 16), torch.randn(8, 16))


def test_selftest_assumed_fragment_order_gives_wrong_results(emu):
    a, b = torch.randn(16, 16), torch.randn(16, 16)
    truth = a.half().float() @ b.half().float()
    out = emu.selftest("wmma_assumed_order", a, b).view(16, 16)
    assert max_err(out, truth) > 0.1


# ---- mutated kernels must fail ----------------------------------------------

MUTATIONS = {
    # every barrier of the CUDA-core position attention kernels removed
    "position_attention_kernels.cuh": [("__syncthreads();", "/* barrier removed */;")],
    # the 16-bit A operand of the scores (Q^T, K^T, dS) loaded without .trans, and the
    # TF32 probabilities' A fragment with two slots exchanged: wrong fragment layouts
    "position_attention_tensor_cores_tiles.cuh": [
        ("ldmatrix<4, true>(f, a + (k0", "ldmatrix<4, false>(f, a + (k0"),
        ("    a[1] = to_tf32(p[kk][2]);  // (g + 8, 2t)  -> slot t", "    a[1] = to_tf32(p[kk][1]);")],
    # the CAM row kernels skip their block reductions: each thread shifts the softmax by
    # its own partial row minimum, and the backward uses each thread's partial dot product
    "channel_attention_kernels.cuh": [
        ("  m = block_min(m, scratch);\n", "  /* row minimum not reduced over the block */\n"),
        ("  dot = block_sum(dot, scratch);\n", "  /* dot product not reduced over the block */\n")],
}


@pytest.fixture(scope="session")
def mutant():
    return build.load(mutations=MUTATIONS)


def fails_against_reference(fn):
    try:
        out, truth = fn()
    except RuntimeError as e:
        return str(e)
    if not torch.isfinite(out).all():
        return "non-finite output"
    err = max_err(out, truth)
    return f"error {err:.3g}" if err > 1e-3 * max(1.0, truth.abs().max().item()) else None


def test_mutant_without_barriers_fails(mutant):
    q, k, v = make_inputs(2, 33, 130, 9, 11, torch.float32)
    found = fails_against_reference(lambda: (mutant.pam_forward(q, k, v)[0],
                                             reference.position_attention(q.double(), k.double(), v.double())))
    assert found, "removing the barriers went unnoticed"


def test_mutant_with_wrong_fragment_layout_fails(mutant):
    q, k, v = make_inputs(1, 33, 130, 9, 11, torch.float16, 0.5)
    found = fails_against_reference(lambda: (mutant.pam_forward(q, k, v, tensor_cores=True)[0],
                                             reference.position_attention(q.double(), k.double(), v.double())))
    assert found, "a wrong mma fragment layout went unnoticed"


def test_mutant_with_wrong_tf32_fragment_fails(mutant):
    q, k, v = make_inputs(1, 16, 40, 9, 11, torch.float32, 0.5)
    found = fails_against_reference(lambda: (mutant.pam_forward(q, k, v, tensor_cores=True)[0],
                                             reference.position_attention(q.double(), k.double(), v.double())))
    assert found, "a wrong TF32 fragment layout went unnoticed"


# The tensor-core kernels without their barriers (a separate build: it must fail on its own).
TENSOR_CORE_BARRIER_MUTATION = {"position_attention_tensor_cores_kernels.cuh": [("__syncthreads();", ";")]}


def test_mutant_tensor_cores_without_barriers_fails():
    mutant = build.load(mutations=TENSOR_CORE_BARRIER_MUTATION)
    q, k, v = make_inputs(1, 16, 40, 9, 11, torch.bfloat16, 0.5)
    grad_out = torch.randn_like(v)
    truth, truth_grads = reference_grads(reference.position_attention, [t.double() for t in (q, k, v)],
                                         grad_out.double())

    def run():
        out, stats = mutant.pam_forward(q, k, v, tensor_cores=True)
        grads = mutant.pam_backward(grad_out, q, k, v, out, stats, tensor_cores=True)
        return torch.cat([out.flatten(), *(g.flatten() for g in grads)]), \
            torch.cat([truth.flatten(), *(g.flatten() for g in truth_grads)])
    assert fails_against_reference(run), "removing the tensor-core kernels' barriers went unnoticed"


def test_mutant_without_row_reductions_fails(emu, mutant):
    x = torch.randn(1, 20, 3, 5)
    found = fails_against_reference(lambda: (mutant.cam_forward(x)[0], reference.channel_attention(x.double())))
    assert found, "the forward's per-thread row minimum went unnoticed"
    # the backward from the correct attention, so that only its own kernel is broken
    grad_out = torch.randn_like(x)
    _, (truth,) = reference_grads(reference.channel_attention, [x.double()], grad_out.double())
    found = fails_against_reference(lambda: (mutant.cam_backward(grad_out, x, emu.cam_forward(x)[1]), truth))
    assert found, "the backward's per-thread dot product went unnoticed"


# ---- AddressSanitizer and ThreadSanitizer builds ----------------------------

def run_sanitized(variant, *args):
    build.build_only(variant)  # compile here; import it under the sanitizer runtime in a subprocess
    return subprocess.run([sys.executable, os.path.join(HERE, "sanitized_run.py"), variant, *args],
                          env=build.sanitizer_env(variant), capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("variant", ["asan", "tsan"])
def test_sanitized_grid(variant):
    r = run_sanitized(variant, "grid")
    assert r.returncode == 0 and "grid passed" in r.stdout, r.stdout[-3000:] + r.stderr[-6000:]


def test_asan_catches_out_of_bounds_shared_write():
    r = run_sanitized("asan", "selftest", "oob_shared_write")
    assert r.returncode != 0 and "AddressSanitizer" in r.stderr and "heap-buffer-overflow" in r.stderr, \
        r.stdout[-2000:] + r.stderr[-4000:]


def test_tsan_catches_missing_barrier():
    r = run_sanitized("tsan", "selftest", "missing_barrier")
    assert r.returncode != 0 and "ThreadSanitizer: data race" in r.stderr, r.stdout[-2000:] + r.stderr[-4000:]



def test_float16_tensor_core_backward_keeps_small_gradients(emu):
    """dS = P (dP - D) has entries near P |dP|: at N = 1024 with |dO| ~ 1e-4 they lie far below
    float16's normal range (6.1e-5), so rounded unscaled they lose their digits, and dQ, dK with
    them. The kernel scales dS per image by a power of two (float16_grad_scores_scale) and undoes
    it in float32. Two images, |dO| ~ 1 and ~ 1e-4, so that each must use its own scale: the small
    one's error must be what rounding the true gradients to float16 costs (they are subnormal
    there too) plus twice the large one's. Unscaled (the kernel before the scale, kept as a switch
    of the emulation) the small image is 10x worse: the check can fail."""
    q, k, v = make_inputs(2, 8, 8, 32, 32, torch.float16, scale=0.3)
    out, stats = emu.pam_forward(q, k, v, tensor_cores=True)
    grad_out = torch.randn(2, 8, 32, 32)
    grad_out[1] *= 1e-4
    grad_out = grad_out.half()
    _, truth = reference_grads(reference.position_attention, [t.double() for t in (q, k, v)], grad_out.double())
    errors = {}
    for scaled in (True, False):
        grads = emu.pam_backward(grad_out, q, k, v, out, stats, tensor_cores=True, scale_grad_scores=scaled)
        errors[scaled] = [relative_errors([g[b] for g in grads], [t[b] for t in truth]) for b in range(2)]
    rounding = relative_errors([t[1].half() for t in truth], [t[1] for t in truth])
    for i, name in enumerate("qkv"):
        bound = rounding[i] + 2 * errors[True][0][i]
        assert errors[True][1][i] <= bound, (name, errors, rounding)
        if name != "v":  # dV = P^T dO involves no dS
            assert errors[False][1][i] > 5 * bound, (name, errors, rounding)


def test_float16_tensor_core_backward_with_an_infinite_grad_out(emu):
    """An infinite dO entry makes its query's dS row, and so every dK, non-finite; the other
    queries' dQ must stay finite and right (the image's scale falls back to 1, as unscaled)."""
    q, k, v = make_inputs(1, 8, 8, 16, 16, torch.float16, scale=0.3)
    out, stats = emu.pam_forward(q, k, v, tensor_cores=True)
    grad_out = torch.randn(1, 8, 16, 16).half()
    grad_out[0, 3, 5, 7] = float("inf")
    assert emu.float16_grad_scores_scale(grad_out, v).item() == 1.0
    dq, _, _ = emu.pam_backward(grad_out, q, k, v, out, stats, tensor_cores=True)
    assert_other_queries_dq_right(dq, q, k, v, grad_out, (5, 7), tol=2e-3)


def test_float16_tensor_core_backward_scales_large_grad_scores_down(emu):
    """Where |dS| passes float16's largest value (65504) while dK stays within it, unscaled dS
    overflows to inf and dK comes out NaN; scaled by s < 1 it stays as accurate as usual."""
    q = (torch.randn(1, 8, 16, 16) * 0.02).half()
    k = (torch.randn(1, 8, 16, 16) * 40).half()
    v = (torch.randn(1, 8, 16, 16) * 60).half()
    grad_out = (torch.randn(1, 8, 16, 16) * 2000).half()
    out, stats = emu.pam_forward(q, k, v, tensor_cores=True)
    assert emu.float16_grad_scores_scale(grad_out, v).item() < 1
    _, truth = reference_grads(reference.position_attention, [t.double() for t in (q, k, v)], grad_out.double())
    assert truth[1].abs().max() < 65504 < truth[0].abs().max()  # dK fits float16, dQ does not
    _, dk, dv = emu.pam_backward(grad_out, q, k, v, out, stats, tensor_cores=True)
    assert max(relative_errors([dk, dv], truth[1:])) < 2e-3
    _, dk_unscaled, _ = emu.pam_backward(grad_out, q, k, v, out, stats, tensor_cores=True, scale_grad_scores=False)
    assert not torch.isfinite(dk_unscaled).all()


def test_float16_grad_scores_scale_is_a_power_of_two_within_the_bound(emu):
    """s = 2^floor(log2(16384 / bound)), bound = 2 max_i |dO_i| max_j |v_j| (norms over channels),
    per image; 2^100 where dO or V is zero."""
    grad_out = torch.randn(3, 16, 5, 7).half()
    v = torch.randn(3, 16, 5, 7).half()
    grad_out[1] *= 1e-3
    v[2] *= 300
    grad_out[0, :, 0, 0] = 0
    s = emu.float16_grad_scores_scale(grad_out, v)
    assert s.dtype == torch.float32 and s.shape == (3,)
    bound = 2 * grad_out.float().flatten(2).norm(dim=1).amax(1) * v.float().flatten(2).norm(dim=1).amax(1)
    assert torch.equal(s, torch.exp2(torch.log2(s).round())), s
    assert ((s * bound > 8192 * (1 - 1e-6)) & (s * bound <= 16384 * (1 + 1e-6))).all(), (s, bound)
    assert s[1] > s[0] > s[2]
    zero = emu.float16_grad_scores_scale(torch.zeros(1, 4, 3, 3).half(), torch.randn(1, 4, 3, 3).half())
    assert zero.item() == 2.0 ** 100
    no_channels = emu.float16_grad_scores_scale(torch.zeros(2, 0, 3, 3).half(), torch.zeros(2, 0, 3, 3).half())
    assert no_channels.tolist() == [2.0 ** 100] * 2
    nan = grad_out.clone()
    nan[2, 0, 1, 1] = float("nan")
    assert emu.float16_grad_scores_scale(nan, v)[2].item() == 1.0
