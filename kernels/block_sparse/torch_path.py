"""The torch path of block-sparse attention, and the host-side block selection and index form that both
backends share. fp32 math, one cast at the end."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def block_pool(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of each ``block_size``-token block of ``x [B, H, N, D]`` in fp32 (tail over its real tokens)."""
    B, H, N, D = x.shape
    nb = math.ceil(N / block_size)
    xp = F.pad(x.float(), (0, 0, 0, nb * block_size - N))
    sums = xp.view(B, H, nb, block_size, D).sum(dim=3)
    sizes = block_sizes(N, block_size, x.device)
    return sums / sizes[:, None]


def block_sizes(n: int, block_size: int, device) -> torch.Tensor:
    """Tokens in each block, fp32 ``[ceil(n / block_size)]``."""
    starts = torch.arange(0, n, block_size, device=device)
    return torch.clamp(n - starts, max=block_size).float()


def select_blocks(pq: torch.Tensor, pk: torch.Tensor, n: int, m: int, block_size: int, pool_size: int,
                  mass: float, min_blocks: int, scale: float) -> torch.Tensor:
    """Boolean block mask ``[B, H, nQB, nKB]`` from queries/keys mean-pooled per ``pool_size`` tokens (fp32
    ``[B, H, ceil(n / pool_size), D]`` and ``[B, H, ceil(m / pool_size), D]``).

    Pool-level probabilities are ``p_ab = softmax_b(mean(q_a)·mean(k_b)·scale + log|k_b|)``: the pooled score,
    weighted by how many tokens the key pool holds. The mass of KV block ``j`` for query block ``i`` is
    ``Σ_{b ∈ j} p_ab`` averaged over the query pools ``a ∈ i`` (weighted by their token counts); with
    ``pool_size == block_size`` that is simply ``softmax_j`` of the block-pooled scores. Per query block the KV
    blocks are ranked by mass (ties: lower index first) and kept while the mass of the blocks ranked above
    is below ``mass``, so the kept set is the smallest prefix whose mass reaches ``mass``; at least
    ``min_blocks`` are kept, and the diagonal block ``j = i * nKB // nQB`` always is."""
    B, H = pq.shape[:2]
    r = block_size // pool_size
    nqb, nkb = -(-n // block_size), -(-m // block_size)
    logits = torch.matmul(pq, pk.transpose(-1, -2)) * scale + block_sizes(m, pool_size, pq.device).log()
    p = logits.softmax(dim=-1)  # [B, H, nq_pools, nk_pools]
    if r > 1:
        p = F.pad(p, (0, nkb * r - p.shape[-1])).view(B, H, -1, nkb, r).sum(dim=-1)
        wq = block_sizes(n, pool_size, pq.device)
        wq = F.pad(wq, (0, nqb * r - wq.shape[0])).view(nqb, r)
        p = F.pad(p, (0, 0, 0, nqb * r - p.shape[2])).view(B, H, nqb, r, nkb)
        p = (p * wq[:, :, None]).sum(dim=3) / wq.sum(dim=1)[:, None]
    probs = p
    if mass >= 1.0:
        keep_sorted = torch.ones_like(probs, dtype=torch.bool)
        order = torch.arange(nkb, device=probs.device).expand_as(probs)
    else:
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p
        keep_sorted = before < mass
        keep_sorted[..., : min(min_blocks, nkb)] = True
    mask = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, keep_sorted)
    rows = torch.arange(nqb, device=mask.device)
    mask[:, :, rows, (rows * nkb) // nqb] = True
    return mask


def mask_to_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index form of a boolean block mask ``[Bm, H, nQB, nKB]``: ``indices`` int32 ``[Bm, H, nQB, nKB]``
    holding the kept KV block ids in ascending order, then ``-1``; ``counts`` int32 ``[Bm, H, nQB]``."""
    counts = mask.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    slots = torch.arange(mask.shape[-1], device=mask.device, dtype=torch.int32)
    indices = torch.where(slots < counts[..., None], order, torch.full_like(order, -1))
    return indices.contiguous(), counts.contiguous()


def block_sparse_attention(q, k, v, indices, counts, block_size: int, scale: float,
                           q_blocks_per_step: int = 16) -> torch.Tensor:
    """Gathers, per query block, only its kept KV blocks (padded to the largest kept count of the step), so
    memory and FLOPs follow the mask density. fp32 math, output in ``q.dtype``."""
    B, H, N, D = q.shape
    M, DV = k.shape[2], v.shape[-1]
    bs = block_size
    nqb, nkb = math.ceil(N / bs), math.ceil(M / bs)
    out = torch.zeros(B, H, nqb * bs, DV, dtype=torch.float32, device=q.device)
    if out.numel() == 0 or nkb == 0:
        return out[:, :, :N].to(q.dtype).contiguous()
    kp = F.pad(k.float(), (0, 0, 0, nkb * bs - M)).view(B, H, nkb, bs, D)
    vp = F.pad(v.float(), (0, 0, 0, nkb * bs - M)).view(B, H, nkb, bs, DV)
    qp = F.pad(q.float(), (0, 0, 0, nqb * bs - N)).view(B, H, nqb, bs, D)
    tok_ok = (torch.arange(nkb * bs, device=q.device) < M).view(nkb, bs)
    idx_all = indices.expand(B, H, nqb, nkb)
    cnt_all = counts.expand(B, H, nqb).clamp(0, nkb)
    bi = torch.arange(B, device=q.device).view(B, 1, 1, 1)
    hi = torch.arange(H, device=q.device).view(1, H, 1, 1)
    for g0 in range(0, nqb, q_blocks_per_step):
        g1 = min(g0 + q_blocks_per_step, nqb)
        cnt = cnt_all[:, :, g0:g1]
        c_max = int(cnt.max()) if cnt.numel() else 0
        if c_max == 0:
            continue
        idx = idx_all[:, :, g0:g1, :c_max].long()
        slot_ok = torch.arange(c_max, device=q.device) < cnt[..., None]  # [B, H, G, C]
        idx = torch.where(slot_ok & (idx >= 0) & (idx < nkb), idx, torch.zeros_like(idx))
        kg = kp[bi, hi, idx]  # [B, H, G, C, bs, D]
        vg = vp[bi, hi, idx]
        # a padded slot gathers block 0: its weights are 0, and 0 * a NaN in that block would still be NaN
        vg = torch.where(slot_ok[..., None, None], vg, torch.zeros((), dtype=vg.dtype, device=vg.device))
        s = torch.einsum("bhgid,bhgcjd->bhgicj", qp[:, :, g0:g1], kg) * scale
        ok = (slot_ok[..., None] & tok_ok[idx])[:, :, :, None]  # [B, H, G, 1, C, bs]
        s = s.masked_fill(~ok, float("-inf"))
        G = g1 - g0
        p = s.reshape(B, H, G, bs, c_max * bs).softmax(dim=-1)
        # a query block with no kept key gives zeros (its softmax is 0/0); a NaN from the input stays a NaN
        kept = ok.reshape(B, H, G, 1, c_max * bs).any(dim=-1, keepdim=True)
        p = torch.where(kept, p, torch.zeros((), dtype=p.dtype, device=p.device))
        o = torch.einsum("bhgin,bhgne->bhgie", p, vg.reshape(B, H, G, c_max * bs, DV))  # a keyless block: 0 @ 0
        out[:, :, g0 * bs:g1 * bs] = o.reshape(B, H, G * bs, DV)
    return out[:, :, :N].to(q.dtype).contiguous()
