"""Loading the compiled extension, and what it was built with.

If the extension is missing, the package still imports and every op runs the
pure-PyTorch reference, after a warning at import (and one at the first op that falls
back). If it was built against another torch version, importing fails with a message
that says how to rebuild.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Optional

import torch

REBUILD_HINT = "rebuild it with: pip install --no-build-isolation -e .  (from the danet-ext checkout)"

_load_error: Optional[str] = None


class StaleBuildError(ImportError):
    """The compiled extension does not match the installed torch."""


def _load():
    global _load_error
    try:
        from danet_ext import _C  # noqa: F401  (runs the TORCH_LIBRARY registrations)
    except ImportError as exc:
        msg = str(exc)
        if "undefined symbol" in msg or "version" in msg.lower():
            raise StaleBuildError(
                f"danet_ext._C could not be loaded against torch {torch.__version__} ({msg}); "
                f"it was probably built against another torch version: {REBUILD_HINT}"
            ) from exc
        _load_error = msg
        warnings.warn(
            f"danet_ext: the compiled extension is not available ({msg}); every op runs the "
            f"pure-PyTorch reference, which holds the full attention matrix. To build it: "
            f"pip install --no-build-isolation .",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    check_built_against(json.loads(torch.ops.danet_ext.build_info())["torch_version"], torch.__version__)
    return True


def check_built_against(built_torch: str, runtime_torch: str) -> None:
    """Raise StaleBuildError unless the extension was built against the running torch."""
    if built_torch != runtime_torch:
        raise StaleBuildError(
            f"danet_ext._C was built against torch {built_torch} but torch {runtime_torch} "
            f"is installed: {REBUILD_HINT}"
        )


HAVE_EXTENSION: bool = _load()
_COMPILED_INFO: dict = json.loads(torch.ops.danet_ext.build_info()) if HAVE_EXTENSION else {}


def build_info() -> dict:
    """What the compiled extension contains.

    Keys: ``extension`` (bool), ``backends`` (e.g. ["cpu", "cuda"]),
    ``cuda_arch_list``, ``torch_version`` and ``cuda_version`` it was built
    against, ``version``; plus ``runtime_torch_version`` and ``cuda_available``,
    the CPU (``cpu``, ``cpu_bfloat16``, ``cpu_float16``, ``cpu_inference_convolutions``) and, with
    CUDA kernels, ``cuda_paths``:
    which kernels run which dtype.
    """
    if HAVE_EXTENSION:
        info = dict(_COMPILED_INFO, extension=True)
    else:
        info = {"extension": False, "backends": [], "cuda_arch_list": "",
                "torch_version": None, "cuda_version": None, "version": None,
                "load_error": _load_error}
    info["runtime_torch_version"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    from . import hardware
    from .ops import AUTO_REFERENCE_MAX_POSITIONS, auto_prefers_reference

    cpu = torch.device("cpu")

    fast_bf16 = hardware.has_fast_bfloat16()
    # float16 position attention multiplies in float16 where the CPU has AVX512-FP16 or AMX-FP16
    # (csrc/cpu/reduced_precision_gemm.h); channel attention stays float32 in float16
    info["cpu_float16"] = {"position_attention products": "float16 (oneDNN)" if hardware.has_fast_float16()
                           else "float32", "channel_attention products": "float32"}
    info["cpu"] = hardware.describe_cpu()
    info["cpu_bfloat16"] = {
        "products": "bfloat16 (oneDNN)" if fast_bf16 else "float32",
        # csrc/cpu/bf16_scores.h; DANET_EXT_CPU_BF16_SCORES=0 forces the float32 GEMM
        "position_attention scores": ("float32 sums of exact bfloat16 products (AVX512-BF16)"
                                      if _bf16_score_kernel_runs() else "float32 GEMM"),
        # csrc/cpu/bf16_gram.h, the same micro-kernel and switch
        "channel_attention Gram": ("float32 sums of exact bfloat16 products (AVX512-BF16)"
                                   if _bf16_score_kernel_runs() else
                                   "bfloat16 products summed in float32 over slices of 1024 positions"
                                   if fast_bf16 else "float32 GEMM"),
        # what ops.auto_prefers_reference decides for bfloat16 on this CPU
        "auto_takes_reference_for": (
            (["channel_attention"] if auto_prefers_reference("channel_attention", cpu, torch.bfloat16, 0) else [])
            + ([f"position_attention with at most {AUTO_REFERENCE_MAX_POSITIONS} positions"]
               if auto_prefers_reference("position_attention", cpu, torch.bfloat16,
                                         AUTO_REFERENCE_MAX_POSITIONS) else [])),
    }
    # optimize_for_inference's 3x3 convolutions on this CPU (danet_ext/winograd.py)
    from . import winograd

    def convolutions(dtype: torch.dtype, how: str) -> str:
        least = winograd.min_channels_for(dtype)
        return ("oneDNN" if least is None else
                f"Winograd F(4x4, 3x3){how} for 3x3 stride-1 convolutions with >= {least} input channels, "
                f"oneDNN otherwise (and for dilated ones on maps where under "
                f"{winograd.min_tile_efficiency(dtype):.0%} of the tile outputs fall inside, see winograd.tile_efficiency)")

    info["cpu_inference_convolutions"] = {
        "float32": convolutions(torch.float32, ""),
        "bfloat16": convolutions(torch.bfloat16, " in float32 (AVX512-BF16 without AMX)"),
    }
    if "cuda" in info["backends"]:
        info["cuda_paths"] = CUDA_PATHS
    return info


def bf16_kernel_built() -> bool:
    """Whether this binary has the AVX512-BF16 score and Gram kernels (csrc/cpu/bf16_scores.h,
    bf16_gram.h: x86-64 and a recent enough compiler). Fixed at import, so that the backend
    choice reads nothing new under torch.compile."""
    return _BF16_KERNEL_BUILT


_BF16_KERNEL_BUILT = bool(_COMPILED_INFO.get("cpu_bf16_score_kernel"))


def _bf16_score_kernel_runs() -> bool:
    """Whether bfloat16 position attention takes its scores from the AVX512-BF16 kernel
    (csrc/cpu/bf16_scores.h): built into this binary, the CPU has the instructions, and
    DANET_EXT_CPU_BF16_SCORES does not switch it off. Read per call, as the kernels do."""
    from . import hardware

    return bf16_kernel_built() and hardware.has_avx512_bf16() and os.environ.get("DANET_EXT_CPU_BF16_SCORES") != "0"


# Which CUDA kernels run what (csrc/cuda; README, "How it works").
CUDA_PATHS = {
    "position_attention float16/bfloat16": "tensor cores (mma.sync m16n8k16) on compute capability >= 8.0 "
                                            "where the shape fits (forward Cq <= 512, backward Cq <= 64), "
                                            "CUDA cores otherwise",
    "position_attention float32": "TF32 tensor cores where torch.backends.cuda.matmul.allow_tf32 allows, "
                                  "CUDA cores (full float32) otherwise",
    "position_attention backward": "dQ accumulated with float32 atomics: raises under "
                                   "torch.use_deterministic_algorithms(True)",
    "channel_attention": "products on cuBLAS (float32 output for 16-bit inputs), row softmax kernels",
    "DANET_EXT_TENSOR_CORES=0": "forces the CUDA-core kernels",
}


def has_kernel(device_type: str) -> bool:
    """Whether compiled kernels exist for this device type ("cpu", "cuda")."""
    return HAVE_EXTENSION and device_type in _COMPILED_INFO["backends"]
