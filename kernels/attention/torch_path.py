"""The batch-invariant torch path of attention: two row-tiled GEMMs around a row softmax."""

from __future__ import annotations

import torch

from ..matmul.torch_path import bmm_f32, f32


def softmax_f32(x: torch.Tensor) -> torch.Tensor:
    """Row softmax over the last dim; torch's CPU kernel handles each row on its own."""
    return torch.softmax(x, dim=-1)


def masked_softmax_f32(x: torch.Tensor) -> torch.Tensor:
    """:func:`softmax_f32` with a row whose every score is -inf (fully masked) giving 0 instead of NaN, as torch's
    SDPA does since 2.5 and as the kernel does. Element-wise per row, so batch invariant."""
    out = torch.softmax(x, dim=-1)
    dead = (x == float("-inf")).all(dim=-1, keepdim=True)
    return out.masked_fill(dead, 0.0)


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
        p = masked_softmax_f32(s)
    else:
        p = softmax_f32(s)
    return bmm_f32(p, f32(v).reshape(b * h, nk, dv)).reshape(b, h, nq, dv).to(q.dtype)
