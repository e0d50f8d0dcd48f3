"""Speed and peak-memory measurements of the kernels against the reference
(the official bmm/softmax/bmm code) and scaled_dot_product_attention.

Used by `danet-ext bench` and the scripts in benchmarks/. Timings are medians
over repeats after a warm-up; memory is the peak extra memory of one further call
(steady state: one-time buffers of BLAS libraries are not counted) above
what its inputs already hold: on CUDA from the caching allocator's statistics,
on the CPU from the process's peak resident set (Linux: VmHWM, reset through
/proc/self/clear_refs, with glibc told to return large blocks to the system).
"""
from __future__ import annotations

import csv
import ctypes
import gc
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch.nn import functional as F

from . import reference
from ._build import build_info
from .ops import channel_attention, position_attention


# --------------------------------------------------------------------------- machine

def machine_info(device: str = "cpu") -> Dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "danet_ext_backends": build_info().get("backends", []),
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def matmul_gflops(device: str = "cpu", n: int = 2048, repeats: int = 5) -> float:
    """This machine's float32 matmul speed, the yardstick for the kernels' GFLOP/s."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    t = time_call(lambda: a @ b, device, repeats=repeats)
    return 2 * n ** 3 / t / 1e9


# --------------------------------------------------------------------------- measuring

def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: str, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds."""
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


_M_MMAP_THRESHOLD = -3


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


_libc = None


def _release_freed_memory() -> None:
    # Blocks of 64 KiB and more are mmapped and returned to the system on free,
    # and what earlier frees left in the heap is trimmed, so that a call's new
    # allocations show up in the resident set instead of reusing resident pages.
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.mallopt(_M_MMAP_THRESHOLD, 1 << 16)
        _libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
    result = fn()
    peak = _read_status_kib("VmHWM")
    del result
    return float(max(0, peak - base) * 1024)


# --------------------------------------------------------------------------- cases

@dataclass
class Result:
    op: str
    impl: str
    mode: str  # "forward" or "forward+backward"
    shape: str
    n: int
    seconds: Optional[float]
    peak_bytes: Optional[float]
    gflops: Optional[float] = None
    note: str = ""
    extra: Dict[str, object] = field(default_factory=dict)


def pam_flops(B: int, Cq: int, C: int, N: int) -> float:
    """Forward FLOPs of position attention: the two N x N products."""
    return 2.0 * B * N * N * (Cq + C)


def cam_flops(B: int, C: int, N: int) -> float:
    return 4.0 * B * C * C * N


# Set to "1", the CUDA kernels run float16/bfloat16 PAM forwards on tensor cores.
TENSOR_CORES_ENV = "DANET_EXT_TENSOR_CORES"


def _pam_impls(device: str):
    def sdpa(q, k, v):
        # (B, 1, N, d) layout, scale 1 as DANet; layouts prepared outside the timing.
        return F.scaled_dot_product_attention(q, k, v, scale=1.0)

    def tensor_cores(q, k, v):
        # the opt-in tensor-core forward (CUDA, float16/bfloat16); read by the kernel at each call
        old = os.environ.get(TENSOR_CORES_ENV)
        os.environ[TENSOR_CORES_ENV] = "1"
        try:
            return position_attention(q, k, v, backend="extension")
        finally:
            if old is None:
                del os.environ[TENSOR_CORES_ENV]
            else:
                os.environ[TENSOR_CORES_ENV] = old

    return {
        "danet_ext": lambda q, k, v: position_attention(q, k, v, backend="extension"),
        "danet_ext_tc": tensor_cores,
        "reference": reference.position_attention,
        "sdpa": sdpa,
    }


def default_pam_impls(device: str, dtype: torch.dtype) -> tuple:
    """The implementations worth comparing: the tensor-core forward where it can run."""
    impls = ("danet_ext", "reference", "sdpa")
    if device == "cuda" and dtype in (torch.float16, torch.bfloat16):
        impls = ("danet_ext", "danet_ext_tc", "reference", "sdpa")
    return impls


def _to_sdpa_layout(t: torch.Tensor) -> torch.Tensor:
    B, C, H, W = t.shape
    return t.reshape(B, C, H * W).transpose(1, 2).unsqueeze(1).contiguous().requires_grad_(t.requires_grad)


def reference_pam_bytes(B: int, N: int, backward: bool, itemsize: int = 4) -> float:
    """Rough memory of the reference: the N x N energy and attention (and their grads)."""
    return B * N * N * itemsize * (4 if backward else 2)


def bench_position_attention(sizes, B=1, Cq=64, C=512, device="cpu", dtype=torch.float32, repeats=3,
                             impls: Optional[tuple] = None, modes=("forward", "forward+backward"),
                             memory_limit: Optional[float] = None, progress=None) -> List[Result]:
    """PAM forward and forward+backward over (H, W) sizes."""
    fns = _pam_impls(device)
    impls = impls if impls is not None else default_pam_impls(device, dtype)
    limit = memory_limit if memory_limit is not None else _default_memory_limit(device)
    results = []
    for H, W in sizes:
        N = H * W
        for mode in modes:
            backward = mode != "forward"
            for impl in impls:
                if progress is not None:
                    progress.set_postfix_str(f"PAM {impl} {mode} {H}x{W}")
                shape = f"{B}x{C}x{H}x{W}"
                if not impl.startswith("danet_ext") and reference_pam_bytes(B, N, backward) > limit:
                    results.append(Result("position_attention", impl, mode, shape, N, None, None,
                                          note=f"skipped: needs ~{reference_pam_bytes(B, N, backward) / 2**30:.0f} GiB"))
                    if progress is not None:
                        progress.update(1)
                    continue
                q = torch.randn(B, Cq, H, W, device=device, dtype=dtype, requires_grad=backward)
                k = torch.randn(B, Cq, H, W, device=device, dtype=dtype, requires_grad=backward)
                v = torch.randn(B, C, H, W, device=device, dtype=dtype, requires_grad=backward)
                args = (q, k, v)
                if impl == "sdpa":
                    args = tuple(_to_sdpa_layout(t.detach()).requires_grad_(backward) for t in args)
                fn = fns[impl]

                def run():
                    out = fn(*args)
                    if backward:
                        out.backward(torch.ones_like(out))
                        for t in args:
                            t.grad = None
                    return out if not backward else None

                try:
                    with torch.set_grad_enabled(backward):
                        seconds = time_call(run, device, repeats=repeats)
                        mem = peak_memory(run, device)  # after the warm-up: steady state
                    flops = pam_flops(B, Cq, C, N) * (3 if backward else 1)
                    results.append(Result("position_attention", impl, mode, shape, N, seconds, mem,
                                          gflops=flops / seconds / 1e9))
                except (RuntimeError, torch.OutOfMemoryError) as exc:  # e.g. an SDPA backend refusing the shapes
                    results.append(Result("position_attention", impl, mode, shape, N, None, None,
                                          note=f"failed: {str(exc).splitlines()[0][:80]}"))
                del q, k, v, args
                if progress is not None:
                    progress.update(1)
    return results


def bench_channel_attention(sizes, channels=(256, 512), B=1, device="cpu", dtype=torch.float32, repeats=3,
                            impls=("danet_ext", "reference"), modes=("forward", "forward+backward"),
                            progress=None) -> List[Result]:
    fns = {"danet_ext": lambda x: channel_attention(x, backend="extension"), "reference": reference.channel_attention}
    results = []
    for C in channels:
        for H, W in sizes:
            for mode in modes:
                backward = mode != "forward"
                for impl in impls:
                    if progress is not None:
                        progress.set_postfix_str(f"CAM {impl} {mode} C={C} {H}x{W}")
                    x = torch.randn(B, C, H, W, device=device, dtype=dtype, requires_grad=backward)
                    fn = fns[impl]

                    def run():
                        out = fn(x)
                        if backward:
                            out.backward(torch.ones_like(out))
                            x.grad = None
                            return None
                        return out

                    with torch.set_grad_enabled(backward):
                        seconds = time_call(run, device, repeats=repeats)
                        mem = peak_memory(run, device)  # after the warm-up: steady state
                    flops = cam_flops(B, C, H * W) * (3 if backward else 1)
                    results.append(Result("channel_attention", impl, mode, f"{B}x{C}x{H}x{W}", H * W, seconds, mem,
                                          gflops=flops / seconds / 1e9, extra={"C": C}))
                    if progress is not None:
                        progress.update(1)
    return results


def bench_module(name: str, make_module: Callable[[str], torch.nn.Module], make_input: Callable[[], torch.Tensor],
                 device="cpu", repeats=3, modes=("forward", "forward+backward"), progress=None) -> List[Result]:
    """A module (head, full model) with the extension backend against the reference backend."""
    results = []
    for mode in modes:
        backward = mode != "forward"
        for impl, backend in (("danet_ext", "extension"), ("reference", "reference")):
            if progress is not None:
                progress.set_postfix_str(f"{name} {impl} {mode}")
            module = make_module(backend).to(device)
            module.train(backward)
            x = make_input().to(device)

            def run():
                out = module(x)
                outs = out if isinstance(out, tuple) else (out,)
                if backward:
                    sum(o.float().mean() for o in outs).backward()
                    module.zero_grad(set_to_none=True)
                    return None
                return outs

            with torch.set_grad_enabled(backward):
                seconds = time_call(run, device, repeats=repeats)
                mem = peak_memory(run, device)
            results.append(Result(name, impl, mode, "x".join(map(str, x.shape)), x.shape[2] * x.shape[3],
                                  seconds, mem))
            if progress is not None:
                progress.update(1)
    return results


def _default_memory_limit(device: str) -> float:
    if device == "cuda" and torch.cuda.is_available():
        return 0.8 * torch.cuda.get_device_properties(0).total_memory
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return 0.5 * pages
    except (ValueError, OSError):
        return 8 * 2**30


# --------------------------------------------------------------------------- output

def write_results(results: List[Result], out_dir: str, meta: Dict[str, object], stem: str = "results") -> List[str]:
    """CSV and JSON of the results (JSON with the machine description)."""
    os.makedirs(out_dir, exist_ok=True)
    rows = [asdict(r) for r in results]
    csv_path = os.path.join(out_dir, f"{stem}.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "extra"] if rows else ["op"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: v for k, v in row.items() if k != "extra"})
    json_path = os.path.join(out_dir, f"{stem}.json")
    with open(json_path, "w") as f:
        json.dump({"machine": meta, "results": rows}, f, indent=1)
    return [csv_path, json_path]


def format_table(results: List[Result]) -> str:
    """A plain-text table: one line per (op, mode, shape), impls side by side, with speed-ups."""
    groups: Dict[tuple, Dict[str, Result]] = {}
    impls: List[str] = []
    for r in results:
        groups.setdefault((r.op, r.mode, r.shape), {})[r.impl] = r
        if r.impl not in impls:
            impls.append(r.impl)
    header = f"{'op':<20} {'mode':<17} {'shape':<18}" + "".join(f" {i + ' ms':>14} {i + ' MiB':>14}" for i in impls)
    if "reference" in impls and "danet_ext" in impls:
        header += f" {'speed-up':>9} {'mem ratio':>9}"
    lines = [header, "-" * len(header)]
    for (op, mode, shape), by_impl in groups.items():
        line = f"{op:<20} {mode:<17} {shape:<18}"
        for i in impls:
            r = by_impl.get(i)
            ms = f"{r.seconds * 1e3:.1f}" if r and r.seconds else (r.note.split(":")[0] if r else "-")
            mib = f"{r.peak_bytes / 2**20:.1f}" if r and r.peak_bytes is not None else "-"
            line += f" {ms:>14} {mib:>14}"
        ours, ref = by_impl.get("danet_ext"), by_impl.get("reference")
        if ours and ref and ours.seconds and ref.seconds:
            line += f" {ref.seconds / ours.seconds:>8.2f}x"
            if ours.peak_bytes and ref.peak_bytes:
                line += f" {ours.peak_bytes / ref.peak_bytes:>8.1%}"
        lines.append(line)
    return "\n".join(lines)


def plot_results(results: List[Result], out_dir: str, op: str, title: str, stem: str,
                 series_key: Optional[str] = None) -> Optional[str]:
    """Time and peak memory against feature-map size (log scales), one line per impl and mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in results if r.op == op and r.seconds]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    keys = sorted({(r.impl, r.mode, r.extra.get(series_key) if series_key else None) for r in rows}, key=str)
    for impl, mode, series in keys:
        sel = sorted((r for r in rows if (r.impl, r.mode) == (impl, mode)
                      and (series_key is None or r.extra.get(series_key) == series)), key=lambda r: r.n)
        label = f"{impl} {mode}" + (f" {series_key}={series}" if series_key else "")
        style = "-" if mode == "forward" else "--"
        axes[0].plot([r.n for r in sel], [r.seconds * 1e3 for r in sel], style, marker="o", label=label)
        mem = [(r.n, r.peak_bytes / 2**20) for r in sel if r.peak_bytes]
        if mem:
            axes[1].plot(*zip(*mem), style, marker="o", label=label)
    for ax, ylabel in zip(axes, ("time (ms)", "peak extra memory (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("positions N = H x W")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{stem}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
