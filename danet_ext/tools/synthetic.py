"""A synthetic segmentation dataset made on the fly: coloured shapes (circles,
squares, triangles) on textured backgrounds. Class 0 is background."""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

CLASSES = ("background", "circle", "square", "triangle")
# One base hue per class; shapes vary around it, so colour helps but shape decides.
_BASE_COLOURS = torch.tensor([[0.0, 0.0, 0.0], [0.9, 0.3, 0.2], [0.2, 0.7, 0.3], [0.25, 0.35, 0.9]])


def make_batch(batch: int, size: int = 96, generator: torch.Generator | None = None) -> Tuple[Tensor, Tensor]:
    """Images (batch, 3, size, size) in [0, 1] and labels (batch, size, size) in 0..3."""
    g = generator
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    images = torch.empty(batch, 3, size, size)
    labels = torch.zeros(batch, size, size, dtype=torch.long)
    for b in range(batch):
        # textured background: a random stripe pattern plus noise, in a random dull colour
        angle = torch.rand((), generator=g) * math.pi
        freq = 0.1 + 0.3 * torch.rand((), generator=g)
        stripes = 0.5 + 0.5 * torch.sin(freq * (xs * torch.cos(angle) + ys * torch.sin(angle)))
        base = 0.25 + 0.3 * torch.rand(3, 1, 1, generator=g)
        img = base * (0.7 + 0.3 * stripes) + 0.06 * torch.randn(3, size, size, generator=g)
        lab = torch.zeros(size, size, dtype=torch.long)
        for _ in range(int(torch.randint(1, 4, (), generator=g))):
            cls = int(torch.randint(1, len(CLASSES), (), generator=g))
            r = size * (0.08 + 0.12 * torch.rand((), generator=g))
            cx, cy = (r + (size - 2 * r) * torch.rand(2, generator=g)).tolist()
            if cls == 1:
                mask = (xs - cx) ** 2 + (ys - cy) ** 2 < r ** 2
            elif cls == 2:
                mask = ((xs - cx).abs() < r * 0.85) & ((ys - cy).abs() < r * 0.85)
            else:
                top = cy - r
                mask = (ys > top) & (ys < cy + r) & ((xs - cx).abs() < (ys - top) * 0.6)
            colour = (_BASE_COLOURS[cls] + 0.7 * (torch.rand(3, generator=g) - 0.5)).clamp(0, 1)
            img = torch.where(mask, colour[:, None, None] * (0.85 + 0.15 * stripes), img)
            lab[mask] = cls
        images[b] = img.clamp(0, 1)
        labels[b] = lab
    return images, labels


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = -1) -> Tensor:
    keep = target != ignore_index
    idx = target[keep] * num_classes + pred[keep]
    return torch.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def mean_iou(conf: Tensor) -> float:
    """Mean intersection-over-union over the classes that occur (in target or prediction)."""
    conf = conf.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    present = union > 0
    return float((inter[present] / union[present]).mean()) if present.any() else 0.0
