"""Full DANet-ResNet-101 inference at full resolution: peak memory and time of one
forward pass with the extension backend and with the reference (official) attention.

Each (size, backend) runs in a fresh process and reports its peak resident set
(ru_maxrss) above the one after building the model and input, so that the
numbers do not mix. Default sizes: 512x1024 and 1024x2048 (Cityscapes), output
stride 8, batch 1, float32, eval mode.

    python benchmarks/bench_full_resolution.py [--sizes 512x1024 1024x2048] [--device cpu]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch


def child(size: str, backend: str, device: str) -> None:
    from danet_ext import DANet

    h, w = map(int, size.split("x"))
    torch.manual_seed(0)
    model = DANet(19, backbone="resnet101", aux=False, backend=backend).eval().to(device)
    x = torch.randn(1, 3, h, w, device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    with torch.no_grad():
        out = model(x)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - base) if device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    print(json.dumps({"size": size, "backend": backend, "device": device, "seconds": round(seconds, 2),
                      "peak_extra_bytes": int(peak), "out_shape": list(out.shape),
                      "finite": bool(torch.isfinite(out).all())}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["512x1024", "1024x2048"])
    p.add_argument("--backends", nargs="+", default=["extension", "reference"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(*args.child)
        return
    rows = []
    for size in args.sizes:
        for backend in args.backends:
            res = subprocess.run([sys.executable, __file__, "--child", size, backend, args.device],
                                 capture_output=True, text=True)
            if res.returncode == 0:
                row = json.loads(res.stdout.strip().splitlines()[-1])
            else:  # e.g. killed for memory
                row = {"size": size, "backend": backend, "device": args.device, "seconds": None,
                       "peak_extra_bytes": None, "error": (res.stderr.strip().splitlines() or [f"exit {res.returncode}"])[-1][:200]}
            rows.append(row)
            gib = f"{row['peak_extra_bytes'] / 2**30:.2f} GiB" if row.get("peak_extra_bytes") else row.get("error")
            print(f"DANet-ResNet101 forward {size} {backend:>9}: {row.get('seconds')} s, peak extra memory {gib}",
                  flush=True)
    os.makedirs(args.out, exist_ok=True)
    from danet_ext.tools.benchmark import machine_info

    path = os.path.join(args.out, f"full_resolution_{args.device}.json")
    with open(path, "w") as f:
        json.dump({"machine": machine_info(args.device), "results": rows}, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
