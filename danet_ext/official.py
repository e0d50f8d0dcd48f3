"""Official DANet weights and models built on the official attention classes.

`load_official_checkpoint` builds a DANet that fits a checkpoint released with the
official code (or written by any code with its key names) and loads it strictly.
`accelerate` swaps the attention computation of modules structured like the
official PAM_Module / CAM_Module, in any model, for danet_ext's kernels, leaving
their parameters and state-dict keys as they are.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .checkpoint import CheckpointError, check_finite, extract_state_dict, load_checkpoint_file
from .models.resnet import DEPTHS
from .nn import ChannelAttention, PositionAttention, _check_backend, scaled_residual
from .ops import channel_attention, position_attention

# The released DANet-101 (Cityscapes) is evaluated with multi-grid dilations
# (4, 8, 16) in layer4 at output stride 8, on the deep-stem ResNet-101 (its stem is read
# from the keys).
OFFICIAL_DEFAULTS = {"output_stride": 8, "multi_grid": (4, 8, 16)}


def _blocks(weights: Dict[str, Tensor], layer: str) -> int:
    prefix = f"pretrained.{layer}."
    indices = {k[len(prefix):].split(".", 1)[0] for k in weights if k.startswith(prefix)}
    return len({i for i in indices if i.isdigit()})


def infer_danet_config(weights: Dict[str, Any]) -> Dict[str, Any]:
    """What a DANet state dict's keys and shapes show: num_classes (from
    head.conv8), backbone (from the blocks per ResNet stage) and deep_stem
    (three-convolution stem). A value that the keys do not show is None."""
    conv8 = weights.get("head.conv8.1.weight")
    num_classes = int(conv8.shape[0]) if isinstance(conv8, Tensor) and conv8.dim() == 4 else None
    depths = tuple(_blocks(weights, f"layer{i}") for i in range(1, 5))
    backbone = {v: k for k, v in DEPTHS.items()}.get(depths)
    has_stem = any(k.startswith("pretrained.conv1.") for k in weights)
    deep_stem = ("pretrained.conv1.0.weight" in weights) if has_stem else None
    return {"num_classes": num_classes, "backbone": backbone, "deep_stem": deep_stem, "depths": depths}


def describe_config(inferred: Dict[str, Any]) -> str:
    """One line for error messages: what the keys show."""
    parts = []
    if inferred.get("backbone"):
        parts.append(f"backbone {inferred['backbone']}")
    elif any(inferred.get("depths", ())):
        parts.append(f"a backbone with {inferred['depths']} blocks per stage")
    if inferred.get("num_classes") is not None:
        parts.append(f"{inferred['num_classes']} classes")
    if inferred.get("deep_stem") is not None:
        parts.append("deep stem" if inferred["deep_stem"] else "7x7 stem")
    return ", ".join(parts) if parts else "no DANet keys (head.*, pretrained.*)"


def load_official_checkpoint(path: str, **overrides) -> nn.Module:
    """A DANet holding the weights of an official DANet checkpoint, in eval mode.

    Reads {'state_dict': ...} (the official training script's format) or a bare
    state dict with torch.load(weights_only=True), strips a DataParallel `module.`
    prefix, infers the number of classes, the ResNet depth and the stem from the
    keys, and uses the released DANet-101's configuration for what the keys cannot
    show: output_stride=8, multi_grid=(4, 8, 16). Prints what it inferred and used.
    `overrides` are DANet keyword arguments (num_classes, backbone, deep_stem,
    output_stride, multi_grid, aux, norm_layer, backend) and win over both.
    Raises CheckpointError when the file is not a DANet checkpoint, does not fit, or holds
    NaN or infinite weights.
    """
    from .models import DANet

    weights = extract_state_dict(load_checkpoint_file(path), path)
    check_finite(weights, path)
    inferred = infer_danet_config(weights)
    config: Dict[str, Any] = {k: inferred[k] for k in ("num_classes", "backbone", "deep_stem")
                              if inferred[k] is not None}
    config.update(OFFICIAL_DEFAULTS)
    config.update(overrides)
    for name in ("num_classes", "backbone"):
        if name not in config:
            raise CheckpointError(f"{path}: cannot tell {name} from the keys ({describe_config(inferred)}); "
                                  f"pass {name}=...")
    config.setdefault("deep_stem", False)
    shown = ", ".join(f"{k}={config[k]!r}" for k in ("num_classes", "backbone", "deep_stem"))
    rest = ", ".join(f"{k}={v!r}" for k, v in config.items() if k not in ("num_classes", "backbone", "deep_stem"))
    print(f"danet_ext: {path}: {shown} (from the keys{', overridden' if overrides else ''}); {rest}", flush=True)
    num_classes = config.pop("num_classes")
    model = DANet(num_classes, **config)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit DANet({shown}, {rest}): "
                              f"{mismatch_summary(model, weights)}; the keys show {describe_config(inferred)}") from exc
    return model.eval()


def mismatch_summary(model: nn.Module, weights: Dict[str, Tensor], limit: int = 3) -> str:
    """Missing, unexpected and wrongly shaped keys, a few whole names of each."""
    own = model.state_dict()
    weights = {k: v for k, v in weights.items() if not k.startswith("pretrained.fc.")}
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in weights and weights[k].shape != own[k].shape]
    parts = []
    for what, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" and {len(items) - limit} more" if len(items) > limit else ""
            parts.append(f"{len(items)} {what} ({', '.join(items[:limit])}{more})")
    return "; ".join(parts) or NO_MISMATCH


NO_MISMATCH = "no key differences"


# --------------------------------------------------------------------------- accelerate


def _fast_pam_forward(self, x: Tensor) -> Tensor:
    out = position_attention(self.query_conv(x), self.key_conv(x), self.value_conv(x),
                             backend=self._danet_ext_backend)
    return scaled_residual(self.gamma, out, x, self._danet_ext_backend)


def _fast_cam_forward(self, x: Tensor) -> Tensor:
    return scaled_residual(self.gamma, channel_attention(x, backend=self._danet_ext_backend), x,
                           self._danet_ext_backend)


_ACCELERATED_CLASSES: Dict[Tuple[type, str], type] = {}


def _accelerated_class(cls: type, kind: str) -> type:
    key = (cls, kind)
    if key not in _ACCELERATED_CLASSES:
        forward = _fast_pam_forward if kind == "position" else _fast_cam_forward
        _ACCELERATED_CLASSES[key] = type(cls.__name__, (cls,), {
            "forward": forward, "_danet_ext_accelerated": kind, "__reduce_ex__": _reduce_accelerated,
            "__doc__": f"{cls.__name__} with its attention computed by danet_ext ({kind} attention)."})
    return _ACCELERATED_CLASSES[key]


def _reduce_accelerated(self, protocol):
    # The class made above cannot be found by its name, so pickle (torch.save(model), copies to
    # worker processes) rebuilds it from the user's own class, which can.
    base = type(self).__bases__[0]
    return _new_accelerated, (base, self._danet_ext_accelerated), self.__dict__.copy()


def _new_accelerated(cls: type, kind: str) -> nn.Module:
    accelerated = _accelerated_class(cls, kind)
    return accelerated.__new__(accelerated)


def _is_pointwise_conv(m: Any) -> bool:
    return (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride == (1, 1)
            and m.padding in ((0, 0), 0) and m.dilation == (1, 1) and m.groups == 1)


def _structure(m: nn.Module) -> Optional[str]:
    """"position" or "channel" when `m` has the official PAM_Module / CAM_Module
    structure: a scalar parameter gamma, for PAM three 1x1 convolutions
    query_conv, key_conv, value_conv (value keeping the channels), and besides
    those no modules other than a Softmax."""
    if isinstance(m, (PositionAttention, ChannelAttention)) or hasattr(m, "_danet_ext_accelerated"):
        return None
    own = dict(m.named_parameters(recurse=False))
    if set(own) != {"gamma"} or own["gamma"].numel() != 1:
        return None
    convs = ("query_conv", "key_conv", "value_conv")
    others = [c for n, c in m.named_children() if n not in convs]
    if not all(isinstance(c, nn.Softmax) for c in others):
        return None
    if not any(hasattr(m, n) for n in convs):
        return "channel"
    q, k, v = (getattr(m, n, None) for n in convs)
    if not all(_is_pointwise_conv(c) for c in (q, k, v)):
        return None
    c = v.in_channels
    if not (q.in_channels == k.in_channels == c == v.out_channels and q.out_channels == k.out_channels):
        return None
    return "position"


@torch.no_grad()
def _computes_the_same(m: nn.Module, kind: str) -> bool:
    """Run the module's own forward and the danet_ext formulation (on the
    reference backend, which is the official maths) on a small random input,
    with gamma set to 1 for the call (at 0 both return the input), and compare."""
    gamma = m.gamma
    if gamma.device.type == "meta":
        return False
    channels = m.value_conv.in_channels if kind == "position" else 16
    dtype = gamma.dtype if gamma.dtype.is_floating_point else torch.float32
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, channels, 5, 4, generator=gen).to(device=gamma.device, dtype=dtype)
    if kind == "channel":
        x = x.relu()
    saved = gamma.detach().clone()
    try:
        gamma.fill_(1.0)
        ref = type(m).forward(m, x)
        fast = (_fast_pam_forward if kind == "position" else _fast_cam_forward)(
            _BackendView(m, "reference"), x)
    except Exception:  # a forward that does not take (B, C, H, W) alone is not the official one
        return False
    finally:
        gamma.copy_(saved)
    if not isinstance(ref, Tensor) or ref.shape != fast.shape:
        return False
    tol = 1e-3 if dtype in (torch.float16, torch.bfloat16) else 1e-4
    return torch.allclose(ref.float(), fast.float(), rtol=tol * 10, atol=tol * 10)


class _BackendView:
    """The module's attributes, plus the backend, for the probe before the swap."""

    def __init__(self, module: nn.Module, backend: str):
        self._module, self._danet_ext_backend = module, backend

    def __getattr__(self, name):
        return getattr(self._module, name)


@dataclass
class AccelerateReport:
    """What `accelerate` did: qualified names of the modules it swapped, and of
    those with the official structure that it left alone, with the reason."""
    position_attention: List[str] = field(default_factory=list)
    channel_attention: List[str] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.position_attention) + len(self.channel_attention)

    def __str__(self) -> str:
        lines = [f"danet_ext.accelerate: {len(self.position_attention)} position attention "
                 f"({', '.join(self.position_attention) or '-'}), {len(self.channel_attention)} channel attention "
                 f"({', '.join(self.channel_attention) or '-'})"]
        lines += [f"  left alone: {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def accelerate(model: nn.Module, backend: str = "auto") -> AccelerateReport:
    """Compute the attention of every official-style PAM_Module / CAM_Module in
    `model` with danet_ext, in place.

    A module qualifies when it has the official structure (see `_structure`) and,
    probed on a small random input, its own forward gives what danet_ext computes
    (so look-alikes with another computation, such as criss-cross attention, are
    left alone). Each such module keeps its object, parameters, buffers, hooks and
    state-dict keys; only its forward changes (its class becomes a subclass of the
    original with danet_ext's forward, so isinstance checks still hold).
    `set_backend(model, ...)` switches these modules too. Returns an AccelerateReport.
    """
    _check_backend(backend)
    report = AccelerateReport()
    for name, m in model.named_modules():
        kind = _structure(m)
        if kind is None:
            continue
        if not _computes_the_same(m, kind):
            report.skipped.append((name or "(model)", f"has the {'PAM' if kind == 'position' else 'CAM'}_Module "
                                   f"structure but computes something else"))
            continue
        m.__class__ = _accelerated_class(type(m), kind)
        m._danet_ext_backend = backend
        (report.position_attention if kind == "position" else report.channel_attention).append(name or "(model)")
    return report
