"""Static-report compile specs of the attention kernel (``launch.py``), for ``jetdet.static_report``."""

from __future__ import annotations

from jetdet import configs
from jetdet.kernels._common import CompileSpec, signature

from . import launch_tma
from .kernel import attention_fwd_kernel
from .kernel_tma import attention_tma_kernel
from .launch import MAX_HEAD_DIM, OP, _default_config, default_configs, resolve, spec_variants, split_head_dim

# the innermost strides, 1 in the common contiguous case (the JIT specialises them to constants)
_UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_mn", "stride_od")


def compile_specs() -> list[CompileSpec]:
    """:func:`table_specs` and :func:`tma_specs`."""
    return table_specs() + tma_specs()


def table_specs() -> list[CompileSpec]:
    """Every shipped (config, head-dim key) x dtype x mask/no-mask (with the entry's ``"masked"`` tile for the
    masked variant) x rows on 16-byte boundaries or not (``STRIDE_UNIT``), as compiled for a GPU, on the archs of
    the tables that ship it (a device table's arch only)."""
    found: dict = {}  # (dtype, head dim, mask, tile) -> archs
    dtypes = {name: dtype for dtype, name in configs.DTYPE_NAMES.items()}
    tables = configs.shipped_tables(OP) + [
        ("default", configs.ARCHS, dn, {str(d): c for d, c in default_configs(dtype).items()})
        for dtype, dn in configs.DTYPE_NAMES.items()
    ]
    for _dev, archs, dt, table in tables:
        for key, cfg in table.items():
            head_dim = min(int(key), MAX_HEAD_DIM)
            entry = {**_default_config(head_dim, dtypes[dt]), **cfg}
            for has_mask in (False, True):
                tile = tuple(sorted(resolve(entry, has_mask).items()))
                found.setdefault((dt, head_dim, has_mask, tile), set()).update(archs)
    specs = []
    for (dt, head_dim, has_mask, tile), archs in found.items():
        cfg = dict(tile)
        block_d, block_d2 = split_head_dim(head_dim)
        ptr = "*" + dt
        sig = signature(
            attention_fwd_kernel,
            {"q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr, "out_ptr": ptr, "qk_scale": "fp32",
             "mask_ptr": "*fp32" if has_mask else ptr},
        )  # fmt: skip
        # the common, contiguous-last-dim case, which the JIT specialises at runtime (stride == 1)
        for name in _UNIT_STRIDES:
            del sig[name]
        # SPLIT_TAIL as each arch launches it; STRIDE_UNIT: rows on 16-byte boundaries (the common case: a head dim
        # that is a multiple of 8, or of 4 in fp32), and 1 for any other strides, which only the one-loop kernel reads
        for split, split_archs, unit in spec_variants(dt == "fp32", archs, 4 if dt == "fp32" else 8):
            specs.append(
                CompileSpec(
                    name=f"attention[{dt},D={head_dim},mask={has_mask},"
                    f"M{cfg['BLOCK_M']}N{cfg['BLOCK_N']}w{cfg['num_warps']}s{cfg['num_stages']}"
                    f"{',unaligned' if unit == 1 else ''}{',split' if split else ''}]",
                    fn=attention_fwd_kernel,
                    signature=sig,
                    constexprs={
                        "HAS_MASK": has_mask,
                        "DOT_FP32": dt == "fp32",
                        "BLOCK_M": cfg["BLOCK_M"],
                        "BLOCK_N": cfg["BLOCK_N"],
                        "HEAD_DIM": head_dim,
                        "HEAD_DIM_V": head_dim,
                        "BLOCK_D": block_d,
                        "BLOCK_DV": block_d,
                        "BLOCK_D2": block_d2,
                        "BLOCK_DV2": block_d2,
                        "STRIDE_UNIT": unit,
                        "SPLIT_TAIL": split,
                        **dict.fromkeys(_UNIT_STRIDES, 1),
                    },
                    options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]},
                    archs=tuple(split_archs),
                    # aligned 16-bit rows are read in 16-byte loads: an element-wise read in the KV loop is the
                    # head-dim-72 gather the stride unit removed
                    forbid=("no_gather",) if unit > 1 and dt != "fp32" else (),
                )
            )
    return specs



def _tma_head_dims() -> list[int]:
    """One head dim per column-block split (``split_head_dim``) of those the TMA kernel takes (multiples of 8 up to
    128), the head dims of real models first (40: SD1.5, 72: DiT-XL/PixArt); the kernel's code depends on the
    split and the tile class, not on the head dim itself."""
    found: dict = {}
    for d in (16, 32, 40, 64, 72, 96, 128, *range(8, launch_tma.MAX_HEAD_DIM + 1, 8)):
        found.setdefault((split_head_dim(d), launch_tma.config(d)["BLOCK_N"]), d)
    return sorted(found.values())


TMA_HEAD_DIMS = _tma_head_dims()


def tma_specs() -> list[CompileSpec]:
    """The TMA kernel (``kernel_tma.py``, opt-in) for sm_90 only (TMA and warpgroup MMA are sm_90 features): fp16 and
    bf16 x one head dim per column-block split it takes (D = Dv), each at its class's tile (``launch_tma.CONFIGS``)."""
    specs = []
    for dt in ("fp16", "bf16"):
        for head_dim in TMA_HEAD_DIMS:
            cfg = launch_tma.config(head_dim)
            bd, bd2 = split_head_dim(head_dim)
            bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
            descs = {f"{t}{tail}_desc": f"tensordesc<{dt}[1, 1, {rows}, {cols}]>"
                     for t, rows in (("q", bm), ("k", bn), ("v", bn), ("o", bm))
                     for tail, cols in (("", bd), ("2", bd2 or bd))}  # fmt: skip
            specs.append(
                CompileSpec(
                    name=f"attention_tma[{dt},D={head_dim},M{bm}N{bn}w{cfg['num_warps']}s{cfg['num_stages']}]",
                    fn=attention_tma_kernel,
                    # sequence lengths of real models are multiples of 16 (1024, 4096 tokens); the JIT variants cover
                    # the others
                    signature={**descs, "num_heads": "i32", "n_q": "i32:16", "n_k": "i32:16", "qk_scale": "fp32"},
                    constexprs={"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd, "BLOCK_DV": bd, "BLOCK_D2": bd2,
                                "BLOCK_DV2": bd2, "DOT_FP32": False},  # fmt: skip
                    options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]},
                    archs=(90,),
                )
            )
    return specs
