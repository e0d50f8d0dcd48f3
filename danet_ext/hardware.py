"""What this machine's CPU can do fast: its model name and the instruction-set
flags that decide which precision runs at the hardware's speed.

CPUs change under us (a cloud machine is an AMD EPYC one week and an Intel
Xeon with AMX the next), so precision choices are made at run time from these
flags, and every benchmark records them.
"""
from __future__ import annotations

import os
import platform
from typing import Dict, FrozenSet

import torch

# The flags (as Linux's /proc/cpuinfo spells them) that matter here.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")


def _read_cpuinfo(field: str) -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


# Read once at import: the ops consult these on every call, also inside torch.compile,
# which must not trace file reads.
_FLAGS: FrozenSet[str] = frozenset(_read_cpuinfo("flags").split())
_MODEL: str = _read_cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> FrozenSet[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    return _FLAGS


def cpu_model() -> str:
    return _MODEL


def has_fast_bfloat16() -> bool:
    """bfloat16 matmul in hardware: AVX512-BF16 (dot products) or AMX-BF16 (tiles)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def has_avx512_bf16() -> bool:
    """AVX512-BF16 (vdpbf16ps): the CPU kernels' bfloat16 score tiles use it (csrc/cpu/bf16_scores.h)."""
    return {"avx512f", "avx512_bf16"} <= cpu_flags()


def has_amx_bf16() -> bool:
    """AMX-BF16 tiles, where oneDNN's bfloat16 matmul (the reference's bmm) runs several
    times faster than the AVX512-BF16 kernels."""
    return "amx_bf16" in cpu_flags()


def has_fast_float16() -> bool:
    """float16 matmul in hardware: AVX512-FP16 or AMX-FP16."""
    return bool({"avx512_fp16", "amx_fp16"} & cpu_flags())


def describe_cpu() -> Dict[str, object]:
    """Model name, cores, torch threads and the ISA flags above that this CPU has."""
    flags = cpu_flags()
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "isa": [f for f in ISA_FLAGS if f in flags]}
