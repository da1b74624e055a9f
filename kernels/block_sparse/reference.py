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
        out[:, :, i] = x[:, :, i * block_size : (i + 1) * block_size].float().mean(dim=2)
    return out


def attention_block_mask_reference(q, k, block_size=64, mass=0.95, min_blocks=1, pool_size=None):
    """Boolean mask ``[B, H, nQB, nKB]``: per query block, the fewest top-mass KV blocks whose estimated
    masses sum to at least ``mass`` (at least ``min_blocks``), plus the diagonal block. The estimated mass
    of KV block j for query block i is the token-weighted mean over query pools a in i of the sum over key
    pools b in j of ``softmax_b(mean(q_a)·mean(k_b)/sqrt(D) + log(tokens in b))``, pools being
    ``pool_size`` (default ``block_size``) tokens."""
    B, H, N, D = q.shape
    M = k.shape[2]
    ps = block_size if pool_size is None else pool_size
    pq, pk = block_pool(q, ps), block_pool(k, ps)
    nqb, nkb = math.ceil(N / block_size), math.ceil(M / block_size)
    ksz = torch.tensor([min(ps, M - j * ps) for j in range(pk.shape[2])], dtype=torch.float64)
    qsz = [min(ps, N - a * ps) for a in range(pq.shape[2])]
    probs = (pq.double() @ pk.double().transpose(-1, -2) / math.sqrt(D) + ksz.log()).softmax(dim=-1)
    r = block_size // ps
    mass_ij = torch.zeros(B, H, nqb, nkb, dtype=torch.float64)
    for i in range(nqb):
        pools = range(i * r, min((i + 1) * r, pq.shape[2]))
        wsum = sum(qsz[a] for a in pools)
        for j in range(nkb):
            for a in pools:
                mass_ij[:, :, i, j] += qsz[a] * probs[:, :, a, j * r : (j + 1) * r].sum(-1) / wsum
    mask = torch.zeros(B, H, nqb, nkb, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(nqb):
                order = sorted(range(nkb), key=lambda j: (-mass_ij[b, h, i, j].item(), j))
                total = 0.0
                for rank, j in enumerate(order):
                    if rank >= min_blocks and mass < 1.0 and total >= mass:
                        break
                    mask[b, h, i, j] = True
                    total += mass_ij[b, h, i, j].item()
                mask[b, h, i, (i * nkb) // nqb] = True
    return mask


def token_mask(block_mask: torch.Tensor, n: int, m: int, block_size: int) -> torch.Tensor:
    """Expand a block mask ``[B, H, nQB, nKB]`` to a token mask ``[B, H, n, m]``."""
    t = block_mask.repeat_interleave(block_size, dim=2).repeat_interleave(block_size, dim=3)
    return t[:, :, :n, :m]


def block_sparse_attention_reference(q, k, v, block_mask=None, block_size=64, scale=None):
    """Dense fp32 softmax attention with KV blocks outside ``block_mask`` removed (rows with no kept
    block give zeros). ``block_mask=None`` is plain dense attention."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bhnd,bhmd->bhnm", q.float(), k.float()) * scale
    if block_mask is not None:
        tm = token_mask(block_mask, q.shape[2], k.shape[2], block_size).expand_as(s)
        s = s.masked_fill(~tm, float("-inf"))
    p = s.softmax(dim=-1).nan_to_num(0.0)
    return torch.einsum("bhnm,bhme->bhne", p, v.float())
