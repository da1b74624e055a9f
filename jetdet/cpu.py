"""Batch-invariant torch implementations (the CPU path).

Why this is needed: MKL's fp32 GEMM picks its blocking and thread split from the problem shape, so on this
class of machine ``(x @ W)[:1]`` differs from ``x[:1] @ W`` at M=257 (~2e-5), and mkldnn's conv2d differs
between batch 1 and batch 6 (~8e-7). Row *i* of a GEMM must not depend on how many rows there are.

How: every GEMM is cut into row tiles of a fixed height ``ROW_TILE`` (the last one zero-padded) and run as
one batched GEMM of identical ``[ROW_TILE, K] @ [K, N]`` problems. Each problem has the same shape whatever
the batch, so MKL runs the same code path with the same K order for every row, and a row's result depends
only on that row. Convolution is an exact im2col gather (one strided copy) followed by that GEMM. Attention is
two such GEMMs around a row-wise softmax. Norms and softmax use torch's row-wise CPU kernels, which reduce
each row serially in an order fixed by the row length; reductions are kept to >= 2 output rows, because
torch splits a reduction across threads only when it has a single output.

The tests (tests/test_ops_cpu.py) check all of this bitwise at batch 1..8, random slots, and 1 vs 2
threads, with negative controls showing plain torch differing.

fp16/bf16 inputs are computed in fp32 and rounded once at the end.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

ROW_TILE = 32
# MKL switches to another kernel for narrow outputs (N < 16 measured here), and that kernel's result for a
# row depends on where the row sits. Padding N to a multiple of COL_PAD with zero columns keeps every
# problem on the wide-N path (a 150-shape random sweep: 10 failures unpadded, 0 padded to 8 or 16).
COL_PAD = 16


def _f32(t):
    return None if t is None else t.to(torch.float32)


def _pad_cols(b: torch.Tensor) -> torch.Tensor:
    pad = (-b.shape[-1]) % COL_PAD
    return F.pad(b, (0, pad)).contiguous() if pad else b.contiguous()


# Packed right-hand sides of nn.Parameter weights (fp32, contiguous, N padded), keyed by the Parameter and
# checked against its version counter, so an in-place update (optimizer step, load_state_dict) repacks.
# Re-packing a DiT linear's weight on every call cost ~25 us of ~200 us (measured, 1 thread).
_packed: dict[int, tuple] = {}


def _cached_pack(b: torch.Tensor, tag: str, make):
    owner = b._base if b._base is not None else b
    if not isinstance(owner, torch.nn.Parameter):
        return make()
    key = (id(owner), tag)
    sig = (tuple(b.shape), b.stride(), b.storage_offset(), b.dtype, owner._version)
    ent = _packed.get(key)
    if ent is not None and ent[0]() is owner and ent[1] == sig:
        return ent[2]
    with torch.no_grad():
        packed = make()
    if len(_packed) > 1024:
        _packed.clear()
    _packed[key] = (weakref.ref(owner, lambda _r, k=key: _packed.pop(k, None)), sig, packed)
    return packed


def _tiled_bmm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None):
    """out[g] = a[g] @ b[g] for groups g, computed as fixed [ROW_TILE, K] @ [K, N] problems.

    a: [G, M, K] contiguous; b: [G, K, Np] (Np a multiple of COL_PAD; stride 0 over G allowed);
    out: [G, Mp, Np] contiguous with Mp = M rounded up to ROW_TILE. Full tiles are views (no copy); the
    last partial tile of each group is zero-padded. ``bias`` ([Np], fp32) is added inside the GEMM
    (baddbmm, beta=1), which saves a separate pass over the output.
    """

    def gemm(x, y, dst):
        if bias is None:
            torch.bmm(x, y, out=dst)
        else:
            torch.baddbmm(bias.view(1, 1, -1).expand(dst.shape), x, y, out=dst)

    g, m, k = a.shape
    np_ = b.shape[2]
    full = m // ROW_TILE
    if g > 1 and m % ROW_TILE and full:
        # several groups with a partial last tile: pad M once so every tile is a plain view of one buffer
        ap = a.new_zeros(g, out.shape[1], k)
        ap[:, :m] = a
        a, m, full = ap, out.shape[1], out.shape[1] // ROW_TILE
    if full:
        tiles = a[:, : full * ROW_TILE].reshape(g * full, ROW_TILE, k)
        dst = out[:, : full * ROW_TILE].view(g * full, ROW_TILE, np_)
        if g == 1:  # one weight for every tile: a stride-0 batch, no copy
            bb = b.expand(full, k, np_)
        else:
            bb = b.unsqueeze(1).expand(g, full, k, np_).reshape(g * full, k, np_)
        gemm(tiles, bb, dst)
    rest = m - full * ROW_TILE
    if rest:
        tail = a.new_zeros(g, ROW_TILE, k)
        tail[:, :rest] = a[:, full * ROW_TILE :]
        gemm(tail, b, out[:, full * ROW_TILE :])


def mm_f32(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 [M, K] @ [K, N] (+ bias [N]) with row-tile invariance."""
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or n == 0 or k == 0:
        out = a.new_zeros(m, n)
        return out if bias is None else out + bias.to(torch.float32)[:n]
    bp = _cached_pack(b, "mm", lambda: _pad_cols(b.to(torch.float32)))
    if bias is not None:
        bias = _cached_pack(bias, "bias", lambda: F.pad(bias.to(torch.float32), (0, bp.shape[1] - bias.shape[0])))
    mp = -(-m // ROW_TILE) * ROW_TILE
    out = a.new_empty(1, mp, bp.shape[1])
    _tiled_bmm_into(out, a.contiguous().unsqueeze(0), bp.unsqueeze(0), bias)
    out = out[0, :m]
    return out if bp.shape[1] == n else out[:, :n].contiguous()


def bmm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp32 [B, M, K] @ [B, K, N] with row-tile invariance."""
    bsz, m, k = a.shape
    n = b.shape[2]
    if bsz == 0 or m == 0 or n == 0 or k == 0:
        return a.new_zeros(bsz, m, n)
    bp = _pad_cols(b)
    mp = -(-m // ROW_TILE) * ROW_TILE
    out = a.new_empty(bsz, mp, bp.shape[2])
    _tiled_bmm_into(out, a.contiguous(), bp)
    out = out[:, :m, :n]
    return out if (mp == m and bp.shape[2] == n) else out.contiguous()


def matmul(a, b, bias=None):
    return mm_f32(_f32(a), b, bias).to(a.dtype)


def bmm(a, b):
    return bmm_f32(_f32(a), _f32(b)).to(a.dtype)


def conv2d(x, w, bias, stride, padding):
    """im2col as one strided gather from a zero-padded channels-last copy, then the tiled GEMM."""
    bsz, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    sh, sw = stride
    ph, pw = padding
    ho = (h + 2 * ph - kh) // sh + 1
    wo = (wd + 2 * pw - kw) // sw + 1
    hp, wp = h + 2 * ph, wd + 2 * pw
    xp = x.new_zeros((bsz, hp, wp, c), dtype=torch.float32) if (ph or pw) else None
    if xp is None:
        xp = x.permute(0, 2, 3, 1).to(torch.float32).contiguous()
    else:
        xp[:, ph : ph + h, pw : pw + wd] = x.permute(0, 2, 3, 1)
    cols = xp.as_strided(
        (bsz, ho, wo, kh, kw, c), (hp * wp * c, sh * wp * c, sw * c, wp * c, c, 1)
    ).reshape(bsz * ho * wo, kh * kw * c)
    wm = _cached_pack(w, "conv", lambda: _pad_cols(_f32(w).permute(2, 3, 1, 0).reshape(kh * kw * c, o)))
    out = mm_f32(cols, wm, bias)[:, :o]  # [B*L, O] (a view: rows keep the padded stride)
    return out.reshape(bsz, ho, wo, o).permute(0, 3, 1, 2).to(x.dtype).contiguous()


def softmax_f32(x: torch.Tensor) -> torch.Tensor:
    """Row softmax over the last dim; torch's CPU kernel handles each row on its own."""
    return torch.softmax(x, dim=-1)


def attention(q, k, v, mask=None, scale=None):
    b, h, nq, d = q.shape
    nk = k.shape[2]
    dv = v.shape[3]
    if scale is None:
        scale = d**-0.5
    qf = _f32(q).reshape(b * h, nq, d)
    kf = _f32(k).reshape(b * h, nk, d)
    vf = _f32(v).reshape(b * h, nk, dv)
    s = bmm_f32(qf, kf.transpose(1, 2)) * scale
    if mask is not None:
        s = (s.reshape(b, h, nq, nk) + _f32(mask)).reshape(b * h, nq, nk)
    p = softmax_f32(s)
    return bmm_f32(p, vf).reshape(b, h, nq, dv).to(q.dtype)


def _at_least_two_rows(x2d: torch.Tensor):
    """torch splits a reduction across threads only when there is a single output; keep >= 2 rows."""
    if x2d.shape[0] == 1:
        return torch.cat([x2d, x2d.new_zeros(1, x2d.shape[1])]), 1
    return x2d, x2d.shape[0]


def layer_norm(x, weight, bias, eps):
    xf, r = _at_least_two_rows(_f32(x))
    out = F.layer_norm(xf, (xf.shape[-1],), _f32(weight), _f32(bias), eps)[:r]
    return out.to(x.dtype)


def rms_norm(x, weight, eps):
    xf, r = _at_least_two_rows(_f32(x))
    ms = (xf * xf).mean(dim=-1, keepdim=True)
    out = (xf * torch.rsqrt(ms + eps))[:r]
    if weight is not None:
        out = out * _f32(weight)
    return out.to(x.dtype)


def group_norm(x, num_groups, weight, bias, eps):
    bsz, c = x.shape[:2]
    xf = _f32(x).contiguous()
    if bsz == 1:  # same single-output guard as the row reductions
        xf2 = torch.cat([xf, xf.new_zeros(xf.shape)])
        return F.group_norm(xf2, num_groups, _f32(weight), _f32(bias), eps)[:1].to(x.dtype)
    return F.group_norm(xf, num_groups, _f32(weight), _f32(bias), eps).to(x.dtype)


def softmax(x):
    xf, r = _at_least_two_rows(_f32(x))
    return softmax_f32(xf)[:r].to(x.dtype)


def sum_rows(x):
    xf, r = _at_least_two_rows(_f32(x))
    return xf.sum(dim=-1)[:r].to(x.dtype)


def mean_rows(x):
    xf, r = _at_least_two_rows(_f32(x))
    return xf.mean(dim=-1)[:r].to(x.dtype)
