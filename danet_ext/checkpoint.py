"""Reading checkpoint files, which are untrusted input.

A `.pt`/`.pth` file is a pickle, and unpickling an arbitrary pickle runs
arbitrary code. Every file a user hands to danet_ext is read here, with
`torch.load(weights_only=True)`: tensors, numbers, strings and plain
containers load, anything else is refused before any of its code runs.
"""
from __future__ import annotations

import os
import pickle
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, unsafe, or of the wrong shape."""


_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _unpickler_detail(text: str) -> str:
    """The line of torch.load's weights_only error that says what was found."""
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(_TORCH_BOILERPLATE):
            return line.replace("WeightsUnpickler error:", "").strip() or line
    return text.strip()[:200]


_ZIP_HEADER = b"PK\x03\x04"  # a zip's local header: also there in a truncated archive


def _looks_like_a_checkpoint(path: str, head: bytes) -> bool:
    """torch.save writes a zip archive; older files are a pickle (protocol >= 2
    starts with 0x80). `head`: the file's first 4 bytes."""
    import zipfile

    # a truncated archive, whose central directory is missing, still starts with the zip
    # header: torch.load then says what is wrong with it
    return head.startswith((b"\x80", _ZIP_HEADER)) or zipfile.is_zipfile(path)


def load_checkpoint_file(path: str, map_location: Any = "cpu") -> Any:
    """torch.load(path, weights_only=True), with errors that say what went wrong.

    Raises FileNotFoundError for a missing file, CheckpointError for a directory,
    a file that is not a checkpoint, or one that holds objects other than tensors
    and plain containers (a pickle that would run code when loaded).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a directory, not a file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if not _looks_like_a_checkpoint(path, head):
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: neither torch.save's zip "
                              f"format nor a pickle (is it an image or a text file?)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = _unpickler_detail(str(exc))
        if "global" in detail.lower():  # a class or function reference: code would run
            raise CheckpointError(
                f"refusing to load {path}: it holds objects other than tensors and plain containers "
                f"(only weights are loaded, never code; {detail[:200]})") from exc
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({detail[:200]})") from exc
    except Exception as exc:  # not a checkpoint at all: truncated, an image, a text file
        if head == _ZIP_HEADER:
            raise CheckpointError(f"{path} is a damaged or truncated torch.save archive (an interrupted "
                                  f"download or save?): {str(exc).strip().split('. ')[0][:200]}") from exc
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: "
                              f"{type(exc).__name__}: {str(exc).strip()[:200]}") from exc


def extract_state_dict(obj: Any, source: str = "checkpoint") -> "dict[str, torch.Tensor]":
    """The state dict inside a loaded checkpoint: {'state_dict': ...}, {'model': ...}
    or a bare state dict, with a DataParallel `module.` prefix stripped.

    Raises CheckpointError unless it is a dict of string keys to tensors.
    """
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a state dict")
    weights = obj
    for key in ("state_dict", "model"):
        if key in obj and isinstance(obj[key], dict):
            weights = obj[key]
            break
    if not weights:
        raise CheckpointError(f"{source} holds no weights (an empty state dict)")
    bad_keys = [k for k in weights if not isinstance(k, str)]
    if bad_keys:
        raise CheckpointError(f"{source}: state dict keys must be strings, found {bad_keys[0]!r}")
    bad_values = [k for k, v in weights.items() if not isinstance(v, torch.Tensor)]
    if bad_values:
        raise CheckpointError(f"{source}: weight {bad_values[0]!r} is a {type(weights[bad_values[0]]).__name__}, "
                              f"not a tensor")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in weights.items()}


def check_finite(weights: "dict[str, torch.Tensor]", source: str = "checkpoint") -> None:
    """Raise CheckpointError where a floating-point tensor holds NaN or infinity: a training run
    that diverged writes such files, and a model holding them segments every pixel as class 0
    (the argmax of NaN) without a word."""
    broken = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise CheckpointError(f"{source}: {len(broken)} tensor(s) hold NaN or infinite values "
                              f"({', '.join(broken[:3])}{' and more' if len(broken) > 3 else ''})")
