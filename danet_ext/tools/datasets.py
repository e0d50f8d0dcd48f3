"""Segmentation datasets stored as folders, in the two common layouts.

`voc`: JPEGImages/*.jpg with SegmentationClass/*.png (index PNGs, 255 = ignore)
and ImageSets/Segmentation/<split>.txt; `cityscapes`:
leftImg8bit/<split>/*/*_leftImg8bit.png with
gtFine/<split>/*/*_gtFine_labelTrainIds.png (255 = ignore).
Used by examples/train.py and `danet-ext evaluate`.
"""
from __future__ import annotations

import glob
import os

import torch
from torch.utils.data import Dataset

IGNORE = 255
LAYOUTS = ("voc", "cityscapes")


class FolderSegmentation(Dataset):
    """(image (3, H, W) float in [0, 1], label (H, W) int64) pairs of a folder dataset."""

    def __init__(self, root: str, layout: str, split: str = "train"):
        if layout == "voc":
            ids_file = os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")
            if not os.path.isfile(ids_file):
                raise FileNotFoundError(f"{ids_file} not found (voc layout)")
            with open(ids_file) as f:
                ids = f.read().split()
            self.pairs = [(os.path.join(root, "JPEGImages", f"{i}.jpg"),
                           os.path.join(root, "SegmentationClass", f"{i}.png")) for i in ids]
        elif layout == "cityscapes":
            image_dir = os.path.join(root, "leftImg8bit")
            images = sorted(glob.glob(os.path.join(glob.escape(image_dir), glob.escape(split), "*",
                                                   "*_leftImg8bit.png")))
            # the label's path mirrors the image's below root: gtFine/<split>/<city>/<name>_gtFine_...
            self.pairs = [(p, os.path.join(root, "gtFine", os.path.relpath(p, image_dir)[:-len("_leftImg8bit.png")]
                                           + "_gtFine_labelTrainIds.png")) for p in images]
        else:
            raise ValueError(f"unknown layout {layout!r}")
        if not self.pairs:
            raise FileNotFoundError(f"no images found under {root} ({layout} layout, split {split})")
        missing = [path for pair in self.pairs for path in pair if not os.path.isfile(path)]
        if missing:
            raise ValueError(f"{len(missing)} file(s) of the {layout} layout's split {split} are missing under "
                             f"{root}: {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}")

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        img_path, lab_path = self.pairs[i]
        return read_image(img_path), read_label(lab_path)


def _open(path: str):
    """The image at `path`, decoded; ValueError naming the file if PIL cannot read it."""
    from PIL import Image

    try:
        img = Image.open(path)
        img.load()
    except Exception as exc:  # UnidentifiedImageError, truncated data, a decompression bomb, ...
        raise ValueError(f"{path}: not a readable image: {exc}") from exc
    return img


def read_image(path: str) -> torch.Tensor:
    """An image file as (3, H, W) float in [0, 1], turned upright by its EXIF
    orientation. 16- and 32-bit greyscale images (which 8-bit RGB would clip)
    raise ValueError."""
    from PIL import ImageOps

    img = _open(path)
    if img.mode in ("I", "F") or img.mode.startswith("I;"):
        raise ValueError(f"{path}: mode {img.mode} (16- or 32-bit greyscale) is not supported; 8-bit RGB, "
                         f"greyscale or palette images are expected")
    try:
        img = ImageOps.exif_transpose(img).convert("RGB")
    except Exception as exc:
        raise ValueError(f"{path}: not a readable image: {exc}") from exc
    image = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3)
    return image.permute(2, 0, 1).float() / 255


def read_label(path: str) -> torch.Tensor:
    """A label image (8-bit class indices, mode L or P) as (H, W) int64."""
    lab = _open(path)
    if lab.mode not in ("L", "P"):
        raise ValueError(f"{path}: a label image must hold 8-bit class indices (PNG mode L or P), "
                         f"got mode {lab.mode}")
    return torch.frombuffer(bytearray(lab.tobytes()), dtype=torch.uint8).view(lab.height, lab.width).long()
