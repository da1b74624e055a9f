"""Static-report compile specs of the linear-attention kernels (``launch.py``), for ``jetdet.static_report``."""

from __future__ import annotations

from jetdet import configs

from .._common import CompileSpec, tl_ptr
from . import kernel
from .launch import DEFAULT, OP, SUM_BLOCK, _pad, _prec


def compile_specs() -> list[CompileSpec]:
    """Every shipped config × fp32/fp16/bf16, for the static SASS report. The feature map is elu+1, whose
    code is a superset of relu's and identity's (it adds the exp)."""
    specs: list[CompileSpec] = []
    seen = set()
    tables = [(archs, dn, table) for _ident, archs, dn, table in configs.shipped_tables(OP)]
    tables = tables or [(configs.ARCHS, dn, {"64": DEFAULT}) for dn in configs.DTYPES]
    for archs, tdt, table in tables:
        for key, entry in table.items():
            d = 64 if key == "default" else int(key)
            cfg = dict(DEFAULT)
            cfg.update(entry)
            for dtype, dn in configs.DTYPE_NAMES.items():
                if tdt != dn:
                    continue
                d_pad = _pad(d)
                s_dv = min(cfg["S_BLOCK_DV"], d_pad)
                a_dv = min(cfg["A_BLOCK_DV"], d_pad)
                sig_id = (
                    archs,
                    d_pad,
                    dn,
                    cfg["S_BLOCK_N"],
                    s_dv,
                    cfg["S_WARPS"],
                    cfg["S_STAGES"],
                    cfg["A_BLOCK_N"],
                    a_dv,
                    cfg["A_WARPS"],
                )
                if sig_id in seen:
                    continue
                seen.add(sig_id)
                p = tl_ptr(dtype)
                specs.append(
                    CompileSpec(
                        name=f"la_state_d{d_pad}_{dn}_n{cfg['S_BLOCK_N']}_dv{s_dv}",
                        fn=kernel.linear_attention_state_kernel,
                        signature={
                            "k_ptr": p,
                            "v_ptr": p,
                            "kv_ptr": "*fp32",
                            "ks_ptr": "*fp32",
                            **{a: "i32" for a in ("H", "M", "D", "DV", "CHUNK_N")},
                            **{f"stride_{t}{s}": "i32" for t in "kv" for s in ("b", "h", "n", "d")},
                            **{a: "i32" for a in ("stride_kv_bh", "stride_kv_s", "stride_ks_bh", "stride_ks_s")},
                        },
                        constexprs={
                            "FEATURE": 2,
                            "PREC": _prec(dtype),
                            "BLOCK_N": cfg["S_BLOCK_N"],
                            "D_PAD": d_pad,
                            "BLOCK_DV": s_dv,
                        },
                        options={"num_warps": cfg["S_WARPS"], "num_stages": cfg["S_STAGES"]},
                        archs=archs,
                    )
                )
                specs.append(
                    CompileSpec(
                        name=f"la_apply_d{d_pad}_{dn}_n{cfg['A_BLOCK_N']}_dv{a_dv}",
                        fn=kernel.linear_attention_apply_kernel,
                        signature={
                            "q_ptr": p,
                            "kv_ptr": "*fp32",
                            "ks_ptr": "*fp32",
                            "o_ptr": p,
                            **{a: "i32" for a in ("H", "N", "D", "DV")},
                            "eps": "fp32",
                            **{f"stride_{t}{s}": "i32" for t in "qo" for s in ("b", "h", "n", "d")},
                        },
                        constexprs={
                            "FEATURE": 2,
                            "PREC": _prec(dtype),
                            "BLOCK_N": cfg["A_BLOCK_N"],
                            "D_PAD": d_pad,
                            "BLOCK_DV": a_dv,
                        },
                        options={"num_warps": cfg["A_WARPS"]},
                        archs=archs,
                    )
                )
    specs.append(
        CompileSpec(
            name="la_sum_splits",
            fn=kernel.linear_attention_sum_splits_kernel,
            signature={"src_ptr": "*fp32", "dst_ptr": "*fp32", "S": "i32", "C": "i32"},
            constexprs={"BLOCK": SUM_BLOCK},
            options={"num_warps": 4},
        )
    )
    return specs
