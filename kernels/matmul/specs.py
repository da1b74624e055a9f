"""Static-report compile specs of the matmul folder: the batch-invariant GEMM (``launch.py``) at every shipped
config, and the persistent TMA GEMM (``launch_tma.py``) at its fixed tiles, for ``jetdet.static_report``."""

from __future__ import annotations

import torch

from jetdet import configs
from jetdet.kernels._common import CompileSpec, tf32x3_tiles, tl_ptr

from .kernel import matmul_kernel
from .kernel_tma import matmul_tma_kernel
from .launch import _DTYPES, FP_FUSION, OP, _default
from .launch_tma import _DTYPES as TMA_DTYPES
from .launch_tma import CONFIGS as TMA_CONFIGS

H100_SMS = 132  # the TMA kernel is compiled for this many persistent programs (H100 SXM / H200)


def compile_specs() -> list[CompileSpec]:
    """:func:`gemm_specs` and :func:`tma_specs`."""
    return gemm_specs() + tma_specs()


def gemm_specs() -> list[CompileSpec]:
    """One spec per (shipped config, dtype) for ``jetdet.static_report``, with the bias epilogue (the
    no-bias variant is the same kernel minus one load and add), and one per fixed tile of fp32 under
    ``JETDET_FP32_DOT=tf32x3`` (tensor cores only: ``no_fma`` fails a variant that fell back to FFMA).

    Modelled on the common launch: contiguous ``a`` (stride_ak == 1, which Triton specializes to a
    constant) and ``b = weight.t()`` (stride_bk == 1), 16-byte aligned pointers, N and K multiples of 16.
    """
    specs = []
    tiles = [(dtype, cfg, archs, "ieee") for dtype, cfg, archs in configs.shipped_configs(OP, _DTYPES, _default)]
    tiles += [(torch.float32, cfg, archs, "tf32x3") for cfg, archs in tf32x3_tiles()]
    for dtype, cfg, archs, prec in tiles:
        ptr, dt = tl_ptr(dtype), configs.dtype_name(dtype)
        tag = "x".join(str(cfg[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        name = f"matmul_{dt}{'_tf32x3' if prec == 'tf32x3' else ''}_{tag}_w{cfg['num_warps']}s{cfg['num_stages']}"
        specs.append(
            CompileSpec(
                name=name,
                fn=matmul_kernel,
                signature={
                    "a_ptr": ptr,
                    "b_ptr": ptr,
                    "bias_ptr": ptr,
                    "c_ptr": ptr,
                    "M": "i32",
                    "N": "i32:16",
                    "K": "i32:16",
                    "stride_ab": "i32:16",
                    "stride_am": "i32:16",
                    "stride_ak": "constexpr",
                    "stride_bb": "i32:16",
                    "stride_bk": "constexpr",
                    "stride_bn": "i32:16",
                    "stride_cb": "i32:16",
                    "stride_cm": "i32:16",
                    "stride_cn": "constexpr",
                },  # fmt: skip
                constexprs={
                    "stride_ak": 1,
                    "stride_bk": 1,
                    "stride_cn": 1,
                    "HAS_BIAS": True,
                    "DOT_F32": dt == "fp32",
                    "F32_DOT": prec,
                    "BLOCK_M": cfg["BLOCK_M"],
                    "BLOCK_N": cfg["BLOCK_N"],
                    "BLOCK_K": cfg["BLOCK_K"],
                    "GROUP_M": cfg["GROUP_M"],
                },
                options={
                    "num_warps": cfg["num_warps"],
                    "num_stages": cfg["num_stages"],
                    "enable_fp_fusion": FP_FUSION,
                },
                deterministic=True,
                archs=archs,
                forbid=(("no_fma",) if prec == "tf32x3" else ("no_tf32",)) if dt == "fp32" else (),
            )
        )
    return specs


def _desc(dtype, rows: int, cols: int) -> str:
    """The JIT's signature type of a host tensor descriptor."""
    return f"tensordesc<{tl_ptr(dtype)[1:]}[{rows}, {cols}]>"


def tma_specs() -> list[CompileSpec]:
    """Every config x fp16/bf16 for sm_90 only (TMA and warpgroup MMA are sm_90 features), with bias, K and N
    multiples of 16 and 132 persistent programs (H100 SXM / H200)."""
    specs = []
    for dtype in TMA_DTYPES:
        ptr = tl_ptr(dtype)
        for cls, cfg in TMA_CONFIGS.items():
            tag = "x".join(str(cfg[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            specs.append(
                CompileSpec(
                    name=f"matmul_tma_{str(dtype)[6:]}_{tag}_w{cfg['num_warps']}s{cfg['num_stages']}[{cls}]",
                    fn=matmul_tma_kernel,
                    signature={
                        "a_desc": _desc(dtype, cfg["BLOCK_M"], cfg["BLOCK_K"]),
                        "w_desc": _desc(dtype, cfg["BLOCK_N"], cfg["BLOCK_K"]),
                        "c_desc": _desc(dtype, cfg["BLOCK_M"], cfg["BLOCK_N"]),
                        "bias_ptr": ptr,
                        "M": "i32",
                        "N": "i32:16",
                        "K": "i32:16",
                    },
                    constexprs={
                        "HAS_BIAS": True,
                        "BLOCK_M": cfg["BLOCK_M"],
                        "BLOCK_N": cfg["BLOCK_N"],
                        "BLOCK_K": cfg["BLOCK_K"],
                        "GROUP_M": cfg["GROUP_M"],
                        "NUM_PROGRAMS": H100_SMS,
                    },
                    options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]},
                    deterministic=True,
                    archs=(90,),
                )
            )
    return specs
