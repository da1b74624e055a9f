"""Layer norm, RMS norm and group norm: one program per normalised row, fixed-order chunked reduction.

A "row" is ``n`` contiguous-by-stride elements: a row of ``x [R, C]`` for layer/RMS norm, or the
``(C/G) * spatial`` elements of one (sample, group) of a contiguous ``x [B, C, *spatial]`` for group norm.
Statistics are two-pass in fp32: the row is walked in chunks of ``BLOCK`` (a constexpr from the launch
table, keyed by the row length), each chunk added lane-wise into a ``[BLOCK]`` accumulator, and the lanes
summed once at the end. The order of every addition depends only on ``n`` and ``BLOCK``, never on the
number of rows, so a row's output is bitwise the same at any batch size or position.

``group_norm_cl_kernel`` is group norm for channels-last 4-D input, where one (sample, group) is not one run
but ``C/G`` contiguous channels at each pixel: the same statistics over a 2-D ``[pixels, channels]`` tile.
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


@triton.jit
def group_norm_cl_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    chans,
    cpg,
    spatial,
    num_groups,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Group norm of (sample, group) ``program_id(0)`` of a channels-last ``x [B, C, H, W]`` (memory order
    ``[B, H*W, C]``), written to a channels-last ``out`` of the same shape.

    The group is ``cpg = C / num_groups`` contiguous channels at each of the ``spatial = H * W`` pixels (pixel
    stride ``chans``). It is walked in ``[BLOCK_P, BLOCK_C]`` tiles (pixels x channels), tile ``t`` covering
    pixel block ``t // n_cb`` and channel block ``t % n_cb`` (``n_cb`` channel blocks per pixel block), each
    tile added element-wise into a ``[BLOCK_P, BLOCK_C]`` fp32 accumulator that is summed once at the end: the
    order of every addition depends only on ``cpg``, ``spatial`` and the two block sizes, never on the batch
    size or the sample's position. Two-pass statistics as ``norm_fwd_kernel``.
    """
    pid = tl.program_id(0)
    chan0 = (pid % num_groups) * cpg
    # 64-bit: a sample's offset may pass 2**31 (offsets inside a sample are 32-bit: the launcher checks)
    base = (pid // num_groups).to(tl.int64) * spatial * chans + chan0
    x_grp = x_ptr + base
    o_grp = out_ptr + base
    offs_p = tl.arange(0, BLOCK_P)[:, None]
    offs_c = tl.arange(0, BLOCK_C)[None, :]
    tile = offs_p * chans + offs_c
    n_cb = tl.cdiv(cpg, BLOCK_C)
    n_tiles = tl.cdiv(spatial, BLOCK_P) * n_cb
    n = cpg * spatial

    acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    for t in range(0, n_tiles):
        p0 = (t // n_cb) * BLOCK_P
        c0 = (t % n_cb) * BLOCK_C
        ok = (offs_p < spatial - p0) & (offs_c < cpg - c0)
        acc += tl.load(x_grp + (p0 * chans + c0) + tile, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(tl.sum(acc, 1), 0) / n

    acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    for t in range(0, n_tiles):
        p0 = (t // n_cb) * BLOCK_P
        c0 = (t % n_cb) * BLOCK_C
        ok = (offs_p < spatial - p0) & (offs_c < cpg - c0)
        x = tl.load(x_grp + (p0 * chans + c0) + tile, mask=ok, other=0.0).to(tl.float32)
        d = tl.where(ok, x - mean, 0.0)
        acc += d * d
    # sqrt_rn: correctly rounded, the same bits as the CPU reference's sqrt (tl.sqrt is an approximation)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(tl.sum(acc, 1), 0) / n + eps)

    for t in range(0, n_tiles):
        p0 = (t // n_cb) * BLOCK_P
        c0 = (t % n_cb) * BLOCK_C
        cok = offs_c < cpg - c0
        ok = (offs_p < spatial - p0) & cok
        off = (p0 * chans + c0) + tile
        x = tl.load(x_grp + off, mask=ok, other=0.0).to(tl.float32)
        y = (x - mean) * rstd
        if HAS_WEIGHT:  # [1, BLOCK_C]: one weight per channel of the block, the same for every pixel
            y = y * tl.load(w_ptr + chan0 + c0 + offs_c, mask=cok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(b_ptr + chan0 + c0 + offs_c, mask=cok, other=0.0).to(tl.float32)
        tl.store(o_grp + off, y.to(out_ptr.dtype.element_ty), mask=ok)
