"""The batch-invariant torch path of attention: two row-tiled GEMMs around a row softmax."""

from __future__ import annotations

import torch

from ..matmul.torch_path import ROW_TILE, _tiled_bmm, bmm_f32, f32, pad_cols

#: Attention whose score matrix (items x heads x queries x keys) has more elements than this (8 MB of fp32) runs
#: in chunks of about this many scores (heads, and query rows in multiples of ROW_TILE), each chunk's scores made,
#: softmaxed and multiplied by v while they are in cache. The same GEMM problems and row softmaxes, so the same
#: bits (tests/test_cpu_path_details.py). `python bench/cpu_large.py --parts` times both ways beside torch's SDPA.
SCORE_CHUNK_ELEMS = 1 << 21


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
    if b * h * nq * nk > SCORE_CHUNK_ELEMS:
        return _attention_in_chunks(q, k, v, mask, scale)
    s = bmm_f32(f32(q).reshape(b * h, nq, d), f32(k).reshape(b * h, nk, d).transpose(1, 2)) * scale
    if mask is not None:
        s = (s.reshape(b, h, nq, nk) + f32(mask)).reshape(b * h, nq, nk)
        p = masked_softmax_f32(s)
    else:
        p = softmax_f32(s)
    return bmm_f32(p, f32(v).reshape(b * h, nk, dv)).reshape(b, h, nq, dv).to(q.dtype)


def _attention_in_chunks(q, k, v, mask, scale):
    """:func:`attention` a chunk of (items, heads, query rows) at a time. Query chunks start at multiples of
    ROW_TILE, so their row tiles are the whole call's; a chunk spans whole items (all heads) or heads of one item,
    so that its q, k, v and output are views of the [b, h, ...] tensors and its mask a slice of the broadcast
    mask."""
    b, h, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[3]
    qf = f32(q)
    kt = pad_cols(f32(k).transpose(2, 3))  # [b, h, d, nkp]
    vp = pad_cols(f32(v))  # [b, h, nk, dvp]
    m4 = None if mask is None else f32(mask).expand(b, h, nq, nk)
    out = torch.empty((b, h, nq, dv), dtype=torch.float32, device=q.device)
    rows = max(ROW_TILE, SCORE_CHUNK_ELEMS // max(1, nk) // ROW_TILE * ROW_TILE)
    heads = max(1, SCORE_CHUNK_ELEMS // max(1, nq * nk)) if rows >= nq else 1
    items = max(1, heads // h) if heads >= h else 1
    heads = min(heads, h)
    for b0 in range(0, b, items):
        b1 = min(b, b0 + items)
        for h0 in range(0, h, heads):
            h1 = min(h, h0 + heads)
            g = (b1 - b0) * (h1 - h0)
            kc = kt[b0:b1, h0:h1].reshape(g, d, kt.shape[-1])
            vc = vp[b0:b1, h0:h1].reshape(g, nk, vp.shape[-1])
            for r0 in range(0, nq, rows):
                r1 = min(nq, r0 + rows)
                qc = qf[b0:b1, h0:h1, r0:r1].reshape(g, r1 - r0, d)
                s = _tiled_bmm(qc, kc)[:, : r1 - r0, :nk] * scale
                if m4 is None:
                    p = softmax_f32(s)
                else:
                    s = (s.view(b1 - b0, h1 - h0, r1 - r0, nk) + m4[b0:b1, h0:h1, r0:r1]).view(g, r1 - r0, nk)
                    p = masked_softmax_f32(s)
                o = _tiled_bmm(p, vc)[:, : r1 - r0, :dv]
                out[b0:b1, h0:h1, r0:r1] = o.view(b1 - b0, h1 - h0, r1 - r0, dv)
    return out.to(q.dtype)
