"""Flash-style scaled-dot-product attention forward, one program per (batch, head, query block).

The KV sequence is visited in order 0..N_K in blocks of ``BLOCK_N`` inside a single program (never split),
with an online softmax in fp32. Every query row therefore sees the same sequence of operations whatever
the batch size, head count or its slot in the batch: the output is batch invariant, bit for bit.
"""

import triton
import triton.language as tl


@triton.jit
def kv_block(
    q,
    q2,
    k_base,
    v_base,
    b_base,
    n0,
    offs_n,
    offs_m,
    offs_d,
    offs_d2,
    offs_dv,
    offs_dv2,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    stride_mm,
    stride_mn,
    n_k,
    m_ok,
    d_ok,
    d2_ok,
    dv_ok,
    dv2_ok,
    qk_scale,
    m_i,
    l_i,
    acc,
    acc2,
    TAIL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DOT_FP32: tl.constexpr,
    HAS_D2: tl.constexpr,
    HAS_DV2: tl.constexpr,
):
    """One KV block of the online softmax: returns the new ``(m_i, l_i, acc, acc2)``.

    The block is keys ``n0 .. n0 + BLOCK_N`` (``offs_n``). ``TAIL``: it may run past ``n_k``, so the key loads are
    masked and the missing keys get no weight; a whole block has no key mask at all. In a whole block with no mask
    the row maximum is taken on the raw scores and scaled after (``qk_scale >= 0``, so ``max(s) * c == max(s * c)``
    exactly), and ``s * c - m`` is one fused multiply-add per score. ``p @ v`` accumulates onto the rescaled
    accumulator inside the dot. Shared by dense and block-sparse attention.
    """
    LOG2E: tl.constexpr = 1.4426950408889634
    cols = n0 + offs_n
    n_ok = cols < n_k
    # pointers are formed here from the bases, not carried in as tiles: a tile of 64-bit pointers held live across
    # the whole-block loop into the tail block costs registers (fp32 tiles spilled)
    k_ptrs = k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd  # k transposed: [BLOCK_D, BLOCK_N]
    v_ptrs = v_base + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    if TAIL:
        k = tl.load(k_ptrs, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=dv_ok[None, :], other=0.0)
    if DOT_FP32:
        s = tl.dot(q, k.to(tl.float32), input_precision="ieee")
    else:
        s = tl.dot(q, k)
    if HAS_D2:
        k2_ptrs = k_base + cols[None, :] * stride_kn + offs_d2[:, None] * stride_kd
        if TAIL:
            k2 = tl.load(k2_ptrs, mask=d2_ok[:, None] & n_ok[None, :], other=0.0)
        else:
            k2 = tl.load(k2_ptrs, mask=d2_ok[:, None], other=0.0)
        if DOT_FP32:
            s = tl.dot(q2, k2.to(tl.float32), acc=s, input_precision="ieee")
        else:
            s = tl.dot(q2, k2, acc=s)
    if HAS_MASK or TAIL:
        s = s * qk_scale
        if HAS_MASK:
            b_ptrs = b_base + offs_m[:, None] * stride_mm + cols[None, :] * stride_mn
            if TAIL:
                bias = tl.load(b_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            else:
                bias = tl.load(b_ptrs, mask=m_ok[:, None], other=0.0)
            s = s + bias * LOG2E
        if TAIL:
            s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    # a row with no finite score yet keeps m = -inf; subtract 0 there instead of -inf so that exp2(-inf - (-inf))
    # does not turn the (still zero) state into NaN. A row that stays fully masked ends with l = 0 and acc = 0, and
    # outputs 0 (the kernel's end), as torch's SDPA does.
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    if HAS_MASK or TAIL:
        p = tl.exp2(s - m_sub[:, None])
    else:
        p = tl.exp2(s * qk_scale - m_sub[:, None])
    alpha = tl.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DOT_FP32:
        acc = tl.dot(p, v.to(tl.float32), acc * alpha[:, None], input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    if HAS_DV2:
        v2_ptrs = v_base + cols[:, None] * stride_vn + offs_dv2[None, :] * stride_vd
        if TAIL:
            v2 = tl.load(v2_ptrs, mask=n_ok[:, None] & dv2_ok[None, :], other=0.0)
        else:
            v2 = tl.load(v2_ptrs, mask=dv2_ok[None, :], other=0.0)
        if DOT_FP32:
            acc2 = tl.dot(p, v2.to(tl.float32), acc2 * alpha[:, None], input_precision="ieee")
        else:
            acc2 = tl.dot(p.to(v2.dtype), v2, acc2 * alpha[:, None])
    return m_new, l_i, acc, acc2


@triton.jit
def attention_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    out_ptr,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_mn,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    num_heads,
    n_q,
    n_k,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_D2: tl.constexpr = 0,
    BLOCK_DV2: tl.constexpr = 0,
    STRIDE_UNIT: tl.constexpr = 1,
    SPLIT_TAIL: tl.constexpr = False,
):
    """``qk_scale`` is ``scale * log2(e)``: scores live in the log2 domain so the kernel uses ``exp2``.

    ``DOT_FP32``: upcast q/k/v tiles and p to fp32 and use ``input_precision="ieee"`` (fp32 inputs, and
    bf16 under the interpreter, whose bf16 ``tl.dot`` is wrong); otherwise the dots run on the input dtype
    (fp16/bf16 tensor cores) with fp32 accumulation.

    ``BLOCK_D2`` / ``BLOCK_DV2`` (0: none): a head dim that is not a power of two is read as two column blocks,
    ``BLOCK_D`` columns and a masked tail of ``BLOCK_D2``, instead of one block padded to the next power of two:
    head dim 72 (DiT-XL, PixArt) computes 64 + 16 columns per dot instead of 128. The scores are the first block's
    dot with the tail's accumulated into it, and the output has an accumulator per block: a fixed order either way.

    ``SPLIT_TAIL`` (the launcher's choice, per dtype and GPU generation: ``launch.split_tail``): visit the whole KV
    blocks in a loop with no key mask and the partial one in a second loop, instead of one loop that masks every
    block. It saves a select per score and lets the row maximum be scaled once per row (``kv_block``), but the second
    loop costs registers that the fp32 FMA dots do not have (the static report showed spills of up to 2 KB), so fp32
    keeps the one masked loop.
    """
    # q/k/v/out batch, head and row strides arrive in units of STRIDE_UNIT elements (launch.py): multiplied by a
    # constant here, the compiler knows every row starts on a 16-byte boundary and reads rows in 16-byte loads. A
    # row stride of 72 elements (head dim 72) is not a multiple of 16, so Triton's own specialisation cannot tell.
    stride_qb = stride_qb * STRIDE_UNIT
    stride_qh = stride_qh * STRIDE_UNIT
    stride_qm = stride_qm * STRIDE_UNIT
    stride_kb = stride_kb * STRIDE_UNIT
    stride_kh = stride_kh * STRIDE_UNIT
    stride_kn = stride_kn * STRIDE_UNIT
    stride_vb = stride_vb * STRIDE_UNIT
    stride_vh = stride_vh * STRIDE_UNIT
    stride_vn = stride_vn * STRIDE_UNIT
    stride_ob = stride_ob * STRIDE_UNIT
    stride_oh = stride_oh * STRIDE_UNIT
    stride_om = stride_om * STRIDE_UNIT
    pid = tl.program_id(0)
    num_m = tl.cdiv(n_q, BLOCK_M)
    pid_m = pid % num_m
    pid_bh = pid // num_m
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)

    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    o_base = out_ptr + b * stride_ob + h * stride_oh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < n_q
    # head dims are constexprs: with D == BLOCK_D the masks fold away and the loads vectorise
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V

    q = tl.load(
        q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=m_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    if BLOCK_D2 > 0:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        d2_ok = offs_d2 < HEAD_DIM
        q2 = tl.load(
            q_base + offs_m[:, None] * stride_qm + offs_d2[None, :] * stride_qd,
            mask=m_ok[:, None] & d2_ok[None, :],
            other=0.0,
        )
        if DOT_FP32:
            q2 = q2.to(tl.float32)
    else:  # unused stand-ins, so that kv_block has one signature
        offs_d2, d2_ok, q2 = offs_d, d_ok, q
    if BLOCK_DV2 > 0:
        offs_dv2 = BLOCK_DV + tl.arange(0, BLOCK_DV2)
        dv2_ok = offs_dv2 < HEAD_DIM_V
        acc2 = tl.zeros([BLOCK_M, BLOCK_DV2], tl.float32)
    else:
        offs_dv2, dv2_ok, acc2 = offs_dv, dv_ok, acc

    b_base = mask_ptr + b * stride_mb + h * stride_mh
    # SPLIT_TAIL: the whole blocks first, with no key mask at all, then the one partial block (if any), in a loop of
    # its own. Otherwise one loop masks every block. Either way the same blocks in the same order for every query row,
    # whatever the batch.
    if SPLIT_TAIL:
        n_whole = n_k - n_k % BLOCK_N
    else:
        n_whole = 0
    for start_n in range(0, n_whole, BLOCK_N):
        m_i, l_i, acc, acc2 = kv_block(
            q, q2, k_base, v_base, b_base, start_n, offs_n, offs_m, offs_d, offs_d2, offs_dv, offs_dv2,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, n_k, m_ok, d_ok, d2_ok, dv_ok, dv2_ok,
            qk_scale, m_i, l_i, acc, acc2, False, HAS_MASK, DOT_FP32, BLOCK_D2 > 0, BLOCK_DV2 > 0,
        )  # fmt: skip
    for start_n in range(n_whole, n_k, BLOCK_N):
        m_i, l_i, acc, acc2 = kv_block(
            q, q2, k_base, v_base, b_base, start_n, offs_n, offs_m, offs_d, offs_d2, offs_dv, offs_dv2,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, n_k, m_ok, d_ok, d2_ok, dv_ok, dv2_ok,
            qk_scale, m_i, l_i, acc, acc2, True, HAS_MASK, DOT_FP32, BLOCK_D2 > 0, BLOCK_DV2 > 0,
        )  # fmt: skip

    # a row with a finite score has l of about 1 or more (its maximum adds exp2(~0)), which the floor leaves alone; a
    # row whose every score was -inf (fully masked) has l = 0 and acc = 0 and outputs 0, as torch's SDPA does; a NaN
    # state stays NaN through acc. (A select here instead spilled 8 B on sm_80 at head dim 40 with a mask.)
    l_safe = tl.maximum(l_i, 1e-30)
    out = acc / l_safe[:, None]
    tl.store(
        o_base + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=m_ok[:, None] & dv_ok[None, :],
    )
    if BLOCK_DV2 > 0:
        out2 = acc2 / l_safe[:, None]
        tl.store(
            o_base + offs_m[:, None] * stride_om + offs_dv2[None, :] * stride_od,
            out2.to(out_ptr.dtype.element_ty),
            mask=m_ok[:, None] & dv2_ok[None, :],
        )
