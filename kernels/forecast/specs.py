"""Static-report compile specs of the forecast and relative-change kernels (``launch.py``), for
``jetdet.static_report``."""

from __future__ import annotations

from jetdet import configs

from .._common import CompileSpec, tl_ptr
from . import kernel
from .launch import DEFAULT, OP, TILE_COLS, _tile_blocks


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
                    fn=kernel.forecast_kernel,
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
                    fn=kernel.relative_change_flat_kernel,
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
                        fn=kernel.relative_change_tile_kernel,
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
                    fn=kernel.relative_change_finish_kernel,
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
