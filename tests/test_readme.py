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
