"""Host side of the attention kernel: config lookup (keyed by head dim), allocation, grid, launch."""

from __future__ import annotations

import functools
import math

import torch

from jetdet import configs
from jetdet.kernels._common import FP_FUSION, cdiv, empty, kernel_choice, next_pow2

from . import launch_tma
from .kernel import attention_fwd_kernel
from .reference import additive_mask

OP = "attention"
MAX_HEAD_DIM = 256
# Used (with a one-time warning) on a device with no shipped table. Small tiles, per head-dim range, that
# compile without spills on sm_80/89/90 for fp32 (ieee dots, the heaviest), fp16 and bf16.
DEFAULT_CONFIGS = {
    64: {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
    128: {"BLOCK_M": 64, "BLOCK_N": 16, "num_warps": 8, "num_stages": 2},
    256: {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 8, "num_stages": 2},
}
#: fp32 at head dim 128: M64 N16 w8 spills 32 B on sm_80 with a mask once rows are read in 16-byte loads
#: (``STRIDE_UNIT``), and M32 N16 w4, clean in fp32, spills with 16-bit inputs on sm_90; so the default depends on
#: the dtype there. fp32 at 64: M32 N32 w4 spills 8-24 B on sm_89/90 under triton 3.6 (torch 2.11's pin); M64 N16
#: w8 is clean on sm_80/89/90 under 3.6 and 3.9, with and without a mask, rows aligned or not. fp32 above 128 with a
#: mask: M32 N16 w8 spilled 24-32 B on sm_80 once the KV step became ``kernel.kv_block``; M16 N16 w4 is clean on
#: sm_80/89/90 under both
DEFAULT_CONFIGS_FP32 = {
    **DEFAULT_CONFIGS,
    64: {"BLOCK_M": 64, "BLOCK_N": 16, "num_warps": 8, "num_stages": 2},
    128: {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2},
    256: {**DEFAULT_CONFIGS[256], "masked": {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2}},
}
_LOG2E = 1.4426950408889634


def _block_d(d: int) -> int:
    return max(16, next_pow2(d))


@functools.cache
def split_head_dim(d: int) -> tuple[int, int]:
    """``(BLOCK_D, BLOCK_D2)``: the column blocks a head dim ``d`` is read in. A power of two (or 16 and less) is one
    block; otherwise the largest power of two below ``d`` plus a masked tail (at least 16 wide), when the two are
    narrower than one padded block: 72 -> (64, 16) instead of 128, 96 -> (64, 32), 40 -> (32, 16); 112 stays
    (128, 0), as 64 + 64 is no narrower. Above 128 the padded block stays: at 160 the split's two blocks spill on
    sm_80/89 with the shipped tiles (the static report), and 160 is only SD1.5's lowest-resolution level. Depends on
    ``d`` alone, never on the batch."""
    full = _block_d(d)
    if d <= 16 or full == d or d > 128:
        return full, 0
    main = 1 << (int(d).bit_length() - 1)
    tail = max(16, next_pow2(d - main))
    return (main, tail) if main + tail < full else (full, 0)


def default_configs(dtype: torch.dtype) -> dict:
    """The built-in tiles by head-dim bound for ``dtype`` (used where no table matches the device)."""
    return DEFAULT_CONFIGS_FP32 if dtype == torch.float32 else DEFAULT_CONFIGS


@functools.cache
def _default_config(d: int, dtype: torch.dtype) -> dict:
    """The built-in tile for head dim ``d`` (cached: the launch reads it on every call; callers copy it)."""
    table = default_configs(dtype)
    return table[min(b for b in table if b >= min(_block_d(d), MAX_HEAD_DIM))]


TILE_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")


def resolve(entry: dict, masked: bool) -> dict:
    """A table entry as launched: its ``"masked"`` sub-entry, if any, overrides the tile of calls with a mask.

    A tile that is fastest without a mask can spill with one (the mask tile and its loads need registers), so a
    table may give masked calls their own tile. Whether a call has a mask is the same for every item of it, so
    this never depends on the batch."""
    cfg = {k: v for k, v in entry.items() if k != "masked"}
    over = entry.get("masked")
    if over is not None:
        bad = sorted(set(over) - set(TILE_KEYS)) if isinstance(over, dict) else [repr(over)]
        if bad:
            raise ValueError(f"attention launch table: 'masked' must map some of {TILE_KEYS} to values, got {bad}")
        if masked:
            cfg.update(over)
    return cfg


def config(head_dim: int, dtype: torch.dtype, device=None, masked: bool = False) -> dict:
    """Tile config keyed by the head dim (``max(D, Dv)``) and whether the call has a mask, never the batch or the
    sequence length."""
    entry = configs.get_config(OP, head_dim, dtype=dtype, device=device, default=_default_config(head_dim, dtype))
    return resolve(entry, masked)


def _dot_fp32(dtype: torch.dtype, device: torch.device) -> bool:
    # fp32 promises fp32 products (ieee, not TF32). bf16 dots are computed wrongly by the interpreter, so
    # there the tiles are upcast too; on a GPU bf16 runs on the tensor cores with fp32 accumulation.
    return dtype == torch.float32 or (dtype == torch.bfloat16 and device.type != "cuda")


def split_tail(dot_fp32: bool, arch: int | None) -> bool:
    """The kernel's ``SPLIT_TAIL``: whole KV blocks in an unmasked loop, the partial one in a second loop. For 16-bit
    dots on sm_80-sm_11x (the static report compiles sm_80/89/90) and under the interpreter (``arch`` None), which
    tests that path; not for the fp32 FMA dots, where the second loop spilled 0.6-2 KB (static report), nor on GPUs
    no table is compiled for. Fixed per dtype and device: never depends on the batch."""
    return not dot_fp32 and (arch is None or 80 <= arch < 120)


def spec_variants(dot_fp32: bool, archs, unit_max: int) -> list[tuple[bool, tuple[int, ...], int]]:
    """``(split, archs, unit)`` for the static report's specs of a tile shipped to ``archs``: ``SPLIT_TAIL`` as each
    arch launches it (:func:`split_tail`), with rows on 16-byte boundaries (``unit_max``) and, for the one-loop
    kernel only, rows that are not (unit 1; :func:`plan_loads` copies those to contiguous rows for the split one)."""
    groups: dict[bool, list[int]] = {}
    for arch in sorted(archs):
        groups.setdefault(split_tail(dot_fp32, arch), []).append(arch)
    return [(s, tuple(a), unit) for s, a in groups.items() for unit in ((unit_max,) if s else (unit_max, 1))]


def nonnegative_scale(q: torch.Tensor, scale) -> tuple[torch.Tensor, float]:
    """``(q, scale)`` with ``scale >= 0`` for the kernels' KV step (``kernel.kv_block``), which takes the row maximum
    before scaling: ``q @ k^T * scale`` is ``(-q) @ k^T * -scale`` exactly (negation is exact and commutes with every
    rounding), at one copy of q when the scale is negative."""
    scale = float(scale)
    return (-q, -scale) if scale < 0 else (q, scale)


def _arch(device: torch.device) -> int | None:
    """``90`` for sm_90; None off CUDA (the interpreter)."""
    return int(configs.device_identity(device)[1][3:]) if device.type == "cuda" else None


def plan_loads(dot_fp32: bool, device: torch.device, head_dims, tensors):
    """``(split, tensors, unit, strides)`` for a launch of dense or block-sparse attention over ``tensors`` (q, k, v,
    out, each ``[B, H, N, D]``): ``SPLIT_TAIL`` (:func:`split_tail`, and only for head dims that are whole 16-byte
    rows), the tensors to read, and their ``STRIDE_UNIT`` and strides (:func:`unit_strides`).

    With the split loops, rows that are not on 16-byte boundaries (a strided view into a wider buffer) are read from
    contiguous copies, whose rows are: read element by element, the split kernel spilled (static report). The copy
    holds the same values, so the same bits come out; and ``split`` depends on the dtype, device and head dims
    alone, never on the strides or the batch."""
    unit_max = 16 // tensors[0].element_size()
    split = split_tail(dot_fp32, _arch(device)) and all(hd % unit_max == 0 for hd in head_dims)
    unit, st = unit_strides(tensors, unit_max)
    if split and unit < unit_max:
        tensors = tuple(t.contiguous() for t in tensors)
        unit, st = unit_strides(tensors, unit_max)
    return split, tensors, unit, st


def unit_strides(tensors, unit_max: int) -> tuple[int, list[int]]:
    """``(unit, strides)`` for the kernel's ``STRIDE_UNIT``: the batch, head and row strides of each ``[B, H, N, D]``
    tensor (0 for a size-1 dim, which is never stepped, so a batch of one reads like any other batch) divided by
    ``unit``, the largest power of two up to ``unit_max`` (16 bytes of the dtype) that divides all of them, and
    each last-dim stride as it is. Which unit a call gets changes only the width of its loads, never a number."""
    raw = []
    bits = 0  # the OR of all the strides: its lowest set bit is the largest power of two dividing them all
    for t in tensors:
        st, sh = t.stride(), t.shape
        sb, shd, sn = (0 if sh[0] == 1 else st[0]), (0 if sh[1] == 1 else st[1]), (0 if sh[2] == 1 else st[2])
        bits |= sb | shd | sn
        raw += (sb, shd, sn, st[3])
    unit = min(unit_max, bits & -bits) if bits else unit_max
    if unit > 1:
        raw = [x if i % 4 == 3 else x // unit for i, x in enumerate(raw)]
    return unit, raw


def attention(q, k, v, mask=None, scale=None) -> torch.Tensor:
    """``softmax(q @ k^T * scale + mask) @ v``.

    q ``[B, H, Nq, D]``, k ``[B, H, Nk, D]``, v ``[B, H, Nk, Dv]`` (same dtype fp32/fp16/bf16, any strides),
    any D and Dv (past :data:`MAX_HEAD_DIM`: :func:`attention_wide`). ``mask``: None, an additive float tensor or a
    boolean one (True = keep), broadcastable to ``[B, H, Nq, Nk]`` (read through stride-0 views, never
    materialised); ``scale`` defaults to ``1/sqrt(D)``. Returns ``[B, H, Nq, Dv]`` in q.dtype. A query row whose
    mask is -inf for every key is 0, as torch's SDPA gives (since 2.5).
    """
    bsz, heads, n_q, d = q.shape
    n_k, d_v = k.shape[2], v.shape[3]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    out = empty((bsz, heads, n_q, d_v), q.dtype, q.device)
    if out.numel() == 0:
        return out
    if n_k == 0:  # softmax over no keys times an empty V: the reference's matmul gives zeros
        return out.zero_()
    if mask is not None:
        mask = additive_mask(mask)
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(bsz, heads, n_q, n_k)
    if max(d, d_v) > MAX_HEAD_DIM:
        return attention_wide(q, k, v, mask, float(scale), out)

    q, scale = nonnegative_scale(q, scale)
    m_arg, m_strides = (mask, mask.stride()) if mask is not None else (q, (0, 0, 0, 0))

    blocks = (bd, bd2), (bdv, bdv2) = split_head_dim(d), split_head_dim(d_v)
    dot_fp32 = _dot_fp32(q.dtype, q.device)
    tma = mask is None and q.dtype != torch.float32 and kernel_choice(launch_tma.KERNEL_ENV) == "tma"
    if tma and launch_tma.eligible(q, k, v, mask):
        return launch_tma.attention_tma(q, k, v, scale * _LOG2E, out, blocks, dot_fp32)
    cfg = config(max(d, d_v), q.dtype, q.device, masked=mask is not None)
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    grid = (cdiv(n_q, block_m) * bsz * heads,)
    split, (q, k, v, out), unit, st = plan_loads(dot_fp32, q.device, (d, d_v), (q, k, v, out))
    attention_fwd_kernel[grid](
        q, k, v, m_arg, out,
        *st[:12], *m_strides, *st[12:],
        heads, n_q, n_k,
        scale * _LOG2E,
        HEAD_DIM=d,
        HEAD_DIM_V=d_v,
        HAS_MASK=mask is not None,
        DOT_FP32=dot_fp32,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=bd,
        BLOCK_DV=bdv,
        BLOCK_D2=bd2,
        BLOCK_DV2=bdv2,
        STRIDE_UNIT=unit,
        SPLIT_TAIL=split,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return out


#: Bytes of fp32 scores one step of :func:`attention_wide` holds: it takes as many query rows per step as fit.
WIDE_SCORE_BYTES = 1 << 28


def attention_wide(q, k, v, mask, scale: float, out: torch.Tensor) -> torch.Tensor:
    """Attention whose head dim is past :data:`MAX_HEAD_DIM`, where the kernel's ``[BLOCK_M, D]`` accumulator no
    longer fits: the single-head attention over 512 channels in the mid blocks of SD, SDXL and Flux-type VAEs.

    ``softmax(q @ k^T * scale + mask) @ v`` as two GEMMs around a row softmax, each jetdet's own batch-invariant
    kernel (``matmul.launch.bmm``, ``reduce.launch.softmax``), over a block of query rows at a time so that the
    scores stay under :data:`WIDE_SCORE_BYTES`. A query row's result depends only on its own rows of the scores and
    of ``p``, and the GEMM's rows do not depend on how many rows it is given, so neither the batch nor the row
    blocks change a bit. fp32 inside (q, k, v upcast; an IEEE dot): exact products, slower than the tensor cores.
    A row whose mask is -inf for every key gives 0, as the kernel does.

    Called by :func:`attention` with its output ``out`` (non-empty, ``Nk > 0``) and ``mask`` already additive and
    expanded to ``[B, H, Nq, Nk]`` (or None)."""
    from ..matmul.launch import bmm
    from ..reduce.launch import softmax

    bsz, heads, n_q, d = q.shape
    n_k, d_v = k.shape[2], v.shape[3]
    bh = bsz * heads
    q32 = q.reshape(bh, n_q, d).to(torch.float32)
    k_t = k.reshape(bh, n_k, d).to(torch.float32).transpose(1, 2)
    v32 = v.reshape(bh, n_k, d_v).to(torch.float32)
    out3 = out.view(bh, n_q, d_v)
    rows = max(1, min(n_q, WIDE_SCORE_BYTES // (4 * bh * n_k)))
    for r0 in range(0, n_q, rows):
        r1 = min(n_q, r0 + rows)
        s = bmm(q32[:, r0:r1], k_t)
        s.mul_(scale)
        if mask is not None:
            s.view(bsz, heads, r1 - r0, n_k).add_(mask[:, :, r0:r1])
        p = softmax(s)
        if mask is not None:
            p.masked_fill_((s == float("-inf")).all(dim=-1, keepdim=True), 0.0)
        out3[:, r0:r1] = bmm(p, v32)
    return out
