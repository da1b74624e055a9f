"""Attention forward fed by tensor descriptors (TMA on sm_90): opt-in, for calls without a mask.

The same algorithm and the same invariance argument as ``kernel.py``: one program per (batch, head, query block),
the whole KV sequence visited in order in blocks of ``BLOCK_N`` inside that program, an online softmax in fp32, the
whole blocks in a loop with no key mask and the partial last block in a second loop. Only the loads differ: q, k,
v and the output are read and written through 4-D descriptors of ``[B, H, N, D]`` with a ``[1, 1, rows, cols]``
block, so on sm_90 every tile arrives by TMA (``UTMALDG``) straight into shared memory, where the warpgroup MMA reads
it. Rows past ``N`` and columns past the head dim read as zero and are not written, so no load or store is masked.

A head dim that is not a power of two is read as two column blocks, as in ``kernel.py`` (72 = 64 + a 16-wide
tail): a second descriptor per tensor with the tail's block width, loaded at column ``BLOCK_D``.
"""

import triton
import triton.language as tl


@triton.jit
def _tile(desc, b, h, row, col, ROWS: tl.constexpr, COLS: tl.constexpr, DOT_FP32: tl.constexpr):
    """The ``[ROWS, COLS]`` tile of ``desc`` at (b, h, row, col); fp32 when ``DOT_FP32``."""
    t = desc.load([b, h, row, col]).reshape(ROWS, COLS)
    if DOT_FP32:
        t = t.to(tl.float32)
    return t


@triton.jit
def _dot(a, b, acc, DOT_FP32: tl.constexpr):
    if DOT_FP32:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _kv_step(q, q2, k_desc, k2_desc, v_desc, v2_desc, b, h, n0, n_k, qk_scale, m_i, l_i, acc, acc2,
             TAIL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_DV: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV2: tl.constexpr, DOT_FP32: tl.constexpr):
    """One KV block of the online softmax (keys ``n0 .. n0 + BLOCK_N``): the new ``(m_i, l_i, acc, acc2)``.

    ``TAIL``: the block may run past ``n_k``; the missing keys (read as zero) get a score of -inf. A whole block
    takes its row maximum on the raw scores and scales it after (``qk_scale >= 0``), and ``s * c - m`` is one fused
    multiply-add per score, as in ``kernel.kv_block``."""
    k = _tile(k_desc, b, h, n0, 0, BLOCK_N, BLOCK_D, DOT_FP32)
    s = _dot(q, k.T, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), DOT_FP32)
    if BLOCK_D2 > 0:
        k2 = _tile(k2_desc, b, h, n0, BLOCK_D, BLOCK_N, BLOCK_D2, DOT_FP32)
        s = _dot(q2, k2.T, s, DOT_FP32)
    if TAIL:
        s = s * qk_scale
        s = tl.where((n0 + tl.arange(0, BLOCK_N) < n_k)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    # a row with no finite score yet keeps m = -inf: subtract 0 there, so exp2(-inf - -inf) cannot make NaN
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    if TAIL:
        p = tl.exp2(s - m_sub[:, None])
    else:
        p = tl.exp2(s * qk_scale - m_sub[:, None])
    alpha = tl.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _tile(v_desc, b, h, n0, 0, BLOCK_N, BLOCK_DV, DOT_FP32)
    acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], DOT_FP32)
    if BLOCK_DV2 > 0:
        v2 = _tile(v2_desc, b, h, n0, BLOCK_DV, BLOCK_N, BLOCK_DV2, DOT_FP32)
        acc2 = _dot(p.to(v2.dtype), v2, acc2 * alpha[:, None], DOT_FP32)
    return m_new, l_i, acc, acc2


@triton.jit
def attention_tma_kernel(
    q_desc,
    k_desc,
    v_desc,
    o_desc,
    q2_desc,
    k2_desc,
    v2_desc,
    o2_desc,
    num_heads,
    n_q,
    n_k,
    qk_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_D2: tl.constexpr,
    BLOCK_DV2: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """Descriptors of q ``[B, H, Nq, D]`` (block ``[1, 1, BLOCK_M, BLOCK_D]``), k (``[1, 1, BLOCK_N, BLOCK_D]``),
    v (``[1, 1, BLOCK_N, BLOCK_DV]``) and the output (``[1, 1, BLOCK_M, BLOCK_DV]``); the ``*2`` ones are the same
    tensors with the tail blocks' widths (``BLOCK_D2``/``BLOCK_DV2``; 0: no tail, and they are not read). Grid
    ``(cdiv(Nq, BLOCK_M) * B * H,)``. ``qk_scale`` is ``scale * log2(e) >= 0``. ``DOT_FP32``: fp32 operands with
    IEEE dots (bf16 under the interpreter, whose bf16 dot is wrong); otherwise 16-bit dots, fp32 accumulation."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(n_q, BLOCK_M)
    pid_m = pid % num_m
    bh = pid // num_m
    b = bh // num_heads
    h = bh % num_heads
    m0 = pid_m * BLOCK_M

    q = _tile(q_desc, b, h, m0, 0, BLOCK_M, BLOCK_D, DOT_FP32)
    if BLOCK_D2 > 0:
        q2 = _tile(q2_desc, b, h, m0, BLOCK_D, BLOCK_M, BLOCK_D2, DOT_FP32)
    else:  # an unused stand-in, so that _kv_step has one signature
        q2 = q
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    if BLOCK_DV2 > 0:
        acc2 = tl.zeros([BLOCK_M, BLOCK_DV2], tl.float32)
    else:
        acc2 = acc
    # the whole blocks with no key mask, then the partial one: the same blocks in the same order for every query
    # row, whatever the batch
    n_whole = n_k - n_k % BLOCK_N
    for n0 in range(0, n_whole, BLOCK_N):
        m_i, l_i, acc, acc2 = _kv_step(
            q, q2, k_desc, k2_desc, v_desc, v2_desc, b, h, n0, n_k, qk_scale, m_i, l_i, acc, acc2,
            False, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, BLOCK_D2, BLOCK_DV2, DOT_FP32,
        )
    for n0 in range(n_whole, n_k, BLOCK_N):
        m_i, l_i, acc, acc2 = _kv_step(
            q, q2, k_desc, k2_desc, v_desc, v2_desc, b, h, n0, n_k, qk_scale, m_i, l_i, acc, acc2,
            True, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, BLOCK_D2, BLOCK_DV2, DOT_FP32,
        )

    # as in kernel.py: a row that saw a finite score has l >= ~1, which the floor leaves alone
    l_safe = tl.maximum(l_i, 1e-30)
    out = (acc / l_safe[:, None]).to(o_desc.dtype)
    o_desc.store([b, h, m0, 0], out.reshape(1, 1, BLOCK_M, BLOCK_DV))
    if BLOCK_DV2 > 0:
        out2 = (acc2 / l_safe[:, None]).to(o2_desc.dtype)
        o2_desc.store([b, h, m0, BLOCK_DV], out2.reshape(1, 1, BLOCK_M, BLOCK_DV2))
