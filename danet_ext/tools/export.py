"""`danet-ext export`: a checkpoint as a deployment model (ONNX or OpenVINO IR) whose
position attention runs one block of queries at a time, so the runtime holds O(N)
memory instead of the N x N matrix.

In export, danet_ext's position attention takes one block of ops.EXPORT_QUERY_BLOCK
queries at a time against every key, as the official MatMul, Softmax, MatMul
(reference.position_attention_blocked). Neither runtime's CPU attention avoids
materialising the scores (ONNX Runtime's fused opset-23 `Attention` holds them too, and
ran 2x slower), so the blocks bound them to 1024 x N at a time. The OpenVINO model is
converted from that ONNX form: converted from PyTorch (where a trace carries
scaled_dot_product_attention per block, reference.position_attention_sdpa), it held more
memory. BatchNorm is folded into the convolutions first. The exported model takes
a (1, 3, H, W) float32 image (ImageNet-normalised for DANet checkpoints) and returns
the (1, K, H, W) logits of DANet's main output. After writing, the file is run on a
random image and compared with PyTorch.
"""
from __future__ import annotations

import os
import tempfile
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..inference import fold_batch_norms
from .segment import load_model

FORMATS = {"onnx": ".onnx", "openvino": ".xml"}
EXTRA_HINT = "pip install 'danet-ext[export]'"


def _require(module: str, fmt: str):
    try:
        return __import__(module)
    except ImportError as exc:
        raise ValueError(f"--format {fmt} needs the {module} package, which is not installed: "
                         f"{EXTRA_HINT}") from exc


class MainOutput(nn.Module):
    """The model's first (fused) output only: what deployment needs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        return out[0] if isinstance(out, (tuple, list)) else out


def check_out_path(out: str, fmt: str) -> None:
    ext = FORMATS[fmt]
    if out.endswith(os.sep) or os.path.isdir(out):
        raise ValueError(f"--out {out} is a directory; give a file name such as {os.path.join(out, 'model' + ext)}")
    if not out.endswith(ext):
        raise ValueError(f"--out {out}: a {fmt} model is written to a file ending in {ext}")


def export_checkpoint(checkpoint: str, out: str, fmt: str = "onnx", size: Tuple[int, int] = (512, 1024),
                      num_classes: Optional[int] = None, backbone: Optional[str] = None,
                      verbose: bool = True) -> Dict[str, object]:
    import warnings

    check_out_path(out, fmt)
    # every package this format needs, before the model is loaded and run
    _require("onnx", fmt)
    _require("onnxscript", fmt)
    ov = _require("openvino", fmt) if fmt == "openvino" else None
    model = load_model(checkpoint, num_classes, backbone, verbose=verbose)
    fold_batch_norms(model)
    wrapped = MainOutput(model).eval()
    torch.manual_seed(0)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        expected = wrapped(x).numpy()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "onnx":
            export_onnx(wrapped, x, out)
            got = _run_onnx(out, x.numpy())
        else:
            # through the ONNX form: OpenVINO converted from PyTorch directly (its fused attention per
            # block) held 3.1 GiB at 1024 x 2048 where the ONNX form holds 0.7 GiB, and was no faster
            with tempfile.TemporaryDirectory(prefix="danet-export-") as tmp:
                onnx_path = os.path.join(tmp, "model.onnx")
                export_onnx(wrapped, x, onnx_path)
                ov.save_model(ov.convert_model(onnx_path), out)
            compiled = ov.Core().compile_model(out, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
            got = compiled(x.numpy())[0]
    err = float(np.abs(got - expected).max()) if got is not None else None
    return {"out": out, "format": fmt, "size": list(size), "max_abs_diff_vs_pytorch": err,
            "attention_ops": attention_ops(out, fmt)}


def export_onnx(model: nn.Module, x: torch.Tensor, path: str) -> None:
    """`model` at the input `x` as the ONNX file `danet-ext export` writes (the dynamo exporter,
    opset 23; the benchmark's export rows use it too)."""
    # one self-contained file (no <path>.data beside it): DANet's weights are far below ONNX's 2 GB limit
    torch.onnx.export(model, (x,), path, dynamo=True, opset_version=23, verbose=False,
                      input_names=["image"], output_names=["logits"], external_data=False)


def _run_onnx(path: str, x: np.ndarray) -> Optional[np.ndarray]:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def attention_ops(path: str, fmt: str) -> Dict[str, int]:
    """The attention operations of the exported graph: position attention is one Softmax and
    two MatMuls per block of ops.EXPORT_QUERY_BLOCK queries, channel attention one Softmax and
    two MatMuls; "fused" counts fused attention nodes (ONNX Attention, OpenVINO
    ScaledDotProductAttention), which a runtime may run holding every score, and is 0 for
    what export_checkpoint writes."""
    if fmt == "onnx":
        import onnx

        types = [n.op_type for n in onnx.load(path, load_external_data=False).graph.node]
        fused = types.count("Attention")
    else:
        import openvino as ov

        types = [op.get_type_name() for op in ov.Core().read_model(path).get_ops()]
        fused = types.count("ScaledDotProductAttention")
    return {"Softmax": types.count("Softmax"), "MatMul": types.count("MatMul"), "fused": fused}
