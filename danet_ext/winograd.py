"""3 x 3 convolutions by Winograd's F(4x4, 3x3) for CPU inference.

A 3 x 3 convolution with stride 1 and padding equal to its dilation (every 3 x 3
convolution of DANet's dilated ResNet and head but the stem's first) takes 36
multiplications per 4 x 4 outputs and channel pair instead of 144: the 36 products
run as GEMMs over the channels, and the transforms around them are cheap. On
DANet-ResNet-101 these convolutions are about 70 % of the float32 work.
optimize_for_inference swaps them in on the CPU in float32 (the kernel:
csrc/cpu/winograd_conv.cpp). The sums are reassociated: the outputs differ from
the direct convolution's by about 1e-5 of their magnitude (the direct one's own
float32 error is about 3e-7), and the accuracy guard of the inference tests covers
it. In bfloat16 it swaps in the widest ones where bfloat16 GEMMs are slow
(pays_off_in_bfloat16), computed in float32 between an exact widening and one
rounding; bfloat16 arithmetic inside the transforms would multiply its error.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ._build import HAVE_EXTENSION

# F(4x4, 3x3) with the points 0, 1, -1, 2, -2 and infinity (Lavin and Gray, 2016)
_G = torch.tensor([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                   [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=torch.float64)


def transform_filters(weight: Tensor) -> Tensor:
    """(C_out, C_in, 3, 3) filters -> (36, C_in, C_out) float32: G g Gᵀ for every channel
    pair, its 6 x 6 points in row-major order (computed in float64)."""
    if weight.dim() != 4 or weight.shape[2:] != (3, 3):
        raise ValueError(f"danet_ext: winograd filters must be (C_out, C_in, 3, 3), got {tuple(weight.shape)}")
    u = torch.einsum("ai,ocij,bj->abco", _G, weight.detach().to(torch.float64), _G)
    return u.reshape(36, weight.shape[1], weight.shape[0]).to(torch.float32).contiguous()


def winograd_conv3x3(x: Tensor, filters: Tensor, bias: Optional[Tensor], dilation: int) -> Tensor:
    """The convolution with transformed `filters` (transform_filters), stride 1,
    padding = dilation; float32 CPU tensors. Returns channels_last."""
    return torch.ops.danet_ext.winograd_conv3x3(x, filters, bias, dilation)


if HAVE_EXTENSION:
    @torch.library.register_fake("danet_ext::winograd_conv3x3")
    def _(x, filters, bias, dilation):
        torch._check(x.dim() == 4 and filters.dim() == 3 and filters.shape[1] == x.shape[1])
        return x.new_empty((x.shape[0], filters.shape[2], x.shape[2], x.shape[3])).contiguous(
            memory_format=torch.channels_last)

    def _no_backward(ctx, grad):
        raise RuntimeError("danet_ext: winograd_conv3x3 (WinogradConv2d) is for inference and has no backward; "
                           "train with nn.Conv2d (optimize_for_inference(..., winograd=False) keeps it)")

    # a clear error at backward instead of gradients that silently never arrive
    torch.library.register_autograd("danet_ext::winograd_conv3x3", _no_backward)


def supports(conv: nn.Module) -> bool:
    """Whether `conv` is a convolution this kernel computes: a plain Conv2d, 3 x 3,
    stride 1, padding = dilation (the same in both dimensions), one group, zero padding,
    float32 or bfloat16 weights on the CPU."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.groups == 1 and conv.padding_mode == "zeros" and conv.dilation[0] == conv.dilation[1]
            and conv.padding == conv.dilation and conv.weight.dtype in (torch.float32, torch.bfloat16)
            and conv.weight.device.type == "cpu")


def tile_efficiency(height: int, width: int, dilation: int) -> float:
    """The fraction of the kernel's 4 x 4 tile outputs that fall inside a height x width
    map. A dilated convolution is tiled per residue class modulo the dilation (the outputs
    of a tile are `dilation` apart), so a map only a few dilations wide leaves most of every
    tile outside: DANet's layer4 at dilation 16 on a 12 x 12 map computes 144 tiles for
    144 outputs, 1/16 of the work useful."""
    def tiles(n: int) -> int:  # along one axis, as make_tiles in csrc/cpu/winograd_conv.cpp
        return sum((-(-(n - q) // dilation) + 3) // 4 for q in range(min(dilation, n)))

    if height < 1 or width < 1:
        return 1.0
    return height * width / (16 * tiles(height) * tiles(width))


# Below this tile efficiency a dilated WinogradConv2d runs the direct convolution. Measured
# on a 2-core EPYC (float32, 512 -> 512): efficiency 0.56 (3 or 6 outputs per residue and
# axis) ran 0.81x to 1.29x the direct convolution's speed, 0.28 (dilation 8, 17 x 17) 0.51x,
# 1/16 (dilation 16, 12 x 12) 0.05x; from 0.72 up Winograd was 1.15x to 2.5x faster.
MIN_TILE_EFFICIENCY = 0.5
# bfloat16 (512 -> 512, against oneDNN's AVX512-BF16 direct convolution, which also skips
# the taps that fall outside the map): 0.36x to 0.59x at efficiency 0.56 to 0.57, 0.74x to
# 0.87x at 0.72 to 0.84, 0.73x to 1.22x from 0.91 up (1.02x to 1.22x at 64 x 128). With 0.9
# the whole DANet-101 (multi-grid 4, 8, 16) ran 0.7 % to 3.4 % faster than with 0.5 from
# 520 x 520 up (1.426 against 1.474 s at 520 x 520, 2.68 against 2.71 s at 512 x 1024).
MIN_TILE_EFFICIENCY_BFLOAT16 = 0.9


def min_tile_efficiency(dtype: torch.dtype) -> float:
    """The tile efficiency below which a dilated WinogradConv2d in `dtype` runs directly."""
    return MIN_TILE_EFFICIENCY_BFLOAT16 if dtype == torch.bfloat16 else MIN_TILE_EFFICIENCY


class WinogradConv2d(nn.Module):
    """A Conv2d (see `supports`) computed by Winograd's F(4x4, 3x3), for inference: no
    gradients (backward raises), float32 or bfloat16 CPU tensors (the dtype of the weights it
    was made from; not under autocast), and forward hooks of the convolution it replaces
    are not carried over. Holds the transformed filters, 4x the memory of the 3 x 3 weights
    (DANet-101 in float32: about 0.7 GB instead of 0.18 GB). A dilated one also keeps the
    3 x 3 weights (DANet-101: 80 MB more in float32, 14 MB in bfloat16, where only layer4's
    are swapped) and runs the direct convolution on maps where most of its tiles' outputs
    would fall outside the map (tile_efficiency below min_tile_efficiency(dtype)). That
    depends on the map's size modulo 4 x the dilation, not only on its size: in float32
    DANet's layer4 at dilation 16 runs directly for images up to 360 px and from 593 to 720 px
    (at output stride 8). At dilation 1 there is no fallback: it is faster than the direct
    convolution from about 16 x 16 positions up, and can be slower below that (DANet's
    features of images under about 128 px)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if not supports(conv):
            raise ValueError(f"danet_ext: WinogradConv2d takes a float32 or bfloat16 CPU Conv2d, 3 x 3, stride 1, "
                             f"padding = dilation, one group; got {conv}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.dilation = conv.dilation[0]
        self.dtype = conv.weight.dtype  # what it takes and returns; the arithmetic is float32
        self.register_buffer("filters", transform_filters(conv.weight))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().float().contiguous())
        # the direct convolution's weights, for maps too small for the dilated tiles
        self.register_buffer("weight", conv.weight.detach() if self.dilation > 1 else None)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"danet_ext: WinogradConv2d expects (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if x.dtype != self.dtype or x.device.type != "cpu":
            raise ValueError(f"danet_ext: this WinogradConv2d runs {self.dtype} CPU tensors, got {x.dtype} on {x.device}")
        if self.weight is not None and (tile_efficiency(x.shape[2], x.shape[3], self.dilation)
                                        < min_tile_efficiency(self.dtype)):
            bias = None if self.bias is None else self.bias.to(self.dtype)  # exact: it was self.dtype
            return F.conv2d(x, self.weight, bias, padding=self.dilation, dilation=self.dilation).contiguous(
                memory_format=torch.channels_last)
        if self.dtype == torch.float32:
            return winograd_conv3x3(x, self.filters, self.bias, self.dilation)
        # bfloat16 in and out, float32 inside (exact widening, one rounding of the output, as
        # the direct bfloat16 convolution rounds its own)
        return winograd_conv3x3(x.float(), self.filters, self.bias, self.dilation).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=(3, 3), dilation={self.dilation}, F(4x4, 3x3)"


# bfloat16 models (computed in float32 between one widening and one rounding): only where
# a bfloat16 GEMM is about twice as fast as a float32 one (AVX512-BF16 without AMX) and only
# for wide convolutions. Measured on a 2-core EPYC with AVX512-BF16 at 64x128 positions,
# against oneDNN's direct bfloat16 convolution: 512 -> 512 (dilation 4) 67 against 81 ms,
# 2048 -> 512 282 against 348 ms (split in 4), 256 -> 256 23 against 21 ms (no gain).
MIN_CHANNELS_BFLOAT16 = 512


def pays_off_in_bfloat16() -> bool:
    """Whether bfloat16 models take Winograd here: CPUs with AVX512-BF16 but not AMX-BF16
    (whose bfloat16 GEMMs run several times faster than float32 ones)."""
    from . import hardware

    return hardware.has_avx512_bf16() and not hardware.has_amx_bf16()


# Below this many input channels the 36 GEMMs are too thin to beat oneDNN's direct
# convolution: measured on a 2-core EPYC, 64 -> 64 at 128x256 positions took 8-20 ms
# against 11 ms direct (noisy, no clear gain); 128 -> 128 at 64x128 6-7 ms against 11 ms.
MIN_CHANNELS = 128


def min_channels_for(dtype: torch.dtype) -> Optional[int]:
    """The fewest input channels of a 3 x 3 convolution that optimize_for_inference runs by
    Winograd on this CPU for a model in `dtype`, or None where it runs none (no compiled
    extension; float16; bfloat16 where it does not pay off)."""
    if not HAVE_EXTENSION:
        return None
    if dtype == torch.float32:
        return MIN_CHANNELS
    if dtype == torch.bfloat16 and pays_off_in_bfloat16():
        return MIN_CHANNELS_BFLOAT16
    return None


def use_winograd(model: nn.Module, min_channels: Optional[int] = None) -> int:
    """Replace, in place, every Conv2d that `supports` accepts and that has at least
    `min_channels` (default MIN_CHANNELS) input channels by a WinogradConv2d; returns how
    many. For CPU inference (no gradients flow to the filters)."""
    if not HAVE_EXTENSION:
        return 0
    min_channels = MIN_CHANNELS if min_channels is None else min_channels
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if supports(child) and child.in_channels >= min_channels:
                setattr(parent, name, WinogradConv2d(child))
                swapped += 1
    return swapped
