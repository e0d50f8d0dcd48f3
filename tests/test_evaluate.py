"""`danet-ext evaluate` on a small VOC-layout folder dataset that the test writes:
the numbers it reports agree with an independent computation, and bad labels
are reported in one line."""
import json
import os

import pytest
import torch
from torch.nn import functional as F

from conftest import run_cli, save_tiny_checkpoint
from danet_ext.tools.evaluate import class_scores
from danet_ext.tools.synthetic import CLASSES, confusion_matrix, make_batch


def write_voc_folder(root, count=3, size=72, bad_label=False):
    from PIL import Image

    images, labels = make_batch(count, size, torch.Generator().manual_seed(3))
    labels[:, :4, :] = 255  # an ignored border, as VOC's object outlines
    if bad_label:
        labels[0, 10, 10] = 7
    os.makedirs(root / "JPEGImages")
    os.makedirs(root / "SegmentationClass")
    os.makedirs(root / "ImageSets" / "Segmentation")
    ids = [f"img{i}" for i in range(count)]
    for i, name in enumerate(ids):
        Image.fromarray((images[i].permute(1, 2, 0) * 255).round().byte().numpy()).save(
            root / "JPEGImages" / f"{name}.jpg", quality=95)
        Image.fromarray(labels[i].byte().numpy(), mode="L").save(root / "SegmentationClass" / f"{name}.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")


@pytest.fixture
def setup(tmp_path):
    return save_tiny_checkpoint(tmp_path / "tiny.pt", width=8, num_classes=len(CLASSES))


def test_evaluate_reports_what_an_independent_computation_finds(tmp_path, setup):
    from danet_ext.tools.datasets import FolderSegmentation

    model, ckpt = setup
    data = tmp_path / "voc"
    write_voc_folder(data)
    out = tmp_path / "eval"
    res = run_cli("evaluate", "--checkpoint", str(ckpt), "--data", str(data), "--scales", "1.0", "0.75",
                  "--flip", "--window", "128", "--precision", "float32", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "mIoU" in res.stdout and "pixel accuracy" in res.stdout
    result = json.loads((out / "evaluation.json").read_text())
    assert (out / "per_class_iou.png").stat().st_size > 0
    assert result["images"] == 3 and len(result["per_class_iou"]) == len(CLASSES)

    # independently: the plain float32 model (no folding, NCHW), whole images (the window
    # exceeds them), both scales, flips
    conf = torch.zeros(len(CLASSES), len(CLASSES), dtype=torch.long)
    for image, label in FolderSegmentation(str(data), "voc", "val"):
        H, W = image.shape[1:]
        probs = 0
        for s in (1.0, 0.75):
            x = F.interpolate(image[None], size=(round(H * s), round(W * s)), mode="bilinear", align_corners=True) \
                if s != 1.0 else image[None]
            with torch.no_grad():
                p = (model(x)[0].softmax(1) + model(x.flip(-1))[0].softmax(1).flip(-1)) / 2
            probs = probs + F.interpolate(p, size=(H, W), mode="bilinear", align_corners=True)
        conf += confusion_matrix(probs[0].argmax(0), label, len(CLASSES), ignore_index=255)
    expected = class_scores(conf)
    assert conf.sum() == 3 * (72 - 4) * 72  # the ignored rows are not counted
    assert abs(result["miou"] - expected["miou"]) < 0.002, (result["miou"], expected["miou"])
    assert abs(result["pixel_accuracy"] - expected["pixel_accuracy"]) < 0.002


def test_evaluate_compiled_reports_what_eager_does(tmp_path, setup):
    """--compile runs the same model through torch.compile: the same numbers."""
    _, ckpt = setup
    data = tmp_path / "voc"
    write_voc_folder(data, count=2, size=64)
    results, said = {}, {}
    for flag in ((), ("--compile",)):
        out = tmp_path / ("eval" + "".join(flag))
        res = run_cli("evaluate", "--checkpoint", str(ckpt), "--data", str(data), "--precision", "float32",
                      "--out", str(out), *flag)
        assert res.returncode == 0, res.stderr
        results[flag] = json.loads((out / "evaluation.json").read_text())
        said[flag] = res.stdout + res.stderr
    assert ", compiled (" in said[("--compile",)] and ", compiled (" not in said[()]
    eager, compiled = results[()], results[("--compile",)]
    assert compiled["images"] == eager["images"] == 2
    assert abs(compiled["miou"] - eager["miou"]) < 0.002, (compiled["miou"], eager["miou"])
    assert abs(compiled["pixel_accuracy"] - eager["pixel_accuracy"]) < 0.002


def test_compiled_model_runs_only_full_windows_compiled(tmp_path, setup):
    """A compiled model compiles once per input size (~10 s for DANet-101), so predict()
    sends only full windows, a size that comes again, through the compiled graph; images
    smaller than the window (whose sizes rarely repeat in a dataset) run eagerly. Both
    give what the eager model gives."""
    from danet_ext import optimize_for_inference
    from danet_ext.tools.segment import predict

    model, _ = setup
    eager = optimize_for_inference(model, precision="float32")
    fast = optimize_for_inference(model, precision="float32", compile=True)
    compiled = fast.__dict__["_compiled_model"]
    shapes = []

    def spy(x):
        shapes.append(tuple(x.shape))
        return compiled(x)

    fast.__dict__["_compiled_model"] = spy
    g = torch.Generator().manual_seed(0)
    small, large = torch.rand(3, 24, 30, generator=g), torch.rand(3, 50, 40, generator=g)
    torch.testing.assert_close(predict(fast, small, window=32, flip=True, normalize=False),
                               predict(eager, small, window=32, flip=True, normalize=False), rtol=1e-4, atol=1e-5)
    assert shapes == []  # 24 x 30 < the window: eager
    torch.testing.assert_close(predict(fast, large, window=32, batch=3, normalize=False),
                               predict(eager, large, window=32, batch=3, normalize=False), rtol=1e-4, atol=1e-5)
    assert shapes == [(3, 3, 32, 32), (1, 3, 32, 32)]  # 2 x 2 full windows, in batches of 3


def test_evaluate_rejects_labels_outside_the_classes(tmp_path, setup):
    _, ckpt = setup
    data = tmp_path / "voc"
    write_voc_folder(data, count=1, bad_label=True)
    res = run_cli("evaluate", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path / "e"))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("danet-ext: error")]
    assert len(errors) == 1 and "label value 7 is outside [0, 4)" in errors[0], res.stderr


def test_class_scores():
    conf = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    scores = class_scores(conf)
    assert scores["per_class_iou"] == [0.75, 2 / 3, None]
    assert scores["miou"] == pytest.approx((0.75 + 2 / 3) / 2)
    assert scores["pixel_accuracy"] == pytest.approx(5 / 6)
