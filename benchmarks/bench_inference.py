"""The main job's speed: a full DANet-ResNet-101 forward (inference, output stride 8,
19 classes, deep stem, multi-grid 4, 8, 16 as the released Cityscapes model, batch 1)
through every path a user could take, measured in one run.

Paths (each in a fresh process, so times and peak memory do not mix):
  eager-float32            the model as trained: float32, NCHW (what `segment` did before)
  optimized-float32        danet_ext.optimize_for_inference(precision="float32", keep_memory=True), as the
                           CLI's segment and evaluate: BN folded, channels_last, 3x3 convolutions by Winograd
  optimized-float32-direct the same with winograd=False (oneDNN's direct 3x3 convolutions, large ones split)
  optimized-float32-compiled  the same through torch.compile (inductor, freezing)
  optimized-bfloat16       ... precision="bfloat16" (only where the CPU has bfloat16 hardware; on AVX512-BF16
                           without AMX, the widest 3x3 convolutions by Winograd in float32)
  optimized-bfloat16-direct  the same with winograd=False
  optimized-bfloat16-refattn  the same with the official attention (N x N matrix)
  optimized-bfloat16-compiled  the same through torch.compile (inductor, freezing); compile time reported
  onnxruntime-export       ONNX Runtime (CPU), the model as danet_ext exports it to ONNX (opset 23; position
                           attention as MatMul/Softmax/MatMul per block of 1024 queries)
  onnxruntime-reference    ONNX Runtime, the official attention exported as MatMul/Softmax/MatMul (N x N)
  openvino-export          OpenVINO (CPU, default hints), reading that ONNX file, as danet-ext export
                           --format openvino converts it
  openvino-reference       OpenVINO, reading the official attention's ONNX file

--device cuda (a GPU machine; `make gpu-suite` runs it) takes the GPU paths instead: eager-float32,
optimized-float32, optimized-float16 (autocast), optimized-bfloat16 (autocast), optimized-float16-refattn
and optimized-float16-compiled; ONNX Runtime and OpenVINO are CPU runtimes here and are left out.
Memory on the GPU is torch.cuda's peak allocation above the level before the forwards.

Time: the median of --repeats forwards after one warm-up (the warm-up's own time, which
includes compilation for the compiled path, is reported too). Memory: the peak resident
set during the forwards above the one before them (sampled every 2 ms), so it includes
the runtimes' own workspace. The CPU model and its ISA flags are recorded beside the results.

    python benchmarks/bench_inference.py [--sizes 512x1024 1024x2048] [--paths ...] [--repeats 3]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
PATHS = ["eager-float32", "optimized-float32", "optimized-float32-direct", "optimized-float32-compiled",
         "optimized-bfloat16", "optimized-bfloat16-direct",
         "optimized-bfloat16-refattn", "optimized-bfloat16-compiled",
         "onnxruntime-export", "onnxruntime-reference", "openvino-export", "openvino-reference"]
CUDA_PATHS = ["eager-float32", "optimized-float32", "optimized-float16", "optimized-bfloat16",
              "optimized-float16-refattn", "optimized-float16-compiled"]


def build_model(backend="auto"):
    from danet_ext import DANet

    torch.manual_seed(0)
    # the released Cityscapes DANet-101 as load_official_checkpoint builds it: deep stem,
    # layer4 at multi-grid dilations 4, 8, 16
    return DANet(19, backbone="resnet101", deep_stem=True, multi_grid=(4, 8, 16), aux=False, backend=backend).eval()


def export_model(backend: str, size, path: str) -> None:
    """danet_ext's export form (backend "auto") or the official attention ("reference"), as an
    ONNX file (which the OpenVINO rows read too)."""
    import warnings

    from danet_ext.inference import fold_batch_norms

    h, w = size
    model = build_model(backend)
    # BatchNorm folded, as `danet-ext export` does (the runtimes fold it themselves, so their
    # graphs run the same): the TorchScript exporter keeps every traced activation alive, and
    # with the BatchNorm outputs too the official attention's export at 1024x2048 (its N x N
    # scores included) was killed at 24 GiB
    fold_batch_norms(model)
    x = torch.randn(1, 3, h, w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if backend == "reference":
            torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17)
        else:
            from danet_ext.tools.export import export_onnx

            export_onnx(model, x, path)


def runner(path: str, size, model_file: str, device: str = "cpu"):
    """A callable running one forward on a fixed input, for the given path."""
    h, w = size
    x = torch.randn(1, 3, h, w, device=device)
    if path.startswith("eager") or path.startswith("optimized"):
        from danet_ext import optimize_for_inference

        model = build_model("reference" if path.endswith("refattn") else "auto").to(device)
        if path.startswith("optimized"):
            model = optimize_for_inference(model, precision=path.split("-")[1], keep_memory=True,  # as the CLI
                                           winograd=not path.endswith("direct"))
        if path.endswith("compiled"):
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True
            model = torch.compile(model)

        def run():
            with torch.inference_mode():
                out = model(x)
            if device == "cuda":
                torch.cuda.synchronize()
            return out
        return run
    if path.startswith("onnxruntime"):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        sess = ort.InferenceSession(model_file, opts, providers=["CPUExecutionProvider"])
        name, arr = sess.get_inputs()[0].name, x.numpy()
        return lambda: sess.run(None, {name: arr})[0]
    if path.startswith("openvino"):
        import openvino as ov

        core = ov.Core()
        compiled = core.compile_model(core.read_model(model_file), "CPU")
        arr = x.numpy()
        return lambda: compiled(arr)[0]
    raise ValueError(path)


def child(path: str, size_text: str, repeats: int, model_file: str, device: str = "cpu") -> None:
    size = tuple(map(int, size_text.split("x")))
    run = runner(path, size, model_file, device)
    import gc

    gc.collect()
    sampler = CudaPeak() if device == "cuda" else RssSampler()
    times = []
    first = None
    for i in range(repeats + 1):
        start = time.perf_counter()
        out = run()
        if i:  # the first call is a warm-up (kernel creation, or compilation)
            times.append(time.perf_counter() - start)
        else:
            first = time.perf_counter() - start
    peak = sampler.stop()
    out = torch.as_tensor(out[0] if isinstance(out, (tuple, list)) else out).cpu()
    print(json.dumps({"path": path, "size": size_text, "seconds": round(statistics.median(times), 3),
                      "first_call_seconds": round(first, 2),
                      "peak_extra_gib": round(peak / 2 ** 30, 2), "finite": bool(torch.isfinite(out).all()),
                      "out_shape": list(out.shape)}))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """Peak resident memory above the level at start, sampled every 2 ms in a thread
    (ru_maxrss cannot be reset, and building a model can set it higher than a forward)."""

    def __init__(self):
        import threading

        self.base = self.peak = _rss()
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return max(self.peak, _rss()) - self.base


class CudaPeak:
    """Peak GPU memory allocated by torch above the level at start."""

    def __init__(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()

    def stop(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - self.base


def available(path: str, device: str = "cpu") -> str:
    """'' if the path can run here, else why not."""
    from danet_ext import hardware

    if device == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device"
        if path not in CUDA_PATHS:
            return "a CPU path"
        if path.startswith("optimized-bfloat16") and not torch.cuda.is_bf16_supported():
            return "this GPU has no bfloat16"
        return ""
    if path not in PATHS:
        return "a GPU path"
    if path.startswith("optimized-bfloat16"):
        return "" if hardware.has_fast_bfloat16() else "no bfloat16 hardware on this CPU"
    for prefix, module in (("onnxruntime", "onnxruntime"), ("openvino", "openvino")):
        if path.startswith(prefix):
            try:
                __import__(module)
            except ImportError:
                return f"{module} is not installed"
    return ""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["512x1024"])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--paths", nargs="+", default=None, choices=sorted(set(PATHS + CUDA_PATHS)),
                   help="default: every path of the device")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="default: benchmarks/results/inference_DEVICE.json")
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    p.add_argument("--export", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]), args.child[3], args.child[4])
        return
    if args.paths is None:
        args.paths = CUDA_PATHS if args.device == "cuda" else PATHS
    if args.out is None:
        args.out = os.path.join(HERE, "results", f"inference_{args.device}.json")
    if args.export:
        export_model(args.export[0], tuple(map(int, args.export[1].split("x"))), args.export[2])
        return
    from danet_ext import hardware

    # --out names the JSON file; a folder gets inference_cpu.json inside it. Checked before the
    # runs (which take many minutes), so that a bad path cannot lose them at the end.
    if os.path.isdir(args.out) or args.out.endswith(("/", os.sep)):
        args.out = os.path.join(args.out, f"inference_{args.device}.json")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    open(args.out, "a").close()
    machine = dict(hardware.describe_cpu(), torch=torch.__version__)
    if args.device == "cuda" and torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name()
        machine["cuda"] = torch.version.cuda
    print("machine:", json.dumps(machine), flush=True)
    rows = []
    tmp = tempfile.mkdtemp(prefix="danet-bench-")
    for size in args.sizes:
        exported = {}
        for path in args.paths:
            why = available(path, args.device)
            if why:
                rows.append({"path": path, "size": size, "skipped": why})
                print(json.dumps(rows[-1]), flush=True)
                continue
            model_file = ""
            if path.startswith(("onnxruntime", "openvino")):
                form = "reference" if path.endswith("reference") else "export"
                model_file = os.path.join(tmp, f"danet_{form}_{size}.onnx")
                if form not in exported:
                    start = time.perf_counter()
                    res = subprocess.run([sys.executable, __file__, "--export",
                                          "reference" if form == "reference" else "auto", size, model_file],
                                         capture_output=True, text=True)
                    exported[form] = "" if res.returncode == 0 else (
                        "the export was killed (out of memory)" if res.returncode == -9
                        else f"the export failed: {(res.stderr.strip().splitlines() or ['?'])[-1][:200]}")
                    print(f"exported {form} form at {size} in {time.perf_counter() - start:.1f} s "
                          f"{exported[form]}", flush=True)
                if exported[form]:
                    rows.append({"path": path, "size": size, "failed": exported[form]})
                    print(json.dumps(rows[-1]), flush=True)
                    continue
            res = subprocess.run([sys.executable, __file__, "--child", path, size, str(args.repeats), model_file,
                                  args.device], capture_output=True, text=True)
            if res.returncode != 0:
                row = {"path": path, "size": size, "failed": "killed (out of memory)" if res.returncode == -9
                       else (res.stderr.strip().splitlines() or ["?"])[-1][:300]}
            else:
                row = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump({"machine": machine, "results": rows}, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
