"""Checkpoint files are untrusted: a pickle that would run code is refused, never run.

The malicious file here is real: unpickling it without weights_only calls
os.system, which creates a marker file. The first test proves that, so the
others cannot pass because the payload was inert.
"""
import os
import subprocess
import sys

import pytest
import torch

from danet_ext.checkpoint import CheckpointError, load_checkpoint_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Payload:
    """Pickles as a call to os.system(command)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def write_malicious_checkpoint(path, marker):
    # the state dict shape the CLI and train.py expect, with the payload inside
    torch.save({"config": {"arch": "tiny", "num_classes": 4},
                "state_dict": {"head.conv8.1.weight": _Payload(f"touch {marker}")}}, path)


@pytest.fixture
def malicious(tmp_path):
    marker = tmp_path / "code-ran"
    ckpt = tmp_path / "evil.pt"
    write_malicious_checkpoint(ckpt, marker)
    return ckpt, marker


def _run(args, cwd=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_the_payload_is_live_when_loaded_unsafely(malicious):
    ckpt, marker = malicious
    res = _run(["-c", f"import torch; torch.load({str(ckpt)!r}, weights_only=False)"])
    assert res.returncode == 0, res.stderr
    assert marker.exists(), "the test payload did not run under weights_only=False: the other tests would prove nothing"


def test_load_checkpoint_file_refuses_it(malicious):
    ckpt, marker = malicious
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint_file(ckpt)
    assert not marker.exists()


def test_segment_refuses_it(malicious, tmp_path):
    from PIL import Image

    ckpt, marker = malicious
    image = tmp_path / "img.png"
    Image.new("RGB", (16, 16)).save(image)
    res = _run(["-m", "danet_ext", "segment", "--checkpoint", str(ckpt), "--image", str(image),
                "--out", str(tmp_path / "out.png")])
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and "refusing to load" in res.stderr, res.stderr
    assert not marker.exists()


def test_train_resume_refuses_it(malicious, tmp_path):
    ckpt, marker = malicious
    res = _run([os.path.join(ROOT, "examples", "train.py"), "--data", "synthetic", "--arch", "tiny",
                "--batch", "2", "--crop", "32", "--workers", "0", "--iters", "1", "--out", str(tmp_path / "run"),
                "--resume", str(ckpt)])
    assert res.returncode != 0
    assert "refusing to load" in res.stderr, res.stderr
    assert not marker.exists()


def test_plain_checkpoints_still_load(tmp_path):
    path = tmp_path / "ok.pt"
    state = {"config": {"arch": "tiny", "num_classes": 4}, "state_dict": {"w": torch.arange(3.0)}, "iter": 7}
    torch.save(state, path)
    loaded = load_checkpoint_file(path)
    assert loaded["iter"] == 7 and torch.equal(loaded["state_dict"]["w"], torch.arange(3.0))


@pytest.mark.parametrize("content,message", [(b"not a checkpoint at all\n", "not a readable PyTorch checkpoint"),
                                             (None, "is a directory")])
def test_non_checkpoints_get_a_clear_error(tmp_path, content, message):
    path = tmp_path / "thing"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint_file(path)


def test_a_small_file_cannot_make_us_allocate_a_large_model(tmp_path):
    # A TinyDANet's width comes from its first convolution's weight: a 0.4 MB file that holds only
    # that weight, at width 4096, names a 23 GiB model. Its missing keys must be found on a model
    # without storage, before anything is allocated: under an 8 GiB address-space limit the CLI
    # answers with the mismatch, where building the model first died in the allocator.
    import resource

    ckpt = tmp_path / "amplify.pt"
    torch.save({"config": {"arch": "tiny", "num_classes": 4, "width": 4096},
                "state_dict": {"pretrained.0.0.weight": torch.zeros(4096, 3, 3, 3)}}, ckpt)
    assert ckpt.stat().st_size < 1 << 20
    from PIL import Image

    image = tmp_path / "in.png"
    Image.new("RGB", (32, 24)).save(image)

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

    proc = subprocess.run([sys.executable, "-m", "danet_ext", "segment", "--checkpoint", str(ckpt), "--image",
                           str(image), "--out", str(tmp_path / "out.png")],
                          capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "does not fit TinyDANet(4, width=4096): 73 missing" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out.png").exists()


def test_a_truncated_checkpoint_is_called_truncated(tmp_path):
    # an interrupted download: the zip's local header is there, its central directory is not
    whole = tmp_path / "whole.pt"
    torch.save({"state_dict": {"w": torch.randn(1000)}}, whole)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cut.pt is a damaged or truncated torch.save archive"):
        load_checkpoint_file(cut)
