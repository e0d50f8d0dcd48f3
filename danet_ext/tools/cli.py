"""The `danet-ext` command line (also `python -m danet_ext`).

    danet-ext info                      what was compiled, which devices are visible
    danet-ext check [--device] [--dtype]  kernels against the reference; non-zero exit on failure
    danet-ext bench [--device] [--quick] [--out DIR]   speed and memory, table + CSV/JSON/PNG
    danet-ext demo                      train a small DANet on synthetic shapes, then compare backends
    danet-ext segment --checkpoint F --image IMG --out OUT.png   colour overlay of a prediction
    danet-ext evaluate --checkpoint F --data DIR [--scales ...] [--flip]   mIoU on a folder dataset
    danet-ext export --checkpoint F --format onnx|openvino --out FILE   deployment model, O(N) attention
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

DTYPES = ("float32", "float16", "bfloat16", "float64")
PRECISION_CHOICES = ("auto", "float32", "bfloat16", "float16")


class UsageError(Exception):
    """A bad argument or missing file: reported on one line, exit status 2."""


def cmd_info(args) -> int:
    import torch

    from .. import build_info

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

    from .. import _build
    from .check import format_rows, run_checks

    device = _device(args.device)
    if not _build.has_kernel(device):
        raise UsageError(f"no compiled {device} kernels to check (build_info: {_build.build_info()['backends']})")
    dtypes = [getattr(torch, d) for d in (args.dtype or (["float32", "float64"] if device == "cpu"
                                                          else ["float32", "float16", "bfloat16"]))]
    from ..ops import KERNEL_DTYPES

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
    from ..models import DANet
    from ..nn import DANetHead

    device = _device(args.device)
    dtype = getattr(torch, args.dtype)
    _out_dir(args.out)
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

    _out_dir(args.out)
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
                           palette=args.palette, window=args.window, flip=args.flip, backbone=args.backbone,
                           verbose=True, precision=args.precision)
    except (FileNotFoundError, CheckpointError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    except OSError as exc:  # e.g. the overlay cannot be written
        raise UsageError(f"{exc.filename or args.out}: {exc.strerror or exc}") from exc
    print("wrote", out)
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_folder, format_result
    from .segment import CheckpointError

    for scale in args.scales:
        if not 0.1 <= scale <= 4.0:
            raise UsageError(f"--scales must lie in [0.1, 4], got {scale}")
    if not os.path.isdir(args.data):
        raise UsageError(f"--data {args.data} is not a folder")
    _checkpoint_file(args.checkpoint)
    _out_dir(args.out)
    try:
        result = evaluate_folder(args.checkpoint, args.data, layout=args.layout, split=args.split,
                                 scales=args.scales, flip=args.flip, window=args.window, precision=args.precision,
                                 out_dir=args.out, num_classes=args.num_classes, backbone=args.backbone,
                                 limit=args.limit, compile=args.compile)
    except (FileNotFoundError, CheckpointError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    except OSError as exc:  # e.g. a file that cannot be read, or the results cannot be written
        raise UsageError(f"{exc.filename or args.out}: {exc.strerror or exc}") from exc
    print(format_result(result))
    print("wrote", ", ".join(result["files"]))
    return 0


def cmd_export(args) -> int:
    from .export import check_out_path, export_checkpoint
    from .segment import CheckpointError, check_writable_dir

    try:
        size = tuple(int(v) for v in args.input_size.lower().split("x"))
        if len(size) != 2 or not all(32 <= v <= 8192 for v in size):
            raise ValueError
    except ValueError:
        raise UsageError(f"--input-size must be HxW with sides in [32, 8192], e.g. 512x1024; got {args.input_size}") from None
    _checkpoint_file(args.checkpoint)
    try:
        check_out_path(args.out, args.format)
        check_writable_dir(os.path.dirname(os.path.abspath(args.out)), "--out")
        result = export_checkpoint(args.checkpoint, args.out, args.format, size, num_classes=args.num_classes,
                                   backbone=args.backbone)
    except (FileNotFoundError, CheckpointError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    except OSError as exc:  # e.g. the model cannot be written
        raise UsageError(f"{exc.filename or args.out}: {exc.strerror or exc}") from exc
    err = result["max_abs_diff_vs_pytorch"]
    print(f"wrote {result['out']} ({args.format}, input 1x3x{size[0]}x{size[1]}); attention operations: "
          f"{result['attention_ops']}; max |difference| from PyTorch on a random image: "
          f"{'not checked (onnxruntime missing)' if err is None else f'{err:.2e}'}")
    return 0


def _checkpoint_file(path: str) -> None:
    from .segment import check_input_file

    try:
        check_input_file("--checkpoint", path)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from exc


def _out_dir(path: str, option: str = "--out") -> str:
    """Create the output folder of bench/demo, or say in one line why not."""
    from .segment import check_writable_dir

    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{option} {path} is a file, not a folder")
    try:
        check_writable_dir(path, option)
        os.makedirs(path, exist_ok=True)
    except (ValueError, OSError) as exc:
        raise UsageError(str(exc) if isinstance(exc, ValueError) else f"{option} {path}: {exc.strerror}") from exc
    return path


# Limits checked before any work: (option, smallest, largest).
# demo --size: the demo makes its 608 synthetic images (512 training, 96 held out) up front, at
# 20 bytes a pixel (float32 RGB and an int64 label): 0.8 GB at 256, 3.2 GB at 512, 12.8 GB at 1024.
DEMO_MAX_SIZE = 256
LIMITS = {"steps": (1, 10**7), "batch": (1, 4096), "size": (16, DEMO_MAX_SIZE), "repeats": (1, 1000),
          "window": (32, 16384), "num_classes": (1, 10_000), "limit": (1, 10**7),
          "seed": (0, 2**63 - 2)}  # torch.manual_seed takes 64-bit seeds; the demo also uses seed + 1


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(prog="danet-ext", description="Fused DANet attention: info, checks, benchmarks, "
                                "demo, segmentation.", formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="build info and visible devices", formatter_class=fmt)
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("check", help="compiled kernels against the pure-PyTorch reference", formatter_class=fmt)
    s.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device whose kernels to check")
    s.add_argument("--dtype", choices=DTYPES, action="append",
                   help="repeatable; None means float32 and float64 on cpu, float32/float16/bfloat16 on cuda")
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("bench", help="speed and peak memory against the reference and SDPA", formatter_class=fmt)
    s.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device to benchmark")
    s.add_argument("--dtype", choices=DTYPES[:3], default="float32", help="input dtype")
    s.add_argument("--quick", action="store_true",
                   help="small sizes only (about 3 minutes on 2 CPU cores; the full run takes much longer)")
    s.add_argument("--repeats", type=int, default=3, help="timed runs per case (the median is reported)")
    s.add_argument("--out", default="bench-out", help="folder for results.csv/.json and plots")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("demo", help="train a small DANet on synthetic shapes, then compare backends "
                       "(about 5 minutes on 2 CPU cores, 4 of them training)", formatter_class=fmt)
    s.add_argument("--out", default="demo-out", help="folder for the prediction grid, checkpoint and sample image")
    s.add_argument("--steps", type=int, default=500, help="training steps")
    s.add_argument("--batch", type=int, default=16, help="images per step")
    s.add_argument("--size", type=int, default=128,
                   help=f"image side in pixels, 16 to {DEMO_MAX_SIZE} (the 608 synthetic images are made up front: "
                        f"about 0.8 GB at {DEMO_MAX_SIZE})")
    s.add_argument("--seed", type=int, default=0, help="random seed for data and initialisation")
    s.add_argument("--no-compare", action="store_true", help="skip the backend speed/memory comparison")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("segment", help="segment an image with a trained checkpoint", formatter_class=fmt)
    s.add_argument("--checkpoint", required=True,
                   help="from `danet-ext demo`, examples/train.py, or an official DANet state dict")
    s.add_argument("--image", required=True, help="image file (any format PIL reads)")
    s.add_argument("--out", required=True, help="overlay image to write (.png, .jpg, ...)")
    s.add_argument("--num-classes", type=int, default=None,
                   help="None means what the checkpoint shows; must agree with it")
    s.add_argument("--backbone", choices=["resnet50", "resnet101", "resnet152"], default=None,
                   help="for DANet checkpoints; None means what the keys show; must agree with them")
    s.add_argument("--palette", choices=["cityscapes", "voc"], default="cityscapes", help="class colours")
    s.add_argument("--window", type=int, default=512,
                   help="sliding-window size for images larger than it (at least 32)")
    s.add_argument("--flip", action="store_true", help="average with the mirrored image")
    s.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                   help="auto: bfloat16 on CPUs with bfloat16 hardware, float16 on CUDA, else float32")
    s.set_defaults(func=cmd_segment)

    s = sub.add_parser("evaluate", help="mIoU of a checkpoint on a folder dataset (the official evaluation)",
                       formatter_class=fmt)
    s.add_argument("--checkpoint", required=True,
                   help="from `danet-ext demo`, examples/train.py, or an official DANet state dict")
    s.add_argument("--data", required=True, help="dataset folder")
    s.add_argument("--layout", choices=["voc", "cityscapes"], default="voc", help="folder layout")
    s.add_argument("--split", default="val", help="split to evaluate")
    s.add_argument("--scales", type=float, nargs="+", default=[1.0],
                   help="image scales to average; the official multi-scale set is 0.5 0.75 1.0 1.25 1.5 1.75")
    s.add_argument("--flip", action="store_true", help="also average with the mirrored images")
    s.add_argument("--window", type=int, default=512, help="sliding-window size (at least 32)")
    s.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                   help="auto: bfloat16 on CPUs with bfloat16 hardware, float16 on CUDA, else float32")
    s.add_argument("--num-classes", type=int, default=None, help="None means what the checkpoint shows")
    s.add_argument("--backbone", choices=["resnet50", "resnet101", "resnet152"], default=None,
                   help="None means what the keys show")
    s.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the model (inductor, freezing) for full sliding windows (window x "
                        "window): each batch size of windows compiles first (seconds to a minute); images "
                        "smaller than the window run eagerly, as they rarely share a size. On the CPU it no "
                        "pays off little (DANet-101 at 512x1024 on a 2-core CPU: bfloat16 2.76 s a forward "
                        "against 2.84 s eager, after an 11 s first call); on a GPU it is unmeasured")
    s.add_argument("--out", default="eval-out", help="folder for evaluation.json and per_class_iou.png")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("export", help="a checkpoint as an ONNX or OpenVINO model whose attention holds O(N) memory",
                       formatter_class=fmt)
    s.add_argument("--checkpoint", required=True,
                   help="from `danet-ext demo`, examples/train.py, or an official DANet state dict")
    s.add_argument("--format", choices=["onnx", "openvino"], default="onnx",
                   help="onnx: opset 23, position attention as MatMul/Softmax/MatMul per block of 1024 queries; "
                        "openvino: IR (.xml + .bin) converted from that ONNX form")
    s.add_argument("--out", required=True, help="file to write (.onnx, or .xml for openvino)")
    s.add_argument("--input-size", default="512x1024", help="input height x width the model is exported for")
    s.add_argument("--num-classes", type=int, default=None, help="None means what the checkpoint shows")
    s.add_argument("--backbone", choices=["resnet50", "resnet101", "resnet152"], default=None,
                   help="None means what the keys show")
    s.set_defaults(func=cmd_export)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, (low, high) in LIMITS.items():
        value = getattr(args, name, None)
        if value is not None and not low <= value <= high:
            parser.exit(2, f"danet-ext: error: --{name.replace('_', '-')} must be in [{low}, {high}], got {value}\n")
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
