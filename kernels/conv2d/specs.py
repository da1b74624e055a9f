"""Static-report compile specs of the implicit-GEMM conv2d (``launch.py``), for ``jetdet.static_report``."""

from __future__ import annotations

import torch

from jetdet import configs
from jetdet.kernels._common import CompileSpec, tf32x3_tiles, tl_ptr

from . import launch_tma
from .kernel import conv2d_kernel
from .kernel_tma import conv2d_tma_kernel
from .launch import _DTYPES, FP_FUSION, OP, _default

# (kh, kw, stride, padding, output layout) compiled per config: the shapes diffusion UNets/VAEs use most; the
# output is channels-last for channels-last input ("cl") and NCHW for NCHW input ("nchw", read as channels-last)
_SPEC_SHAPES = ((3, 3, 1, 1, "cl"), (3, 3, 1, 1, "nchw"), (1, 1, 1, 0, "cl"))


def compile_specs() -> list[CompileSpec]:
    """:func:`table_specs` and :func:`tma_specs`."""
    return table_specs() + tma_specs()


def table_specs() -> list[CompileSpec]:
    """One spec per (shipped config, dtype, kernel shape and output layout in ``_SPEC_SHAPES``) for
    ``jetdet.static_report``, with bias. Modelled on the common launch: channels-last input (``stride_xc == 1``)
    with C, W*C multiples of 16, a channels-last weight (``stride_wk == 1``), stride/padding 1
    specialized to constants as Triton does."""
    specs = []
    # the shipped tables' tiles, then the fixed tiles of fp32 under JETDET_FP32_DOT=tf32x3 (tensor cores only)
    tiles = [(dtype, cfg, archs, "ieee") for dtype, cfg, archs in configs.shipped_configs(OP, _DTYPES, _default)]
    tiles += [(torch.float32, cfg, archs, "tf32x3") for cfg, archs in tf32x3_tiles()]
    for dtype, cfg, archs, prec in tiles:
        ptr, dt = tl_ptr(dtype), configs.dtype_name(dtype)
        dt += "_tf32x3" if prec == "tf32x3" else ""
        tag = "x".join(str(cfg[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        for kh, kw, st, pad, out in _SPEC_SHAPES:
            signature = {
                "x_ptr": ptr,
                "w_ptr": ptr,
                "bias_ptr": ptr,
                "y_ptr": ptr,
                "C": "i32:16",
                "H": "i32:16",
                "W": "i32:16",
                "O": "i32:16",
                "OH": "i32:16",
                "OW": "i32:16",
                "stride_xb": "i32:16",
                "stride_xh": "i32:16",
                "stride_xw": "i32:16",
                "stride_wo": "i32:16",
                "stride_yb": "i32:16",
            }
            constexprs = {"stride_xc": 1, "stride_wk": 1}
            if out == "cl":  # y[b, o, h, w] at b*OH*OW*O + (h*OW + w)*O + o
                signature.update(stride_yh="i32:16", stride_yw="i32:16")
                constexprs["stride_yo"] = 1
            else:  # y[b, o, h, w] at b*O*OH*OW + o*OH*OW + h*OW + w
                signature.update(stride_yo="i32:16", stride_yh="i32:16")
                constexprs["stride_yw"] = 1
            for arg, val in (("SH", st), ("SW", st), ("PH", pad), ("PW", pad)):
                if val == 1:
                    constexprs[arg] = 1
                else:
                    signature[arg] = "i32:16" if val % 16 == 0 else "i32"
            constexprs.update(
                KH=kh,
                KW=kw,
                HAS_BIAS=True,
                DOT_F32=dtype == torch.float32,
                F32_DOT=prec,
                BLOCK_M=cfg["BLOCK_M"],
                BLOCK_N=cfg["BLOCK_N"],
                BLOCK_K=cfg["BLOCK_K"],
                GROUP_M=cfg["GROUP_M"],
            )
            specs.append(
                CompileSpec(
                    name=f"conv2d_{dt}_{kh}x{kw}s{st}p{pad}_{out}_{tag}_w{cfg['num_warps']}s{cfg['num_stages']}",
                    fn=conv2d_kernel,
                    signature=signature,
                    constexprs=constexprs,
                    options={
                        "num_warps": cfg["num_warps"],
                        "num_stages": cfg["num_stages"],
                        "enable_fp_fusion": FP_FUSION,
                    },
                    deterministic=True,
                    archs=archs,
                    # fp32: never TF32 (tf32x3: tensor cores only); 16-bit: the activations arrive in vector loads,
                    # never element by element
                    forbid=(("no_fma",) if prec == "tf32x3" else ("no_tf32",)) if dtype == torch.float32
                    else ("no_gather",),
                )
            )
    return specs


def tma_specs() -> list[CompileSpec]:
    """The TMA-fed conv (``kernel_tma.py``, opt-in) for sm_90 only (TMA and warpgroup MMA are sm_90 features): fp16
    and bf16 x each tile of ``launch_tma.CONFIGS`` x 3x3 with padding 1 and 1x1, with bias; C, O and the output's
    height and width multiples of 16, as in a UNet."""
    specs = []
    for dtype in launch_tma._DTYPES:
        dt = configs.dtype_name(dtype)
        for cls, cfg in launch_tma.CONFIGS.items():
            bh, bw, bn, bk = cfg["BLOCK_H"], cfg["BLOCK_W"], cfg["BLOCK_N"], cfg["BLOCK_K"]
            for k, pad in ((3, 1), (1, 0)):
                signature = {
                    "x_desc": f"tensordesc<{dt}[1, {bh}, {bw}, {bk}]>",
                    "w_desc": f"tensordesc<{dt}[{bn}, 1, 1, {bk}]>",
                    "y_desc": f"tensordesc<{dt}[1, {bh}, {bw}, {bn}]>",
                    "bias_ptr": tl_ptr(dtype),
                    **dict.fromkeys(("C", "O", "OH", "OW"), "i32:16"),
                }
                constexprs = {"KH": k, "KW": k, "HAS_BIAS": True, "DOT_F32": False, "BLOCK_H": bh, "BLOCK_W": bw,
                              "BLOCK_N": bn, "BLOCK_K": bk}  # fmt: skip
                for arg in ("PH", "PW"):  # as the JIT specialises them: 1 a constant, 0 divisible by 16
                    if pad == 1:
                        constexprs[arg] = 1
                    else:
                        signature[arg] = "i32:16"
                specs.append(
                    CompileSpec(
                        name=f"conv2d_tma_{dt}_{k}x{k}s1p{pad}_{bh}x{bw}x{bn}x{bk}_w{cfg['num_warps']}s"
                        f"{cfg['num_stages']}[{cls}]",
                        fn=conv2d_tma_kernel,
                        signature=signature,
                        constexprs=constexprs,
                        options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
                                 "enable_fp_fusion": launch_tma.FP_FUSION},  # fmt: skip
                        deterministic=True,
                        archs=(90,),
                    )
                )
    return specs
