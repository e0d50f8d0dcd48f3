"""The `danet-ext` command line (also `python -m danet_ext`).

    danet-ext info                      what was compiled, which devices are visible
    danet-ext check [--device] [--dtype]  kernels against the reference; non-zero exit on failure
    danet-ext bench [--device] [--quick] [--out DIR]   speed and memory, table + CSV/JSON/PNG
    danet-ext demo                      train a small DANet on synthetic shapes, then compare backends
    danet-ext segment --checkpoint F --image IMG --out OUT.png   colour overlay of a prediction
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

DTYPES = ("float32", "float16", "bfloat16", "float64")


class UsageError(Exception):
    """A bad argument or missing file: reported on one line, exit status 2."""


def cmd_info(args) -> int:
    import torch

    from . import build_info

    info = build_info()
    print(json.dumps(info, indent=1))
    devices = ["cpu"] + [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    print("devices visible:", ", ".join(devices))
    print("torch threads:", torch.get_num_threads())
    return 0


def _device(name: str) -> str:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible")
    return name


def cmd_check(args) -> int:
    import torch

    from . import _build
    from .check import format_rows, run_checks

    device = _device(args.device)
    if not _build.has_kernel(device):
        raise UsageError(f"no compiled {device} kernels to check (build_info: {_build.build_info()['backends']})")
    dtypes = [getattr(torch, d) for d in (args.dtype or (["float32", "float64"] if device == "cpu"
                                                          else ["float32", "float16", "bfloat16"]))]
    from .ops import KERNEL_DTYPES

    for d in dtypes:
        if d not in KERNEL_DTYPES[device]:
            raise UsageError(f"the {device} kernels do not take {d}")
    rows = run_checks(device, dtypes)
    print(format_rows(rows))
    return 0 if all(r.passed for r in rows) else 1


def cmd_bench(args) -> int:
    import torch
    from tqdm import tqdm

    from . import benchmark as bm
    from .demo import TinyDANet
    from .models import DANet
    from .nn import DANetHead

    device = _device(args.device)
    dtype = getattr(torch, args.dtype)
    os.makedirs(args.out, exist_ok=True)
    meta = bm.machine_info(device)
    meta["matmul_fp32_gflops"] = round(bm.matmul_gflops(device), 1)
    meta["dtype"] = args.dtype
    print("machine:", json.dumps(meta))
    pam_sizes = [(32, 32), (48, 48), (64, 64)] if args.quick else [(32, 32), (64, 64), (96, 96), (128, 128)]
    cam_sizes = [(32, 32), (64, 64)] if args.quick else [(32, 32), (64, 64), (97, 97), (128, 128)]
    head_hw = (32, 32) if args.quick else (64, 64)
    model_hw = (129, 129) if args.quick else (257, 257)
    total = len(pam_sizes) * 2 * len(bm.default_pam_impls(device, dtype)) + len(cam_sizes) * 2 * 2 * 2 + 4 + 4
    results = []
    with tqdm(total=total, desc="benchmarking", file=sys.stderr, dynamic_ncols=True) as bar:
        results += bm.bench_position_attention(pam_sizes, device=device, dtype=dtype, repeats=args.repeats, progress=bar)
        results += bm.bench_channel_attention(cam_sizes, device=device, dtype=dtype, repeats=args.repeats, progress=bar)
        results += bm.bench_module("danet_head", lambda be: DANetHead(2048, 19, backend=be).to(dtype),
                                   lambda: torch.randn(1, 2048, *head_hw, dtype=dtype), device=device,
                                   repeats=args.repeats, progress=bar)
        make_model = ((lambda be: TinyDANet(19, backend=be).to(dtype)) if args.quick
                      else (lambda be: DANet(19, backbone="resnet50", backend=be).to(dtype)))
        results += bm.bench_module("danet_resnet50" if not args.quick else "tiny_danet", make_model,
                                   lambda: torch.randn(1, 3, *model_hw, dtype=dtype), device=device,
                                   repeats=max(1, args.repeats - 1), progress=bar)
    print(bm.format_table(results))
    files = bm.write_results(results, args.out, meta)
    where = meta.get("gpu", meta["cpu"])
    for op, title, series in (("position_attention", "Position attention, B=1, Cq=64, C=512", None),
                              ("channel_attention", "Channel attention, B=1", "C")):
        png = bm.plot_results(results, args.out, op, f"{title}, {args.dtype}, {where}", op, series_key=series)
        if png:
            files.append(png)
    print("wrote", ", ".join(files))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    result = run_demo(out_dir=args.out, steps=args.steps, batch=args.batch, size=args.size, seed=args.seed,
                      compare=not args.no_compare)
    if result["miou"] < 2 * result["chance_miou"]:
        print("the model did not learn: mIoU is not above twice chance", file=sys.stderr)
        return 1
    return 0


def cmd_segment(args) -> int:
    from .segment import CheckpointError, segment_file

    try:
        out = segment_file(args.checkpoint, args.image, args.out, num_classes=args.num_classes,
                           palette=args.palette, window=args.window, flip=args.flip, backbone=args.backbone)
    except (FileNotFoundError, CheckpointError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    print("wrote", out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="danet-ext", description="Fused DANet attention: info, checks, benchmarks, demo.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="build info and visible devices")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("check", help="compiled kernels against the pure-PyTorch reference")
    s.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    s.add_argument("--dtype", choices=DTYPES, action="append", help="repeatable; default: all the device takes")
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("bench", help="speed and peak memory against the reference and SDPA")
    s.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    s.add_argument("--dtype", choices=DTYPES[:3], default="float32")
    s.add_argument("--quick", action="store_true", help="small sizes only (about a minute on 2 CPU cores)")
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--out", default="bench-out", help="folder for results.csv/.json and plots")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("demo", help="train a small DANet on synthetic shapes (a few minutes on a CPU)")
    s.add_argument("--out", default="demo-out")
    s.add_argument("--steps", type=int, default=500)
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--size", type=int, default=128)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-compare", action="store_true", help="skip the backend speed/memory comparison")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("segment", help="segment an image with a trained checkpoint")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--image", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--num-classes", type=int, default=None)
    s.add_argument("--backbone", choices=["resnet50", "resnet101"], default="resnet101",
                   help="for bare DANet state dicts")
    s.add_argument("--palette", choices=["cityscapes", "voc"], default="cityscapes")
    s.add_argument("--window", type=int, default=512, help="sliding-window size for large images")
    s.add_argument("--flip", action="store_true", help="average with the mirrored image")
    s.set_defaults(func=cmd_segment)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "size", "repeats", "window", "num_classes"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.exit(2, f"danet-ext: error: --{name.replace('_', '-')} must be positive, got {value}\n")
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"danet-ext: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("danet-ext: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
