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
        backbone: "resnet101" (the paper's) or "resnet50".
        output_stride: 8 (the paper's), 16 or 32.
        multi_grid: dilations of layer4's three blocks, e.g. (4, 8, 16); None for uniform.
        deep_stem: three-convolution stem, as in the official backbone checkpoints.
        aux: return (sasc, sa, sc) for training with DANetLoss; False returns sasc alone.
        norm_layer: e.g. nn.BatchNorm2d; nn.SyncBatchNorm.convert_sync_batchnorm works on the result.
        backend: attention backend, "auto", "extension" or "reference".

    A state dict of the official DANet (keys pretrained.*, head.*) loads with strict=True.
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

    def forward(self, x: Tensor) -> Union[Tensor, Tuple[Tensor, Tensor, Tensor]]:
        size = x.shape[2:]
        c4 = self.pretrained.forward_features(x)[3]
        outputs = tuple(F.interpolate(o, size=size, **UP_KWARGS) for o in self.head(c4))
        return outputs if self.aux else outputs[0]

    def head_parameters(self):
        """Parameters the official recipe trains with 10x the learning rate."""
        return self.head.parameters()

    def backbone_parameters(self):
        return self.pretrained.parameters()


class DANetLoss(nn.Module):
    """Cross-entropy summed over DANet's three outputs, as the official training:
    loss = CE(sasc) + aux_weight * (CE(sa) + CE(sc)). A single tensor is scored alone."""

    def __init__(self, aux_weight: float = 1.0, ignore_index: int = -1):
        super().__init__()
        self.aux_weight = aux_weight
        self.ignore_index = ignore_index

    def forward(self, outputs: Union[Tensor, Sequence[Tensor]], target: Tensor) -> Tensor:
        if isinstance(outputs, Tensor):
            return F.cross_entropy(outputs, target, ignore_index=self.ignore_index)
        main, *aux = outputs
        loss = F.cross_entropy(main, target, ignore_index=self.ignore_index)
        for o in aux:
            loss = loss + self.aux_weight * F.cross_entropy(o, target, ignore_index=self.ignore_index)
        return loss
