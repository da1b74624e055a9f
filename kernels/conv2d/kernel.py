"""Batch-invariant implicit-GEMM conv2d that reads channels-last input (groups=1, dilation=1, zero padding).

GEMM view per batch item: ``y[p, o] = sum_k X[p, k] * wt[k, o]`` with ``p = oh * OW + ow`` the output pixel and
``k = (r * KW + s) * C + c`` the flattened reduction index (filter tap ``(r, s)`` outer, channel ``c`` inner).
For one tap, the ``BLOCK_K`` channels a pixel needs are contiguous in a channels-last (NHWC) image, so the A tile
is ``BLOCK_M`` row loads of ``BLOCK_K`` consecutive elements: vector loads, no element-wise im2col gather. The
weight is read as ``wt[k, o]`` from a channels-last ``[O, C, KH, KW]`` weight, whose ``k`` is contiguous too.

Each program owns ``BLOCK_M`` output pixels of one batch item x ``BLOCK_N`` output channels and runs the whole K
loop (every tap, every channel block) in order into an fp32 accumulator: no split-K, no atomics. The loop is one
flat loop over (tap, channel block), so it is software-pipelined across taps. Nothing depends on the batch size,
so a pixel's result is the same in any batch.
"""

import triton
import triton.language as tl


@triton.jit
def k_step(it, n_cblk, KW: tl.constexpr, BLOCK_K: tl.constexpr):
    """Step ``it`` of the flat K loop over (filter tap, channel block), the order both conv kernels reduce in (tap
    outer, channel block inner; ``n_cblk`` channel blocks per tap): ``(tap, r, s, c0)``, the tap, its filter row and
    column, and the block's first channel."""
    tap = it // n_cblk
    c0 = (it - tap * n_cblk) * BLOCK_K
    r = tap // KW
    return tap, r, tap - r * KW, c0


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
    stride_xh,
    stride_xw,
    stride_xc,
    stride_wk,
    stride_wo,
    stride_yb,
    stride_yo,
    stride_yh,
    stride_yw,
    SH,
    SW,
    PH,
    PW,
    KH: tl.constexpr,
    KW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_F32: tl.constexpr,
    F32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """x [B, C, H, W] with any strides (``stride_xc == 1``, channels-last, is the fast case), wt [KH*KW*C, O]
    with any strides (``stride_wk == 1``, a channels-last weight, is the fast case), bias [O], y [B, O, OH, OW]
    with any strides; grid (cdiv(OH*OW, BLOCK_M) * cdiv(O, BLOCK_N), B).

    ``DOT_F32``: upcast to fp32 after the load and use an IEEE fp32 dot (fp32 inputs: never TF32; bf16 under the
    interpreter, whose bf16 dot is wrong). ``F32_DOT``: that dot's ``input_precision``, ``"ieee"`` or ``"tf32x3"``
    (fp32 inputs under ``JETDET_FP32_DOT=tf32x3``, ``kernels/_common.py``).
    """
    pid = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    P = OH * OW

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
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < P
    mask_n = rn < O
    oh = rm // OW
    ow = rm % OW
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW

    x_base = x_ptr + pid_b * stride_xb
    w_cols = w_ptr + rn[None, :] * stride_wo
    n_cblk = tl.cdiv(C, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in range(0, KH * KW * n_cblk):
        tap, r, s, c0 = k_step(it, n_cblk, KW, BLOCK_K)
        ih = ih0 + r
        iw = iw0 + s
        row_ok = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        c = c0 + rk
        mask_c = c < C
        x_rows = x_base + ih * stride_xh + iw * stride_xw
        a = tl.load(x_rows[:, None] + c[None, :] * stride_xc, mask=row_ok[:, None] & mask_c[None, :], other=0.0)
        k = tap * C + c
        b = tl.load(w_cols + k[:, None] * stride_wk, mask=mask_c[:, None] & mask_n[None, :], other=0.0)
        if DOT_F32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=F32_DOT)
        else:
            acc = tl.dot(a, b, acc)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]

    y_offs = rn[None, :] * stride_yo + (oh * stride_yh + ow * stride_yw)[:, None]
    y = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + pid_b * stride_yb + y_offs, y, mask=mask_m[:, None] & mask_n[None, :])
