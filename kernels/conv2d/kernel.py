"""Batch-invariant implicit-GEMM conv2d (NCHW, groups=1, dilation=1, zero padding).

GEMM view per batch item: ``y[o, p] = sum_k w[o, k] * im2col(x)[k, p]`` with ``p = oh * OW + ow`` the
output pixel and ``k = (c * KH + r) * KW + s`` the flattened reduction index. Each program owns
``BLOCK_M`` output pixels of one batch item x ``BLOCK_N`` output channels and runs the whole K loop in
order, ``BLOCK_K`` at a time, into an fp32 accumulator; the im2col tile is gathered on the fly (never
materialized). Nothing depends on the batch size, so a pixel's result is the same in any batch.
"""

import triton
import triton.language as tl


@triton.jit
def conv2d_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    y_ptr,
    C,
    H,
    W,
    O,
    OH,
    OW,
    stride_xb,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_wo,
    stride_wk,
    stride_yb,
    SH,
    SW,
    PH,
    PW,
    KH: tl.constexpr,
    KW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """x [B, C, H, W] (any strides), w [O, C*KH*KW] (``stride_wk`` between k), bias [O],
    y [B, O, OH, OW] contiguous per batch item; grid (cdiv(OH*OW, BLOCK_M) * cdiv(O, BLOCK_N), B).

    ``DOT_F32``: upcast to fp32 after the load and use an IEEE fp32 dot (fp32 inputs: never TF32; bf16
    under the interpreter, whose bf16 dot is wrong).
    """
    pid = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    P = OH * OW
    KTOT = C * (KH * KW)

    # grouped tile order (L2 reuse of the weight tile); it never changes a tile's math
    num_pid_m = tl.cdiv(P, BLOCK_M)
    num_pid_n = tl.cdiv(O, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    group_id = pid // group_size
    first_m = group_id * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % group_size) % group_m)
    pid_n = (pid % group_size) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixels
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output channels
    mask_m = rm < P
    mask_n = rn < O
    oh = rm // OW
    ow = rm % OW
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW

    x_base = x_ptr + pid_b * stride_xb
    w_offs_n = rn[None, :] * stride_wo

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(KTOT, BLOCK_K)):
        rk = k0 * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = rk < KTOT
        c = rk // (KH * KW)
        rs = rk % (KH * KW)
        r = rs // KW
        s = rs % KW
        ih = ih0[:, None] + r[None, :]
        iw = iw0[:, None] + s[None, :]
        in_img = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_offs = c[None, :] * stride_xc + ih * stride_xh + iw * stride_xw
        a = tl.load(x_base + x_offs, mask=mask_m[:, None] & mask_k[None, :] & in_img, other=0.0)
        w_offs = rk[:, None] * stride_wk + w_offs_n
        b = tl.load(w_ptr + w_offs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if DOT_F32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]

    y_offs = rn[None, :] * P + rm[:, None]
    y = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + pid_b * stride_yb + y_offs, y, mask=mask_m[:, None] & mask_n[None, :])
