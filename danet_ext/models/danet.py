"""DANet: a dilated ResNet (`pretrained`, the official attribute name) and the
dual-attention head (`head`), with outputs upsampled to the input size."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..nn import DANetHead
from .resnet import dilated_resnet

UP_KWARGS = {"mode": "bilinear", "align_corners": True}


class DANet(nn.Module):
    """Dual Attention Network for scene segmentation.

    Args:
        num_classes: number of segmentation classes.
        backbone: "resnet101" (the paper's), "resnet50" or "resnet152".
        output_stride: 8 (the paper's), 16 or 32.
        multi_grid: dilations of layer4's three blocks, e.g. (4, 8, 16); None for uniform.
        deep_stem: three-convolution stem, as in the official backbone checkpoints.
        aux: return (sasc, sa, sc) for training with DANetLoss; False returns sasc alone.
        norm_layer: e.g. nn.BatchNorm2d; nn.SyncBatchNorm.convert_sync_batchnorm works on the result.
        backend: attention backend, "auto", "extension" or "reference".

    A state dict of the official DANet (keys pretrained.*, head.*) loads with
    strict=True; `pretrained.fc.*` keys, which older code saved, are dropped.
    `danet_ext.load_official_checkpoint` builds the right DANet for a file.
    """

    def __init__(self, num_classes: int, backbone: str = "resnet101", output_stride: int = 8,
                 multi_grid: Optional[Sequence[int]] = None, deep_stem: bool = False, aux: bool = True,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d, backend: str = "auto"):
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"danet_ext: DANet needs num_classes >= 1, got {num_classes!r}")
        self.num_classes = num_classes
        self.aux = aux
        self.pretrained = dilated_resnet(backbone, output_stride=output_stride, multi_grid=multi_grid,
                                         deep_stem=deep_stem, norm_layer=norm_layer)
        self.head = DANetHead(2048, num_classes, norm_layer=norm_layer, backend=backend)

    # dtype the logits are upsampled and returned in (None: the model's own); optimize_for_inference
    # sets float32 for a reduced-precision model. A class attribute, so that models pickled
    # before it existed still run.
    output_dtype: Optional[torch.dtype] = None

    def forward(self, x: Tensor) -> Union[Tensor, Tuple[Tensor, Tensor, Tensor]]:
        size = x.shape[2:]
        c4 = self.pretrained.forward_features(x)[3]
        fused_only = getattr(self.head, "fused_output", None)  # a head swapped for another may lack it
        if self.aux or self.training or fused_only is None:
            outputs = self.head(c4)
            outputs = outputs if self.aux else outputs[:1]
        else:  # the auxiliary outputs would be computed and upsampled only to be dropped
            outputs = (fused_only(c4),)
        outputs = tuple(self._upsample(o, size) for o in outputs)
        return outputs if self.aux else outputs[0]

    def _upsample(self, logits: Tensor, size) -> Tensor:
        # The logits have few channels: upsampling them in NCHW writes the large output
        # contiguously (from channels_last logits, 4x faster at 512x1024 in a measurement).
        logits = logits.to(dtype=self.output_dtype or logits.dtype, memory_format=torch.contiguous_format)
        return F.interpolate(logits, size=size, **UP_KWARGS)

    def head_parameters(self):
        """Parameters the official recipe trains with 10x the learning rate."""
        return self.head.parameters()

    def backbone_parameters(self):
        return self.pretrained.parameters()


class DANetLoss(nn.Module):
    """Cross-entropy summed over DANet's three outputs, as the official training:
    loss = CE(sasc) + aux_weight * (CE(sa) + CE(sc)). A single tensor is scored alone.

    Each term is the mean over the pixels whose target is not `ignore_index`; a
    batch in which every pixel is ignored gives 0 (with zero gradients), not NaN.
    A target outside [0, num_classes) that is not `ignore_index` raises a
    ValueError (datasets that mark unlabelled pixels with 255, as VOC and mmseg
    do, need ignore_index=255).
    """

    def __init__(self, aux_weight: float = 1.0, ignore_index: int = -1):
        super().__init__()
        self.aux_weight = aux_weight
        self.ignore_index = ignore_index

    def _checked_target(self, logits: Tensor, target: Tensor) -> Tensor:
        """`target` as int64 (so that ignore_index=-1 never wraps around in uint8), checked."""
        if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"danet_ext: DANetLoss target must hold integer class indices, got {target.dtype}")
        target = target.long()
        num_classes = logits.shape[1]
        bad = (target != self.ignore_index) & ((target < 0) | (target >= num_classes))
        if bool(bad.any()):
            values = sorted(set(target[bad].unique()[:5].tolist()))
            raise ValueError(
                f"danet_ext: DANetLoss target holds {values}, outside [0, {num_classes}) and not ignore_index "
                f"({self.ignore_index}); if those values mark unlabelled pixels (255 in VOC and mmseg), "
                f"pass DANetLoss(ignore_index={values[-1]})")
        return target

    def _ce(self, logits: Tensor, target: Tensor) -> Tensor:
        total = F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="sum")
        count = (target != self.ignore_index).sum().clamp(min=1)
        return total / count.to(total.dtype)

    def forward(self, outputs: Union[Tensor, Sequence[Tensor]], target: Tensor) -> Tensor:
        main, *aux = (outputs,) if isinstance(outputs, Tensor) else outputs
        for i, o in enumerate((main, *aux)):
            what = "the main output" if i == 0 else f"output {i}"
            if not isinstance(o, Tensor) or o.dim() != 4:
                raise ValueError(f"danet_ext: DANetLoss takes logits (B, num_classes, H, W); {what} has shape "
                                 f"{tuple(o.shape) if isinstance(o, Tensor) else type(o).__name__}")
            if o.shape != main.shape:  # the targets are checked against the main output's classes
                raise ValueError(f"danet_ext: DANetLoss: {what} has shape {tuple(o.shape)}, the main output "
                                 f"{tuple(main.shape)}; every output scores the same classes at the same size")
        if not isinstance(target, Tensor) or target.shape != (main.shape[0], *main.shape[2:]):
            raise ValueError(f"danet_ext: DANetLoss target must have shape (B, H, W) = "
                             f"{(main.shape[0], *main.shape[2:])} for logits {tuple(main.shape)}, got "
                             f"{tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__}")
        target = self._checked_target(main, target)
        loss = self._ce(main, target)
        for o in aux:
            loss = loss + self.aux_weight * self._ce(o, target)
        return loss
