"""Host side of bidirectional linear attention: config lookup, allocation, grids, launches.

Inputs are validated by ``jetdet.ops.fast`` before they get here. Shapes: ``q [B, H, N, D]``,
``k [B, H, M, D]``, ``v [B, H, M, Dv]``; state ``kv [B, H, D, Dv]`` and ``k_sum [B, H, D]``, both fp32.
"""

from __future__ import annotations

import torch

from jetdet import configs

from .._common import FP_FUSION, cdiv, empty, next_pow2
from . import kernel

OP = "linear_attention"
FEATURES = {"identity": 0, "relu": 1, "elu1": 2}
MAX_D = 128

# Untuned defaults (no GPU was available to tune); sized so the sm_80/89/90 cross-compile shows no spills.
DEFAULT = {
    "S_BLOCK_N": 16,
    "S_BLOCK_DV": 64,
    "CHUNK_N": 1024,
    "S_WARPS": 8,
    "S_STAGES": 1,
    "A_BLOCK_N": 32,
    "A_BLOCK_DV": 64,
    "A_WARPS": 4,
}
SUM_BLOCK = 1024


def _pad(d: int) -> int:
    return max(16, next_pow2(int(d)))


def _prec(dtype: torch.dtype) -> str:
    # fp32 promises fp32 math: no TF32. fp16/bf16: TF32 dots (kernel.py says which products that rounds).
    return "ieee" if dtype == torch.float32 else "tf32"


def config(d: int, dtype: torch.dtype, device) -> dict:
    cfg = configs.get_config(OP, d, dtype=dtype, device=device, default=DEFAULT)
    # a chunk holds whole token tiles
    cfg["CHUNK_N"] = max(cfg["S_BLOCK_N"], cfg["CHUNK_N"] // cfg["S_BLOCK_N"] * cfg["S_BLOCK_N"])
    return cfg


def num_splits(m: int, cfg: dict) -> int:
    """Token chunks reduced in parallel by pass 1; depends on the key length only, never on the batch."""
    return cdiv(max(int(m), 1), cfg["CHUNK_N"])


def state(k: torch.Tensor, v: torch.Tensor, feature_map: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1: ``(φ(K)ᵀV [B, H, D, Dv], φ(K)ᵀ1 [B, H, D])`` in fp32."""
    B, H, M, D = k.shape
    DV = v.shape[-1]
    cfg = config(D, k.dtype, k.device)
    d_pad, dv_pad = _pad(D), _pad(DV)
    block_dv = min(cfg["S_BLOCK_DV"], dv_pad)
    S = num_splits(M, cfg)
    kv = empty((B, H, D, DV), torch.float32, k.device)
    ks = empty((B, H, D), torch.float32, k.device)
    if S == 1:
        kv_part, ks_part = kv, ks
        skv, sks = 0, 0
    else:
        kv_part = empty((B * H, S, D, DV), torch.float32, k.device)
        ks_part = empty((B * H, S, D), torch.float32, k.device)
        skv, sks = D * DV, D
    if B * H > 0:
        grid = (B * H, cdiv(DV, block_dv), S)
        kernel.linear_attention_state_kernel[grid](
            k,
            v,
            kv_part,
            ks_part,
            H,
            M,
            D,
            DV,
            cfg["CHUNK_N"],
            *k.stride(),
            *v.stride(),
            S * D * DV if S > 1 else D * DV,
            skv,
            S * D if S > 1 else D,
            sks,
            FEATURE=FEATURES[feature_map],
            PREC=_prec(k.dtype),
            BLOCK_N=cfg["S_BLOCK_N"],
            D_PAD=d_pad,
            BLOCK_DV=block_dv,
            num_warps=cfg["S_WARPS"],
            num_stages=cfg["S_STAGES"], enable_fp_fusion=FP_FUSION,
        )
        if S > 1:
            kernel.linear_attention_sum_splits_kernel[(B * H, cdiv(D * DV, SUM_BLOCK))](
                kv_part, kv, S, D * DV, BLOCK=SUM_BLOCK, num_warps=4, enable_fp_fusion=FP_FUSION
            )
            kernel.linear_attention_sum_splits_kernel[(B * H, cdiv(D, SUM_BLOCK))](
                ks_part, ks, S, D, BLOCK=SUM_BLOCK, num_warps=4, enable_fp_fusion=FP_FUSION
            )
    return kv, ks


def apply(q: torch.Tensor, kv: torch.Tensor, ks: torch.Tensor, feature_map: str, eps: float) -> torch.Tensor:
    """Pass 2: ``φ(Q)·kv / (φ(Q)·k_sum + eps)`` written in ``q.dtype``. ``kv``/``ks`` must be contiguous."""
    B, H, N, D = q.shape
    DV = kv.shape[-1]
    cfg = config(D, q.dtype, q.device)
    d_pad, dv_pad = _pad(D), _pad(DV)
    block_dv = min(cfg["A_BLOCK_DV"], dv_pad)
    out = empty((B, H, N, DV), q.dtype, q.device)
    if out.numel() == 0:
        return out
    grid = (cdiv(N, cfg["A_BLOCK_N"]), cdiv(DV, block_dv), B * H)
    kernel.linear_attention_apply_kernel[grid](
        q,
        kv,
        ks,
        out,
        H,
        N,
        D,
        DV,
        float(eps),
        *q.stride(),
        *out.stride(),
        FEATURE=FEATURES[feature_map],
        PREC=_prec(q.dtype),
        BLOCK_N=cfg["A_BLOCK_N"],
        D_PAD=d_pad,
        BLOCK_DV=block_dv,
        num_warps=cfg["A_WARPS"], enable_fp_fusion=FP_FUSION,
    )
    return out
