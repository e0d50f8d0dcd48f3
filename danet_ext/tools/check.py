"""`danet-ext check`: every compiled kernel against the pure-PyTorch reference
on a grid of shapes, forward and gradients.

The truth is the reference in float64. A kernel passes when its error is at most
twice that of the reference computed in the kernel's own dtype (PyTorch's own
error at that precision), plus four units in the last place of the quantity's
magnitude (1e-9 of it in float64, where the reference is the truth itself).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Sequence

import torch

from .. import reference
from ..ops import channel_attention, position_attention

PAM_SHAPES = [(1, 8, 16, 1, 1), (2, 8, 5, 7, 9), (3, 1, 64, 17, 23), (1, 64, 512, 32, 32), (1, 64, 64, 33, 65)]
CAM_SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (2, 64, 33, 31), (1, 512, 32, 32)]


@dataclass
class CheckRow:
    op: str
    shape: str
    dtype: str
    quantity: str
    error: float
    pytorch_error: float
    passed: bool


def _grads(fn: Callable, inputs: Sequence[torch.Tensor], grad_out: torch.Tensor):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in inputs]


def _compare(op: str, shape: str, dtype: torch.dtype, names: Sequence[str], ours, ref_same, truth) -> List[CheckRow]:
    rows = []
    for name, a, b, t in zip(names, ours, ref_same, truth):
        err = (a.double() - t).abs().max().item() if a.numel() else 0.0
        err_ref = (b.double() - t).abs().max().item() if b.numel() else 0.0
        # a few units in the last place of the quantity's scale: a gradient that is
        # exactly 0 in float64 is a rounding residue, not 0, in any float computation
        scale = max(1.0, t.abs().max().item() if t.numel() else 1.0)
        # in float64 the reference is the truth itself; ask for 1e-9 of the scale
        slack = (1e-9 if dtype == torch.float64 else 4 * torch.finfo(dtype).eps) * scale
        ok = bool(torch.isfinite(a).all()) and err <= 2 * err_ref + slack
        rows.append(CheckRow(op, shape, str(dtype).replace("torch.", ""), name, err, err_ref, ok))
    return rows


def run_checks(device: str = "cpu", dtypes: Sequence[torch.dtype] = (torch.float32,), seed: int = 0) -> List[CheckRow]:
    torch.manual_seed(seed)
    rows: List[CheckRow] = []
    for dtype in dtypes:
        for B, Cq, C, H, W in PAM_SHAPES:
            q, k, v = (torch.randn(B, c, H, W, dtype=torch.float64, device=device) for c in (Cq, Cq, C))
            grad_out = torch.randn(B, C, H, W, dtype=torch.float64, device=device)
            cast = [t.to(dtype) for t in (q, k, v)]
            truth = _grads(reference.position_attention, [t.double() for t in cast], grad_out)
            ours = _grads(lambda *a: position_attention(*a, backend="extension"), cast, grad_out.to(dtype))
            ref_same = _grads(reference.position_attention, cast, grad_out.to(dtype))
            rows += _compare("position_attention", f"{B}x{Cq}/{C}x{H}x{W}", dtype,
                             ("out", "grad_query", "grad_key", "grad_value"), ours, ref_same, truth)
        for B, C, H, W in CAM_SHAPES:
            x = (torch.randn(B, C, H, W, dtype=torch.float64, device=device) / 4).relu()
            grad_out = torch.randn_like(x)
            cast = [x.to(dtype)]
            truth = _grads(reference.channel_attention, [cast[0].double()], grad_out)
            ours = _grads(lambda a: channel_attention(a, backend="extension"), cast, grad_out.to(dtype))
            ref_same = _grads(reference.channel_attention, cast, grad_out.to(dtype))
            rows += _compare("channel_attention", f"{B}x{C}x{H}x{W}", dtype, ("out", "grad_x"), ours, ref_same, truth)
    return rows


def format_rows(rows: List[CheckRow]) -> str:
    header = f"{'op':<20} {'shape':<18} {'dtype':<9} {'quantity':<11} {'max error':>10} {'PyTorch':>10}  result"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.op:<20} {r.shape:<18} {r.dtype:<9} {r.quantity:<11} {r.error:>10.2e} "
                     f"{r.pytorch_error:>10.2e}  {'pass' if r.passed else 'FAIL'}")
    failed = sum(not r.passed for r in rows)
    lines.append(f"{len(rows) - failed} passed, {failed} failed")
    return "\n".join(lines)
