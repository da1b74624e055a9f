"""Persistent, TMA-fed GEMM for sm_90: ``C = A @ W^T (+ bias)`` with A [M, K], W [N, K] (nn.Linear's weight),
C [M, N], all row-major with 16-byte aligned rows.

``NUM_PROGRAMS`` programs walk the output tiles in a fixed grouped order (``tile = start, start + NUM_PROGRAMS,
...``); each tile is computed by one program from a zeroed fp32 accumulator over the whole K range in order,
``BLOCK_K`` at a time: no split-K, no atomics, and nothing a tile computes depends on M, on which program owns it
or on how many tiles there are, so a row's result is the same in any batch. Tiles are loaded through tensor
descriptors made on the host (``triton.tools.tensor_descriptor.TensorDescriptor``, so no device-side scratch
allocator is needed; TMA on sm_90, out-of-bounds rows and columns read as zero) and the result is written through
one (out-of-bounds parts are not written).
"""

import triton
import triton.language as tl


@triton.jit
def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped order (GROUP_M row tiles per group, for L2 reuse): it decides who computes a tile, not how."""
    in_group = GROUP_M * num_pid_n
    first_m = (tile // in_group) * GROUP_M
    rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % in_group) % rows
    pid_n = (tile % in_group) // rows
    return pid_m, pid_n


@triton.jit
def matmul_tma_kernel(
    a_desc,
    w_desc,
    c_desc,
    bias_ptr,
    M,
    N,
    K,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
):
    """Descriptors of a [M, K] (block BLOCK_M x BLOCK_K), w [N, K] (BLOCK_N x BLOCK_K) and c [M, N]
    (BLOCK_M x BLOCK_N); bias [N]; grid (min(NUM_PROGRAMS, tiles),)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        row0 = pid_m * BLOCK_M
        col0 = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(k_tiles):  # the whole K range, in order, in this program
            a = a_desc.load([row0, kt * BLOCK_K])
            w = w_desc.load([col0, kt * BLOCK_K])
            acc = tl.dot(a, w.T, acc)
        if HAS_BIAS:
            cols = col0 + tl.arange(0, BLOCK_N)
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        c_desc.store([row0, col0], acc.to(c_desc.dtype))
