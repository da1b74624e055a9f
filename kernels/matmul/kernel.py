"""Batch-invariant GEMM: ``C[b] = A[b] @ B[b] (+ bias)`` with one fixed tile per launch table entry.

Each program owns one ``BLOCK_M x BLOCK_N`` tile of one batch item and runs the whole K loop in order,
``BLOCK_K`` at a time, into an fp32 accumulator. Nothing (tile, K order, split) depends on M or on the
batch size, so a row's result is the same whichever batch or M it is computed in.
"""

import triton
import triton.language as tl


@triton.jit
def matmul_kernel(
    a_ptr,
    b_ptr,
    bias_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_ab,
    stride_am,
    stride_ak,
    stride_bb,
    stride_bk,
    stride_bn,
    stride_cb,
    stride_cm,
    stride_cn,
    HAS_BIAS: tl.constexpr,
    DOT_F32: tl.constexpr,
    F32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """a [B, M, K], b [B, K, N], bias [N], c [B, M, N]; grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), B).

    ``DOT_F32``: upcast both operands to fp32 right after the load and use an IEEE fp32 dot. Set for fp32
    inputs (so the GPU never uses TF32) and for bf16 under the interpreter (whose bf16 dot is wrong).
    ``F32_DOT``: that dot's ``input_precision``: ``"ieee"``, or ``"tf32x3"`` for fp32 inputs under
    ``JETDET_FP32_DOT=tf32x3`` (``kernels/_common.py``).
    """
    pid = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)

    # grouped tile order (L2 reuse); it changes which program owns a tile, never a tile's math
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    group_id = pid // group_size
    first_m = group_id * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % group_size) % group_m)
    pid_n = (pid % group_size) // group_m

    # 64-bit scalar bases for the tile; 32-bit offsets inside it (a tile spans < 2**31 elements)
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = (row0 + rm) < M
    mask_n = (col0 + rn) < N
    a_base = a_ptr + pid_b * stride_ab + row0.to(tl.int64) * stride_am
    b_base = b_ptr + pid_b * stride_bb + col0.to(tl.int64) * stride_bn
    a_offs = rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_offs = rk[:, None] * stride_bk + rn[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_base + a_offs, mask=mask_m[:, None] & (rk[None, :] < k_left), other=0.0)
        b = tl.load(b_base + b_offs, mask=(rk[:, None] < k_left) & mask_n[None, :], other=0.0)
        if DOT_F32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=F32_DOT)
        else:
            acc = tl.dot(a, b, acc)
        a_base += BLOCK_K * stride_ak
        b_base += BLOCK_K * stride_bk

    if HAS_BIAS:
        bias = tl.load(bias_ptr + col0 + rn, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]

    c_base = c_ptr + pid_b * stride_cb + row0.to(tl.int64) * stride_cm + col0.to(tl.int64) * stride_cn
    c_offs = rm[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c_base + c_offs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
