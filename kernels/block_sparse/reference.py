"""Literal fp32 torch math for block masks and block-sparse attention (ground truth for the tests)."""

from __future__ import annotations

import math

import torch


def block_pool(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of each ``block_size``-token block of ``x [B, H, N, D]`` (tail block over its real tokens)."""
    B, H, N, D = x.shape
    nb = math.ceil(N / block_size)
    out = torch.zeros(B, H, nb, D, dtype=torch.float32)
    for i in range(nb):
        out[:, :, i] = x[:, :, i * block_size:(i + 1) * block_size].float().mean(dim=2)
    return out


def block_mask(q, k, block_size=64, mass=0.95, min_blocks=1):
    """Boolean mask ``[B, H, nQB, nKB]``: per query block, the fewest top-probability KV blocks whose
    probabilities sum to at least ``mass`` (at least ``min_blocks``), plus the diagonal block. The
    probabilities are the softmax over KV blocks of the pooled scores ``mean(q_blk)·mean(k_blk)/sqrt(D)
    + log(tokens in k_blk)``."""
    B, H, N, D = q.shape
    M = k.shape[2]
    pq, pk = block_pool(q, block_size), block_pool(k, block_size)
    nqb, nkb = pq.shape[2], pk.shape[2]
    sizes = torch.tensor([min(block_size, M - j * block_size) for j in range(nkb)], dtype=torch.float32)
    probs = (pq @ pk.transpose(-1, -2) / math.sqrt(D) + sizes.log()).softmax(dim=-1)
    mask = torch.zeros(B, H, nqb, nkb, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(nqb):
                order = sorted(range(nkb), key=lambda j: (-probs[b, h, i, j].item(), j))
                total = 0.0
                for rank, j in enumerate(order):
                    if rank >= min_blocks and mass < 1.0 and total >= mass:
                        break
                    mask[b, h, i, j] = True
                    total += probs[b, h, i, j].item()
                mask[b, h, i, (i * nkb) // nqb] = True
    return mask


def token_mask(block_mask: torch.Tensor, n: int, m: int, block_size: int) -> torch.Tensor:
    """Expand a block mask ``[B, H, nQB, nKB]`` to a token mask ``[B, H, n, m]``."""
    t = block_mask.repeat_interleave(block_size, dim=2).repeat_interleave(block_size, dim=3)
    return t[:, :, :n, :m]


def masked_attention(q, k, v, block_mask=None, block_size=64, scale=None):
    """Dense fp32 softmax attention with KV blocks outside ``block_mask`` removed (rows with no kept
    block give zeros). ``block_mask=None`` is plain dense attention."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bhnd,bhmd->bhnm", q.float(), k.float()) * scale
    if block_mask is not None:
        tm = token_mask(block_mask, q.shape[2], k.shape[2], block_size).expand_as(s)
        s = s.masked_fill(~tm, float("-inf"))
    p = s.softmax(dim=-1).nan_to_num(0.0)
    return torch.einsum("bhnm,bhme->bhne", p, v.float())
