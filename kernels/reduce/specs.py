"""Static-report compile specs of the softmax / row-sum kernels (``launch.py``), for ``jetdet.static_report``."""

from __future__ import annotations

from jetdet import configs
from jetdet.kernels._common import CompileSpec, signature

from .kernel import softmax_kernel, sum_rows_kernel
from .launch import DEFAULT_CONFIG, OP


def compile_specs() -> list[CompileSpec]:
    """Every shipped BLOCK/num_warps x dtype for softmax, sum and mean (contiguous rows)."""
    specs, seen = [], set()
    for _dev, _archs, dt, table in configs.shipped_tables(OP, default={"1024": DEFAULT_CONFIG}):
        for cfg in table.values():
            cfg = {**DEFAULT_CONFIG, **cfg}
            ptr = "*" + dt
            for kind, fn, extra in (
                ("softmax", softmax_kernel, {}),
                ("sum_rows", sum_rows_kernel, {"MEAN": False}),
                ("mean_rows", sum_rows_kernel, {"MEAN": True}),
            ):
                ident = (dt, kind, cfg["BLOCK"], cfg["num_warps"])
                if ident in seen:
                    continue
                seen.add(ident)
                sig = signature(fn, {"x_ptr": ptr, "out_ptr": ptr})
                unit = [s for s in ("stride_xc", "stride_oc") if s in sig]
                for s in unit:  # contiguous rows: the JIT specialises stride 1
                    del sig[s]
                specs.append(
                    CompileSpec(
                        name=f"{kind}[{dt},BLOCK{cfg['BLOCK']},w{cfg['num_warps']}]",
                        fn=fn,
                        signature=sig,
                        constexprs={**dict.fromkeys(unit, 1), **extra, "BLOCK": cfg["BLOCK"]},
                        options={"num_warps": cfg["num_warps"], "num_stages": 1},
                    )
                )
    return specs
