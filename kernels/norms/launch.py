"""Host side of the norm kernels: config lookup (keyed by the normalised row length), allocation, launch."""

from __future__ import annotations

import math

import torch

from jetdet import configs
from jetdet.kernels._common import FP_FUSION, empty, next_pow2, out_memory_format

from .kernel import group_norm_cl_kernel, norm_fwd_kernel

OP = "norms"
DEFAULT_CONFIG = {"BLOCK": 1024, "num_warps": 4}
#: The channels-last group norm's tile is [BLOCK // BLOCK_C pixels, BLOCK_C channels], BLOCK_C the group's channel
#: count rounded up to a power of two, at most this (wider groups take several channel blocks per pixel block)
MAX_BLOCK_C = 64
_I32 = 2**31 - 1


def config(n: int, dtype: torch.dtype, device=None) -> dict:
    """Config keyed by the normalised length (row length, or ``C/G * spatial``), never the batch size."""
    return configs.get_config(OP, n, dtype=dtype, device=device, default=DEFAULT_CONFIG)


def _launch(x2, weight, bias, out2, n, eps, *, rms, num_groups=1, spatial=1, grouped=False):
    rows = x2.shape[0]
    if rows == 0:
        return
    cfg = config(n, x2.dtype, x2.device)
    norm_fwd_kernel[(rows,)](
        x2, weight if weight is not None else x2, bias if bias is not None else x2, out2,
        x2.stride(0), x2.stride(1), out2.stride(0), out2.stride(1),
        n, num_groups, spatial, float(eps),
        RMS=rms,
        GROUPED=grouped,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        BLOCK=cfg["BLOCK"],
        num_warps=cfg["num_warps"], enable_fp_fusion=FP_FUSION,
    )  # fmt: skip


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x


def _affine(t):
    return None if t is None else t.contiguous()


def layer_norm(x, weight=None, bias=None, eps=1e-5) -> torch.Tensor:
    """Layer norm over the last dim of ``x [R, C]`` (any leading dims are flattened): ``(x - mean) /
    sqrt(var + eps) * weight + bias`` with the biased variance; ``weight``/``bias`` ``[C]`` or None.
    fp32 statistics; returns x.dtype, shape of x."""
    x2 = _rows(x)
    out = empty(x.shape, x.dtype, x.device)
    _launch(x2, _affine(weight), _affine(bias), out.view(x2.shape), x.shape[-1], eps, rms=False)
    return out


def rms_norm(x, weight=None, eps=1e-6) -> torch.Tensor:
    """RMS norm over the last dim of ``x [R, C]``: ``x / sqrt(mean(x^2) + eps) * weight``; ``weight``
    ``[C]`` or None. fp32 statistics; returns x.dtype, shape of x."""
    x2 = _rows(x)
    out = empty(x.shape, x.dtype, x.device)
    _launch(x2, _affine(weight), None, out.view(x2.shape), x.shape[-1], eps, rms=True)
    return out


def block_c(cpg: int, block: int) -> int:
    """The channel width of the channels-last group norm's tile for ``cpg`` channels per group and a config's
    ``BLOCK``: ``cpg`` rounded up to a power of two, at most ``MAX_BLOCK_C`` and ``BLOCK``."""
    return min(next_pow2(max(cpg, 1)), MAX_BLOCK_C, block)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5) -> torch.Tensor:
    """Group norm of ``x [B, C, *spatial]``: each (sample, group) of ``C/G`` channels x spatial is
    normalised by its own mean and biased variance, then the per-channel ``weight``/``bias`` ``[C]`` (or
    None) apply. One program per (sample, group). Returns x.dtype, shape of x, in x's layout
    (:func:`~jetdet.kernels._common.out_memory_format`): a channels-last 4-D ``x`` is read as it is by
    ``group_norm_cl_kernel`` and gives channels-last output; any other ``x`` is made contiguous and gives
    contiguous output."""
    bsz, chans = x.shape[0], x.shape[1]
    if chans % num_groups:
        raise ValueError(f"num_groups: expected a divisor of the {chans} channels, got {num_groups}")
    spatial = math.prod(x.shape[2:])
    n = chans // num_groups * spatial
    if out_memory_format(x) == torch.channels_last:
        if chans * spatial < _I32:
            return _group_norm_cl(x, num_groups, _affine(weight), _affine(bias), eps, n)
        # a sample past the channels-last kernel's 32-bit offsets (a VAE decoder's full-resolution group norms at
        # 4K: 128 channels x 4096 x 4096): the NCHW kernel, whose rows are one (sample, group) each
        out = group_norm(x.contiguous(), num_groups, weight, bias, eps)
        return out.contiguous(memory_format=torch.channels_last)
    xc = x.contiguous()
    out = empty(x.shape, x.dtype, x.device)
    _launch(
        xc.view(bsz * num_groups, n), _affine(weight), _affine(bias), out.view(bsz * num_groups, n), n, eps,
        rms=False, num_groups=num_groups, spatial=max(spatial, 1), grouped=True,
    )  # fmt: skip
    return out


def _group_norm_cl(x, num_groups, weight, bias, eps, n):
    bsz, chans, h, w = x.shape
    out = empty(x.shape, x.dtype, x.device, torch.channels_last)
    if bsz == 0 or n == 0:
        return out
    assert chans * h * w < _I32, "one sample of x spans 2**31 elements or more"  # 32-bit offsets in a sample
    cpg = chans // num_groups
    # keyed by the (sample, group) size as the NCHW path, so both layouts take the same table entry
    cfg = config(n, x.dtype, x.device)
    bc = block_c(cpg, cfg["BLOCK"])
    # bf16 on a CPU (the interpreter) stores by truncation, as the NCHW path does: the norms' bf16 tolerance
    # allows for it (README)
    group_norm_cl_kernel[(bsz * num_groups,)](
        x, weight if weight is not None else x, bias if bias is not None else x, out,
        chans, cpg, h * w, num_groups, float(eps),
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        BLOCK_P=cfg["BLOCK"] // bc,
        BLOCK_C=bc,
        num_warps=cfg["num_warps"], enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return out
