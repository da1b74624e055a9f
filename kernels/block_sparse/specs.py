"""Static-report compile specs of the block-sparse attention and block pooling kernels (``launch.py``), for
``jetdet.static_report``."""

from __future__ import annotations

import torch

from jetdet import configs

from .._common import CompileSpec, tl_ptr
from ..attention.launch import _dot_fp32, spec_variants
from . import kernel
from .launch import DEFAULT, OP, _pad


def compile_specs() -> list[CompileSpec]:
    """Every shipped config × fp32/fp16/bf16 at mask block size 64 and 128 (the attention kernel) and the
    pooling kernel at pool sizes 4, 16, 64 and 128, for the static SASS report."""
    specs: list[CompileSpec] = []
    seen = set()
    i32 = "i32"
    tables = [(archs, dn, table) for _ident, archs, dn, table in configs.shipped_tables(OP)]
    tables = tables or [(configs.ARCHS, dn, {"64": DEFAULT}) for dn in configs.DTYPES]
    for archs, tdt, table in tables:
        for key, entry in table.items():
            d = 64 if key == "default" else int(key)
            for dtype, dn in configs.DTYPE_NAMES.items():
                if tdt != dn:
                    continue
                for bs in (64, 128):
                    cfg = dict(DEFAULT)
                    cfg.update(entry)
                    bm, bn = min(cfg["BLOCK_M"], bs), min(cfg["BLOCK_N"], bs)
                    half = not _dot_fp32(dtype, torch.device("cuda"))
                    ident = (archs, _pad(d), dn, bs, bm, bn, cfg["num_warps"], cfg["num_stages"])
                    if ident in seen:
                        continue
                    seen.add(ident)
                    p = tl_ptr(dtype)
                    sig = {
                        "q_ptr": p,
                        "k_ptr": p,
                        "v_ptr": p,
                        "o_ptr": p,
                        "idx_ptr": "*i32",
                        "cnt_ptr": "*i32",
                        "visits_ptr": "*i32",
                        "H": i32,
                        "N": i32,
                        "M": i32,
                        "qk_scale": "fp32",
                    }
                    for t in "qkvo":
                        for s in "bhn":
                            sig[f"stride_{t}{s}"] = i32
                    for s in ("stride_ib", "stride_ih", "stride_iq", "stride_cb", "stride_ch"):
                        sig[s] = i32
                    # SPLIT_TAIL as each arch launches it; STRIDE_UNIT: rows on 16-byte boundaries (a head dim that is
                    # a multiple of 8, or 4 in fp32) and 1 for any other strides (the one-loop kernel only; see
                    # attention/launch.py: spec_variants); the last-dim strides are 1, as the JIT specialises them
                    for split, split_archs, unit in spec_variants(not half, archs, 4 if dn == "fp32" else 8):
                        specs.append(
                            CompileSpec(
                                name=f"bsa_fwd_d{_pad(d)}_{dn}_bs{bs}_m{bm}_n{bn}_w{cfg['num_warps']}"
                                f"_s{cfg['num_stages']}{'_unaligned' if unit == 1 else ''}"
                                f"{'_split' if split else ''}",
                                fn=kernel.block_sparse_fwd_kernel,
                                signature=dict(sig),
                                constexprs={
                                    "D": _pad(d),
                                    "DV": _pad(d),
                                    "BLOCK_SIZE": bs,
                                    "BLOCK_M": bm,
                                    "BLOCK_N": bn,
                                    "D_PAD": _pad(d),
                                    "DV_PAD": _pad(d),
                                    "HALF_DOT": half,
                                    "COUNT_VISITS": False,
                                    "STRIDE_UNIT": unit,
                                    "SPLIT_TAIL": split,
                                    **{f"stride_{t}d": 1 for t in "qkvo"},
                                },
                                options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]},
                                archs=tuple(split_archs),
                                # 16-bit inputs run 16-bit dots on a GPU: a TF32 instruction is the interpreter's
                                # fp32 path compiled by mistake (half rate, twice the shared memory); aligned 16-bit
                                # rows are read in 16-byte loads, never element by element in the KV loop
                                forbid=(("no_tf32",) + (("no_gather",) if unit > 1 else ())) if half else (),
                            )
                        )
                    for ps in (4, 16, bs) if bs == 64 else (bs,):
                        pr = min(cfg["POOL_ROWS"], ps)
                        if ("pool", archs, _pad(d), dn, ps, pr) in seen:
                            continue
                        seen.add(("pool", archs, _pad(d), dn, ps, pr))
                        specs.append(
                            CompileSpec(
                                name=f"block_pool_d{_pad(d)}_{dn}_ps{ps}_r{pr}",
                                fn=kernel.block_pool_kernel,
                                signature={
                                    "x_ptr": p,
                                    "out_ptr": "*fp32",
                                    "H": i32,
                                    "N": i32,
                                    "D": i32,
                                    "n_blocks": i32,
                                    "stride_xb": i32,
                                    "stride_xh": i32,
                                    "stride_xn": i32,
                                    "stride_xd": i32,
                                },
                                constexprs={"BLOCK_SIZE": ps, "ROWS": pr, "D_PAD": _pad(d)},
                                options={"num_warps": 4},
                                archs=archs,
                            )
                        )
    return specs
