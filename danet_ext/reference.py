"""The pure-PyTorch maths of every op: the single truth that the tests compare
the kernels against, and the fallback path when no kernel fits.

These are written exactly as the official DANet code computes them (bmm,
softmax, bmm), so they hold the full attention matrix: N x N for position
attention, C x C for channel attention.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as F


def position_attention(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    """out[b, :, i] = sum_j softmax_j(q_i . k_j) v_j, with no 1/sqrt(d) scaling.

    query, key: (B, Cq, H, W); value: (B, C, H, W); returns (B, C, H, W).
    """
    B, C, H, W = value.shape
    n = H * W
    Cq = query.shape[1]  # explicit sizes, not -1: a reshape of an empty tensor cannot infer them
    proj_query = query.reshape(B, Cq, n).permute(0, 2, 1)  # B x N x Cq
    proj_key = key.reshape(B, Cq, n)  # B x Cq x N
    energy = torch.bmm(proj_query, proj_key)  # B x N x N
    attention = torch.softmax(energy, dim=-1)
    proj_value = value.reshape(B, C, n)  # B x C x N
    out = torch.bmm(proj_value, attention.permute(0, 2, 1))
    return out.view(B, C, H, W)


def position_attention_blocked(query: Tensor, key: Tensor, value: Tensor, query_block: int) -> Tensor:
    """The same maths as position_attention (matmul, softmax, matmul), one block of
    `query_block` queries at a time against every key, the outputs concatenated: the
    form exported ONNX models carry, so that a runtime holds query_block x N scores
    at a time instead of N x N."""
    B, C, H, W = value.shape
    n = H * W
    Cq = query.shape[1]
    proj_query = query.reshape(B, Cq, n).permute(0, 2, 1)  # B x N x Cq
    proj_key = key.reshape(B, Cq, n)  # B x Cq x N
    proj_value_t = value.reshape(B, C, n).permute(0, 2, 1)  # B x N x C
    out = _in_query_blocks(lambda q, k, v: torch.bmm(torch.softmax(torch.bmm(q, k), dim=-1), v),
                           proj_query, proj_key, proj_value_t, query_block)  # B x N x C
    return out.permute(0, 2, 1).reshape(B, C, H, W)


def _in_query_blocks(attend, q: Tensor, k: Tensor, v: Tensor, query_block: Optional[int]) -> Tensor:
    """attend(q, k, v) for queries q (..., N, Cq), one block of `query_block` of them at a
    time against every key (None: all at once), the outputs concatenated along the queries."""
    n = q.shape[-2]
    if query_block is None or n <= query_block:
        return attend(q, k, v)
    return torch.cat([attend(q[..., i:i + query_block, :], k, v) for i in range(0, n, query_block)], dim=-2)


def position_attention_sdpa(query: Tensor, key: Tensor, value: Tensor, query_block: Optional[int] = None) -> Tensor:
    """The same maths as position_attention, written as scaled_dot_product_attention
    (one head, scale 1, value width C against query/key width Cq). This is the form
    traces carry (ops.position_attention under torch.jit.trace, as in OpenVINO's
    conversion from PyTorch, which makes it its fused `ScaledDotProductAttention`);
    ONNX export takes position_attention_blocked.

    query_block: with N above it, one attention call per block of that many queries
    (each against every key; the outputs concatenated), so that a runtime that
    materialises the scores holds query_block x N of them at a time instead of N x N."""
    B, C, H, W = value.shape
    n = H * W
    Cq = query.shape[1]
    q = query.reshape(B, 1, Cq, n).transpose(-1, -2)  # B x 1 x N x Cq
    k = key.reshape(B, 1, Cq, n).transpose(-1, -2)
    v = value.reshape(B, 1, C, n).transpose(-1, -2)  # B x 1 x N x C
    out = _in_query_blocks(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=1.0), q, k, v, query_block)
    return out.transpose(-1, -2).reshape(B, C, H, W)


def channel_attention(x: Tensor) -> Tensor:
    """With X = x[b] as C x N: E = X X^T; A = softmax(rowmax(E) - E); out = A X.

    x: (B, C, H, W); returns (B, C, H, W).
    """
    B, C, H, W = x.shape
    # no channels: nothing to attend over (the max of an empty row is undefined); traces, whose
    # sizes are fixed, skip the test rather than warn about it
    if not torch.jit.is_tracing() and C == 0:
        return x.clone()
    proj_query = x.reshape(B, C, H * W)
    proj_key = proj_query.permute(0, 2, 1)
    energy = torch.bmm(proj_query, proj_key)  # B x C x C
    energy_new = torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy
    attention = torch.softmax(energy_new, dim=-1)
    out = torch.bmm(attention, proj_query)
    return out.view(B, C, H, W)
