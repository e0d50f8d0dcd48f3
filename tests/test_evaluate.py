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


def write_voc_folder(root, count=3, size=72, bad_label=False, all_ignored=False):
    from PIL import Image

    images, labels = make_batch(count, size, torch.Generator().manual_seed(3))
    labels[:, :4, :] = 255  # an ignored border, as VOC's object outlines
    if all_ignored:
        labels[:] = 255
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


def test_evaluate_refuses_to_score_no_labelled_pixels(tmp_path, setup):
    # every label pixel ignored: there is nothing to score, and 'mIoU 0.0000' would be a number
    # the model never earned
    _, ckpt = setup
    data = tmp_path / "voc"
    write_voc_folder(data, count=2, all_ignored=True)
    res = run_cli("evaluate", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path / "e"))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("danet-ext: error")]
    assert len(errors) == 1 and "no labelled pixels in the 2 image(s)" in errors[0], res.stderr
    assert not (tmp_path / "e" / "evaluation.json").exists()


def write_cityscapes_folder(root, count=2, size=40):
    from PIL import Image

    images, labels = make_batch(count, size, torch.Generator().manual_seed(3))
    os.makedirs(root / "leftImg8bit" / "val" / "aachen")
    os.makedirs(root / "gtFine" / "val" / "aachen")
    for i in range(count):
        Image.fromarray((images[i].permute(1, 2, 0) * 255).round().byte().numpy()).save(
            root / "leftImg8bit" / "val" / "aachen" / f"aachen_{i}_leftImg8bit.png")
        Image.fromarray(labels[i].byte().numpy(), mode="L").save(
            root / "gtFine" / "val" / "aachen" / f"aachen_{i}_gtFine_labelTrainIds.png")
    return labels


def evaluate_errors(res):
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    return [line for line in res.stderr.splitlines() if line.startswith("danet-ext: error")]


@pytest.mark.parametrize("mode", ["RGB", "I;16", "LA", "1"])
def test_label_images_must_hold_8bit_indices(tmp_path, mode):
    from PIL import Image

    from danet_ext.tools.datasets import FolderSegmentation

    write_voc_folder(tmp_path, count=1, size=40)
    label = tmp_path / "SegmentationClass" / "img0.png"
    Image.open(label).convert(mode).save(label)
    with pytest.raises(ValueError, match=f"img0.png: .*got mode {mode}$"):
        FolderSegmentation(str(tmp_path), "voc", "val")[0]


def test_palette_labels_read_as_their_indices(tmp_path):
    from PIL import Image

    from danet_ext.tools.datasets import FolderSegmentation

    write_voc_folder(tmp_path, count=1, size=40)
    label = tmp_path / "SegmentationClass" / "img0.png"
    before = FolderSegmentation(str(tmp_path), "voc", "val")[0][1]
    Image.open(label).convert("P").save(label)  # an index image with a palette, as VOC's
    assert Image.open(label).mode == "P"
    assert torch.equal(FolderSegmentation(str(tmp_path), "voc", "val")[0][1], before)


@pytest.mark.parametrize("which", ["image", "label"])
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_unreadable_images_name_the_file(tmp_path, setup, which, damage):
    from danet_ext.tools.datasets import FolderSegmentation

    write_voc_folder(tmp_path / "voc", count=1, size=40)
    path = tmp_path / "voc" / ("JPEGImages/img0.jpg" if which == "image" else "SegmentationClass/img0.png")
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] if damage == "truncated" else b"not an image\n" * 10)
    with pytest.raises(ValueError, match="img0.*: not a readable image"):
        FolderSegmentation(str(tmp_path / "voc"), "voc", "val")[0]
    if which == "image" and damage == "truncated":  # and in one line from the command
        _, ckpt = setup
        res = run_cli("evaluate", "--checkpoint", str(ckpt), "--data", str(tmp_path / "voc"),
                      "--out", str(tmp_path / "e"))
        errors = evaluate_errors(res)
        assert len(errors) == 1 and f"{path}: not a readable image" in errors[0], res.stderr


def test_images_are_turned_upright_by_their_exif_orientation(tmp_path):
    import numpy as np
    from PIL import Image

    from danet_ext.tools.datasets import read_image

    pixels = (torch.rand(30, 50, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned, show the image rotated 90 degrees clockwise
    path = tmp_path / "phone.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    stored = Image.open(path).convert("RGB")  # the pixels as stored, 50 wide and 30 high
    upright = torch.from_numpy(np.asarray(stored.transpose(Image.Transpose.ROTATE_270)).copy())
    image = read_image(str(path))
    assert image.shape == (3, 50, 30)
    assert torch.equal((image * 255).round().byte().permute(1, 2, 0), upright)


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_images_are_refused(tmp_path, mode):
    from PIL import Image

    from danet_ext.tools.datasets import read_image

    path = tmp_path / "deep.tif"
    Image.fromarray((torch.arange(40 * 40).reshape(40, 40) * 40).int().numpy()).convert(mode).save(path)
    assert Image.open(path).mode == mode
    with pytest.raises(ValueError, match=f"deep.tif: mode {mode} .*8-bit RGB, greyscale or palette"):
        read_image(str(path))


def test_cityscapes_labels_are_found_under_a_root_named_like_the_image_folder(tmp_path):
    from danet_ext.tools.datasets import FolderSegmentation

    root = tmp_path / "leftImg8bit_trainvaltest"  # the name of Cityscapes' own download
    labels = write_cityscapes_folder(root)
    dataset = FolderSegmentation(str(root), "cityscapes", "val")
    assert [lab for _, lab in dataset.pairs] == [
        str(root / "gtFine" / "val" / "aachen" / f"aachen_{i}_gtFine_labelTrainIds.png") for i in range(2)]
    assert torch.equal(dataset[1][1], labels[1])


@pytest.mark.parametrize("layout", ["voc", "cityscapes"])
def test_missing_files_are_listed_before_the_model_loads(tmp_path, layout):
    from danet_ext.tools.datasets import FolderSegmentation

    data = tmp_path / "data"
    if layout == "voc":
        write_voc_folder(data, count=5, size=32)
        gone = [data / "SegmentationClass" / f"img{i}.png" for i in (0, 2, 3, 4)]
    else:
        write_cityscapes_folder(data, count=5, size=32)
        gone = [data / "gtFine" / "val" / "aachen" / f"aachen_{i}_gtFine_labelTrainIds.png" for i in (0, 2, 3, 4)]
    for path in gone:
        path.unlink()
    with pytest.raises(ValueError) as info:
        FolderSegmentation(str(data), layout, "val")
    message = str(info.value)
    assert message.startswith(f"4 file(s) of the {layout} layout") and all(str(p) in message for p in gone[:3])
    assert str(gone[3]) not in message  # the first few only
    # the command says so before it reads the checkpoint (which is not one here)
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    res = run_cli("evaluate", "--checkpoint", str(tmp_path / "notes.pt"), "--data", str(data), "--layout", layout,
                  "--out", str(tmp_path / "e"))
    errors = evaluate_errors(res)
    assert len(errors) == 1 and "4 file(s)" in errors[0] and str(gone[0]) in errors[0], res.stderr


def test_class_scores():
    conf = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    scores = class_scores(conf)
    assert scores["per_class_iou"] == [0.75, 2 / 3, None]
    assert scores["miou"] == pytest.approx((0.75 + 2 / 3) / 2)
    assert scores["pixel_accuracy"] == pytest.approx(5 / 6)
