"""Static-report compile specs of the norm kernel (``launch.py``), for ``jetdet.static_report``."""

from __future__ import annotations

from jetdet import configs
from jetdet.kernels._common import CompileSpec, signature

from .kernel import norm_fwd_kernel
from .launch import DEFAULT_CONFIG, OP


def compile_specs() -> list[CompileSpec]:
    """Every shipped BLOCK/num_warps x dtype x {layer, rms, group} with weight and bias present."""
    specs, seen = [], set()
    for _dev, _archs, dt, table in configs.shipped_tables(OP, default={"1024": DEFAULT_CONFIG}):
        for cfg in table.values():
            cfg = {**DEFAULT_CONFIG, **cfg}
            for kind in ("layer", "rms", "group"):
                ident = (dt, kind, cfg["BLOCK"], cfg["num_warps"])
                if ident in seen:
                    continue
                seen.add(ident)
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
