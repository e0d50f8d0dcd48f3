"""`danet-ext evaluate`: a checkpoint's mIoU on a folder dataset, the official
evaluation (single- or multi-scale, flip, sliding window) through the fast
inference path.

For each image the class probabilities are averaged over the scales (the image
resized by each, predicted with sliding windows, and the probabilities resized
back) and, with --flip, over the mirrored image; the prediction is their
argmax. Pixels labelled 255 are ignored. Writes a JSON with every number and a
PNG of the per-class IoU.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Dict, Optional, Sequence

import torch
from torch.nn import functional as F

from .datasets import IGNORE, FolderSegmentation
from .segment import load_model, model_classes, predict, prepare, takes_normalised_images
from .synthetic import confusion_matrix


def class_scores(conf: torch.Tensor) -> Dict[str, object]:
    """mIoU over the classes present (in labels or predictions), pixel accuracy and
    per-class IoU (None for a class absent from both) from a confusion matrix."""
    conf = conf.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    iou = [float(i / u) if u > 0 else None for i, u in zip(inter, union)]
    present = [v for v in iou if v is not None]
    total = float(conf.sum())
    return {"miou": sum(present) / len(present) if present else 0.0,
            "pixel_accuracy": float(inter.sum()) / total if total else 0.0,
            "per_class_iou": iou}


def predict_multiscale(model, image: torch.Tensor, scales: Sequence[float], flip: bool, window: int,
                       normalize: bool) -> torch.Tensor:
    """Class probabilities (K, H, W), averaged over scales (and flips)."""
    H, W = image.shape[1:]
    total = None
    for s in scales:
        h, w = max(1, round(H * s)), max(1, round(W * s))
        scaled = image if (h, w) == (H, W) else F.interpolate(image[None], size=(h, w), mode="bilinear",
                                                              align_corners=True)[0]
        p = predict(model, scaled, window=window, flip=flip, normalize=normalize)
        if (h, w) != (H, W):
            p = F.interpolate(p[None], size=(H, W), mode="bilinear", align_corners=True)[0]
        total = p if total is None else total + p
    return total / len(scales)


def evaluate_folder(checkpoint: str, data: str, layout: str = "voc", split: str = "val",
                    scales: Sequence[float] = (1.0,), flip: bool = False, window: int = 512,
                    precision: str = "auto", out_dir: Optional[str] = None, num_classes: Optional[int] = None,
                    backbone: Optional[str] = None, limit: Optional[int] = None,
                    progress: bool = True, compile: bool = False) -> Dict[str, object]:
    from tqdm import tqdm

    dataset = FolderSegmentation(data, layout, split)
    model = load_model(checkpoint, num_classes, backbone, verbose=progress)
    k = model_classes(model)
    names = getattr(model, "class_names", None) or [f"class {i}" for i in range(k)]
    normalize = takes_normalised_images(model)
    fast = prepare(model, precision, verbose=progress, compile=compile)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    conf = torch.zeros(k, k, dtype=torch.long)
    bar = tqdm(range(count), desc="evaluating", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    for i in bar:
        image, label = dataset[i]
        if label.shape != image.shape[1:]:
            raise ValueError(f"{dataset.pairs[i][1]}: label size {tuple(label.shape)} differs from the image's "
                             f"{tuple(image.shape[1:])}")
        bad = (label != IGNORE) & ((label < 0) | (label >= k))
        if bad.any():
            raise ValueError(f"{dataset.pairs[i][1]}: label value {int(label[bad][0])} is outside [0, {k}) "
                             f"and is not the ignore value {IGNORE}")
        pred = predict_multiscale(fast, image, scales, flip, window, normalize).argmax(0).cpu()
        conf += confusion_matrix(pred, label, k, ignore_index=IGNORE)
        bar.set_postfix(mIoU=f"{class_scores(conf)['miou']:.3f}")
    bar.close()
    if int(conf.sum()) == 0:  # mIoU and pixel accuracy of nothing are not 0
        raise ValueError(f"{data}: no labelled pixels in the {count} image(s) evaluated: every label pixel is "
                         f"the ignore value {IGNORE}")
    result = dict(class_scores(conf), images=count, checkpoint=checkpoint, data=data, layout=layout, split=split,
                  scales=list(scales), flip=flip, window=window, precision=str(fast.dtype).replace("torch.", ""),
                  class_names=list(names))
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "evaluation.json"), "w") as f:
            json.dump(result, f, indent=1)
        result["files"] = [os.path.join(out_dir, "evaluation.json"), plot_iou(result, out_dir)]
    return result


def format_result(result: Dict[str, object]) -> str:
    lines = [f"{'class':<20} {'IoU':>7}"]
    for name, iou in zip(result["class_names"], result["per_class_iou"]):
        lines.append(f"{name:<20} {'-' if iou is None else f'{iou:.4f}':>7}")
    lines.append(f"mIoU {result['miou']:.4f}   pixel accuracy {result['pixel_accuracy']:.4f}   "
                 f"({result['images']} images, scales {result['scales']}, flip {result['flip']}, "
                 f"{result['precision']})")
    return "\n".join(lines)


def plot_iou(result: Dict[str, object], out_dir: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = result["class_names"]
    values = [v if v is not None else 0.0 for v in result["per_class_iou"]]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(names) + 1.5), 3.6))
    ax.bar(range(len(names)), values, color="#4363d8")
    ax.axhline(result["miou"], color="#e6553a", linestyle="--", label=f"mIoU {result['miou']:.3f}")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("IoU")
    ax.set_title(f"per-class IoU, {result['images']} images, scales {result['scales']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "per_class_iou.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
