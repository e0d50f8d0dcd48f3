"""Shared fixtures and helpers for the kernel tests."""
import os

import pytest
import torch

import danet_ext
from danet_ext import _build

HAVE_CUDA_DEVICE = torch.cuda.is_available() and _build.has_kernel("cuda")

# Devices every kernel test runs on: the CPU always, CUDA where a GPU and the
# CUDA kernels are both there (marked, so `-m "not cuda"` deselects them).
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(not HAVE_CUDA_DEVICE, reason="needs a CUDA device and CUDA kernels")]),
]

# dtypes the kernels take, per device.
def kernel_dtypes(device):
    return list(danet_ext.ops.KERNEL_DTYPES[device])


def pytest_collection_modifyitems(config, items):
    if not danet_ext.HAVE_EXTENSION:
        skip = pytest.mark.skip(reason="danet_ext._C is not built")
        for item in items:
            if "needs_extension" in item.keywords:
                item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_extension: needs the compiled extension")


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def relative_errors(tensors, truths):
    """||t - truth|| / ||truth|| for each pair, in float64."""
    return [((t.double() - tr).norm() / tr.norm()).item() for t, tr in zip(tensors, truths)]


def assert_other_queries_dq_right(dq, q, k, v, grad_out, position, tol):
    """grad_out (B = 1) holds a non-finite entry at query `position` (h, w): that query's dS row
    is non-finite, but every other query's dQ must be finite and, against float64 with that
    query's dO zeroed (the others do not depend on it), within `tol` relative error."""
    from danet_ext import reference

    finite = grad_out.double().clone()
    finite[0, :, position[0], position[1]] = 0
    inputs = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    reference.position_attention(*inputs).backward(finite)
    others = torch.ones(q.shape[2:], dtype=torch.bool)
    others[position] = False
    assert torch.isfinite(dq[..., others]).all()
    assert relative_errors([dq[..., others]], [inputs[0].grad[..., others]])[0] < tol


# Position-attention gradients at logits in the thousands, as a fraction of the largest true
# gradient. The truth is float64 on the rounded inputs with the kernel's own rounded output in
# D = rowsum(dO * O), as FlashAttention-style backwards take it: at such logits the softmax is
# nearly one-hot, dP - D cancels, and the rounding of O alone moves dQ and dK by up to 2 % of
# their largest entry in float16. Measured on the CPU kernels over four seeds: at most 1.8e-4
# (float32), 4.9e-4 (float16), 6.6e-2 (bfloat16, whose products round P and dS).
LARGE_LOGIT_GRAD_TOL = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 1.5e-1}


def assert_large_logit_grads_close(grads, q, k, v, out, grad_out):
    """The kernel's (dq, dk, dv) against float64 arithmetic given its output `out`."""
    q, k, v, out, go = (t.double().flatten(2) for t in (q, k, v, out, grad_out))
    p = torch.softmax(q.transpose(1, 2) @ k, -1)
    ds = p * (go.transpose(1, 2) @ v - (go * out).sum(1).unsqueeze(-1))
    truth = (k @ ds.transpose(1, 2), q @ ds, go @ p)
    for name, g, tg in zip(("query", "key", "value"), grads, truth):
        assert torch.isfinite(g).all(), name
        rel = max_err(g.flatten(2), tg) / tg.abs().max().item()
        assert rel < LARGE_LOGIT_GRAD_TOL[grad_out.dtype], f"{name} gradient off by {rel:.2e} of its largest entry"


def assert_within_twice_pytorch(ours, pytorch_same_precision, truth, atol=0.0):
    """The kernel's error against a float64 truth is at most about twice that of
    PyTorch's own computation in the same precision (the reference op run in that dtype)."""
    err_ours = max_err(ours, truth)
    err_torch = max_err(pytorch_same_precision, truth)
    assert err_ours <= 2.0 * err_torch + atol, (
        f"kernel error {err_ours:.3e} > 2 x PyTorch's same-precision error {err_torch:.3e} (+{atol:.1e})")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The CUDA emulation's tests (tests/cuda_emulation) compile the CUDA kernels for
# the CPU and take minutes: `make test-cuda-emulated` runs them, `make test` not.
collect_ignore = [] if os.environ.get("DANET_EXT_CUDA_EMULATION") == "1" else ["cuda_emulation"]


def save_tiny_checkpoint(path, width=8, num_classes=4, seed=0):
    """A TinyDANet checkpoint as `danet-ext demo` writes it, with gamma = 0.5 so the
    attention branches count in the output. Returns (model in eval mode, path)."""
    from danet_ext.tools.demo import TinyDANet

    torch.manual_seed(seed)
    model = TinyDANet(num_classes, width=width).eval()
    for m in model.modules():
        if hasattr(m, "gamma"):
            m.gamma.data.fill_(0.5)
    torch.save({"config": model.config, "state_dict": model.state_dict()}, path)
    return model, path


def run_cli(*args, timeout=600):
    """`python -m danet_ext ARGS` in a subprocess, as a user runs it."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "danet_ext", *args], capture_output=True, text=True,
                          timeout=timeout)
