"""`danet-ext segment`: run a trained model on an image file and write a colour overlay."""
from __future__ import annotations

import functools
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..checkpoint import CheckpointError, check_finite, extract_state_dict, load_checkpoint_file

# Palettes (RGB) of the two common benchmark label sets, and their class names.
CITYSCAPES = [(128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
              (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
              (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)]
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle")
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")

# Formats `--out` may name (PIL writes each of them).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MAX_CLASSES = 10_000
MIN_WINDOW = 32


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


# ----------------------------------------------------------------------------- input checks


def check_paths(checkpoint: str, image_path: str, out_path: str) -> None:
    """Everything about the three paths that can be checked before any work:
    raises FileNotFoundError or ValueError naming the option."""
    for option, path in (("--image", image_path), ("--checkpoint", checkpoint)):
        check_input_file(option, path)
    if out_path.endswith(os.sep) or os.path.isdir(out_path):
        raise ValueError(f"--out {out_path} is a directory; give a file name such as "
                         f"{os.path.join(out_path, 'overlay.png')}")
    if os.path.exists(out_path) and os.path.samefile(out_path, image_path):
        raise ValueError(f"--out {out_path} is the --image file itself; writing the overlay would overwrite it: "
                         f"give another name")
    ext = os.path.splitext(out_path)[1].lower()
    if ext not in IMAGE_EXTENSIONS:
        raise ValueError(f"--out {out_path}: the name must end in an image extension "
                         f"({', '.join(IMAGE_EXTENSIONS)}), got {ext or 'none'}")
    check_writable_dir(os.path.dirname(os.path.abspath(out_path)), "--out")


def check_input_file(option: str, path: str) -> None:
    """`path` is an existing file: raises FileNotFoundError or ValueError naming `option`."""
    if os.path.isdir(path):
        raise ValueError(f"{option} {path} is a directory; give one file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{option}: not found: {path}")


def check_writable_dir(directory: str, option: str) -> None:
    """`directory` exists as a writable folder or can be created: the nearest
    existing ancestor is a folder we may write to. Raises ValueError naming `option`."""
    ancestor = os.path.abspath(directory)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ValueError(f"{option}: {ancestor} is a file, so {directory} cannot be a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{option}: cannot write into {ancestor}")


def _positive_int(value: Any, name: str, source: str, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise CheckpointError(f"{source}: config[{name!r}] must be an integer in [1, {limit}], got {value!r}")
    return value


def read_config(state: Any, source: str) -> Dict[str, Any]:
    """The checkpoint's `config` (written by `danet-ext demo` and examples/train.py),
    validated: raises CheckpointError for anything odd."""
    from ..models.resnet import DEPTHS

    config = state.get("config", {}) if isinstance(state, dict) else {}
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: 'config' must be a dict, got {type(config).__name__}")
    config = dict(config)
    arch = config.get("arch", "danet")
    if arch not in ("danet", "tiny"):
        raise CheckpointError(f"{source}: config['arch'] must be 'danet' or 'tiny', got {arch!r}")
    config["arch"] = arch
    if "num_classes" in config:
        _positive_int(config["num_classes"], "num_classes", source, MAX_CLASSES)
    if "width" in config:
        _positive_int(config["width"], "width", source, 4096)
    if "backbone" in config and config["backbone"] not in DEPTHS:
        raise CheckpointError(f"{source}: config['backbone'] must be one of {sorted(DEPTHS)}, "
                              f"got {config['backbone']!r}")
    mg = config.get("multi_grid")
    if mg is not None and not (isinstance(mg, (list, tuple)) and len(mg) == 3
                               and all(isinstance(d, int) and 1 <= d <= 64 for d in mg)):
        raise CheckpointError(f"{source}: config['multi_grid'] must be three dilations, got {mg!r}")
    names = config.get("classes", state.get("classes") if isinstance(state, dict) else None)
    if names is not None:
        if not (isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names)):
            raise CheckpointError(f"{source}: the class names must be a list of strings, got {names!r:.80}")
        config["classes"] = list(names)
    return config


# ----------------------------------------------------------------------------- model


def load_model(checkpoint: str, num_classes: Optional[int] = None, backbone: Optional[str] = None,
               verbose: bool = False) -> nn.Module:
    """A model from a checkpoint: one written by `danet-ext demo` / examples/train.py
    ({"config": ..., "state_dict": ...}) or a DANet state dict in the official format
    (bare or under 'state_dict'; then the official evaluation's output stride 8 and
    multi-grid (4, 8, 16)). The number of classes and the backbone are checked
    against the keys before the model is built. The model's class names, when the
    checkpoint stores them, are in `model.class_names`."""
    from .demo import TinyDANet
    from ..models import DANet
    from ..official import NO_MISMATCH, OFFICIAL_DEFAULTS, describe_config, infer_danet_config, mismatch_summary

    state = load_checkpoint_file(checkpoint)
    config = read_config(state, checkpoint)
    weights = extract_state_dict(state, checkpoint)
    check_finite(weights, checkpoint)
    inferred = infer_danet_config(weights)
    shown = inferred["num_classes"]
    if num_classes is not None and not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"--num-classes must be in [1, {MAX_CLASSES}], got {num_classes}")
    classes = num_classes or config.get("num_classes") or shown
    if classes is None:
        raise CheckpointError(f"{checkpoint}: cannot tell the number of classes (no head.conv8.1.weight); "
                              f"pass --num-classes")
    if config["arch"] == "danet":
        hint = f"its keys show {describe_config(inferred)}"
    else:
        hint = f"its keys show {shown} classes" if shown is not None else "it has no classifier (head.conv8.1.weight)"
    if shown is not None and classes != shown:
        raise CheckpointError(f"{checkpoint} does not fit {classes} classes: {hint}; "
                              f"try --num-classes {shown}")
    if config["arch"] == "tiny":
        # the width decides the model's size: take it from the weights, never from the config alone
        stem = weights.get("pretrained.0.0.weight")
        if stem is None or stem.dim() != 4:
            raise CheckpointError(f"{checkpoint}: a TinyDANet checkpoint needs 'pretrained.0.0.weight', the first "
                                  f"convolution's (width, 3, 3, 3) weight; "
                                  f"{'it is missing' if stem is None else f'it has shape {tuple(stem.shape)}'}")
        width = config.get("width", int(stem.shape[0]))
        if width != stem.shape[0]:
            raise CheckpointError(f"{checkpoint}: config['width'] is {width}, but the weights are of width "
                                  f"{stem.shape[0]} (pretrained.0.0.weight has {stem.shape[0]} output channels)")
        width = _positive_int(width, "width", checkpoint, 4096)

        def build():
            return TinyDANet(classes, width=width)
        described = f"TinyDANet({classes}, width={width})"
    else:
        arch = backbone or config.get("backbone") or inferred["backbone"] or "resnet101"
        if inferred["backbone"] is not None and arch != inferred["backbone"]:
            raise CheckpointError(f"{checkpoint} does not fit backbone {arch}: {hint}; "
                                  f"try --backbone {inferred['backbone']}")
        official_format = "config" not in (state if isinstance(state, dict) else {})
        multi_grid = config.get("multi_grid", OFFICIAL_DEFAULTS["multi_grid"] if official_format else None)

        def build():
            return DANet(classes, backbone=arch, deep_stem=bool(inferred["deep_stem"]),
                         multi_grid=tuple(multi_grid) if multi_grid else None, aux=True)
        described = (f"DANet({classes}, backbone={arch}, deep_stem={bool(inferred['deep_stem'])}, "
                     f"multi_grid={tuple(multi_grid) if multi_grid else None})")
    # Every key and shape is checked on a model without storage first: the file is untrusted,
    # and a few of its keys (a TinyDANet's width) decide how much memory the model takes, so a
    # small file must not make us allocate gigabytes before its other keys are found wrong.
    with torch.device("meta"):
        mismatch = mismatch_summary(build(), weights)
    if mismatch != NO_MISMATCH:
        raise CheckpointError(f"{checkpoint} does not fit {described}: {mismatch}; {hint}")
    model = build()
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{checkpoint} does not fit {described}: {mismatch_summary(model, weights)}; "
                              f"{hint}") from exc
    names = config.get("classes")
    model.class_names = names if names is not None and len(names) == classes else None
    if verbose:
        print(f"model: {described}", flush=True)
    return model.eval()


# ----------------------------------------------------------------------------- prediction


def window_weights(size: int, ramp: int) -> torch.Tensor:
    """Per-row (or column) weight of a window's pixels: a linear ramp from near 0
    at each border to 1 at `ramp` pixels in. Where windows overlap, their
    probabilities are blended by these weights, so pixels near a window's border
    (which see its zero padding) count little and no seam forms."""
    d = torch.arange(size, dtype=torch.float32)
    dist = torch.minimum(d, size - 1 - d)
    return ((dist + 0.5) / max(ramp, 1)).clamp(max=1.0)


@torch.no_grad()
def predict(model: nn.Module, image: torch.Tensor, window: int = 512, flip: bool = False,
            normalize: bool = True, batch: int = 4) -> torch.Tensor:
    """Class probabilities (K, H, W) for one image (3, H, W) in [0, 1].

    Images larger than `window` are covered by windows that overlap by a third;
    each window's probabilities are weighted by `window_weights` (a ramp over the
    overlap) and the weighted sum is normalised, so window borders leave no seam.
    Windows (all of one size) run `batch` at a time. `flip` averages with the
    mirrored image. A compiled InferenceModel runs only full windows (window x
    window, a size that comes again) through its compiled graph and smaller images
    eagerly, so that a dataset of many image sizes does not compile once per size."""
    if window < MIN_WINDOW:
        raise ValueError(f"--window must be at least {MIN_WINDOW}, got {window}")
    x = image.unsqueeze(0)
    if normalize:
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        x = (x - mean) / std
    H, W = x.shape[2:]

    def run(tile):
        forward = model
        if getattr(model, "compiled", False) and tuple(tile.shape[2:]) != (window, window):
            forward = functools.partial(model, eager=True)
        out = forward(tile)
        probs = (out[0] if isinstance(out, (tuple, list)) else out).softmax(1)
        if flip:
            out_f = forward(tile.flip(-1))
            probs = (probs + (out_f[0] if isinstance(out_f, (tuple, list)) else out_f).softmax(1).flip(-1)) / 2
        if not torch.isfinite(probs).all():  # argmax of NaN says class 0 everywhere: never report that
            dtype = getattr(model, "dtype", None)
            raise ValueError("the model's output holds NaN or infinite values"
                             + (f" in {str(dtype).replace('torch.', '')} (try --precision float32)"
                                if dtype not in (None, torch.float32) else ""))
        return probs

    if H <= window and W <= window:
        return run(x)[0]

    def starts(length):
        stride = max(1, window * 2 // 3)
        s = list(range(0, max(length - window, 0) + 1, stride))
        if s[-1] + window < length:
            s.append(length - window)
        return s

    ramp = window - window * 2 // 3  # the overlap
    corners = [(y0, x0) for y0 in starts(H) for x0 in starts(W)]
    h, w = min(window, H), min(window, W)  # every window has this size
    weight = window_weights(h, ramp).view(h, 1) * window_weights(w, ramp).view(1, w)
    probs = total = None
    for first in range(0, len(corners), max(1, batch)):
        group = corners[first:first + max(1, batch)]
        p = run(torch.cat([x[:, :, y0:y0 + h, x0:x0 + w] for y0, x0 in group]))
        if probs is None:  # on the device the model returns its outputs on
            probs = torch.zeros(1, p.shape[1], H, W, device=p.device)
            total = torch.zeros(1, 1, H, W, device=p.device)
            weight = weight.to(p.device)
        for (y0, x0), pi in zip(group, p):
            probs[0, :, y0:y0 + h, x0:x0 + w] += pi * weight
            total[0, :, y0:y0 + h, x0:x0 + w] += weight
    return (probs / total)[0]


# ----------------------------------------------------------------------------- overlay


def background_index(names: Optional[Sequence[str]], palette: str) -> Optional[int]:
    """The class left unpainted: the one named "background", else class 0 for the
    VOC label set, else none (in Cityscapes every class is a thing or stuff)."""
    if names:
        lowered = [n.lower() for n in names]
        return lowered.index("background") if "background" in lowered else None
    return 0 if palette == "voc" else None


def legend_entries(labels: torch.Tensor, names: Optional[Sequence[str]], colours: Sequence[Tuple[int, int, int]],
                   background: Optional[int]) -> List[Tuple[str, Optional[Tuple[int, int, int]]]]:
    """(name, RGB colour) of every class present in `labels`; the background
    class, which is not painted, has colour None."""
    present = sorted(int(c) for c in labels.unique())
    return [(names[c] if names else f"class {c}",
             None if c == background else tuple(colours[c % len(colours)])) for c in present]


def overlay(image: torch.Tensor, labels: torch.Tensor, palette, alpha: float = 0.5,
            background: Optional[int] = None) -> torch.Tensor:
    colours = torch.tensor([palette[i % len(palette)] for i in range(int(labels.max()) + 1)],
                           dtype=torch.float32) / 255
    colour_map = colours[labels].permute(2, 0, 1)
    painted = (1 - alpha) * image + alpha * colour_map
    if background is None:
        return painted
    return torch.where(labels.unsqueeze(0) == background, image, painted)


def draw_legend(canvas, entries, x0: int):
    """Swatches and names, one per line, right of the image."""
    from PIL import ImageDraw, ImageFont

    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, (name, colour) in enumerate(entries):
        y = 6 + i * LEGEND_LINE
        draw.rectangle([x0 + 6, y, x0 + 6 + 12, y + 12], fill=colour, outline=(0, 0, 0))
        draw.text((x0 + 24, y), name if colour else f"{name} (not painted)", fill=(0, 0, 0), font=font)


LEGEND_LINE = 18


def segment_file(checkpoint: str, image_path: str, out_path: str, num_classes: Optional[int] = None,
                 palette: str = "cityscapes", window: int = 512, flip: bool = False,
                 backbone: Optional[str] = None, verbose: bool = False, precision: str = "auto") -> str:
    """Segment one image and write the overlay (image with classes painted
    half-transparent, background unpainted, a legend on the right). The model
    runs through danet_ext.optimize_for_inference at `precision`."""
    from PIL import Image, ImageFont

    from .datasets import read_image

    check_paths(checkpoint, image_path, out_path)
    if window < MIN_WINDOW:
        raise ValueError(f"--window must be at least {MIN_WINDOW}, got {window}")
    try:
        image = read_image(image_path)
    except ValueError as exc:
        raise ValueError(f"--image {exc}") from exc
    model = load_model(checkpoint, num_classes, backbone, verbose=verbose)
    normalize = takes_normalised_images(model)
    fast = prepare(model, precision, verbose)
    labels = predict(fast, image, window=window, flip=flip, normalize=normalize).argmax(0)
    names = model.class_names
    if names is None and palette == "cityscapes" and len(CITYSCAPES_CLASSES) == model_classes(model):
        names = list(CITYSCAPES_CLASSES)
    if names is None and palette == "voc" and len(VOC_CLASSES) == model_classes(model):
        names = list(VOC_CLASSES)
    pal = CITYSCAPES if palette == "cityscapes" else voc_palette()
    if palette == "cityscapes" and model_classes(model) > len(CITYSCAPES):
        pal = voc_palette()
    background = background_index(names, palette)
    result = overlay(image, labels, pal, background=background)
    entries = legend_entries(labels, names, pal, background)
    font = ImageFont.load_default()
    text_w = max((int(font.getlength(n + " (not painted)")) for n, _ in entries), default=0)
    legend_w = 24 + text_w + 8 if entries else 0
    H, W = labels.shape
    canvas = Image.new("RGB", (W + legend_w, max(H, 8 + len(entries) * LEGEND_LINE)), (255, 255, 255))
    canvas.paste(Image.fromarray((result.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()), (0, 0))
    draw_legend(canvas, entries, W)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    canvas.save(out_path)
    return out_path


def prepare(model: nn.Module, precision: str, verbose: bool = False, compile: bool = False) -> nn.Module:
    """The model through optimize_for_inference (BatchNorm folded, channels_last,
    the precision asked for, "auto" choosing what the hardware runs fastest), with glibc
    keeping freed activations for the next image (this command's own process); compile:
    through torch.compile as well (inductor, freezing)."""
    from ..inference import optimize_for_inference

    fast = optimize_for_inference(model, precision=precision, keep_memory=True, compile=compile)
    if verbose:
        print(f"inference: {str(fast.dtype).replace('torch.', '')}, channels_last, "
              f"{fast.folded_batch_norms} BatchNorms folded, {fast.split_convolutions} convolutions split"
              f"{', compiled (full windows; each batch size compiles first)' if compile else ''}, on {fast.device}",
              flush=True)
    return fast


def takes_normalised_images(model: nn.Module) -> bool:
    """DANet checkpoints were trained on ImageNet-normalised images; the demo's
    TinyDANet on raw [0, 1] pixels."""
    return not (isinstance(getattr(model, "config", None), dict) and model.config.get("arch") == "tiny")


def model_classes(model: nn.Module) -> int:
    return model.head.conv8[1].out_channels
