"""Host side of the timestep-skip kernels: ``forecast`` (fused weighted sum of ≤ 4 history tensors) and
``relative_change`` (per-item and per-tile ``Σ|a-b| / Σ|b|``).

Inputs are validated (and made contiguous) by ``jetdet.ops.fast`` first; the extrapolation weights are
computed there, on the host, from the timestep floats.
"""

from __future__ import annotations

import torch
import triton

from jetdet import configs

from .._common import CompileSpec, empty, tl_ptr
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
    kernel._forecast_kernel[(triton.cdiv(n, cfg["BLOCK"]),)](
        out,
        *hs,
        *ws,
        n,
        K=len(history),
        BLOCK=cfg["BLOCK"],
        num_warps=cfg["num_warps"],
    )
    return out


def _tile_blocks(cols: int, elems: int) -> tuple[int, int]:
    block_c = min(max(triton.next_power_of_2(max(int(cols), 1)), TILE_COLS[0]), elems, TILE_COLS[-1])
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
        n_tiles = max(1, triton.cdiv(item, cfg["RC_CHUNK"]))
        num = empty((B, n_tiles), torch.float32, a.device)
        den = empty((B, n_tiles), torch.float32, a.device)
        kernel._relchange_flat_kernel[(n_tiles, B)](
            a,
            b,
            num,
            den,
            item,
            cfg["RC_CHUNK"],
            n_tiles,
            BLOCK=cfg["RC_BLOCK"],
            num_warps=cfg["num_warps"],
        )
        per_tile = None
    else:
        n0, n1, n2, n3 = (triton.cdiv(s, t) for s, t in zip(view, tile))
        n_tiles = n0 * n1 * n2 * n3
        num = empty((B, n_tiles), torch.float32, a.device)
        den = empty((B, n_tiles), torch.float32, a.device)
        block_r, block_c = _tile_blocks(min(tile[3], view[3]), cfg["RC_ELEMS"])
        kernel._relchange_tile_kernel[(n_tiles, B)](
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
            num_warps=cfg["num_warps"],
        )
        per_tile = empty((B, n_tiles), torch.float32, a.device)
    kernel._relchange_finish_kernel[(B,)](
        num,
        den,
        per_item,
        per_tile if per_tile is not None else per_item,
        n_tiles,
        WRITE_TILES=per_tile is not None,
        BLOCK=cfg["FIN_BLOCK"],
        num_warps=4,
    )
    return per_item, per_tile


def compile_specs() -> list[CompileSpec]:
    """Every shipped config × fp32/fp16/bf16: the forecast kernel at K = 4 (K < 4 drops loads), the untiled
    and every tiled block shape of the relative change, and the finishing kernel."""
    specs: list[CompileSpec] = []
    seen = set()
    dts = {dn: dtype for dtype, dn in configs.DTYPE_NAMES.items()}

    def add(ident, spec):
        ident = (spec.archs, *ident)
        if ident not in seen:
            seen.add(ident)
            specs.append(spec)

    tables = [(archs, dn, table) for _ident, archs, dn, table in configs.shipped_tables(OP)]
    tables = tables or [(configs.ARCHS, dn, {"default": DEFAULT}) for dn in configs.DTYPES]
    for archs, dn, table in tables:
        p = tl_ptr(dts[dn])
        for entry in table.values():
            cfg = dict(DEFAULT)
            cfg.update(entry)
            w = cfg["num_warps"]
            add(
                ("fc", dn, cfg["BLOCK"], w),
                CompileSpec(
                    name=f"forecast_k4_{dn}_b{cfg['BLOCK']}_w{w}",
                    fn=kernel._forecast_kernel,
                    signature={
                        "out_ptr": p,
                        "h0_ptr": p,
                        "h1_ptr": p,
                        "h2_ptr": p,
                        "h3_ptr": p,
                        "w0": "fp32",
                        "w1": "fp32",
                        "w2": "fp32",
                        "w3": "fp32",
                        "n_elements": "i32",
                    },
                    constexprs={"K": 4, "BLOCK": cfg["BLOCK"]},
                    options={"num_warps": w},
                    archs=archs,
                ),
            )
            add(
                ("flat", dn, cfg["RC_BLOCK"], w),
                CompileSpec(
                    name=f"relchange_flat_{dn}_b{cfg['RC_BLOCK']}_w{w}",
                    fn=kernel._relchange_flat_kernel,
                    signature={
                        "a_ptr": p,
                        "b_ptr": p,
                        "num_ptr": "*fp32",
                        "den_ptr": "*fp32",
                        "item_size": "i32",
                        "chunk": "i32",
                        "n_chunks": "i32",
                    },
                    constexprs={"BLOCK": cfg["RC_BLOCK"]},
                    options={"num_warps": w},
                    archs=archs,
                ),
            )
            for cols in TILE_COLS:
                br, bc = _tile_blocks(cols, cfg["RC_ELEMS"])
                add(
                    ("tile", dn, br, bc, w),
                    CompileSpec(
                        name=f"relchange_tile_{dn}_r{br}_c{bc}_w{w}",
                        fn=kernel._relchange_tile_kernel,
                        signature={
                            "a_ptr": p,
                            "b_ptr": p,
                            "num_ptr": "*fp32",
                            "den_ptr": "*fp32",
                            **{x: "i32" for x in ("S0", "S1", "S2", "S3", "T0", "T1", "T2", "T3")},
                            "n1": "i32",
                            "n2": "i32",
                            "n3": "i32",
                        },
                        constexprs={"BLOCK_R": br, "BLOCK_C": bc},
                        options={"num_warps": w},
                        archs=archs,
                    ),
                )
            add(
                ("fin", cfg["FIN_BLOCK"]),
                CompileSpec(
                    name=f"relchange_finish_b{cfg['FIN_BLOCK']}",
                    fn=kernel._relchange_finish_kernel,
                    signature={
                        "num_ptr": "*fp32",
                        "den_ptr": "*fp32",
                        "item_ptr": "*fp32",
                        "tile_ptr": "*fp32",
                        "n_tiles": "i32",
                    },
                    constexprs={"WRITE_TILES": True, "BLOCK": cfg["FIN_BLOCK"]},
                    options={"num_warps": 4},
                    archs=archs,
                ),
            )
    return specs
