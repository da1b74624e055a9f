"""Host side of the depthwise conv2d kernel: one program per (BLOCK_P output pixels, BLOCK_C channels, item)."""

from __future__ import annotations

import torch

from jetdet.kernels._common import MAX_GRID_YZ, cdiv, empty, out_memory_format

from ..conv2d.op import out_size
from .kernel import depthwise_conv2d_kernel

BLOCK_P = 64
BLOCK_C = 32
NUM_WARPS = 8
# Explicit: the accumulation ``acc += x * w`` contracts to one FMA per tap, the same instruction for every item
FP_FUSION = True


def depthwise_conv2d(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, int],
                     padding: tuple[int, int]) -> torch.Tensor:
    """``x [B, C, H, W]`` (any strides; NCHW and channels-last read in place), ``w [M*C, 1, KH, KW]``, bias
    ``[M*C]`` or None -> ``[B, M*C, HO, WO]`` in ``x``'s layout (:func:`out_memory_format`) and dtype."""
    nb, c, h, wd = x.shape
    co, _, kh, kw = w.shape
    sh, sw = (int(v) for v in stride)
    ph, pw = (int(v) for v in padding)
    ho, wo = out_size(x, w, (sh, sw), (ph, pw))
    assert co % c == 0 and ho >= 1 and wo >= 1, (tuple(x.shape), tuple(w.shape), stride, padding)
    y = empty((nb, co, ho, wo), x.dtype, x.device, out_memory_format(x))
    if y.numel() == 0:
        return y
    wc = w.reshape(co, kh * kw).contiguous()
    b = bias.contiguous() if bias is not None else wc  # a valid pointer, never read without HAS_BIAS
    for b0 in range(0, nb, MAX_GRID_YZ):  # the grid's item axis is at most 65535: the same programs per item
        xb, yb = x[b0:b0 + MAX_GRID_YZ], y[b0:b0 + MAX_GRID_YZ]
        grid = (cdiv(ho * wo, BLOCK_P), cdiv(co, BLOCK_C), xb.shape[0])
        depthwise_conv2d_kernel[grid](
            xb, wc, b, yb, h, wd, ho, wo, co, *xb.stride(), *yb.stride(), sh, sw, ph, pw,
            MULT=co // c, KH=kh, KW=kw, HAS_BIAS=bias is not None, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C,
            num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION)
    return y
