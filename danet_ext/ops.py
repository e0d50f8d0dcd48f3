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
from torch.autograd import forward_ad

from . import hardware, reference
from ._build import HAVE_EXTENSION, bf16_kernel_built, has_kernel

BACKENDS = ("auto", "extension", "reference")

# dtypes the ops take at all (the reference path included).
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

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
    if t.layout != torch.strided or t.is_nested:
        raise TypeError(f"danet_ext: `{name}` must be a dense (strided) tensor, got layout {t.layout}"
                        f"{' (nested)' if t.is_nested else ''}; convert it with .to_dense()")
    if t.dim() != 4:
        raise ValueError(
            f"danet_ext: `{name}` must be a 4-D (B, C, H, W) tensor, got {t.dim()}-D with shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"danet_ext: `{name}` must be a float32, float64, float16 or bfloat16 tensor, got {t.dtype}")


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


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_saved(t, name: str, shape: Tuple[int, ...], ref: Tensor, ref_name: str) -> None:
    """A tensor the forward saved for backward: its shape, device and accumulate dtype."""
    if not isinstance(t, Tensor):
        raise TypeError(f"danet_ext: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"danet_ext: `{name}` must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"danet_ext: `{name}` is on {t.device} but `{ref_name}` is on {ref.device}; "
                         "all inputs must be on the same device")
    want = _accumulate_dtype(ref.dtype)
    if t.dtype != want:
        raise TypeError(f"danet_ext: `{name}` must be {want} for {ref.dtype} inputs, got {t.dtype}")


def check_position_attention_backward_inputs(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor,
                                             out: Tensor, softmax_stats: Tensor) -> None:
    """What the backward op checks: the forward's inputs, then grad_out and out shaped, placed
    and typed like value, and softmax_stats (B, 2, H*W) in the accumulate dtype."""
    check_position_attention_inputs(query, key, value)
    for t, name in ((grad_out, "grad_out"), (out, "out")):
        _check_tensor(t, name)
        _check_same(t, value, name, "value")
        if t.shape != value.shape:
            raise ValueError(f"danet_ext: `{name}` must have the shape of `value` {tuple(value.shape)}, "
                             f"got {tuple(t.shape)}")
    B, _, H, W = value.shape
    _check_saved(softmax_stats, "softmax_stats", (B, 2, H * W), value, "value")


def check_channel_attention_backward_inputs(grad_out: Tensor, x: Tensor, attention: Tensor) -> None:
    """grad_out shaped, placed and typed like x; attention (B, C, C) in the accumulate dtype."""
    check_channel_attention_inputs(x)
    _check_tensor(grad_out, "grad_out")
    _check_same(grad_out, x, "grad_out", "x")
    if grad_out.shape != x.shape:
        raise ValueError(f"danet_ext: `grad_out` must have the shape of `x` {tuple(x.shape)}, "
                         f"got {tuple(grad_out.shape)}")
    B, C = x.shape[:2]
    _check_saved(attention, "attention", (B, C, C), x, "x")


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
    return torch.jit.is_tracing() or torch.jit.is_scripting() or _onnx_exporting()


def _onnx_exporting() -> bool:
    onnx = getattr(torch, "onnx", None)
    return bool(onnx is not None and hasattr(onnx, "is_in_onnx_export") and onnx.is_in_onnx_export())


def _transform_reason(tensors: Tuple[Tensor, ...]) -> str | None:
    """Why the kernels cannot serve this call's autodiff, or None.

    The custom ops have a first-order reverse-mode derivative (and a double
    backward, see _differentiable_backward). Forward-mode AD (torch.func.jvp,
    torch.autograd.forward_ad) and the torch.func transforms (grad, vmap,
    jacrev, hessian) need more; the reference, made of differentiable PyTorch
    ops, supports them all, so those calls run it.
    """
    if torch.compiler.is_compiling():
        return None
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return "a torch.func transform (grad, vmap, jvp, jacrev, hessian) is active"
    if forward_ad._current_level >= 0 and any(forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        return "an input carries a forward-mode AD tangent"
    return None


# On a CPU with bfloat16 hardware, PyTorch's own bfloat16 matmuls (the official code's
# bmm) match or beat the kernels where the attention matrix is small (measured on a
# 2-core AMD EPYC with AVX512-BF16; README "Benchmarks"), so "auto" takes the reference
# there: position attention in bfloat16 up to this many positions (a 2048 x 2048
# bfloat16 matrix is 8 MiB). Larger maps take the kernel: faster, and O(N) memory
# instead of N x N. Channel attention in bfloat16 takes the kernel on AVX512-BF16, where
# this binary has its Gram kernel (1.04x to 1.17x the reference forward, 0.90x to 1.11x at
# C = 256, 97 x 97 over several runs, and 1.25x to 1.48x forward+backward, 2026-12-01), and the
# reference on CPUs with AMX-BF16, whose oneDNN bmm runs on tiles several times faster
# than the kernel's AVX512-BF16 Gram (not measured yet: no AMX machine has been available
# since that kernel; before it, the kernel ran 0.28x there). backend="extension" always takes the kernel.
AUTO_REFERENCE_MAX_POSITIONS = 2048

# Exported models carry position attention one block of this many queries at a time,
# each against every key: ONNX as MatMul, Softmax, MatMul (reference.position_attention_blocked;
# `danet-ext export --format openvino` converts that ONNX form), traces such as OpenVINO's own
# conversion from PyTorch as scaled_dot_product_attention, which OpenVINO makes its fused
# ScaledDotProductAttention (reference.position_attention_sdpa). The number of blocks is fixed
# at trace or export time, so an export serves its input size. Neither runtime's CPU
# attention avoids holding the scores. Measured on a 2-core EPYC, position attention alone (Cq = 64, C = 512): at
# 128 x 256 positions (a 1024 x 2048 image) one fused node for all queries held 8.5 GiB in
# ONNX Runtime (17.5 s) and 2.2 GiB in OpenVINO (bfloat16, 3.6 s); blocks of 1024 queries
# held 0.42 and 0.29 GiB (13.8 and 3.7 s; 512: 0.36 GiB, 14.1 s; 2048: 0.66 GiB, 14.2 s). At
# 64 x 128, ONNX Runtime's fused Attention took 0.86 s in blocks where MatMul, Softmax, MatMul
# took 0.42 s (0.47 s unblocked, 0.57 GiB against 0.11), hence that form for ONNX; OpenVINO
# ran both in 0.22 s. The memory is O(N): 1024 x N scores at a time.
EXPORT_QUERY_BLOCK = 1024


def auto_prefers_reference(op: str, device: torch.device, dtype: torch.dtype, positions: int) -> bool:
    """Whether backend="auto" runs the reference for this call on speed grounds."""
    if device.type != "cpu" or dtype != torch.bfloat16 or not hardware.has_fast_bfloat16():
        return False
    if op == "channel_attention":  # the kernel's Gram needs AVX512-BF16 and a binary built with it
        return hardware.has_amx_bf16() or not (hardware.has_avx512_bf16() and bf16_kernel_built())
    return positions <= AUTO_REFERENCE_MAX_POSITIONS


def use_kernel(backend: str, tensors: Tuple[Tensor, ...], op: str) -> bool:
    """Resolve backend ("auto", "extension", "reference") for one call on `tensors`."""
    if backend == "reference":
        return False
    if backend not in BACKENDS:
        raise ValueError(f"danet_ext: backend must be one of {BACKENDS}, got {backend!r}")
    if _exporting():
        return False  # the custom ops have no ONNX / TorchScript form; the reference does
    transform = _transform_reason(tensors)
    if transform is not None:
        if backend == "extension":
            raise RuntimeError(f"danet_ext: backend='extension' was asked for {op}, but {transform}, which "
                               "the compiled kernels do not support; use backend='auto' or 'reference'")
        return False
    device, dtype = tensors[-1].device, tensors[-1].dtype
    if backend == "auto" and auto_prefers_reference(op, device, dtype, tensors[-1].shape[-2] * tensors[-1].shape[-1]):
        return False
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
    """Inside torch.autocast, run in the autocast dtype, casting what autocast
    casts for matmul: floating tensors other than float64 (which stays float64)."""
    device_type = tensors[0].device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t
                     for t in tensors)
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
    if backend != "reference" and _exporting():
        if _onnx_exporting():  # MatMul, Softmax, MatMul per block of queries
            return reference.position_attention_blocked(query, key, value, EXPORT_QUERY_BLOCK)
        # traces (OpenVINO's conversion): its fused ScaledDotProductAttention, per block of queries
        return reference.position_attention_sdpa(query, key, value, query_block=EXPORT_QUERY_BLOCK)
    if use_kernel(backend, (query, key, value), "position_attention"):
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
    if use_kernel(backend, (x,), "channel_attention"):
        return torch.ops.danet_ext.channel_attention_forward(x)[0]
    return reference.channel_attention(x)


# --------------------------------------------------------------------------- registrations

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
        check_position_attention_backward_inputs(grad_out, query, key, value, out, softmax_stats)
        return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)

    def _position_attention_setup_context(ctx, inputs, output):
        query, key, value = inputs
        out, stats = output
        ctx.mark_non_differentiable(stats)
        ctx.save_for_backward(query, key, value, out, stats)

    def _differentiable_backward(fn, inputs, needs_grad, grad_out):
        """The backward as a graph of differentiable ops, for
        torch.autograd.grad(..., create_graph=True): the reference's vector-Jacobian
        product, so second derivatives (gradgradcheck, gradient penalties) are exact.
        It holds the reference's attention matrix, as a double backward of the
        official code would."""
        wanted = [t for t, need in zip(inputs, needs_grad) if need]
        grads = iter(torch.autograd.grad(fn(*inputs), wanted, grad_out, create_graph=True, allow_unused=True))
        return tuple(next(grads) if need else None for need in needs_grad)

    def _position_attention_backward(ctx, grad_out, grad_stats):
        query, key, value, out, stats = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the gradient must itself be differentiable
            return _differentiable_backward(reference.position_attention, (query, key, value),
                                            ctx.needs_input_grad, grad_out)
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
        check_channel_attention_backward_inputs(grad_out, x, attention)
        return x.new_empty(x.shape)

    def _channel_attention_setup_context(ctx, inputs, output):
        (x,) = inputs
        _, attention = output
        ctx.mark_non_differentiable(attention)
        ctx.save_for_backward(x, attention)

    def _channel_attention_backward(ctx, grad_out, grad_attention):
        x, attention = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _differentiable_backward(reference.channel_attention, (x,), ctx.needs_input_grad, grad_out)
        return torch.ops.danet_ext.channel_attention_backward(grad_out, x, attention)

    torch.library.register_autograd(
        "danet_ext::channel_attention_forward", _channel_attention_backward,
        setup_context=_channel_attention_setup_context)
