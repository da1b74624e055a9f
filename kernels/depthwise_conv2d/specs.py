"""Static-report compile specs of the depthwise conv2d kernel: fp32/fp16/bf16, 3x3 (stride 1, padding 1) and 7x7
(padding 3) filters, channels-last and NCHW input, with bias, for sm_80/89/90. The JIT's own specialisations of
the integer arguments are derived from these by the report (``jit_variants``)."""

from __future__ import annotations

import torch

from jetdet.kernels._common import CompileSpec, signature, tl_ptr

from .kernel import depthwise_conv2d_kernel
from .launch import BLOCK_C, BLOCK_P, FP_FUSION, NUM_WARPS

_INTS16 = ("H", "W", "HO", "WO", "CO", "sxb", "sob")


def compile_specs() -> list[CompileSpec]:
    specs = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        ptr = tl_ptr(dtype)
        for k, pad in ((3, 1), (7, 3)):
            for layout in ("cl", "nchw"):
                types = {n: ptr for n in ("x_ptr", "w_ptr", "b_ptr", "out_ptr")}
                types.update({n: "i32:16" for n in _INTS16})
                # channels-last: a pixel's channels are contiguous; NCHW: a row's pixels are
                unit = ("sxc", "soc") if layout == "cl" else ("sxw", "sow")
                other = ("sxh", "sxw", "soh", "sow") if layout == "cl" else ("sxc", "sxh", "soc", "soh")
                types.update({n: "i32:16" for n in other})
                constexprs = {n: 1 for n in unit}
                constexprs.update(stride_h=1, stride_w=1)
                if pad == 1:
                    constexprs.update(pad_h=1, pad_w=1)
                sig = {n: t for n, t in signature(depthwise_conv2d_kernel, types).items() if n not in constexprs}
                constexprs.update(MULT=1, KH=k, KW=k, HAS_BIAS=True, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
                specs.append(CompileSpec(
                    name=f"depthwise_conv2d_{str(dtype)[6:]}_{k}x{k}p{pad}_{layout}",
                    fn=depthwise_conv2d_kernel, signature=sig, constexprs=constexprs,
                    options={"num_warps": NUM_WARPS, "num_stages": 1, "enable_fp_fusion": FP_FUSION},
                ))
    return specs
