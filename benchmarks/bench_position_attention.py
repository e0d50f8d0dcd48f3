"""Position attention: danet_ext vs the reference (bmm + softmax + bmm, the
official code) vs scaled_dot_product_attention(scale=1), forward and
forward+backward, time and peak extra memory. Writes CSV/JSON/PNG into
benchmarks/results/ (or --out) and checks the project's targets.

    python benchmarks/bench_position_attention.py [--device cuda] [--dtype float16] [--quick]
"""
import argparse
import os
import sys

import torch
from tqdm import tqdm

from danet_ext.tools import benchmark as bm

SIZES = [(32, 32), (64, 64), (96, 96), (128, 128), (128, 256)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--quick", action="store_true", help="sizes up to 64x64 only")
    p.add_argument("--sizes", nargs="+", default=None, help="HxW sizes, e.g. 64x64 96x96 (default: all)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    sizes = SIZES[:2] if args.quick else SIZES
    if args.sizes:
        sizes = [tuple(int(v) for v in t.split("x")) for t in args.sizes]
    meta = bm.machine_info(args.device)
    meta["matmul_fp32_gflops"] = round(bm.matmul_gflops(args.device), 1)
    meta["dtype"] = args.dtype
    print(f"machine: {meta}")
    total = len(sizes) * 2 * len(bm.default_pam_impls(args.device, dtype))
    with tqdm(total=total, desc="position attention", file=sys.stderr) as bar:
        results = bm.bench_position_attention(sizes, device=args.device, dtype=dtype, repeats=args.repeats,
                                              progress=bar)
    print(bm.format_table(results))
    stem = f"pam_{args.device}_{args.dtype}"
    files = bm.write_results(results, args.out, meta, stem=stem)
    png = bm.plot_results(results, args.out, "position_attention",
                          f"Position attention, B=1, Cq=64, C=512, {args.dtype}, {meta.get('gpu', meta['cpu'])}", stem)
    print("wrote", ", ".join(files + ([png] if png else [])))
    report_targets(results, meta, args.device)


def find(results, impl, mode, shape):
    for r in results:
        if (r.impl, r.mode, r.shape) == (impl, mode, shape) and r.seconds:
            return r
    return None


def report_targets(results, meta, device):
    """The targets of the position-attention issue, as measured (reported, not asserted)."""
    lines = []
    if device == "cpu":
        ours, ref = find(results, "danet_ext", "forward+backward", "1x512x64x64"), \
            find(results, "reference", "forward+backward", "1x512x64x64")
        if ours and ref:
            lines.append(("forward+backward >= 1.5x faster than the reference at 64x64",
                          f"{ref.seconds / ours.seconds:.2f}x", ref.seconds / ours.seconds >= 1.5))
        f64 = find(results, "danet_ext", "forward", "1x512x64x64")
        if f64:
            frac = f64.gflops / meta["matmul_fp32_gflops"]
            lines.append(("forward >= 70% of matmul GFLOP/s", f"{f64.gflops:.0f} GFLOP/s = {frac:.0%}", frac >= 0.7))
        ours, ref = find(results, "danet_ext", "forward", "1x512x128x128"), \
            find(results, "reference", "forward", "1x512x128x128")
        if ours and ref and ours.peak_bytes and ref.peak_bytes:
            ratio = ours.peak_bytes / ref.peak_bytes
            lines.append(("forward peak extra memory at 128x128 <= 10% of the reference's", f"{ratio:.1%}", ratio <= 0.1))
        big = find(results, "danet_ext", "forward", "1x512x128x256")
        if big and big.peak_bytes is not None:
            lines.append(("forward at 128x256 in under 2 GB extra", f"{big.peak_bytes / 1e9:.2f} GB",
                          big.peak_bytes < 2e9))
    if device == "cuda":
        half = meta.get("dtype") in ("float16", "bfloat16")
        for shape in ("1x512x64x64", "1x512x128x128", "1x512x128x256"):
            ours, sdpa, ref = (find(results, i, "forward", shape) for i in ("danet_ext", "sdpa", "reference"))
            if ours and sdpa and half:
                lines.append((f"{meta['dtype']} forward at least as fast as SDPA at {shape}",
                              f"{sdpa.seconds / ours.seconds:.2f}x SDPA's speed", ours.seconds <= sdpa.seconds))
            if ours and ref and half:
                lines.append((f"{meta['dtype']} forward >= 1.5x the reference at {shape}",
                              f"{ref.seconds / ours.seconds:.2f}x", ref.seconds / ours.seconds >= 1.5))
            ours_b, ref_b = (find(results, i, "forward+backward", shape) for i in ("danet_ext", "reference"))
            if ours_b and ref_b and half:
                lines.append((f"{meta['dtype']} forward+backward >= 1.3x the reference at {shape}",
                              f"{ref_b.seconds / ours_b.seconds:.2f}x", ref_b.seconds / ours_b.seconds >= 1.3))
            if ours and ref and meta.get("dtype") == "float32":
                lines.append((f"float32 forward >= 3x the reference at {shape}",
                              f"{ref.seconds / ours.seconds:.2f}x", ref.seconds / ours.seconds >= 3))
    for what, got, ok in lines:
        print(f"target: {what}: {got} -> {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
