"""`danet-ext segment`: run a trained model on an image file and write a colour overlay."""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from .checkpoint import CheckpointError, load_checkpoint_file

# Palettes (RGB) of the two common benchmark label sets.
CITYSCAPES = [(128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
              (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
              (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)]


def voc_palette(n: int = 256):
    palette = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.append((r, g, b))
    return palette


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_model(checkpoint: str, num_classes: Optional[int] = None, backbone: str = "resnet101") -> nn.Module:
    """A model from a checkpoint: one written by `danet-ext demo` / examples/train.py
    ({"config": ..., "state_dict": ...}) or a bare DANet state dict (official format)."""
    from .demo import TinyDANet
    from .models import DANet

    state = load_checkpoint_file(checkpoint)
    config = state.get("config", {}) if isinstance(state, dict) else {}
    weights = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else None
    if not isinstance(weights, dict):
        raise CheckpointError(f"{checkpoint} holds no state dict")
    weights = {k[len("module."):] if k.startswith("module.") else k: v for k, v in weights.items()}
    classes = num_classes or config.get("num_classes")
    if classes is None:
        conv8 = weights.get("head.conv8.1.weight")
        if conv8 is None:
            raise CheckpointError("cannot tell the number of classes; pass --num-classes")
        classes = conv8.shape[0]
    if config.get("arch") == "tiny":
        model = TinyDANet(classes, width=config.get("width", 32))
    else:
        deep_stem = "pretrained.conv1.0.weight" in weights
        model = DANet(classes, backbone=config.get("backbone", backbone), deep_stem=deep_stem, aux=True)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        detail = next((line.strip() for line in first[1:] if line.strip()), first[0])
        raise CheckpointError(f"checkpoint does not fit the model ({classes} classes): {detail[:300]}") from exc
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, image: torch.Tensor, window: int = 512, flip: bool = False,
            normalize: bool = True) -> torch.Tensor:
    """Class probabilities (K, H, W) for one image (3, H, W) in [0, 1], by sliding a
    window with 1/3 overlap over images larger than `window`; `flip` averages with
    the mirrored image."""
    x = image.unsqueeze(0)
    if normalize:
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        x = (x - mean) / std
    H, W = x.shape[2:]

    def run(tile):
        out = model(tile)
        logits = out[0] if isinstance(out, tuple) else out
        probs = logits.softmax(1)
        if flip:
            out_f = model(tile.flip(-1))
            probs = probs + (out_f[0] if isinstance(out_f, tuple) else out_f).softmax(1).flip(-1)
        return probs

    if H <= window and W <= window:
        return run(x)[0]
    stride = max(1, window * 2 // 3)
    probs = None
    counts = torch.zeros(1, 1, H, W)
    ys = list(range(0, max(H - window, 0) + 1, stride))
    xs = list(range(0, max(W - window, 0) + 1, stride))
    if ys[-1] + window < H:
        ys.append(H - window)
    if xs[-1] + window < W:
        xs.append(W - window)
    for y0 in ys:
        for x0 in xs:
            tile = x[:, :, y0:y0 + window, x0:x0 + window]
            p = run(tile)
            if probs is None:
                probs = torch.zeros(1, p.shape[1], H, W)
            probs[:, :, y0:y0 + tile.shape[2], x0:x0 + tile.shape[3]] += p
            counts[:, :, y0:y0 + tile.shape[2], x0:x0 + tile.shape[3]] += 1
    return (probs / counts)[0]


def overlay(image: torch.Tensor, labels: torch.Tensor, palette, alpha: float = 0.5) -> torch.Tensor:
    colours = torch.tensor([palette[i % len(palette)] for i in range(int(labels.max()) + 1)],
                           dtype=torch.float32) / 255
    colour_map = colours[labels].permute(2, 0, 1)
    return (1 - alpha) * image + alpha * colour_map


def segment_file(checkpoint: str, image_path: str, out_path: str, num_classes: Optional[int] = None,
                 palette: str = "cityscapes", window: int = 512, flip: bool = False,
                 backbone: str = "resnet101") -> str:
    from PIL import Image

    if not os.path.isfile(image_path):
        raise FileNotFoundError(f"image not found: {image_path}")
    model = load_model(checkpoint, num_classes, backbone)
    try:
        pil = Image.open(image_path).convert("RGB")
    except Exception as exc:
        raise ValueError(f"cannot read image {image_path}: {exc}") from exc
    image = torch.frombuffer(bytearray(pil.tobytes()), dtype=torch.uint8).view(pil.height, pil.width, 3)
    image = image.permute(2, 0, 1).float() / 255
    # the demo's model was trained on raw [0, 1] pixels; DANet checkpoints on ImageNet-normalised ones
    normalize = not (isinstance(getattr(model, "config", None), dict) and model.config.get("arch") == "tiny")
    labels = predict(model, image, window=window, flip=flip, normalize=normalize).argmax(0)
    pal = CITYSCAPES if palette == "cityscapes" else voc_palette()
    if palette == "cityscapes" and int(labels.max()) >= len(CITYSCAPES):
        pal = voc_palette()
    result = overlay(image, labels, pal)
    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    Image.fromarray((result.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()).save(out_path)
    return out_path
