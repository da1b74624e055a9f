"""Depthwise conv2d: output channel ``o`` is input channel ``o // MULT`` correlated with its own ``KH x KW`` filter.

One program per (``BLOCK_P`` output pixels, ``BLOCK_C`` output channels, item). It walks the filter's taps in a
fixed order (row by row), loads the tap's input tile (masked: zero padding and the edges), multiplies it by the
tap's weights and adds it to an fp32 accumulator; bias in the epilogue, one rounding at the store. Nothing in it
depends on the batch: one item per program, the same tiles and tap order for every item, no atomics, no split.
Strides are arguments, so NCHW and channels-last inputs are read in place (channels-last: a tile's channels are
contiguous).
"""

import triton
import triton.language as tl


@triton.jit
def depthwise_conv2d_kernel(x_ptr, w_ptr, b_ptr, out_ptr, H, W, HO, WO, CO,
                            sxb, sxc, sxh, sxw, sob, soc, soh, sow, stride_h, stride_w, pad_h, pad_w,
                            MULT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
                            BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pix = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    co = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    item = tl.program_id(2).to(tl.int64)
    ok_p = pix < HO * WO
    ok_c = co < CO
    oh = pix // WO
    ow = pix % WO
    ci = (co // MULT).to(tl.int64)
    x_item = x_ptr + item * sxb
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for r in range(KH):  # a loop, not unrolled: the taps' loads are not all hoisted into registers
        ih = oh * stride_h - pad_h + r
        ok_h = ok_p & (ih >= 0) & (ih < H)
        for s in range(KW):
            iw = ow * stride_w - pad_w + s
            ok = ok_h & (iw >= 0) & (iw < W)
            ptrs = x_item + (ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw)[:, None] + (ci * sxc)[None, :]
            xv = tl.load(ptrs, mask=ok[:, None] & ok_c[None, :], other=0.0).to(tl.float32)
            wv = tl.load(w_ptr + co * (KH * KW) + (r * KW + s), mask=ok_c, other=0.0).to(tl.float32)
            acc += xv * wv[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=ok_c, other=0.0).to(tl.float32)[None, :]
    pix_off = oh.to(tl.int64) * soh + ow.to(tl.int64) * sow
    out = out_ptr + item * sob + pix_off[:, None] + (co.to(tl.int64) * soc)[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=ok_p[:, None] & ok_c[None, :])
