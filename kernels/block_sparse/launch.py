"""Host side of block-sparse attention and of the block pooling behind ``attention_block_mask``.

Inputs are validated by ``jetdet.ops.fast`` first. ``q [B, H, N, D]``, ``k [B, H, M, D]``,
``v [B, H, M, Dv]``; the mask's index form is ``indices [Bm, H, nQB, nKB]`` int32 (kept KV block ids,
ascending, then padding) and ``counts [Bm, H, nQB]`` int32, with ``Bm`` equal to ``B`` or 1 (one mask
shared by the whole batch, e.g. both CFG branches).
"""

from __future__ import annotations

import math

import torch

from jetdet import configs

from .._common import FP_FUSION, cdiv, empty, next_pow2
from ..attention.launch import _dot_fp32, nonnegative_scale, plan_loads
from . import kernel

OP = "block_sparse"
BLOCK_SIZES = (16, 32, 64, 128)
MAX_D = 128

# Untuned defaults (no GPU was available to tune); sized so the sm_80/89/90 cross-compile shows no spills.
# BLOCK_M / BLOCK_N are capped at the mask block size and must divide it (all are powers of two).
DEFAULT = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "POOL_ROWS": 16}


def _pad(d: int) -> int:
    return max(16, next_pow2(int(d)))


def config(d: int, block_size: int, dtype: torch.dtype, device) -> dict:
    cfg = configs.get_config(OP, d, dtype=dtype, device=device, default=DEFAULT)
    cfg["BLOCK_M"] = min(cfg["BLOCK_M"], block_size)
    cfg["BLOCK_N"] = min(cfg["BLOCK_N"], block_size)
    cfg["POOL_ROWS"] = min(cfg["POOL_ROWS"], block_size)
    return cfg


def attention(q, k, v, indices, counts, block_size: int, scale: float, visits: torch.Tensor | None = None):
    """Block-sparse attention; ``indices``/``counts`` contiguous in their last dim. If ``visits`` (int32,
    ``[B*H*programs_m]``) is given, each program writes the number of KV tiles it visited."""
    B, H, N, D = q.shape
    M, DV = k.shape[2], v.shape[-1]
    cfg = config(D, block_size, q.dtype, q.device)
    out = empty((B, H, N, DV), q.dtype, q.device)
    if out.numel() == 0:
        return out
    q, scale = nonnegative_scale(q, scale)
    grid = (cdiv(N, cfg["BLOCK_M"]), B * H)
    sib = 0 if indices.shape[0] == 1 else indices.stride(0)
    scb = 0 if counts.shape[0] == 1 else counts.stride(0)
    count_visits = visits is not None
    # fp16, and bf16 on a GPU: 16-bit operands on the tensor cores (HALF_DOT); fp32, and bf16 in the interpreter
    # (whose bf16 dot is wrong): IEEE fp32 dots, the same rule as dense attention's
    dot_fp32 = _dot_fp32(q.dtype, q.device)
    split, (q, k, v, out), unit, st = plan_loads(dot_fp32, q.device, (D, DV), (q, k, v, out))
    kernel.block_sparse_fwd_kernel[grid](
        q, k, v, out, indices, counts, visits if count_visits else counts,
        H, N, M,
        scale * math.log2(math.e),
        *st,
        sib, indices.stride(1), indices.stride(2), scb, counts.stride(1),
        D=D,
        DV=DV,
        BLOCK_SIZE=block_size,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        D_PAD=_pad(D),
        DV_PAD=_pad(DV),
        HALF_DOT=not dot_fp32,
        COUNT_VISITS=count_visits,
        STRIDE_UNIT=unit,
        SPLIT_TAIL=split,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return out


def programs_per_query_block(d: int, block_size: int, dtype: torch.dtype, device) -> tuple[int, int]:
    """``(query programs per query block, KV tiles per kept KV block)`` at the config that would run."""
    cfg = config(d, block_size, dtype, device)
    return block_size // cfg["BLOCK_M"], block_size // cfg["BLOCK_N"]


def block_pool(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of each ``block_size``-token block: ``[B, H, ceil(N / block_size), D]`` fp32."""
    B, H, N, D = x.shape
    cfg = config(D, block_size, x.dtype, x.device)
    nb = cdiv(N, block_size)
    out = empty((B, H, nb, D), torch.float32, x.device)
    if out.numel() == 0:
        return out
    kernel.block_pool_kernel[(nb, B * H)](
        x,
        out,
        H,
        N,
        D,
        nb,
        *x.stride(),
        BLOCK_SIZE=block_size,
        ROWS=cfg["POOL_ROWS"],
        D_PAD=_pad(D),
        num_warps=4, enable_fp_fusion=FP_FUSION,
    )
    return out
