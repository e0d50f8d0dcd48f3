"""danet-ext: fused DANet position and channel attention for PyTorch."""
from ._build import HAVE_EXTENSION, build_info
from .ops import channel_attention, position_attention
from . import reference
from .nn import ChannelAttention, DANetHead, PositionAttention, set_backend
from .models import DANet, DANetLoss, load_torchvision_resnet
from .inference import InferenceModel, fold_batch_norms, optimize_for_inference
from .official import AccelerateReport, accelerate, load_official_checkpoint

__version__ = "0.1.0"

__all__ = [
    "AccelerateReport",
    "accelerate",
    "load_official_checkpoint",
    "ChannelAttention",
    "DANet",
    "DANetHead",
    "DANetLoss",
    "InferenceModel",
    "fold_batch_norms",
    "optimize_for_inference",
    "PositionAttention",
    "load_torchvision_resnet",
    "set_backend",
    "HAVE_EXTENSION",
    "build_info",
    "channel_attention",
    "position_attention",
    "reference",
]
