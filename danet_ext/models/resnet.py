"""Dilated ResNet backbone, with the attribute names of the official DANet
backbone (and torchvision's ResNet), so that both checkpoint formats load."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

NormLayer = Callable[[int], nn.Module]

DEPTHS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3), "resnet152": (3, 8, 36, 3)}


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: Optional[nn.Module] = None, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=dilation,
                               dilation=dilation, bias=False)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = norm_layer(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity  # in place, as torchvision's: a fresh 64 MiB sum costs its page faults
        return self.relu(out)


def stage_strides_and_dilations(output_stride: int) -> List[Tuple[int, int]]:
    """(stride, dilation) of layer3 and layer4 for an output stride of 8, 16 or 32."""
    table = {8: [(1, 2), (1, 4)], 16: [(2, 1), (1, 2)], 32: [(2, 1), (2, 1)]}
    if output_stride not in table:
        raise ValueError(f"danet_ext: output_stride must be 8, 16 or 32, got {output_stride}")
    return table[output_stride]


class DilatedResNet(nn.Module):
    """ResNet whose last stages trade stride for dilation (DANet uses output stride 8).

    Args:
        depths: blocks per stage, e.g. (3, 4, 23, 3) for ResNet-101.
        output_stride: 8 (layer3 dilation 2, layer4 dilation 4), 16 or 32.
        multi_grid: per-block dilations of layer4, e.g. (4, 8, 16); None for uniform.
        deep_stem: three 3x3 convolutions (64, 64, 128 channels) instead of one 7x7.

    There is no ImageNet classifier: like the official DANet backbone (whose `fc`
    is set to None), the network ends at layer4. Incoming `fc.*` keys (ImageNet
    checkpoints, DANet checkpoints from older code) are dropped on load, so both
    kinds load with strict=True.
    """

    def __init__(self, depths: Sequence[int], output_stride: int = 8,
                 multi_grid: Optional[Sequence[int]] = None, deep_stem: bool = False,
                 norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        self.inplanes = 128 if deep_stem else 64
        if deep_stem:
            self.conv1 = nn.Sequential(
                nn.Conv2d(3, 64, kernel_size=3, stride=2, padding=1, bias=False),
                norm_layer(64), nn.ReLU(inplace=True),
                nn.Conv2d(64, 64, kernel_size=3, stride=1, padding=1, bias=False),
                norm_layer(64), nn.ReLU(inplace=True),
                nn.Conv2d(64, 128, kernel_size=3, stride=1, padding=1, bias=False),
            )
        else:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        (s3, d3), (s4, d4) = stage_strides_and_dilations(output_stride)
        if multi_grid is not None and len(multi_grid) != depths[3]:
            raise ValueError(f"danet_ext: multi_grid needs one dilation per layer4 block ({depths[3]}), got {multi_grid}")
        self.layer1 = self._make_layer(64, depths[0], 1, [1] * depths[0], norm_layer)
        self.layer2 = self._make_layer(128, depths[1], 2, [1] * depths[1], norm_layer)
        self.layer3 = self._make_layer(256, depths[2], s3, self._dilations(d3, depths[2]), norm_layer)
        layer4_dilations = list(multi_grid) if multi_grid is not None else self._dilations(d4, depths[3])
        self.layer4 = self._make_layer(512, depths[3], s4, layer4_dilations, norm_layer)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _dilations(dilation: int, blocks: int) -> List[int]:
        # As in the official backbone: the first block of a dilated stage uses
        # half the dilation (1 for 2, 2 for 4), the rest the full one.
        first = 1 if dilation <= 2 else dilation // 2
        return [first] + [dilation] * (blocks - 1)

    def _make_layer(self, planes: int, blocks: int, stride: int, dilations: Sequence[int],
                    norm_layer: NormLayer) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, kernel_size=1, stride=stride, bias=False),
                norm_layer(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, dilations[0], downsample, norm_layer)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes, 1, d, None, norm_layer) for d in dilations[1:]]
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """The four stage outputs c1..c4 (c4 has 2048 channels)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return c1, c2, c3, c4

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.forward_features(x)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # An ImageNet classifier has no place in a segmentation backbone: drop it.
        for name in ("fc.weight", "fc.bias"):
            state_dict.pop(prefix + name, None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def dilated_resnet(name: str = "resnet101", **kwargs) -> DilatedResNet:
    if name not in DEPTHS:
        raise ValueError(f"danet_ext: backbone must be one of {sorted(DEPTHS)}, got {name!r}")
    return DilatedResNet(DEPTHS[name], **kwargs)


def load_torchvision_resnet(backbone: DilatedResNet, path: str, strict: bool = True):
    """Load an ImageNet ResNet state dict saved in torchvision's format (a file
    written by torch.save(torchvision.models.resnet101().state_dict(), path))
    into a backbone built with deep_stem=False. Dilation changes no shapes, so
    every key maps one to one. Returns the result of load_state_dict. A file that
    does not hold a state dict of tensors, holds NaN or infinite weights or (with
    `strict`) does not fit the backbone raises CheckpointError naming it."""
    from ..checkpoint import CheckpointError, check_finite, extract_state_dict, load_checkpoint_file
    from ..official import mismatch_summary

    weights = extract_state_dict(load_checkpoint_file(path), path)
    check_finite(weights, path)
    try:
        return backbone.load_state_dict(weights, strict=strict)
    except RuntimeError as exc:
        hint = ""
        if any(k.startswith("pretrained.") for k in weights):
            hint = ("; its keys start with 'pretrained.': a whole DANet checkpoint, which "
                    "danet_ext.load_official_checkpoint reads")
        raise CheckpointError(f"{path} does not fit this ResNet backbone: "
                              f"{mismatch_summary(backbone, weights)}{hint}") from exc
