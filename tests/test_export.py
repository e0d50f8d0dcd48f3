"""`danet-ext export`: ONNX and OpenVINO models whose position attention is one fused
attention operation, and whose outputs match PyTorch's."""

import numpy as np
import pytest
import torch

from conftest import run_cli, save_tiny_checkpoint


@pytest.fixture
def checkpoint(tmp_path):
    return save_tiny_checkpoint(tmp_path / "tiny.pt", width=16)


def test_onnx_export_has_one_fused_attention_and_matches(tmp_path, checkpoint):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model, ckpt = checkpoint
    out = tmp_path / "m.onnx"
    res = run_cli("export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(out), "--input-size", "72x96")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "tiny.pt"]  # one file, no m.onnx.data
    moved = tmp_path / "elsewhere" / "model.onnx"  # and it works copied alone
    moved.parent.mkdir()
    moved.write_bytes(out.read_bytes())
    out.unlink()
    ops = [n.op_type for n in onnx.load(str(moved)).graph.node]
    assert ops.count("Attention") == 1 and ops.count("Softmax") == 1  # CAM's C x C softmax only
    x = torch.rand(1, 3, 72, 96)
    sess = ort.InferenceSession(str(moved), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected = model(x)[0].numpy()
    assert got.shape == (1, 4, 72, 96)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_openvino_export_has_one_fused_attention_and_matches(tmp_path, checkpoint):
    ov = pytest.importorskip("openvino")
    model, ckpt = checkpoint
    out = tmp_path / "m.xml"
    res = run_cli("export", "--checkpoint", str(ckpt), "--format", "openvino", "--out", str(out),
                  "--input-size", "64x80")
    assert res.returncode == 0, res.stderr
    core = ov.Core()
    ir = core.read_model(str(out))
    types = [op.get_type_name() for op in ir.get_ops()]
    assert types.count("ScaledDotProductAttention") == 1
    x = torch.rand(1, 3, 64, 80)
    got = core.compile_model(ir, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x.numpy())[0]
    with torch.no_grad():
        expected = model(x)[0].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("args,message", [
    (["--format", "onnx", "--out", "m.xml"], "ending in .onnx"),
    (["--format", "openvino", "--out", "m.onnx"], "ending in .xml"),
    (["--format", "onnx", "--out", "m.onnx", "--input-size", "12x4000000"], "--input-size must be HxW"),
])
def test_export_argument_errors_are_one_line(tmp_path, checkpoint, args, message):
    _, ckpt = checkpoint
    res = run_cli("export", "--checkpoint", str(ckpt), *args)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("danet-ext: error")]
    assert len(errors) == 1 and message in errors[0], res.stderr


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_export_out_that_is_a_directory(tmp_path, checkpoint, fmt):
    _, ckpt = checkpoint
    out = tmp_path / ("model.onnx" if fmt == "onnx" else "model.xml")
    out.mkdir()
    res = run_cli("export", "--checkpoint", str(ckpt), "--format", fmt, "--out", str(out))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("danet-ext: error")]
    assert len(errors) == 1 and f"--out {out} is a directory" in errors[0], res.stderr
    assert "model:" not in res.stdout  # refused before the model loads
    assert list(out.iterdir()) == []
