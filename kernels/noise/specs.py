"""Static-report compile specs of the noise kernel (``launch.py``), for ``jetdet.static_report``."""

from __future__ import annotations

from .._common import CompileSpec
from .kernel import philox_randn_kernel
from .launch import BLOCK, LAUNCH_OPTIONS


def compile_specs() -> list[CompileSpec]:
    """The shipped configs of ``philox_randn_kernel`` for the static SASS report. ``no_mufu``/``no_fma``:
    the transform must contain no approximate special-function unit ops and no contracted FMAs."""
    specs = []
    for name, ptr, bf16 in (("fp32", "*fp32", False), ("fp16", "*fp16", False), ("bf16", "*i16", True)):
        specs.append(
            CompileSpec(
                name=f"noise.philox_randn[{name}]",
                fn=philox_randn_kernel,
                signature={
                    "out_ptr": ptr,
                    "N": "i32",
                    "blocks_per_item": "i32",
                    "key0": "i32",
                    "key1": "i32",
                    "item_lo": "i32",
                    "item_hi": "i32",
                    "step": "i32",
                },
                constexprs={"BLOCK": BLOCK, "OUT_BF16_BITS": bf16},
                options=dict(LAUNCH_OPTIONS),
                deterministic=True,
                forbid=("no_mufu", "no_fma"),
            )
        )
    return specs
