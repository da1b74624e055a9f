"""Host side of the persistent TMA GEMM (``kernel_tma.py``): eligibility, config, grid, launch.

Opt-in and not the default: ``JETDET_MATMUL_KERNEL=tma`` makes ``matmul/launch.py`` send eligible fp16/bf16
linears here (one 2-D problem, row-major operands with 16-byte aligned rows), so ``bench/gpu_check.py`` can time
it against the default kernel. It becomes the default only after a GPU has measured it.

The tile is fixed per (dtype, N class, arch) and never chosen by M; the K loop is whole and in order; no split-K,
no atomics. On sm_90 the loads are TMA (``UTMALDG``) and the dot is warpgroup MMA (``HGMMA``); the static report
checks both, and that it does not spill (``specs.tma_specs``).
"""

from __future__ import annotations

import torch

from jetdet.kernels._common import FP_FUSION, cdiv, empty, tensor_descriptor

from .kernel_tma import matmul_tma_kernel

# one tile per N class: never a function of M or the batch size
CONFIGS = {
    "n<1024": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    "n>=1024": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
}
# programs of the persistent grid under the interpreter (a GPU uses its SM count): fewer than the tiles of
# most test shapes, so the tests walk the persistent loop
INTERPRETER_PROGRAMS = 3
_DTYPES = (torch.float16, torch.bfloat16)


def config(n: int) -> dict:
    return CONFIGS["n>=1024" if n >= 1024 else "n<1024"]


def _aligned_rows(t: torch.Tensor) -> bool:
    return (
        t.dim() == 2
        and t.stride(1) == 1
        and t.stride(0) == t.shape[1]
        and (t.stride(0) * t.element_size()) % 16 == 0
        and t.data_ptr() % 16 == 0
    )


def eligible(a: torch.Tensor, w: torch.Tensor, c: torch.Tensor) -> bool:
    """Whether ``a [M, K] @ w[N, K].T -> c [M, N]`` can run on the TMA kernel: fp16/bf16, row-major operands
    whose rows are 16-byte aligned (what a tensor descriptor needs). Independent of M."""
    return (
        a.dtype in _DTYPES
        and w.dtype == a.dtype
        and c.dtype == a.dtype
        and all(_aligned_rows(t) for t in (a, w, c))
    )


def _programs(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_PROGRAMS


def matmul_tma(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ w.T + bias``: a [M, K], w [N, K], bias [N] or None -> [M, N] in ``a.dtype`` (see :func:`eligible`)."""
    m, k = a.shape
    n = w.shape[0]
    c = empty((m, n), a.dtype, a.device) if out is None else out
    if not eligible(a, w, c):
        raise ValueError("matmul_tma: expected fp16/bf16 row-major a [M, K], w [N, K], out [M, N] with 16-byte "
                         f"aligned rows; got a {tuple(a.shape)} {a.dtype} strides {a.stride()}, w {tuple(w.shape)} "
                         f"strides {w.stride()}")
    if m == 0 or n == 0:
        return c
    cfg = config(n)
    programs = _programs(a.device)
    tiles = cdiv(m, cfg["BLOCK_M"]) * cdiv(n, cfg["BLOCK_N"])
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    desc = tensor_descriptor("JETDET_MATMUL_KERNEL")
    matmul_tma_kernel[(min(programs, tiles),)](
        desc.from_tensor(a, [bm, bk]),
        desc.from_tensor(w, [bn, bk]),
        desc.from_tensor(c, [bm, bn]),
        bias if bias is not None else c,
        m, n, k,
        HAS_BIAS=bias is not None,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"],
        NUM_PROGRAMS=programs,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return c
