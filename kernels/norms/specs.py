"""Static-report compile specs of the norm kernels (``launch.py``), for ``jetdet.static_report``."""

from __future__ import annotations

from jetdet import configs
from jetdet.kernels._common import CompileSpec, signature

from .kernel import group_norm_cl_kernel, norm_fwd_kernel
from .launch import DEFAULT_CONFIG, MAX_BLOCK_C, OP


def compile_specs() -> list[CompileSpec]:
    """Every shipped BLOCK/num_warps x dtype x {layer, rms, group} with weight and bias present, and the
    channels-last group norm at every channel width ``BLOCK_C`` its launcher can pick for that BLOCK (the
    powers of two up to ``min(BLOCK, MAX_BLOCK_C)``, from the group's channel count)."""
    specs, seen = [], set()
    for _dev, _archs, dt, table in configs.shipped_tables(OP, default={"1024": DEFAULT_CONFIG}):
        for cfg in table.values():
            cfg = {**DEFAULT_CONFIG, **cfg}
            for kind in ("layer", "rms", "group", "group_cl"):
                ident = (dt, kind, cfg["BLOCK"], cfg["num_warps"])
                if ident in seen:
                    continue
                seen.add(ident)
                if kind == "group_cl":
                    specs.extend(_cl_specs(dt, cfg))
                    continue
                ptr = "*" + dt
                sig = signature(norm_fwd_kernel, {"x_ptr": ptr, "out_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr,
                                                  "eps": "fp32"})  # fmt: skip
                del sig["stride_xc"], sig["stride_oc"]  # contiguous rows: the JIT specialises stride 1
                specs.append(
                    CompileSpec(
                        name=f"{kind}_norm[{dt},BLOCK{cfg['BLOCK']},w{cfg['num_warps']}]",
                        fn=norm_fwd_kernel,
                        signature=sig,
                        constexprs={
                            "stride_xc": 1,
                            "stride_oc": 1,
                            "RMS": kind == "rms",
                            "GROUPED": kind == "group",
                            "HAS_WEIGHT": True,
                            "HAS_BIAS": kind != "rms",
                            "BLOCK": cfg["BLOCK"],
                        },
                        options={"num_warps": cfg["num_warps"], "num_stages": 1},
                    )
                )
    return specs


def _cl_specs(dt: str, cfg: dict) -> list[CompileSpec]:
    """``group_norm_cl_kernel`` at one config, one spec per ``BLOCK_C``. Modelled on a UNet's launch: C, H*W
    and the group count (32) multiples of 16, the channels per group (10, 20, 40 at C = 320, 640, 1280) not."""
    ptr = "*" + dt
    sig = signature(group_norm_cl_kernel, {"x_ptr": ptr, "out_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "eps": "fp32",
                                           "chans": "i32:16", "spatial": "i32:16", "num_groups": "i32:16"})  # fmt: skip
    out, bc = [], 1
    while bc <= min(cfg["BLOCK"], MAX_BLOCK_C):
        out.append(
            CompileSpec(
                name=f"group_norm_cl[{dt},BLOCK{cfg['BLOCK']},C{bc},w{cfg['num_warps']}]",
                fn=group_norm_cl_kernel,
                signature=sig,
                constexprs={"HAS_WEIGHT": True, "HAS_BIAS": True, "BLOCK_P": cfg["BLOCK"] // bc, "BLOCK_C": bc},
                options={"num_warps": cfg["num_warps"], "num_stages": 1},
            )
        )
        bc *= 2
    return out
