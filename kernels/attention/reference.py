"""Literal fp32 attention, the ground truth for the kernel's tests."""

from __future__ import annotations

import math

import torch


def additive_mask(mask: torch.Tensor) -> torch.Tensor:
    """fp32 additive form of an attention mask: a float mask as is, a boolean one as 0 (True = keep) / -inf."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(torch.float32)


def attention_reference(q, k, v, mask=None, scale=None) -> torch.Tensor:
    """``softmax(q @ k^T * scale + mask) @ v`` in fp32 (inputs upcast); returns fp32 ``[B, H, Nq, Dv]``.

    ``mask``: None, an additive float tensor or a boolean one (True = keep), broadcastable to
    ``[B, H, Nq, Nk]``. A row masked to all -inf is 0, as torch's SDPA gives (since 2.5) and not the NaN of a
    literal softmax of all -inf.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is None:
        return torch.matmul(torch.softmax(scores, dim=-1), v.float())
    scores = scores + additive_mask(mask)
    # rows with no finite score: softmax over zeros instead (no NaN, not even in a gradient), then zeroed
    dead = (scores == float("-inf")).all(-1, keepdim=True)
    p = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    return torch.matmul(p, v.float())
