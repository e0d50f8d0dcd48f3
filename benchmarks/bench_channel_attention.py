"""Channel attention: danet_ext vs the reference (the official code), forward
and forward+backward, time and peak extra memory, for C in {256, 512}.

    python benchmarks/bench_channel_attention.py [--device cuda] [--dtype float16] [--quick]
"""
import argparse
import os
import sys

import torch
from tqdm import tqdm

from danet_ext.tools import benchmark as bm

SIZES = [(32, 32), (64, 64), (97, 97), (128, 128)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sizes", nargs="+", default=None, help="HxW sizes, e.g. 64x64 96x96 (default: all)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    sizes = SIZES[:2] if args.quick else SIZES
    if args.sizes:
        sizes = [tuple(int(v) for v in t.split("x")) for t in args.sizes]
    meta = bm.machine_info(args.device)
    meta["dtype"] = args.dtype
    print(f"machine: {meta}")
    with tqdm(total=len(sizes) * 2 * 2 * 2, desc="channel attention", file=sys.stderr) as bar:
        results = bm.bench_channel_attention(sizes, device=args.device, dtype=getattr(torch, args.dtype),
                                             repeats=args.repeats, progress=bar)
    print(bm.format_table(results))
    stem = f"cam_{args.device}_{args.dtype}"
    files = bm.write_results(results, args.out, meta, stem=stem)
    png = bm.plot_results(results, args.out, "channel_attention",
                          f"Channel attention, B=1, {args.dtype}, {meta.get('gpu', meta['cpu'])}", stem, series_key="C")
    print("wrote", ", ".join(files + ([png] if png else [])))
    for r_ours in results:
        if (r_ours.impl, r_ours.mode, r_ours.shape) == ("danet_ext", "forward+backward", "1x512x64x64"):
            ref = next(r for r in results if (r.impl, r.mode, r.shape) == ("reference", "forward+backward", "1x512x64x64"))
            s = ref.seconds / r_ours.seconds
            print(f"target: forward+backward >= 1.2x faster than the reference at C=512, 64x64: {s:.2f}x -> "
                  f"{'met' if s >= 1.2 else 'NOT met'}")


if __name__ == "__main__":
    main()
