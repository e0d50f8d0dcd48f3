"""danet-ext: fused DANet position and channel attention for PyTorch."""
from ._build import HAVE_EXTENSION, build_info
from .ops import channel_attention, position_attention
from . import reference

__version__ = "0.1.0"

__all__ = [
    "HAVE_EXTENSION",
    "build_info",
    "channel_attention",
    "position_attention",
    "reference",
]
