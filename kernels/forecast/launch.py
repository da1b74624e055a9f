"""Host side of the timestep-skip kernels: ``forecast`` (fused weighted sum of ≤ 4 history tensors) and
``relative_change`` (per-item and per-tile ``Σ|a-b| / Σ|b|``).

Inputs are validated (and made contiguous) by ``jetdet.ops.fast`` first; the extrapolation weights are
computed there, on the host, from the timestep floats.
"""

from __future__ import annotations

import torch

from jetdet import configs

from .._common import FP_FUSION, cdiv, empty, next_pow2
from . import kernel

OP = "forecast"
MAX_HISTORY = 4
# Untuned defaults (no GPU was available to tune); sized so the sm_80/89/90 cross-compile shows no spills.
# BLOCK: elements per forecast program; RC_BLOCK / RC_CHUNK: vector width and elements per program of the
# untiled relative change; RC_ELEMS: elements per step of the tiled one; FIN_BLOCK: tiles per step of the
# finishing kernel.
DEFAULT = {"BLOCK": 1024, "num_warps": 4, "RC_BLOCK": 1024, "RC_CHUNK": 65536, "RC_ELEMS": 1024, "FIN_BLOCK": 256}
TILE_COLS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)


def config(key: int, dtype: torch.dtype, device) -> dict:
    cfg = configs.get_config(OP, key, dtype=dtype, device=device, default=DEFAULT)
    cfg["RC_CHUNK"] = max(cfg["RC_BLOCK"], cfg["RC_CHUNK"] // cfg["RC_BLOCK"] * cfg["RC_BLOCK"])
    return cfg


def forecast(history: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """``Σ_i weights[i] · history[i]`` in fp32, written in the history dtype. Contiguous, equal tensors."""
    h0 = history[0]
    out = empty(h0.shape, h0.dtype, h0.device)
    n = h0.numel()
    if n == 0:
        return out
    cfg = config(len(history), h0.dtype, h0.device)
    hs = list(history) + [h0] * (MAX_HISTORY - len(history))
    ws = [float(w) for w in weights] + [0.0] * (MAX_HISTORY - len(weights))
    kernel.forecast_kernel[(cdiv(n, cfg["BLOCK"]),)](
        out,
        *hs,
        *ws,
        n,
        K=len(history),
        BLOCK=cfg["BLOCK"],
        num_warps=cfg["num_warps"],
        enable_fp_fusion=FP_FUSION,
    )
    return out


def _tile_blocks(cols: int, elems: int) -> tuple[int, int]:
    block_c = min(max(next_pow2(max(int(cols), 1)), TILE_COLS[0]), elems, TILE_COLS[-1])
    return max(1, elems // block_c), block_c


def relative_change(
    a: torch.Tensor, b: torch.Tensor, view: tuple[int, ...] | None = None, tile: tuple[int, ...] | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-item ``Σ|a-b| / Σ|b|`` as fp32 ``[B]``; with ``view``/``tile`` (each item seen as a contiguous
    ``view = (S0, S1, S2, S3)`` array cut into ``tile = (T0, T1, T2, T3)`` boxes) also the per-tile ratios,
    fp32 ``[B, n0 * n1 * n2 * n3]`` in row-major tile order. ``a``/``b`` contiguous, same shape and dtype."""
    B = a.shape[0]
    item = a.numel() // B if B else 0
    cfg = config(item, a.dtype, a.device)
    per_item = empty((B,), torch.float32, a.device)
    if B == 0:
        return per_item, (None if tile is None else empty((0, 0), torch.float32, a.device))
    if tile is None:
        n_tiles = max(1, cdiv(item, cfg["RC_CHUNK"]))
        num = empty((B, n_tiles), torch.float32, a.device)
        den = empty((B, n_tiles), torch.float32, a.device)
        kernel.relative_change_flat_kernel[(n_tiles, B)](
            a,
            b,
            num,
            den,
            item,
            cfg["RC_CHUNK"],
            n_tiles,
            BLOCK=cfg["RC_BLOCK"],
            num_warps=cfg["num_warps"], enable_fp_fusion=FP_FUSION,
        )
        per_tile = None
    else:
        n0, n1, n2, n3 = (cdiv(s, t) for s, t in zip(view, tile))
        n_tiles = n0 * n1 * n2 * n3
        num = empty((B, n_tiles), torch.float32, a.device)
        den = empty((B, n_tiles), torch.float32, a.device)
        block_r, block_c = _tile_blocks(min(tile[3], view[3]), cfg["RC_ELEMS"])
        kernel.relative_change_tile_kernel[(n_tiles, B)](
            a,
            b,
            num,
            den,
            *view,
            *tile,
            n1,
            n2,
            n3,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            num_warps=cfg["num_warps"], enable_fp_fusion=FP_FUSION,
        )
        per_tile = empty((B, n_tiles), torch.float32, a.device)
    kernel.relative_change_finish_kernel[(B,)](
        num,
        den,
        per_item,
        per_tile if per_tile is not None else per_item,
        n_tiles,
        WRITE_TILES=per_tile is not None,
        BLOCK=cfg["FIN_BLOCK"],
        num_warps=4, enable_fp_fusion=FP_FUSION,
    )
    return per_item, per_tile
