"""The batch-invariant torch path of conv2d: per-item im2col, one batched GEMM (see ``matmul/torch_path.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..matmul.torch_path import COL_PAD, cached_pack, f32, gemm, round_up, scratch_buffer


def conv2d(x, w, bias, stride, padding):
    """Per item: ``out[b] = W [O, C*kh*kw] @ cols[b] [C*kh*kw, Ho*Wo]``, one batched GEMM of identical
    problems, one per item, so an item's result cannot depend on the batch. ``cols`` is one strided gather
    (im2col) from a zero-padded NCHW copy; the product is NCHW already, so no layout change on either side.
    O is padded to a multiple of 8 and Ho*Wo to a multiple of 16: batched GEMMs of such shapes were batch and
    thread invariant in every sweep here (tests/test_cpu_sweep.py; 0 of 480 checks each for 4..56 rows in
    steps of 4 with 16-multiple columns), while odd row counts (7, 9) were not."""
    bsz, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    sh, sw = stride
    ph, pw = padding
    ho = (h + 2 * ph - kh) // sh + 1
    wo = (wd + 2 * pw - kw) // sw + 1
    hp, wp = h + 2 * ph, wd + 2 * pw
    k, ll = c * kh * kw, ho * wo
    op, lp = round_up(o, 8), round_up(ll, COL_PAD)
    if ph or pw:  # the border of this buffer is zero from its creation and never written
        xp = scratch_buffer(f"conv.pad{ph},{pw}", (bsz, c, hp, wp), x, zero=True)
        xp[:, :, ph : ph + h, pw : pw + wd].copy_(x)
    else:
        xp = x.to(torch.float32).contiguous()
    if (kh, kw, sh, sw) == (1, 1, 1, 1) and lp == ll:
        cols = xp.view(bsz, c, ll)
    else:  # columns ll..lp of this buffer stay zero as well
        cols = scratch_buffer(f"conv.cols{ll}", (bsz, k, lp), x, zero=True)
        cols[:, :, :ll].view(bsz, c, kh, kw, ho, wo).copy_(
            xp.as_strided((bsz, c, kh, kw, ho, wo), (c * hp * wp, hp * wp, wp, 1, sh * wp, sw))
        )
    if op == o and w.dtype == torch.float32 and w.is_contiguous():
        wm = w.view(o, k)  # read in place: the copy would hold the same values in the same layout (and a weight that
        # is not cached, as every ComfyUI weight, would be copied at every call)
    else:
        wm = cached_pack(w, "conv", lambda: F.pad(f32(w).reshape(o, k), (0, 0, 0, op - o)).contiguous())
    exact = op == o and lp == ll and x.dtype == torch.float32
    out = torch.empty((bsz, op, lp), device=x.device) if exact else scratch_buffer("conv.out", (bsz, op, lp), x)
    bcol = None if bias is None else cached_pack(bias, "conv.bias", lambda: F.pad(f32(bias), (0, op - o)).view(op, 1))
    gemm(wm.expand(bsz, op, k), cols, out, bcol)  # never one problem alone; the bias as gemm() adds it
    if exact:
        return out.view(bsz, o, ho, wo)
    res = torch.empty((bsz, o, ho, wo), dtype=x.dtype, device=x.device)  # fresh: never a scratch alias
    res.copy_(out[:, :o, :ll].view(bsz, o, ho, wo))
    return res
