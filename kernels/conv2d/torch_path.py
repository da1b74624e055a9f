"""The batch-invariant torch path of conv2d: per-item im2col, one batched GEMM (see ``matmul/torch_path.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..matmul.torch_path import COL_PAD, cached_pack, even_sizes, f32, gemm, round_up, scratch_buffer


def conv2d(x, w, bias, stride, padding):
    """Per item: ``out[b] = W [O, C*kh*kw] @ cols[b] [C*kh*kw, Ho*Wo]``, one batched GEMM of identical
    problems, one per item, so an item's result cannot depend on the batch. ``cols`` is one strided gather
    (im2col) from a zero-padded NCHW copy; the product is NCHW already, so no layout change on either side.
    O is padded to a multiple of 8 and Ho*Wo to a multiple of 16: batched GEMMs of such shapes were batch and
    thread invariant in every sweep here (tests/test_cpu_sweep.py; 0 of 480 checks each for 4..56 rows in
    steps of 4 with 16-multiple columns), while odd row counts (7, 9) were not.

    The input is padded, its columns gathered and multiplied a group of items at a time (:func:`item_groups`), in
    buffers reused across the groups: every item's problem is the same problem whatever the group, as it is whatever the
    batch (a batched call computes each problem on its own), so the bits are those of one call over the batch."""
    bsz, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    sh, sw = stride
    ph, pw = padding
    ho = (h + 2 * ph - kh) // sh + 1
    wo = (wd + 2 * pw - kw) // sw + 1
    hp, wp = h + 2 * ph, wd + 2 * pw
    k, ll = c * kh * kw, ho * wo
    op, lp = round_up(o, 8), round_up(ll, COL_PAD)
    if op == o and w.dtype == torch.float32 and w.is_contiguous():
        wm = w.view(o, k)  # read in place: the copy would hold the same values in the same layout (and a weight that
        # is not cached, as every ComfyUI weight, would be copied at every call)
    else:
        wm = cached_pack(w, "conv", lambda: F.pad(f32(w).reshape(o, k), (0, 0, 0, op - o)).contiguous())
    exact = op == o and lp == ll and x.dtype == torch.float32
    if exact:
        out = torch.empty((bsz, op, lp), dtype=torch.float32, device=x.device)
    else:
        out = scratch_buffer("conv.out", (bsz, op, lp), x)
    bcol = None if bias is None else cached_pack(bias, "conv.bias", lambda: F.pad(f32(bias), (0, op - o)).view(op, 1))
    direct = (kh, kw, sh, sw) == (1, 1, 1, 1) and lp == ll  # the padded input is the columns
    sizes = [bsz] if direct else item_groups(bsz, k * lp * 4)
    # the border of the padded input and columns ll..lp of the columns stay zero from the buffers' creation: every
    # call writes only the interior
    pad = scratch_buffer(f"conv.pad{ph},{pw}", (sizes[0], c, hp, wp), x, zero=True) if ph or pw else None
    cols = None if direct else scratch_buffer(f"conv.cols{ll}", (sizes[0], k, lp), x, zero=lp != ll)
    i = 0
    for n in sizes:
        if pad is None:
            xp = x[i : i + n].to(torch.float32).contiguous()
        else:
            xp = pad[:n]
            xp[:, :, ph : ph + h, pw : pw + wd].copy_(x[i : i + n])
        if direct:
            b = xp.view(n, c, ll)
        else:
            b = cols[:n]
            b[:, :, :ll].view(n, c, kh, kw, ho, wo).copy_(
                xp.as_strided((n, c, kh, kw, ho, wo), (c * hp * wp, hp * wp, wp, 1, sh * wp, sw))
            )
        gemm(wm.expand(n, op, k), b, out[i : i + n], bcol)  # never one problem alone; gemm() adds the bias
        i += n
    if exact:
        return out.view(bsz, o, ho, wo)
    res = torch.empty((bsz, o, ho, wo), dtype=x.dtype, device=x.device)  # fresh: never a scratch alias
    res.copy_(out[:, :o, :ll].view(bsz, o, ho, wo))
    return res


# A conv's columns are gathered for this many bytes of items at a time (at least two items, and at least as many as
# torch has threads: a batched GEMM computes each problem on one thread). Gathering the whole batch at once made
# buffers too big to keep (an SD1.5 3x3 conv over 960 channels at a 64x64 latent, batch 8: 1.1 GB of columns and
# 134 MB of padded input), allocated, zero-filled and page-faulted afresh at every call.
COLS_GROUP_BYTES = 32 << 20


def item_groups(bsz: int, item_bytes: int) -> list[int]:
    """Sizes of the item groups of a batch of ``bsz`` whose columns take ``item_bytes`` each: as equal as can be,
    the largest first, none below the group size (so no lone item's problem is computed twice, ``gemm``)."""
    g = max(2, torch.get_num_threads(), COLS_GROUP_BYTES // max(1, item_bytes))
    return even_sizes(bsz, max(1, bsz // g))
