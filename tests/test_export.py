"""`danet-ext export`: ONNX and OpenVINO models whose position attention runs one block
of queries at a time (MatMul, Softmax, MatMul; OpenVINO's model converted from that ONNX
form), and whose outputs match PyTorch's. Traces (OpenVINO's own conversion from PyTorch)
get scaled_dot_product_attention per block."""

import numpy as np
import pytest
import torch
from torch import nn

import danet_ext
from danet_ext import ops, reference
from conftest import run_cli, save_tiny_checkpoint


@pytest.fixture
def checkpoint(tmp_path):
    return save_tiny_checkpoint(tmp_path / "tiny.pt", width=16)


def test_onnx_export_matches(tmp_path, checkpoint):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model, ckpt = checkpoint
    out = tmp_path / "m.onnx"
    res = run_cli("export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(out), "--input-size", "72x96")
    assert res.returncode == 0, res.stderr
    # what it reports: PAM's one block and CAM, each a Softmax between two MatMuls, nothing fused
    assert "attention operations: {'Softmax': 2, 'MatMul': 4, 'fused': 0}" in res.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "tiny.pt"]  # one file, no m.onnx.data
    moved = tmp_path / "elsewhere" / "model.onnx"  # and it works copied alone
    moved.parent.mkdir()
    moved.write_bytes(out.read_bytes())
    out.unlink()
    node_types = [n.op_type for n in onnx.load(str(moved)).graph.node]
    # 9 x 12 positions, one block of queries: PAM's Softmax and CAM's C x C one
    assert node_types.count("Softmax") == 2 and node_types.count("Attention") == 0
    x = torch.rand(1, 3, 72, 96)
    sess = ort.InferenceSession(str(moved), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected = model(x)[0].numpy()
    assert got.shape == (1, 4, 72, 96)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_openvino_export_matches(tmp_path, checkpoint):
    ov = pytest.importorskip("openvino")
    model, ckpt = checkpoint
    out = tmp_path / "m.xml"
    res = run_cli("export", "--checkpoint", str(ckpt), "--format", "openvino", "--out", str(out),
                  "--input-size", "64x80")
    assert res.returncode == 0, res.stderr
    assert "attention operations: {'Softmax': 2, 'MatMul': 4, 'fused': 0}" in res.stdout
    core = ov.Core()
    ir = core.read_model(str(out))
    types = [op.get_type_name() for op in ir.get_ops()]
    assert types.count("Softmax") == 2 and types.count("ScaledDotProductAttention") == 0  # via ONNX: PAM, CAM
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


@pytest.mark.parametrize("block", [7, 40, 64])
def test_blocked_export_forms_are_the_reference(block):
    q, k = torch.randn(2, 3, 5, 8, dtype=torch.float64), torch.randn(2, 3, 5, 8, dtype=torch.float64)
    v = torch.randn(2, 6, 5, 8, dtype=torch.float64)
    expected = reference.position_attention(q, k, v)
    torch.testing.assert_close(reference.position_attention_sdpa(q, k, v, query_block=block), expected,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reference.position_attention_blocked(q, k, v, block), expected, rtol=1e-12, atol=1e-12)


class PositionAttentionOnly(nn.Module):
    def forward(self, q, k, v):
        return danet_ext.position_attention(q, k, v)


def _pam_inputs():
    return torch.randn(1, 4, 5, 8), torch.randn(1, 4, 5, 8), torch.randn(1, 8, 5, 8)  # 40 queries


def test_onnx_export_splits_the_queries_into_blocks(tmp_path, monkeypatch):
    """Each block of EXPORT_QUERY_BLOCK queries is one MatMul, Softmax, MatMul, so a runtime holds
    that many rows of scores at a time (O(N)), not N x N; the outputs still match."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    monkeypatch.setattr(ops, "EXPORT_QUERY_BLOCK", 16)
    q, k, v = _pam_inputs()
    path = str(tmp_path / "pam.onnx")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(PositionAttentionOnly(), (q, k, v), path, dynamo=True, opset_version=23,
                          verbose=False, external_data=False)
    types = [n.op_type for n in onnx.load(path).graph.node]
    assert types.count("Softmax") == 3 and types.count("MatMul") == 6  # 40 queries: 16 + 16 + 8
    assert types.count("Attention") == 0
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = sess.run(None, dict(zip([i.name for i in sess.get_inputs()], (q.numpy(), k.numpy(), v.numpy()))))[0]
    np.testing.assert_allclose(got, reference.position_attention(q, k, v).numpy(), rtol=1e-5, atol=1e-5)


def test_openvino_conversion_splits_the_queries_into_fused_blocks(monkeypatch):
    ov = pytest.importorskip("openvino")
    monkeypatch.setattr(ops, "EXPORT_QUERY_BLOCK", 16)
    q, k, v = _pam_inputs()
    converted = ov.convert_model(PositionAttentionOnly(), example_input=(q, k, v))
    types = [op.get_type_name() for op in converted.get_ops()]
    assert types.count("ScaledDotProductAttention") == 3 and types.count("Softmax") == 0
    got = ov.Core().compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(
        [q.numpy(), k.numpy(), v.numpy()])[0]
    np.testing.assert_allclose(got, reference.position_attention(q, k, v).numpy(), rtol=1e-4, atol=1e-4)
