"""Preparing a model for the fastest inference this machine offers.

    fast = danet_ext.optimize_for_inference(model)          # precision="auto"
    logits = fast(images)                                   # float32 logits, as before

What it does, in order: a copy of the model in eval mode; every BatchNorm that
follows a convolution folded into that convolution's weights; channels_last
memory format; and the precision the hardware runs fastest: bfloat16 on a CPU
with AVX512-BF16 or AMX-BF16, float16 autocast on a CUDA GPU, float32
otherwise. Inputs are cast on the way in and outputs returned in float32, so
the result is a drop-in for the original model's forward.
"""
from __future__ import annotations

import contextlib
import copy
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import hardware
from .allocator import keep_freed_memory
from . import winograd as _winograd

PRECISIONS = ("auto", "float32", "bfloat16", "float16")


def choose_precision(device: Union[str, torch.device], precision: str = "auto") -> torch.dtype:
    """The dtype `precision` means on `device`: "auto" picks bfloat16 on CPUs with
    bfloat16 hardware, float16 on CUDA, float32 otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"danet_ext: precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if precision != "auto":
        return getattr(torch, precision)
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and hardware.has_fast_bfloat16():
        return torch.bfloat16
    return torch.float32


# --------------------------------------------------------------------------- BatchNorm folding

def _folded(conv: nn.Conv2d, bn: _BatchNorm) -> nn.Conv2d:
    """conv followed by bn (eval mode) as one convolution with a bias."""
    scale = bn.weight.detach() if bn.affine else torch.ones_like(bn.running_var)
    shift = bn.bias.detach() if bn.affine else torch.zeros_like(bn.running_mean)
    inv_std = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
    factor = (scale.double() * inv_std)
    fused = copy.deepcopy(conv)
    fused.weight = nn.Parameter((conv.weight.detach().double() * factor.view(-1, 1, 1, 1)).to(conv.weight.dtype))
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(factor)
    fused.bias = nn.Parameter(((bias - bn.running_mean.detach().double()) * factor + shift.double())
                              .to(conv.weight.dtype))
    return fused


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and isinstance(bn, _BatchNorm) and bn.track_running_stats
            and bn.running_mean is not None and conv.out_channels == bn.num_features)


def _fold_pairs(parent: nn.Module, pairs: List[Tuple[str, str]]) -> int:
    """Fold parent.<bn> into parent.<conv> for each (conv, bn) name pair."""
    done = 0
    for conv_name, bn_name in pairs:
        conv, bn = getattr(parent, conv_name, None), getattr(parent, bn_name, None)
        if isinstance(conv, nn.Sequential) and len(conv) and _foldable(conv[-1], bn):
            conv[-1] = _folded(conv[-1], bn)  # a deep stem: its last convolution feeds bn1
        elif _foldable(conv, bn):
            setattr(parent, conv_name, _folded(conv, bn))
        else:
            continue
        setattr(parent, bn_name, nn.Identity())
        done += 1
    return done


def fold_batch_norms(model: nn.Module) -> int:
    """Fold, in place, every BatchNorm that is known to follow a convolution directly:
    consecutive (Conv2d, BatchNorm) children of an nn.Sequential, the conv/bn pairs of
    the ResNet bottleneck and stem. The model must be in eval mode. Returns how many
    were folded."""
    from .models.resnet import Bottleneck, DilatedResNet

    if model.training:
        raise ValueError("danet_ext: fold_batch_norms needs a model in eval mode (running statistics)")
    folded = 0
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                if _foldable(module[i], module[i + 1]):
                    module[i] = _folded(module[i], module[i + 1])
                    module[i + 1] = nn.Identity()
                    folded += 1
        elif isinstance(module, Bottleneck):
            folded += _fold_pairs(module, [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")])
        elif isinstance(module, DilatedResNet):
            folded += _fold_pairs(module, [("conv1", "bn1")])
    return folded


# --------------------------------------------------------------------------- large convolutions

# Output channels per chunk are chosen so that each chunk's weights take at most this many
# bytes. Measured on a 2-core AMD EPYC (2 MiB L2 per core, 32 MiB L3), batch 1, channels_last,
# oneDNN's brgconv, 3x3 convolutions at 64x128 (ms whole; split in 2, 4, 8 chunks):
#   2048 -> 512 bfloat16 (18 MiB, DANet's conv5a/conv5c): 440; 350, 347, 351 (1639 -> 1381 at 128x256)
#   2048 -> 512 float32 (36 MiB): 869; 856, 695, 693
#   1024 -> 512 float32 (18 MiB): 430; 410, 344, 350
#   1024 -> 512 bfloat16 (9 MiB): 169; 169, 171, 172 -- and 512 -> 512 float32 (9 MiB,
#   dilated): 171; 169, 165, 171: neutral, so the float32 512 -> 512 ones being split costs nothing.
# Chunks of 9 MiB were not always enough (410 against 344), chunks of 4.5 MiB always were;
# 1x1 convolutions ran no faster split.
SPLIT_CONV_WEIGHT_BYTES = 8 * 2 ** 20


class SplitConv2d(nn.Module):
    """A Conv2d computed as `chunks` convolutions over consecutive blocks of its output
    channels, concatenated: the same sums per output channel, with each chunk's weights
    small enough for oneDNN to keep its blocking in cache."""

    def __init__(self, conv: nn.Conv2d, chunks: int):
        super().__init__()
        if conv.groups != 1 or conv.out_channels % chunks:
            raise ValueError(f"danet_ext: cannot split {conv} into {chunks} chunks")
        self.convs = nn.ModuleList()
        per = conv.out_channels // chunks
        for i in range(chunks):
            part = copy.deepcopy(conv)
            part.out_channels = per
            part.weight = nn.Parameter(conv.weight.detach()[i * per:(i + 1) * per].clone(
                memory_format=torch.channels_last), requires_grad=False)
            if conv.bias is not None:
                part.bias = nn.Parameter(conv.bias.detach()[i * per:(i + 1) * per].clone(), requires_grad=False)
            self.convs.append(part)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([conv(x) for conv in self.convs], dim=1)


def _split_chunks(conv: nn.Conv2d, element_size: int) -> int:
    """How many output-channel chunks `conv` is worth splitting into (1: none)."""
    if conv.groups != 1 or tuple(conv.kernel_size) == (1, 1):
        return 1
    chunks = 1
    per_chunk = conv.weight.numel() * element_size
    while (per_chunk > SPLIT_CONV_WEIGHT_BYTES and conv.out_channels % (2 * chunks) == 0
           and conv.out_channels // (2 * chunks) >= 64):
        chunks *= 2
        per_chunk //= 2
    return chunks


def split_large_convolutions(model: nn.Module) -> int:
    """Replace, in place, every Conv2d whose weights exceed SPLIT_CONV_WEIGHT_BYTES (in the
    weights' dtype) by a SplitConv2d; returns how many were split. For CPU inference only."""
    split = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Conv2d:
                chunks = _split_chunks(child, child.weight.element_size())
                if chunks > 1:
                    setattr(parent, name, SplitConv2d(child, chunks))
                    split += 1
    return split


def _upsample_in_float32(model: nn.Module) -> None:
    """DANet upsamples its logits to the image size last: done in float32 from the small
    logits, the large output needs no conversion afterwards (and is more accurate)."""
    from .models.danet import DANet

    for module in model.modules():
        if isinstance(module, DANet):
            module.output_dtype = torch.float32


# --------------------------------------------------------------------------- the prepared model

class InferenceModel(nn.Module):
    """A model prepared by optimize_for_inference: takes float32 (or any) images,
    runs in `dtype` and channels_last on `device`, returns float32 outputs with the
    structure of the original model's (a tensor or a tuple of tensors)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, device: torch.device, autocast: bool,
                 folded: int, compiled: bool = False, split: int = 0, winograd: int = 0):
        super().__init__()
        self.model = model
        # torch.compile's wrapper of the same module, kept out of the module tree so that the
        # parameters are registered once (the state_dict keys do not change with `compiled`)
        self.__dict__["_compiled_model"] = torch.compile(model) if compiled else None
        self.dtype = dtype
        self.device = device
        self.autocast = autocast
        self.folded_batch_norms = folded
        self.split_convolutions = split
        self.winograd_convolutions = winograd
        self.compiled = compiled

    @torch.inference_mode()
    def forward(self, x: Tensor, eager: bool = False):
        """`eager=True` skips torch.compile for this call: every new input size compiles
        the graph afresh (about 10 s for DANet-ResNet-101 on 2 cores), which only pays off
        for sizes that come again, such as full sliding windows; `predict` runs the rest
        (whole images smaller than the window) eagerly."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            # an integer image (0-255) cast to float would run as if it were normalised
            raise TypeError(f"danet_ext: the optimized model takes a floating-point image batch (B, 3, H, W), "
                            f"normalised as the model was trained; got "
                            f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
        x = x.to(self.device, non_blocking=True)
        x = x.to(dtype=torch.float32 if self.autocast else self.dtype, memory_format=torch.channels_last)
        compiled = self.compiled and not eager
        with contextlib.ExitStack() as stack:
            if compiled:  # weights become constants of the compiled graph (inductor's freezing)
                import torch._inductor.config as inductor_config

                stack.enter_context(inductor_config.patch(freezing=True))
            if self.autocast:
                stack.enter_context(torch.autocast(self.device.type, dtype=self.dtype))
            out = (self._compiled_model if compiled else self.model)(x)
        if isinstance(out, (tuple, list)):
            return type(out)(o.float().contiguous() for o in out)
        return out.float().contiguous()

    def extra_repr(self) -> str:
        return (f"dtype={self.dtype}, device={self.device}, autocast={self.autocast}, "
                f"folded_batch_norms={self.folded_batch_norms}, split_convolutions={self.split_convolutions}, "
                f"winograd_convolutions={self.winograd_convolutions}, "
                f"compiled={self.compiled}")


def optimize_for_inference(model: nn.Module, precision: str = "auto",
                           device: Optional[Union[str, torch.device]] = None,
                           fold_bn: bool = True, compile: bool = False,
                           split_convs: bool = True, keep_memory: bool = False,
                           winograd: bool = True) -> InferenceModel:
    """A copy of `model` prepared for fast inference (the original is left as it is).

    Args:
        model: any segmentation model, e.g. danet_ext.DANet or an official DANet.
        precision: "auto" (bfloat16 on a CPU with bfloat16 hardware, float16 autocast on
            CUDA, float32 otherwise), or "float32", "bfloat16", "float16" to force one.
            On the CPU a reduced precision converts the weights; on CUDA it runs under
            torch.autocast (softmax and reductions stay in float32).
        device: where to run; default: where the model's parameters are.
        fold_bn: fold BatchNorm into the preceding convolutions.
        split_convs: on the CPU, compute convolutions with large weights (DANet's conv5a
            and conv5c) in chunks of output channels, which oneDNN runs faster
            (SPLIT_CONV_WEIGHT_BYTES says what was measured); the sums are the same.
        winograd: in float32 on the CPU, compute the 3 x 3 convolutions with stride 1,
            padding equal to the dilation and at least 128 input channels (33 of
            DANet-101's) by Winograd's F(4x4, 3x3)
            (danet_ext/winograd.py): a quarter of the multiplications, outputs within
            about 1e-5 of their magnitude of the direct convolution's. Its filters take 4x
            the memory of the 3 x 3 weights (DANet-101: ~0.7 GB instead of 0.18 GB). In
            bfloat16 on CPUs with AVX512-BF16 but not AMX, the same in float32 for the
            convolutions with 512 input channels and more (layer4, conv5a/c, conv51/52),
            where it is faster than the direct bfloat16 convolution and as accurate.
            Dilated ones keep their 3 x 3 weights too and run directly on maps too small
            for their tiles (winograd.tile_efficiency).
        keep_memory: on the CPU, call keep_freed_memory(): glibc then keeps freed
            activations for the next forward instead of page-faulting them in afresh (5 to
            9 % faster at 1024x2048, ~0.6 GiB more resident). A process-wide setting, so
            off by default here; the CLI's segment and evaluate turn it on.
        compile: run through torch.compile (inductor, freezing). On the CPU it pays off
            little since the Winograd convolutions (opaque to inductor): measured on a
            2-core AMD EPYC (AVX512-BF16) on 2026-12-01, the released DANet-ResNet-101 at
            512x1024 took 2.76 s in bfloat16 and 3.95 s in float32 a forward, against 2.84
            and 4.21 s eager, after first calls of 11-12 s (on 2026-11-30, with a 7 x 7 stem,
            0 to 3 % either way). Each new input size compiles again (forward(x, eager=True)
            runs a one-off size without it). Off by default.
    Returns:
        an InferenceModel whose forward takes images and returns float32 outputs.
    """
    first = next(model.parameters(), None)
    device = torch.device(device) if device is not None else (first.device if first is not None
                                                              else torch.device("cpu"))
    dtype = choose_precision(device, precision)
    prepared = copy.deepcopy(model).eval()
    folded = fold_batch_norms(prepared) if fold_bn else 0
    autocast = device.type == "cuda" and dtype != torch.float32
    prepared = prepared.to(device=device, memory_format=torch.channels_last)
    if not autocast:
        prepared = prepared.to(dtype)
    min_channels = _winograd.min_channels_for(dtype) if winograd and device.type == "cpu" else None
    swapped = _winograd.use_winograd(prepared, min_channels) if min_channels is not None else 0
    split = split_large_convolutions(prepared) if split_convs and device.type == "cpu" else 0
    if keep_memory and device.type == "cpu":
        keep_freed_memory()
    for p in prepared.parameters():
        p.requires_grad_(False)
    _upsample_in_float32(prepared)
    return InferenceModel(prepared, dtype, device, autocast, folded, compiled=compile, split=split,
                          winograd=swapped)
