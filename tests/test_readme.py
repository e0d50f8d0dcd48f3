"""The README's quick start runs as written, given a checkpoint file in its place."""
import os
import re

import torch

import danet_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quick_start_code():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text[text.index("## Quick start"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_quick_start_runs(tmp_path, monkeypatch, capsys):
    code = quick_start_code()
    assert 'load_official_checkpoint("DANet101.pth.tar")' in code
    # stands in for the downloaded file: the official format, a smaller backbone
    model = danet_ext.DANet(19, backbone="resnet50")
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               tmp_path / "DANet101.pth.tar")
    del model
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, "README.md quick start", "exec"), scope)
    assert scope["labels"].shape == (1, 256, 512)
    assert scope["loss"].isfinite()
    assert "num_classes=19" in capsys.readouterr().out


def test_benchmark_tables_are_the_recorded_results():
    """Every table row that benchmarks/results_to_markdown.py prints from the recorded
    results (CPU, float32 and bfloat16) stands in the README as printed, so the numbers
    there are the measured ones."""
    import subprocess
    import sys

    readme = open(os.path.join(ROOT, "README.md")).read()
    script = os.path.join(ROOT, "benchmarks", "results_to_markdown.py")
    for dtype in ("float32", "bfloat16"):
        printed = subprocess.run([sys.executable, script, "--dtype", dtype], capture_output=True, text=True,
                                 check=True).stdout
        rows = [line for line in printed.splitlines() if line.startswith("| ") and not line.startswith("| mode")
                and not line.startswith("| image")]
        assert len(rows) >= 20, printed
        missing = [row for row in rows if row not in readme]
        assert not missing, f"README rows differ from benchmarks/results ({dtype}): {missing[:3]}"
