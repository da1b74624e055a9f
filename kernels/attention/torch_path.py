"""The batch-invariant torch path of attention: two row-tiled GEMMs around a row softmax."""

from __future__ import annotations

import torch

from ..matmul.torch_path import bmm_f32, f32


def softmax_f32(x: torch.Tensor) -> torch.Tensor:
    """Row softmax over the last dim; torch's CPU kernel handles each row on its own."""
    return torch.softmax(x, dim=-1)


def attention(q, k, v, mask=None, scale=None):
    """softmax(q k^T * scale + mask) v per (item, head): two row-tiled GEMMs around a row softmax, fp32.

    torch's own CPU flash-attention kernel is not used: it is not batch invariant here (q/k/v
    [B, 2, 13, 8]: item 0 alone differs from item 0 in a batch of 2..5, and between 1 and 2 threads)."""
    b, h, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[3]
    if scale is None:
        scale = d**-0.5
    s = bmm_f32(f32(q).reshape(b * h, nq, d), f32(k).reshape(b * h, nk, d).transpose(1, 2)) * scale
    if mask is not None:
        s = (s.reshape(b, h, nq, nk) + f32(mask)).reshape(b * h, nq, nk)
    return bmm_f32(softmax_f32(s), f32(v).reshape(b * h, nk, dv)).reshape(b, h, nq, dv).to(q.dtype)
