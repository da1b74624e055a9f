"""Layer norm, RMS norm and group norm: one program per normalised row, fixed-order chunked reduction.

A "row" is ``n`` contiguous-by-stride elements: a row of ``x [R, C]`` for layer/RMS norm, or the
``(C/G) * spatial`` elements of one (sample, group) of a contiguous ``x [B, C, *spatial]`` for group norm.
Statistics are two-pass in fp32: the row is walked in chunks of ``BLOCK`` (a constexpr from the launch
table, keyed by the row length), each chunk added lane-wise into a ``[BLOCK]`` accumulator, and the lanes
summed once at the end. The order of every addition depends only on ``n`` and ``BLOCK``, never on the
number of rows, so a row's output is bitwise the same at any batch size or position.
"""

import triton
import triton.language as tl


@triton.jit
def norm_fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    stride_xr,
    stride_xc,
    stride_or,
    stride_oc,
    n,
    num_groups,
    spatial,
    eps,
    RMS: tl.constexpr,
    GROUPED: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Normalise row ``program_id(0)`` of length ``n``.

    ``RMS``: ``y = x / sqrt(mean(x^2) + eps)``; else ``y = (x - mean) / sqrt(var + eps)`` (biased var).
    ``GROUPED``: the affine index of element ``i`` is ``g * (n / spatial) + i // spatial`` with
    ``g = row % num_groups`` (per-channel affine of group norm); otherwise it is ``i``.
    """
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xr
    o_row = out_ptr + row * stride_or
    offs = tl.arange(0, BLOCK)

    mean = 0.0
    if not RMS:
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n, BLOCK):
            cols = start + offs
            x = tl.load(x_row + cols * stride_xc, mask=cols < n, other=0.0).to(tl.float32)
            acc += x
        mean = tl.sum(acc, 0) / n

    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        cols = start + offs
        ok = cols < n
        x = tl.load(x_row + cols * stride_xc, mask=ok, other=0.0).to(tl.float32)
        d = tl.where(ok, x - mean, 0.0)
        acc += d * d
    # sqrt_rn: correctly rounded, the same bits as the CPU reference's sqrt (tl.sqrt is an approximation)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(acc, 0) / n + eps)

    if GROUPED:
        chan0 = (row % num_groups) * (n // spatial)
    for start in range(0, n, BLOCK):
        cols = start + offs
        ok = cols < n
        x = tl.load(x_row + cols * stride_xc, mask=ok, other=0.0).to(tl.float32)
        y = (x - mean) * rstd
        if GROUPED:
            aff = chan0 + cols // spatial
        else:
            aff = cols
        if HAS_WEIGHT:
            y = y * tl.load(w_ptr + aff, mask=ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(b_ptr + aff, mask=ok, other=0.0).to(tl.float32)
        tl.store(o_row + cols * stride_oc, y.to(out_ptr.dtype.element_ty), mask=ok)
