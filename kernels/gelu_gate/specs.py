"""Static-report compile specs of the gated-GELU kernel: both GELU forms in fp32/fp16/bf16 at the launch's
BLOCK, for sm_80/89/90."""

from __future__ import annotations

from jetdet.kernels._common import CompileSpec

from .kernel import gelu_gate_kernel
from .launch import BLOCK, NUM_WARPS


def compile_specs() -> list[CompileSpec]:
    specs = []
    for dt in ("fp32", "fp16", "bf16"):
        for tanh in (False, True):
            specs.append(CompileSpec(
                name=f"gelu_gate[{dt},{'tanh' if tanh else 'erf'},BLOCK{BLOCK}]",
                fn=gelu_gate_kernel,
                signature={"h_ptr": "*" + dt, "out_ptr": "*" + dt, "stride_hr": "i32", "stride_or": "i32",
                           "n": "i32"},
                constexprs={"APPROX_TANH": tanh, "BLOCK": BLOCK},
                options={"num_warps": NUM_WARPS, "num_stages": 1},
            ))
    return specs
