"""The public ops: validation, backend choice, and their torch.library
registrations (autograd and fake kernels), so that they work with autograd,
torch.compile(fullgraph=True), torch.autocast and torch.library.opcheck.

Each op is two custom ops in C++ (`*_forward` returning what backward needs,
and `*_backward`), declared once in csrc/ops.cpp.
"""
from __future__ import annotations

import warnings
from typing import Tuple

import torch
from torch import Tensor

from . import reference
from ._build import HAVE_EXTENSION, has_kernel

BACKENDS = ("auto", "extension", "reference")

# dtypes each device's kernels take (CPU computes float16/bfloat16 in float32).
KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}

_warned: set = set()


# --------------------------------------------------------------------------- validation

def _check_tensor(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"danet_ext: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(
            f"danet_ext: `{name}` must be a 4-D (B, C, H, W) tensor, got {t.dim()}-D with shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"danet_ext: `{name}` must be a floating-point tensor, got {t.dtype}")


def _check_same(t: Tensor, ref: Tensor, name: str, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"danet_ext: `{name}` is on {t.device} but `{ref_name}` is on {ref.device}; "
                         "all inputs must be on the same device")
    if t.dtype != ref.dtype:
        raise TypeError(f"danet_ext: `{name}` has dtype {t.dtype} but `{ref_name}` has dtype {ref.dtype}; "
                        "all inputs must have the same dtype")


def check_position_attention_inputs(query: Tensor, key: Tensor, value: Tensor) -> None:
    """Raise TypeError/ValueError, naming the argument, unless query, key: (B, Cq, H, W)
    and value: (B, C, H, W) share device, floating dtype, batch and spatial sizes."""
    for t, name in ((query, "query"), (key, "key"), (value, "value")):
        _check_tensor(t, name)
    _check_same(query, value, "query", "value")
    _check_same(key, value, "key", "value")
    if query.shape[1] != key.shape[1]:
        raise ValueError("danet_ext: `query` and `key` must have the same number of channels, "
                         f"got {query.shape[1]} and {key.shape[1]}")
    if query.shape[1] < 1:
        raise ValueError("danet_ext: `query` must have at least one channel")
    for d in (0, 2, 3):
        if not (query.shape[d] == key.shape[d] == value.shape[d]):
            raise ValueError("danet_ext: `query`, `key` and `value` must share batch and spatial sizes "
                             f"(dims 0, 2, 3), got {tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}")


def check_channel_attention_inputs(x: Tensor) -> None:
    """Raise TypeError/ValueError unless x is a floating (B, C, H, W) tensor."""
    _check_tensor(x, "x")


# --------------------------------------------------------------------------- backend choice

def kernel_unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why no compiled kernel can run for this device and dtype, or None if one can."""
    if not HAVE_EXTENSION:
        return "the compiled extension danet_ext._C is not built"
    if device.type == "meta":
        return None
    if not has_kernel(device.type):
        return f"the extension was built without {device.type} kernels"
    if dtype not in KERNEL_DTYPES.get(device.type, ()):
        return f"the {device.type} kernels do not take {dtype}"
    return None


def _exporting() -> bool:
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    onnx = getattr(torch, "onnx", None)
    return bool(onnx is not None and hasattr(onnx, "is_in_onnx_export") and onnx.is_in_onnx_export())


def use_kernel(backend: str, device: torch.device, dtype: torch.dtype, op: str) -> bool:
    """Resolve backend ("auto", "extension", "reference") for one call."""
    if backend == "reference":
        return False
    if backend not in BACKENDS:
        raise ValueError(f"danet_ext: backend must be one of {BACKENDS}, got {backend!r}")
    if _exporting():
        return False  # the custom ops have no ONNX / TorchScript form; the reference does
    reason = kernel_unavailable_reason(device, dtype)
    if reason is None:
        return True
    if backend == "extension":
        raise RuntimeError(f"danet_ext: backend='extension' was asked for {op}, but {reason}")
    if not torch.compiler.is_compiling() and reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"danet_ext: {op} runs the pure-PyTorch reference because {reason}",
                      RuntimeWarning, stacklevel=3)
    return False


def _autocast(*tensors: Tensor) -> Tuple[Tensor, ...]:
    """Inside torch.autocast, run in the autocast dtype (like matmul does)."""
    device_type = tensors[0].device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)
    return tensors


# --------------------------------------------------------------------------- public ops

def position_attention(query: Tensor, key: Tensor, value: Tensor, *, backend: str = "auto") -> Tensor:
    """DANet position attention without the N x N matrix.

    out[b, :, i] = sum_j softmax_j(q_i . k_j) v_j  (no 1/sqrt(Cq) scaling), N = H*W.

    Args:
        query, key: (B, Cq, H, W).
        value: (B, C, H, W); same device and dtype.
        backend: "auto" (compiled kernel when one exists for the device and dtype,
            else the reference, with one warning), "extension" or "reference".
    Returns:
        (B, C, H, W) tensor, dtype and device of `value`.
    """
    if not torch.jit.is_tracing():  # traced shapes are tensors; the traced reference checks them
        check_position_attention_inputs(query, key, value)
    query, key, value = _autocast(query, key, value)
    if use_kernel(backend, value.device, value.dtype, "position_attention"):
        return torch.ops.danet_ext.position_attention_forward(query, key, value)[0]
    return reference.position_attention(query, key, value)


def channel_attention(x: Tensor, *, backend: str = "auto") -> Tensor:
    """DANet channel attention: with X = x[b] as C x N, E = X X^T,
    out = softmax(rowmax(E) - E) X. E and the softmax are kept in float32
    for float16/bfloat16 inputs.

    Args:
        x: (B, C, H, W).
        backend: as for position_attention.
    Returns:
        (B, C, H, W) tensor, dtype and device of `x`.
    """
    if not torch.jit.is_tracing():
        check_channel_attention_inputs(x)
    (x,) = _autocast(x)
    if use_kernel(backend, x.device, x.dtype, "channel_attention"):
        return torch.ops.danet_ext.channel_attention_forward(x)[0]
    return reference.channel_attention(x)


# --------------------------------------------------------------------------- registrations

def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


if HAVE_EXTENSION:

    @torch.library.register_fake("danet_ext::position_attention_forward")
    def _position_attention_forward_fake(query, key, value):
        check_position_attention_inputs(query, key, value)
        B, C, H, W = value.shape
        out = value.new_empty((B, C, H, W))
        stats = value.new_empty((B, 2, H * W), dtype=_accumulate_dtype(value.dtype))
        return out, stats

    @torch.library.register_fake("danet_ext::position_attention_backward")
    def _position_attention_backward_fake(grad_out, query, key, value, out, softmax_stats):
        return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)

    def _position_attention_setup_context(ctx, inputs, output):
        query, key, value = inputs
        out, stats = output
        ctx.mark_non_differentiable(stats)
        ctx.save_for_backward(query, key, value, out, stats)

    def _position_attention_backward(ctx, grad_out, grad_stats):
        query, key, value, out, stats = ctx.saved_tensors
        grad_query, grad_key, grad_value = torch.ops.danet_ext.position_attention_backward(
            grad_out, query, key, value, out, stats)
        return grad_query, grad_key, grad_value

    torch.library.register_autograd(
        "danet_ext::position_attention_forward", _position_attention_backward,
        setup_context=_position_attention_setup_context)

    @torch.library.register_fake("danet_ext::channel_attention_forward")
    def _channel_attention_forward_fake(x):
        check_channel_attention_inputs(x)
        B, C = x.shape[:2]
        return x.new_empty(x.shape), x.new_empty((B, C, C), dtype=_accumulate_dtype(x.dtype))

    @torch.library.register_fake("danet_ext::channel_attention_backward")
    def _channel_attention_backward_fake(grad_out, x, attention):
        return x.new_empty(x.shape)

    def _channel_attention_setup_context(ctx, inputs, output):
        (x,) = inputs
        _, attention = output
        ctx.mark_non_differentiable(attention)
        ctx.save_for_backward(x, attention)

    def _channel_attention_backward(ctx, grad_out, grad_attention):
        x, attention = ctx.saved_tensors
        return torch.ops.danet_ext.channel_attention_backward(grad_out, x, attention)

    torch.library.register_autograd(
        "danet_ext::channel_attention_forward", _channel_attention_backward,
        setup_context=_channel_attention_setup_context)
