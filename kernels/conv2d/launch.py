"""Host side of the batch-invariant implicit-GEMM conv2d: layout, config lookup, allocation, grid, launch.

The caller (``jetdet.ops``) has validated dtypes, devices and shapes; the asserts here are cheap guards.
"""

from __future__ import annotations

import torch

from jetdet import configs
from jetdet.kernels._common import (
    MAX_GRID_YZ,
    cdiv,
    empty,
    fp32_dot,
    kernel_choice,
    out_memory_format,
    tf32x3_config,
)

from ..matmul.torch_path import cached_pack
from . import launch_tma
from .kernel import conv2d_kernel

OP = "conv2d"

# Used when no table matches the device; no spills on sm_80/89/90, fits 99 KiB of shared memory.
DEFAULT_CONFIG = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)
# fp32 at 4 warps spilled 16 B on sm_80 under triton 3.6 (torch 2.11's pin); 8 warps is clean under 3.6 and 3.9
DEFAULT_CONFIG_FP32 = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=8, num_stages=3)

# Explicit, so the numbers do not change when Triton flips its default (3.10). Nothing here contracts:
# the dot's FMAs are explicit and the epilogue only adds; the static report shows identical SASS either way.
FP_FUSION = False
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_I32 = 2**31 - 1


def _default(dtype: torch.dtype) -> dict:
    return DEFAULT_CONFIG_FP32 if dtype == torch.float32 else DEFAULT_CONFIG


def config(out_channels: int, dtype: torch.dtype, device=None, f32_dot: str | None = None) -> dict:
    """Tile config keyed by the number of output channels (never the batch size or the image size); fp32 under
    ``JETDET_FP32_DOT=tf32x3`` (or ``f32_dot="tf32x3"``, the launch's reading of it): the fixed tensor-core tile
    of ``kernels/_common.py``."""
    if dtype == torch.float32 and (f32_dot or fp32_dot()) == "tf32x3":
        return tf32x3_config(configs.device_identity(device)[1])
    return configs.get_config(OP, out_channels, dtype=dtype, device=device, default=_default(dtype))


def out_size(size: int, k: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - k) // stride + 1


def conv2d(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
) -> torch.Tensor:
    """2-D convolution: x [B, C, H, W] (NCHW or channels-last, any strides), w [O, C, kh, kw], bias [O] or None
    -> [B, O, OH, OW] in ``x.dtype``, ``OH = (H + 2 * padding[0] - kh) // stride[0] + 1`` (same for W),
    channels-last when ``x`` is (:func:`jetdet.kernels._common.out_memory_format`), contiguous otherwise.

    The kernel reads channels-last input; any other layout is copied to channels-last first (an element-wise
    copy, the same for every item). Zero padding, groups=1, dilation=1. fp32 accumulation; the reduction over
    ``kh * kw * C`` runs in a fixed order inside one program, with a tile config chosen by O, so
    ``conv2d(x)[i]`` is bitwise ``conv2d(x[i:i+1])[0]`` for any batch.
    """
    assert x.dim() == 4 and w.dim() == 4 and x.shape[1] == w.shape[1], (tuple(x.shape), tuple(w.shape))
    assert x.dtype in _DTYPES and w.dtype == x.dtype and w.device == x.device
    sh, sw = (int(v) for v in stride)
    ph, pw = (int(v) for v in padding)
    assert sh >= 1 and sw >= 1 and ph >= 0 and pw >= 0, (stride, padding)
    nb, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    oh, ow = out_size(h, kh, sh, ph), out_size(wd, kw, sw, pw)
    assert oh >= 1 and ow >= 1, f"kernel {kh}x{kw} larger than padded input {h}x{wd}"
    if bias is not None:
        assert bias.shape == (o,) and bias.device == x.device, tuple(bias.shape)
    fmt = out_memory_format(x)
    y = empty((nb, o, oh, ow), x.dtype, x.device, fmt)
    if y.numel() == 0:
        return y
    if c == 0:
        y.zero_()
        if bias is not None:
            y += bias.to(y.dtype)[:, None, None]
        return y
    if x.stride(1) != 1 and c > 1:  # the kernel reads channels-last: a C-block of one pixel is contiguous
        x = x.contiguous(memory_format=torch.channels_last)
    # the weight as wk[o, k], k = (r * kw + s) * C + c contiguous: a view of a channels-last weight (as
    # model.to(memory_format=torch.channels_last) makes); any other is copied to channels-last, once per weight
    # Parameter until it changes (a second copy of the weight in memory). The kernel reads it as its wt[k, o]
    # through the strides.
    if not w.is_contiguous(memory_format=torch.channels_last):
        w = cached_pack(w, "conv2d.cl", lambda: w.detach().contiguous(memory_format=torch.channels_last))
    wk = w.permute(0, 2, 3, 1).reshape(o, kh * kw * c)
    tma = x.dtype != torch.float32 and kernel_choice(launch_tma.KERNEL_ENV) == "tma"
    if tma and launch_tma.eligible(x.dtype, c, o, (sh, sw)):
        # the opt-in TMA-fed kernel (launch_tma.py): bf16 under the interpreter upcasts (its bf16 dot is wrong)
        interp_bf16 = x.dtype == torch.bfloat16 and x.device.type != "cuda"
        return launch_tma.conv2d_tma(x, w, bias, y, (ph, pw), dot_f32=interp_bf16)
    if wk.numel() >= 2**31 - 1:
        raise ValueError(f"w: at most 2**31 - 1 elements, got {wk.numel()}")
    # 32-bit offsets inside one batch item (the batch offset is 64-bit): an item that passes them (a VAE decoder's
    # full-resolution convs at 4K: 128 channels x 4096 x 4096 = 2**31) runs in bands of output rows
    span = (c - 1) * abs(x.stride(1)) + (h - 1) * abs(x.stride(2)) + (wd - 1) * abs(x.stride(3))
    if span >= _I32 or o * oh * ow >= _I32:
        return _conv_in_bands(x, wk, bias, y, (kh, kw), (sh, sw), (ph, pw))

    if x.dtype == torch.bfloat16 and x.device.type != "cuda":
        # The interpreter truncates fp32 -> bf16 casts (the GPU rounds to nearest even): write fp32 and let
        # torch round, as the GPU's cvt.rn.bf16.f32 does.
        y32 = empty(y.shape, torch.float32, x.device, fmt)
        _launch(x, wk, bias, y32, kh, kw, sh, sw, ph, pw, dot_f32=True)
        y.copy_(y32)
        return y
    _launch(x, wk, bias, y, kh, kw, sh, sw, ph, pw, dot_f32=x.dtype == torch.float32)
    return y


def _conv_in_bands(x, wk, bias, y, kernel, stride, padding) -> torch.Tensor:
    """``y`` for a channels-last ``x`` whose items pass 32-bit offsets, a band of output rows at a time: each band
    reads a view of the input rows it needs (its own top padding only at the image's top) and writes a channels-last
    buffer of its own, copied into ``y``. A pixel's sum does not depend on which tile or band computes it, so the
    bits are those of one launch (``tests/test_kernels_conv2d.py`` forces bands on small images)."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    nb, c, h, wd = x.shape
    _, o, oh, ow = y.shape
    # a band reads (rows - 1) * sh + kh input rows: their span, by x's own strides (a channel slice of a channels-last
    # tensor steps further per row than its size says), must stay below the limit, as its output rows' must
    row_span = (c - 1) * abs(x.stride(1)) + (wd - 1) * abs(x.stride(3))
    in_rows = (_I32 - 1 - row_span) // max(abs(x.stride(2)), 1) + 1
    rows = min(oh, (in_rows - kh) // sh + 1, _I32 // (ow * o))
    if rows < 1:
        raise ValueError(f"x: one output row of this conv ({wd} x {c} input or {ow} x {o} output elements per row, "
                         f"{kh} filter rows) passes 2**31 elements; split the image")
    interp_bf16 = x.dtype == torch.bfloat16 and x.device.type != "cuda"
    dot_f32 = interp_bf16 or x.dtype == torch.float32
    for r in range(0, oh, rows):
        r_end = min(oh, r + rows)
        top = max(0, r * sh - ph)  # the band's first input row, and its share of the top padding
        xb = x[:, :, top:min(h, (r_end - 1) * sh - ph + kh)]
        yb = empty((nb, o, r_end - r, ow), torch.float32 if interp_bf16 else y.dtype, x.device, torch.channels_last)
        _launch(xb, wk, bias, yb, kh, kw, sh, sw, ph + top - r * sh, pw, dot_f32=dot_f32)
        y[:, :, r:r_end].copy_(yb)
    return y


def _launch(x, wk, bias, y, kh, kw, sh, sw, ph, pw, *, dot_f32: bool) -> None:
    nb, c, h, wd = x.shape
    _, o, oh, ow = y.shape
    prec = fp32_dot() if x.dtype == torch.float32 else "ieee"  # bf16 under the interpreter: exact products
    cfg = config(o, x.dtype, x.device, prec)
    tiles = cdiv(oh * ow, cfg["BLOCK_M"]) * cdiv(o, cfg["BLOCK_N"])
    bias_arg = bias if bias is not None else y
    for start in range(0, nb, MAX_GRID_YZ):
        stop = min(nb, start + MAX_GRID_YZ)
        x_, y_ = (x, y) if nb <= MAX_GRID_YZ else (x[start:stop], y[start:stop])  # one launch: no views
        # a single batch item never steps its batch stride; 0 keeps Triton's divisibility-16 specialization
        sxb, syb = (0, 0) if stop - start == 1 else (x_.stride(0), y_.stride(0))
        conv2d_kernel[(tiles, stop - start)](
            x_, wk, bias_arg, y_,
            c, h, wd, o, oh, ow,
            sxb, x_.stride(2), x_.stride(3), x_.stride(1),
            wk.stride(1), wk.stride(0),  # stride_wk, stride_wo
            syb, y_.stride(1), y_.stride(2), y_.stride(3),
            sh, sw, ph, pw,
            KH=kh,
            KW=kw,
            HAS_BIAS=bias is not None,
            DOT_F32=dot_f32,
            F32_DOT=prec,
            BLOCK_M=cfg["BLOCK_M"],
            BLOCK_N=cfg["BLOCK_N"],
            BLOCK_K=cfg["BLOCK_K"],
            GROUP_M=cfg["GROUP_M"],
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
            enable_fp_fusion=FP_FUSION,
        )  # fmt: skip
