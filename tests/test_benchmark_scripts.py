"""The full-model benchmark script (benchmarks/bench_inference.py) runs end to end on a
tiny image and writes what results_to_markdown.py turns into the README's table; on a
machine without a GPU its --device cuda run records every GPU path as skipped, with why."""
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks", "bench_inference.py")
TO_MD = os.path.join(ROOT, "benchmarks", "results_to_markdown.py")


def run(*args):
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_inference_benchmark_measures_and_tabulates(tmp_path):
    run(BENCH, "--sizes", "64x96", "--paths", "eager-float32", "optimized-float32", "--repeats", "1",
        "--out", str(tmp_path))
    data = json.loads((tmp_path / "inference_cpu.json").read_text())
    assert data["machine"]["cpu"] and "isa" in data["machine"]
    rows = {r["path"]: r for r in data["results"]}
    assert set(rows) == {"eager-float32", "optimized-float32"}
    for r in rows.values():
        assert r["finite"] and r["out_shape"] == [1, 19, 64, 96] and r["seconds"] > 0, r
    table = run(TO_MD, "--results", str(tmp_path))
    assert "| 64x96 | optimized-float32 | " in table and "| 64x96 | eager-float32 | " in table


def test_inference_benchmark_on_cuda_paths(tmp_path):
    out = tmp_path / "cuda.json"
    if torch.cuda.is_available():
        run(BENCH, "--device", "cuda", "--sizes", "64x96", "--paths", "optimized-float16", "--repeats", "1",
            "--out", str(out))
        (row,) = json.loads(out.read_text())["results"]
        assert row["finite"] and row["out_shape"] == [1, 19, 64, 96], row
        return
    run(BENCH, "--device", "cuda", "--sizes", "64x96", "--repeats", "1", "--out", str(out))
    rows = json.loads(out.read_text())["results"]
    assert [r["path"] for r in rows] == ["eager-float32", "optimized-float32", "optimized-float16",
                                         "optimized-bfloat16", "optimized-float16-refattn",
                                         "optimized-float16-compiled"]
    assert all(r["skipped"] == "no CUDA device" for r in rows)
