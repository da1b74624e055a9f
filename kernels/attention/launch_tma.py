"""Host side of the TMA-fed attention kernel (``kernel_tma.py``): the switch, eligibility, config, descriptors, launch.

Opt-in and not the default: ``JETDET_ATTENTION_KERNEL=tma`` makes ``launch.attention`` send eligible calls here, so
that ``bench/gpu_check.py`` can time it beside the default kernel. It becomes the default only after a GPU has
measured it.

Eligible: fp16/bf16 q, k, v with no mask and head dims that are multiples of 8 (16-byte rows, which a descriptor
needs) up to 128. That depends on the dtype, the head dims and whether there is a mask, never on the batch or the
strides: a tensor whose strides a descriptor cannot take is read from a contiguous copy (same values, same bits).
The tile is fixed per head-dim class (never chosen by the sequence length or the batch); the KV loop is whole and in
order; no split, no atomics. On sm_90 the loads are TMA (``UTMALDG``) and the dots warpgroup MMA (``HGMMA``); the
static report checks both, and that it does not spill (``specs.tma_specs``).
"""

from __future__ import annotations

import torch

from jetdet.kernels._common import FP_FUSION, cdiv, descriptor_strides, empty, tensor_descriptor

from .kernel_tma import attention_tma_kernel

#: ``default`` or ``tma`` (this kernel, for eligible calls; ``kernels._common.kernel_choice``)
KERNEL_ENV = "JETDET_ATTENTION_KERNEL"
MAX_HEAD_DIM = 128
# one tile per head-dim class (max(D, Dv) up to the key): never a function of the sequence length or the batch
CONFIGS = {
    64: dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    128: dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
}
_DTYPES = (torch.float16, torch.bfloat16)


def eligible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> bool:
    """Whether a call can run on the TMA kernel (see the module docstring). Independent of the batch and strides."""
    d, d_v = q.shape[-1], v.shape[-1]
    return (
        mask is None
        and q.dtype in _DTYPES
        and k.dtype == q.dtype
        and v.dtype == q.dtype
        and d % 8 == 0
        and d_v % 8 == 0
        and max(d, d_v) <= MAX_HEAD_DIM
    )


def config(head_dim: int) -> dict:
    return CONFIGS[64 if head_dim <= 64 else 128]


def _descriptors(desc, t: torch.Tensor, rows: int, cols: int, cols2: int):
    """A ``[1, 1, rows, cols]`` descriptor (Triton's class ``desc``) of ``t`` (of a contiguous copy when a descriptor
    cannot take its strides: the same values) and, when ``cols2``, its ``[1, 1, rows, cols2]`` twin (else the same
    one again)."""
    strides = descriptor_strides(t)
    if strides is None:
        t = t.contiguous()
        strides = descriptor_strides(t)
    shape = list(t.shape)
    main = desc(t, shape, strides, [1, 1, rows, cols])
    return main, (desc(t, shape, strides, [1, 1, rows, cols2]) if cols2 else main)


def attention_tma(q, k, v, qk_scale: float, out: torch.Tensor, blocks: tuple, dot_fp32: bool) -> torch.Tensor:
    """``softmax(q @ k^T * scale) @ v`` into ``out`` (``[B, H, Nq, Dv]``, contiguous): q ``[B, H, Nq, D]``, k, v
    with ``Nk >= 1`` (:func:`eligible`); ``qk_scale = scale * log2(e) >= 0``. ``blocks``: ``((BLOCK_D, BLOCK_D2),
    (BLOCK_DV, BLOCK_DV2))`` (``launch.split_head_dim``). ``dot_fp32``: fp32 operands with IEEE dots (bf16 under
    the interpreter)."""
    bsz, heads, n_q, _ = q.shape
    n_k = k.shape[2]
    (bd, bd2), (bdv, bdv2) = blocks
    cfg = config(max(q.shape[-1], v.shape[-1]))
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    # the interpreter truncates fp32 -> bf16 casts (a GPU rounds to nearest even): it writes fp32, torch rounds
    o = out
    if out.dtype == torch.bfloat16 and out.device.type != "cuda":
        o = empty(out.shape, torch.float32, out.device)
    desc = tensor_descriptor(KERNEL_ENV)
    qd, qd2 = _descriptors(desc, q, bm, bd, bd2)
    kd, kd2 = _descriptors(desc, k, bn, bd, bd2)
    vd, vd2 = _descriptors(desc, v, bn, bdv, bdv2)
    od, od2 = _descriptors(desc, o, bm, bdv, bdv2)  # o is a fresh contiguous tensor: written in place, never copied
    attention_tma_kernel[(cdiv(n_q, bm) * bsz * heads,)](
        qd, kd, vd, od, qd2, kd2, vd2, od2,
        heads, n_q, n_k, qk_scale,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_D=bd,
        BLOCK_DV=bdv,
        BLOCK_D2=bd2,
        BLOCK_DV2=bdv2,
        DOT_FP32=dot_fp32,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    if o is not out:
        out.copy_(o)
    return out
