"""The command line, the benchmark helpers, the synthetic data and the demo."""
import json
import os
import subprocess
import sys

import pytest
import torch

import danet_ext
from danet_ext import benchmark as bm
from danet_ext.cli import main
from danet_ext.demo import TinyDANet, run_demo
from danet_ext.synthetic import CLASSES, confusion_matrix, make_batch, mean_iou


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "danet_ext", *args], capture_output=True, text=True, timeout=timeout)


def test_info_prints_build_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    info = json.loads(out[: out.index("}") + 1])
    assert info["runtime_torch_version"] == torch.__version__
    assert "devices visible: cpu" in out


@pytest.mark.skipif(not danet_ext.HAVE_EXTENSION, reason="extension not built")
def test_check_passes_on_cpu(capsys):
    assert main(["check", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "position_attention" in out and "channel_attention" in out
    assert out.strip().splitlines()[-1].endswith("0 failed")


@pytest.mark.parametrize("args,message", [
    (["segment", "--checkpoint", "missing.pt", "--image", "missing.png", "--out", "o.png"], "not found"),
    (["demo", "--steps", "0"], "--steps must be positive"),
    (["check", "--device", "cuda"] if not torch.cuda.is_available() else ["check", "--dtype", "float64", "--device", "cuda"],
     "cuda"),
])
def test_errors_are_one_line_without_traceback(args, message):
    res = run_cli(*args)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = [l for l in res.stderr.strip().splitlines() if l.startswith("danet-ext")]
    assert len(lines) == 1 and message in lines[0], res.stderr


def test_segment_writes_an_overlay_and_rejects_mismatched_checkpoints(tmp_path):
    from PIL import Image

    model = TinyDANet(len(CLASSES), width=8)
    ckpt = tmp_path / "tiny.pt"
    torch.save({"config": model.config, "state_dict": model.state_dict()}, ckpt)
    image = tmp_path / "img.png"
    Image.fromarray((make_batch(1, 40)[0][0].permute(1, 2, 0) * 255).byte().numpy()).save(image)
    out = tmp_path / "overlay.png"
    assert main(["segment", "--checkpoint", str(ckpt), "--image", str(image), "--out", str(out),
                 "--window", "32", "--flip"]) == 0
    assert Image.open(out).size == (40, 40)
    res = run_cli("segment", "--checkpoint", str(ckpt), "--image", str(image), "--out", str(out),
                  "--num-classes", "7")
    assert res.returncode == 2 and "does not fit" in res.stderr and "Traceback" not in res.stderr


def test_synthetic_data_and_miou():
    images, labels = make_batch(4, 48, torch.Generator().manual_seed(0))
    assert images.shape == (4, 3, 48, 48) and labels.shape == (4, 48, 48)
    assert 0 <= images.min() and images.max() <= 1
    assert set(labels.unique().tolist()) <= set(range(len(CLASSES))) and labels.max() > 0
    conf = confusion_matrix(labels, labels, len(CLASSES))
    assert conf.sum() == labels.numel() and mean_iou(conf) == 1.0
    wrong = confusion_matrix(torch.zeros_like(labels), labels, len(CLASSES))
    assert mean_iou(wrong) < 1.0


@pytest.mark.skipif(not danet_ext.HAVE_EXTENSION, reason="extension not built")
def test_demo_learns_well_above_chance(tmp_path):
    result = run_demo(out_dir=str(tmp_path), steps=150, batch=8, size=64, compare=False)
    assert result["miou"] > 2 * result["chance_miou"], result
    for name in ("demo_predictions.png", "tiny_danet.pt", "sample.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_peak_memory_sees_a_known_allocation():
    if not bm.cpu_peak_tracking_available():
        pytest.skip("no /proc/self/clear_refs")
    n = 16 * 2**20
    peak = bm.peak_memory(lambda: torch.ones(n // 4), "cpu")
    assert n <= peak < 2 * n


@pytest.mark.skipif(not danet_ext.HAVE_EXTENSION, reason="extension not built")
def test_benchmark_outputs(tmp_path):
    results = bm.bench_position_attention([(8, 8)], Cq=4, C=8, repeats=1)
    results += bm.bench_channel_attention([(8, 8)], channels=(8,), repeats=1)
    assert {r.impl for r in results} == {"danet_ext", "reference", "sdpa"}
    assert all(r.seconds and r.seconds > 0 for r in results)
    files = bm.write_results(results, str(tmp_path), bm.machine_info())
    data = json.loads(open(files[1]).read())
    assert data["machine"]["cores"] == os.cpu_count() and len(data["results"]) == len(results)
    assert "speed-up" in bm.format_table(results)
    png = bm.plot_results(results, str(tmp_path), "position_attention", "test", "pam")
    assert png and os.path.getsize(png) > 0
