"""Timing and peak memory of one call: medians after a warm-up; on CUDA the
caching allocator's peak, on the CPU the peak resident set (Linux VmHWM, reset
through /proc/self/clear_refs, with glibc told to return large blocks)."""
from __future__ import annotations

import gc
import os
import statistics
import time
from typing import Callable, Optional

import torch

from ... import allocator


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: str, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds, on the CPU at the allocator's steady state
    (see _restore_steady_state_allocator): otherwise a process's first timings ran in
    glibc's initial state and later ones, after a peak_memory call, in the steady one
    (measured: a first CAM case 9.3 ms, the same case after a memory measurement 6.9 ms)."""
    if device == "cpu":
        _restore_steady_state_allocator()
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# glibc's own ceiling for its dynamic mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
_STEADY_STATE_THRESHOLD = 32 << 20
_MEASURING_MMAP_THRESHOLD = 64 << 10
_MEASURING_TRIM_THRESHOLD = 128 << 10  # glibc's default (DEFAULT_TRIM_THRESHOLD)


def _read_status_kib(field_name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_peak_tracking_available() -> bool:
    return os.access("/proc/self/clear_refs", os.W_OK) and _read_status_kib("VmHWM") is not None


def _release_freed_memory() -> None:
    # Blocks of 64 KiB and more are mmapped and returned to the system on free,
    # and what earlier frees left in the heap is trimmed, so that a call's new
    # allocations show up in the resident set instead of reusing resident pages.
    # Both thresholds are set, since the steady state between measurements raises both.
    allocator.mallopt(allocator.M_MMAP_THRESHOLD, _MEASURING_MMAP_THRESHOLD)
    allocator.mallopt(allocator.M_TRIM_THRESHOLD, _MEASURING_TRIM_THRESHOLD)
    allocator.malloc_trim()


def _restore_steady_state_allocator() -> None:
    # Setting the mmap threshold switches off glibc's dynamic one, which in a
    # long-running process climbs to the size of the blocks it sees freed (up to
    # 32 MiB), so that repeated calls reuse heap pages. Left at 64 KiB, every
    # later call would mmap, page-fault and unmap each buffer of 64 KiB or more:
    # time no user's process spends, and more for code with many work buffers.
    # Timings run at glibc's steady state instead.
    allocator.mallopt(allocator.M_MMAP_THRESHOLD, _STEADY_STATE_THRESHOLD)
    allocator.mallopt(allocator.M_TRIM_THRESHOLD, 2 * _STEADY_STATE_THRESHOLD)


def peak_memory(fn: Callable[[], object], device: str) -> Optional[float]:
    """Peak extra bytes held while fn() runs (its result is dropped afterwards), or None."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del result
        return float(peak)
    if not cpu_peak_tracking_available():
        return None
    _release_freed_memory()
    base = _read_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set to the current one
    try:
        result = fn()
        peak = _read_status_kib("VmHWM")
        del result
    finally:
        _restore_steady_state_allocator()
    return float(max(0, peak - base) * 1024)
