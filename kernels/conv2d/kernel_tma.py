"""Conv2d with stride 1 fed by tensor descriptors (TMA on sm_90): opt-in, fp16/bf16, channels-last.

The default kernel's GEMM view (``kernel.py``): output pixels x output channels, reduced over
``k = (r * KW + s) * C + c`` (filter tap outer, channel block inner), the whole K loop in order in one program
into an fp32 accumulator: no split-K, no atomics. Here a program's pixels are a ``BLOCK_H x BLOCK_W`` patch of one
image's output, so for one tap its A tile is the input patch shifted by the tap: one 4-D descriptor load of
``[1, BLOCK_H, BLOCK_W, BLOCK_K]`` from the NHWC input at ``(b, oh0 - PH + r, ow0 - PW + s, c0)``. The zero padding
is the descriptor's own: rows, columns and channels outside the image read as zero (negative coordinates
included), so no load is masked. The weight tile comes from a ``[O, KH, KW, C]`` descriptor, the output goes out
through a ``[B, OH, OW, O]`` one (parts outside are not written).
"""

import triton
import triton.language as tl

from .kernel import k_step


@triton.jit
def conv2d_tma_kernel(
    x_desc,
    w_desc,
    y_desc,
    bias_ptr,
    C,
    O,
    OH,
    OW,
    PH,
    PW,
    KH: tl.constexpr,
    KW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Descriptors of x ``[B, H, W, C]`` (block ``[1, BLOCK_H, BLOCK_W, BLOCK_K]``), w ``[O, KH, KW, C]``
    (``[BLOCK_N, 1, 1, BLOCK_K]``) and y ``[B, OH, OW, O]`` (``[1, BLOCK_H, BLOCK_W, BLOCK_N]``); bias ``[O]``.
    Grid ``(cdiv(OH, BLOCK_H) * cdiv(OW, BLOCK_W) * cdiv(O, BLOCK_N), B)``. ``DOT_F32``: fp32 operands and IEEE
    dots (bf16 under the interpreter, whose bf16 dot is wrong)."""
    BLOCK_M: tl.constexpr = BLOCK_H * BLOCK_W
    pid = tl.program_id(0)
    b = tl.program_id(1)
    tiles_w = tl.cdiv(OW, BLOCK_W)
    tiles_hw = tl.cdiv(OH, BLOCK_H) * tiles_w
    pid_n = pid // tiles_hw
    pid_hw = pid % tiles_hw
    oh0 = (pid_hw // tiles_w) * BLOCK_H
    ow0 = (pid_hw % tiles_w) * BLOCK_W
    o0 = pid_n * BLOCK_N
    n_cblk = tl.cdiv(C, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in range(0, KH * KW * n_cblk):
        _, r, s, c0 = k_step(it, n_cblk, KW, BLOCK_K)  # the default kernel's K order
        a = x_desc.load([b, oh0 - PH + r, ow0 - PW + s, c0]).reshape(BLOCK_M, BLOCK_K)
        w = w_desc.load([o0, r, s, c0]).reshape(BLOCK_N, BLOCK_K)
        if DOT_F32:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32).T, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w.T, acc)

    if HAS_BIAS:
        cols = o0 + tl.arange(0, BLOCK_N)
        acc = acc + tl.load(bias_ptr + cols, mask=cols < O, other=0.0).to(tl.float32)[None, :]
    y_desc.store([b, oh0, ow0, o0], acc.to(y_desc.dtype).reshape(1, BLOCK_H, BLOCK_W, BLOCK_N))
