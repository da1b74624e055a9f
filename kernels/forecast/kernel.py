"""Timestep-skip kernels: a fused forecast of a skipped model output and the relative change between two
outputs. Both are memory-bound single passes; neither needs a host sync.

``forecast_kernel``: ``out = Σ_i w_i · h_i`` over ``K ≤ 4`` history tensors, in fp32, terms added in
history order, written in the output dtype. The weights are finite-difference / Lagrange extrapolation
weights computed on the host from the timesteps.

``relative_change_flat_kernel`` / ``relative_change_tile_kernel``: per (item, chunk or tile) partial sums of
``|a - b|`` and ``|b|`` in fp32. ``relative_change_finish_kernel``: per-tile ratios and per-item ratios
``Σ|a-b| / Σ|b|`` from the partials, adding them in tile order. No atomics: the order of every addition is
fixed by the shapes and the launch config, never by scheduling, and never by the batch size.
"""

import triton
import triton.language as tl


@triton.jit
def forecast_kernel(
    out_ptr,
    h0_ptr,
    h1_ptr,
    h2_ptr,
    h3_ptr,
    w0,
    w1,
    w2,
    w3,
    n_elements,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_elements
    acc = w0 * tl.load(h0_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if K > 1:
        acc += w1 * tl.load(h1_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if K > 2:
        acc += w2 * tl.load(h2_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if K > 3:
        acc += w3 * tl.load(h3_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def relative_change_flat_kernel(
    a_ptr,
    b_ptr,
    num_ptr,
    den_ptr,
    item_size,
    chunk,
    n_chunks,
    BLOCK: tl.constexpr,
):
    """Partial sums over elements ``[c*chunk, (c+1)*chunk)`` of item ``i`` (contiguous items)."""
    c = tl.program_id(0)
    i = tl.program_id(1)
    base = i.to(tl.int64) * item_size
    start = c * chunk
    end = tl.minimum(start + chunk, item_size)
    offs = tl.arange(0, BLOCK)
    acc_n = tl.zeros([BLOCK], dtype=tl.float32)
    acc_d = tl.zeros([BLOCK], dtype=tl.float32)
    for e0 in range(start, end, BLOCK):
        e = e0 + offs
        ok = e < end
        a = tl.load(a_ptr + base + e, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + base + e, mask=ok, other=0.0).to(tl.float32)
        acc_n += tl.abs(a - b)
        acc_d += tl.abs(b)
    out = i.to(tl.int64) * n_chunks + c
    tl.store(num_ptr + out, tl.sum(acc_n, axis=0))
    tl.store(den_ptr + out, tl.sum(acc_d, axis=0))


@triton.jit
def relative_change_tile_kernel(
    a_ptr,
    b_ptr,
    num_ptr,
    den_ptr,
    S0,
    S1,
    S2,
    S3,
    T0,
    T1,
    T2,
    T3,
    n1,
    n2,
    n3,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Partial sums over one box tile ``[T0, T1, T2, T3]`` (clipped at the edges) of item ``i``, seen as a
    contiguous ``[S0, S1, S2, S3]`` array. The box's rows (its first three axes, flattened) go down the
    block's first axis, its last, contiguous axis along the second."""
    t = tl.program_id(0)
    i = tl.program_id(1)
    j0 = t // (n1 * n2 * n3)
    j1 = (t // (n2 * n3)) % n1
    j2 = (t // n3) % n2
    j3 = t % n3
    o0 = j0 * T0
    o1 = j1 * T1
    o2 = j2 * T2
    o3 = j3 * T3
    r1 = tl.minimum(T1, S1 - o1)
    r2 = tl.minimum(T2, S2 - o2)
    rows = tl.minimum(T0, S0 - o0) * r1 * r2
    cols = tl.minimum(T3, S3 - o3)
    base = i.to(tl.int64) * S0 * S1 * S2 * S3
    offs_r = tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    acc_n = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc_d = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for rr0 in range(0, rows, BLOCK_R):
        rr = rr0 + offs_r
        a0 = rr // (r1 * r2)
        a1 = (rr // r2) % r1
        a2 = rr % r2
        row_off = (((o0 + a0).to(tl.int64) * S1 + (o1 + a1)) * S2 + (o2 + a2)) * S3 + o3
        r_ok = rr < rows
        for cc0 in range(0, cols, BLOCK_C):
            cc = cc0 + offs_c
            ok = r_ok[:, None] & (cc < cols)[None, :]
            ptr_off = base + row_off[:, None] + cc[None, :]
            a = tl.load(a_ptr + ptr_off, mask=ok, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + ptr_off, mask=ok, other=0.0).to(tl.float32)
            acc_n += tl.abs(a - b)
            acc_d += tl.abs(b)
    out = i.to(tl.int64) * tl.num_programs(0) + t
    tl.store(num_ptr + out, tl.sum(tl.sum(acc_n, axis=1), axis=0))
    tl.store(den_ptr + out, tl.sum(tl.sum(acc_d, axis=1), axis=0))


@triton.jit
def _ratio(num, den):
    # 0/0 -> 0 (nothing changed), x/0 -> inf (changed from exactly zero)
    safe = tl.where(den > 0.0, den, 1.0)
    return tl.where(den > 0.0, num / safe, tl.where(num > 0.0, float("inf"), 0.0))


@triton.jit
def relative_change_finish_kernel(
    num_ptr,
    den_ptr,
    item_ptr,
    tile_ptr,
    n_tiles,
    WRITE_TILES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0)
    base = i.to(tl.int64) * n_tiles
    offs = tl.arange(0, BLOCK)
    acc_n = tl.zeros([BLOCK], dtype=tl.float32)
    acc_d = tl.zeros([BLOCK], dtype=tl.float32)
    for t0 in range(0, n_tiles, BLOCK):
        t = t0 + offs
        ok = t < n_tiles
        num = tl.load(num_ptr + base + t, mask=ok, other=0.0)
        den = tl.load(den_ptr + base + t, mask=ok, other=0.0)
        acc_n += num
        acc_d += den
        if WRITE_TILES:
            tl.store(tile_ptr + base + t, _ratio(num, den), mask=ok)
    tl.store(item_ptr + i, _ratio(tl.sum(acc_n, axis=0), tl.sum(acc_d, axis=0)))
