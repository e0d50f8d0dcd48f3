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
            ids = open(ids_file).read().split()
            self.pairs = [(os.path.join(root, "JPEGImages", f"{i}.jpg"),
                           os.path.join(root, "SegmentationClass", f"{i}.png")) for i in ids]
        elif layout == "cityscapes":
            images = sorted(glob.glob(os.path.join(root, "leftImg8bit", split, "*", "*_leftImg8bit.png")))
            self.pairs = [(p, p.replace("leftImg8bit", "gtFine", 1).replace("_leftImg8bit.png",
                                                                              "_gtFine_labelTrainIds.png"))
                          for p in images]
        else:
            raise ValueError(f"unknown layout {layout!r}")
        if not self.pairs:
            raise FileNotFoundError(f"no images found under {root} ({layout} layout, split {split})")

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        from PIL import Image

        img_path, lab_path = self.pairs[i]
        img = Image.open(img_path).convert("RGB")
        lab = Image.open(lab_path)
        image = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3)
        label = torch.frombuffer(bytearray(lab.tobytes()), dtype=torch.uint8).view(lab.height, lab.width)
        return image.permute(2, 0, 1).float() / 255, label.long()
