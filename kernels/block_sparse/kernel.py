"""Block-sparse attention and the block pooling behind its mask.

``block_sparse_fwd_kernel``: flash-style online-softmax attention in which the program for a query tile walks only
the kept KV blocks of its query block, read from the index form of the mask (ascending kept block ids +
count). The loop trip count is the kept count, so work is proportional to mask density: no program loops
over all blocks to skip most of them. KV blocks are visited in ascending order, so the floating-point
order is fixed. With ``COUNT_VISITS`` the program also writes how many KV tiles it visited (tests use this
to check that work follows density; the flag compiles out otherwise).

Each KV tile is one step of dense attention's online softmax (``attention/kernel.py: kv_block``), the whole
tiles with no key mask. Dot precision: fp16 inputs, and bf16 inputs on a GPU, use 16-bit operands with fp32
accumulation (P is rounded to the input dtype for P·V, as in flash attention). fp32 inputs, and bf16 under the Triton
interpreter (whose bf16 dot is wrong), use fp32 operands with ``input_precision="ieee"``.

``block_pool_kernel``: mean of each ``BLOCK_SIZE``-token block of ``x [B, H, N, D]`` in fp32, rows added
in a fixed order; the tail block is divided by its true token count.
"""

import triton
import triton.language as tl

from ..attention.kernel import kv_block


@triton.jit
def block_sparse_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    idx_ptr,
    cnt_ptr,
    visits_ptr,
    H,
    N,
    M,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_on,
    stride_od,
    stride_ib,
    stride_ih,
    stride_iq,
    stride_cb,
    stride_ch,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D_PAD: tl.constexpr,
    DV_PAD: tl.constexpr,
    HALF_DOT: tl.constexpr,
    COUNT_VISITS: tl.constexpr,
    STRIDE_UNIT: tl.constexpr = 1,
    SPLIT_TAIL: tl.constexpr = False,
):
    """``D``/``DV`` are constexprs, so at a power-of-two head dim the column masks fold away and K/V rows are read
    in 16-byte vector loads; q/k/v/o batch, head and row strides arrive in units of ``STRIDE_UNIT`` elements, as in
    dense attention (``attention/launch.py: unit_strides``). ``SPLIT_TAIL``: as in dense attention
    (``attention/launch.py: split_tail``)."""
    stride_qb = stride_qb * STRIDE_UNIT
    stride_qh = stride_qh * STRIDE_UNIT
    stride_qn = stride_qn * STRIDE_UNIT
    stride_kb = stride_kb * STRIDE_UNIT
    stride_kh = stride_kh * STRIDE_UNIT
    stride_kn = stride_kn * STRIDE_UNIT
    stride_vb = stride_vb * STRIDE_UNIT
    stride_vh = stride_vh * STRIDE_UNIT
    stride_vn = stride_vn * STRIDE_UNIT
    stride_ob = stride_ob * STRIDE_UNIT
    stride_oh = stride_oh * STRIDE_UNIT
    stride_on = stride_on * STRIDE_UNIT
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    qb = (pid_m * BLOCK_M) // BLOCK_SIZE

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < N
    d_ok = offs_d < D
    dv_ok = offs_dv < DV

    q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    q = tl.load(
        q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
        mask=m_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if not HALF_DOT:
        q = q.to(tl.float32)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], dtype=tl.float32)

    idx_base = idx_ptr + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih + qb * stride_iq
    count = tl.load(cnt_ptr + b.to(tl.int64) * stride_cb + h.to(tl.int64) * stride_ch + qb)
    # Kept block ids ascend, and only the keys' last block can be partial (M not a multiple of BLOCK_SIZE), so if it
    # is kept it is the last kept one. Tiles are numbered t = 0, 1, ... over (kept block, sub-tile) pairs; a sub-tile
    # wholly past the keys would add nothing and is not visited. With SPLIT_TAIL every whole tile is visited first
    # with no key mask at all (the partial block's whole sub-tiles included), then the partial tile, if any, in a
    # loop of its own; otherwise one loop masks every tile.
    last = tl.load(idx_base + tl.maximum(count - 1, 0))
    rem = M - last * BLOCK_SIZE  # keys from the last kept block on: >= BLOCK_SIZE unless that block is partial
    partial = (count > 0) & (rem < BLOCK_SIZE)
    SUBS: tl.constexpr = BLOCK_SIZE // BLOCK_N
    n_whole = tl.where(partial, (count - 1) * SUBS + rem // BLOCK_N, count * SUBS)
    n_tiles = n_whole + (partial & (rem % BLOCK_N != 0)).to(tl.int32)
    if not SPLIT_TAIL:
        n_whole = 0
    # flat loops over the tiles: one trip per KV tile visited, which software pipelining can overlap, and no
    # unrolled copies of the body
    visits = 0
    for t in range(0, n_whole):
        n0 = tl.load(idx_base + t // SUBS) * BLOCK_SIZE + (t % SUBS) * BLOCK_N
        m_i, l_i, acc, _acc2 = kv_block(
            q, q, k_base, v_base, k_base, n0, offs_n, offs_m, offs_d, offs_d, offs_dv, offs_dv,
            stride_kn, stride_kd, stride_vn, stride_vd, 0, 0, M, m_ok, d_ok, d_ok, dv_ok, dv_ok,
            qk_scale, m_i, l_i, acc, acc, False, False, not HALF_DOT, False, False,
        )  # fmt: skip
        visits += 1
    for t in range(n_whole, n_tiles):
        n0 = tl.load(idx_base + t // SUBS) * BLOCK_SIZE + (t % SUBS) * BLOCK_N
        m_i, l_i, acc, _acc2 = kv_block(
            q, q, k_base, v_base, k_base, n0, offs_n, offs_m, offs_d, offs_d, offs_dv, offs_dv,
            stride_kn, stride_kd, stride_vn, stride_vd, 0, 0, M, m_ok, d_ok, d_ok, dv_ok, dv_ok,
            qk_scale, m_i, l_i, acc, acc, True, False, not HALF_DOT, False, False,
        )  # fmt: skip
        visits += 1

    # a query block with no kept KV block (possible only with a user-made mask) outputs zeros
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_base = o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(
        o_base + offs_m[:, None] * stride_on + offs_dv[None, :] * stride_od,
        out.to(o_ptr.dtype.element_ty),
        mask=m_ok[:, None] & dv_ok[None, :],
    )
    if COUNT_VISITS:
        tl.store(visits_ptr + pid_bh.to(tl.int64) * tl.num_programs(0) + pid_m, visits)


@triton.jit
def block_pool_kernel(
    x_ptr,
    out_ptr,
    H,
    N,
    D,
    n_blocks,
    stride_xb,
    stride_xh,
    stride_xn,
    stride_xd,
    BLOCK_SIZE: tl.constexpr,
    ROWS: tl.constexpr,
    D_PAD: tl.constexpr,
):
    pid_blk = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_d = tl.arange(0, D_PAD)
    offs_r = tl.arange(0, ROWS)
    d_ok = offs_d < D
    base = x_ptr + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    start = pid_blk * BLOCK_SIZE
    acc = tl.zeros([ROWS, D_PAD], dtype=tl.float32)
    for r0 in range(0, BLOCK_SIZE, ROWS):
        n = start + r0 + offs_r
        x = tl.load(
            base + n[:, None] * stride_xn + offs_d[None, :] * stride_xd,
            mask=(n < N)[:, None] & d_ok[None, :],
            other=0.0,
        )
        acc += x.to(tl.float32)
    cnt = tl.minimum(N - start, BLOCK_SIZE).to(tl.float32)
    mean = tl.sum(acc, axis=0) / cnt
    tl.store(out_ptr + (pid_bh.to(tl.int64) * n_blocks + pid_blk) * D + offs_d, mean, mask=d_ok)
