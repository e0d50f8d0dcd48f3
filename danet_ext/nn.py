"""Drop-in modules for DANet's attention: parameter names and shapes match the
official PAM_Module, CAM_Module and DANetHead, so their state dicts load unchanged."""
from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch import Tensor, nn

from .ops import BACKENDS, channel_attention, position_attention


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"danet_ext: backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def scaled_residual(gamma: Tensor, out: Tensor, x: Tensor, backend: str) -> Tensor:
    """y = gamma * out + x. The reference backend keeps the official expression, bit for
    bit; the others compute it in one pass (no gamma * out temporary), in x's memory
    format (channels_last stays channels_last)."""
    return gamma * out + x if backend == "reference" else torch.addcmul(x, gamma, out)


class PositionAttention(nn.Module):
    """Position attention module (official name: PAM_Module).

    y = gamma * position_attention(query_conv(x), key_conv(x), value_conv(x)) + x

    Args:
        in_channels: C of the input (B, C, H, W).
        reduction: query/key channels are in_channels // reduction (8 in DANet).
        backend: "auto" (compiled kernel when one fits the tensor's device and dtype,
            else the pure-PyTorch reference with one warning), "extension" or "reference".
    """

    def __init__(self, in_channels: int, reduction: int = 8, backend: str = "auto"):
        super().__init__()
        if in_channels < 1 or reduction < 1 or in_channels // reduction < 1:
            raise ValueError(f"danet_ext: PositionAttention needs in_channels // reduction >= 1, "
                             f"got in_channels={in_channels}, reduction={reduction}")
        self.in_channels = in_channels
        self.backend = _check_backend(backend)
        self.query_conv = nn.Conv2d(in_channels, in_channels // reduction, kernel_size=1)
        self.key_conv = nn.Conv2d(in_channels, in_channels // reduction, kernel_size=1)
        self.value_conv = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        out = position_attention(self.query_conv(x), self.key_conv(x), self.value_conv(x), backend=self.backend)
        return scaled_residual(self.gamma, out, x, self.backend)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, backend={self.backend!r}"


class ChannelAttention(nn.Module):
    """Channel attention module (official name: CAM_Module).

    y = gamma * channel_attention(x) + x
    """

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = _check_backend(backend)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        return scaled_residual(self.gamma, channel_attention(x, backend=self.backend), x, self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


def _conv_norm_relu(in_channels: int, out_channels: int, norm_layer: Callable[[int], nn.Module]) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        norm_layer(out_channels),
        nn.ReLU(),
    )


def _classifier(in_channels: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Dropout2d(0.1, False), nn.Conv2d(in_channels, num_classes, 1))


class DANetHead(nn.Module):
    """DANet's head: a position-attention branch and a channel-attention branch
    on in_channels // 4 features, summed before the final classifier.

    Returns (sasc, sa, sc) logits at the input's resolution: the fused output
    and the two branches' own (auxiliary) outputs.
    """

    def __init__(self, in_channels: int, num_classes: int,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d, backend: str = "auto"):
        super().__init__()
        inter = in_channels // 4
        if inter < 8:
            raise ValueError(f"danet_ext: DANetHead needs in_channels >= 32, got {in_channels}")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"danet_ext: DANetHead needs num_classes >= 1, got {num_classes!r}")
        self.conv5a = _conv_norm_relu(in_channels, inter, norm_layer)
        self.conv5c = _conv_norm_relu(in_channels, inter, norm_layer)
        self.sa = PositionAttention(inter, backend=backend)
        self.sc = ChannelAttention(backend=backend)
        self.conv51 = _conv_norm_relu(inter, inter, norm_layer)
        self.conv52 = _conv_norm_relu(inter, inter, norm_layer)
        self.conv6 = _classifier(inter, num_classes)
        self.conv7 = _classifier(inter, num_classes)
        self.conv8 = _classifier(inter, num_classes)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        # The official order (conv6, then conv7, then conv8), so that the three
        # Dropout2d layers draw their masks in the same sequence under one seed.
        sa_conv = self.conv51(self.sa(self.conv5a(x)))
        sa_output = self.conv6(sa_conv)
        sc_conv = self.conv52(self.sc(self.conv5c(x)))
        sc_output = self.conv7(sc_conv)
        return self.conv8(sa_conv + sc_conv), sa_output, sc_output

    def fused_output(self, x: Tensor) -> Tensor:
        """The fused (sasc) logits alone, without the two auxiliary classifiers, which
        only feed the training loss. (In training, forward keeps the official order of
        the Dropout masks; this draws conv8's first.)"""
        return self.conv8(self.conv51(self.sa(self.conv5a(x))) + self.conv52(self.sc(self.conv5c(x))))


def set_backend(module: nn.Module, backend: str) -> nn.Module:
    """Switch every attention module inside `module` to `backend`, including
    official-style modules swapped by `danet_ext.accelerate`; returns `module`."""
    _check_backend(backend)
    for m in module.modules():
        if isinstance(m, (PositionAttention, ChannelAttention)):
            m.backend = backend
        elif hasattr(m, "_danet_ext_accelerated"):
            m._danet_ext_backend = backend
    return module
