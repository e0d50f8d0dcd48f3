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
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than tensors and plain containers "
            f"(only weights are loaded, never code; {first[:200]})") from exc
    except Exception as exc:  # not a checkpoint at all: truncated, an image, a text file
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: "
                              f"{type(exc).__name__}: {str(exc).strip()[:200]}") from exc
