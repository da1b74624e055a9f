"""Host side of the TMA-fed conv2d (``kernel_tma.py``): the switch, eligibility, config, descriptors, launch.

Opt-in and not the default: ``JETDET_CONV_KERNEL=tma`` makes ``launch.conv2d`` send eligible calls here, so that
``bench/gpu_check.py`` can time it beside the default kernel. It becomes the default only after a GPU has measured it.

Eligible: fp16/bf16 convs with stride 1 whose input and output channel counts are multiples of 8 (16-byte pixel rows,
which a descriptor needs): SD-type UNets' and VAEs' 3x3 and 1x1 convs, not their 4-channel latent convs. That
depends on the dtype, the stride and the channel counts, never on the batch or the strides of the tensors: an input
a descriptor cannot read is read from a channels-last copy, and an NCHW output is written through a channels-last
one (same values, same bits). The tile is fixed per output-channel class (never chosen by the image or the batch);
the K loop is whole and in order; no split-K, no atomics. On sm_90 the loads are TMA (``UTMALDG``) and the dots
warpgroup MMA (``HGMMA``); the static report checks both, and that it does not spill (``specs.tma_specs``).
"""

from __future__ import annotations

import torch

from jetdet.kernels._common import FP_FUSION, MAX_GRID_YZ, cdiv, descriptor_strides, empty, tensor_descriptor

from .kernel_tma import conv2d_tma_kernel

#: ``default`` or ``tma`` (this kernel, for eligible calls; ``kernels._common.kernel_choice``)
KERNEL_ENV = "JETDET_CONV_KERNEL"
# one tile per output-channel class: never a function of the image size or the batch. 8 x 16 output pixels per
# program (a patch of one image), BLOCK_N output channels, BLOCK_K input channels per step
CONFIGS = {
    "o<=64": dict(BLOCK_H=8, BLOCK_W=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
    "o>64": dict(BLOCK_H=8, BLOCK_W=16, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
}
_DTYPES = (torch.float16, torch.bfloat16)


def eligible(dtype: torch.dtype, in_channels: int, out_channels: int, stride: tuple[int, int]) -> bool:
    """Whether a conv can run on the TMA kernel (see the module docstring). Independent of the batch and strides."""
    return dtype in _DTYPES and tuple(stride) == (1, 1) and in_channels % 8 == 0 and out_channels % 8 == 0


def config(out_channels: int) -> dict:
    return CONFIGS["o<=64" if out_channels <= 64 else "o>64"]


def _nhwc(t: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """``[N, C, H, W]`` as the ``[N, H, W, C]`` view a descriptor reads (of a channels-last copy when needed: the same
    values), and its descriptor strides."""
    v = t.permute(0, 2, 3, 1)
    strides = descriptor_strides(v)
    if strides is None:
        v = t.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        strides = descriptor_strides(v)
    return v, strides


def conv2d_tma(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, padding: tuple[int, int],
               dot_f32: bool) -> torch.Tensor:  # fmt: skip
    """Stride-1 conv of x ``[B, C, H, W]`` with w ``[O, C, KH, KW]`` (+ bias ``[O]``) into y ``[B, O, OH, OW]``
    (any layouts; :func:`eligible`). ``dot_f32``: fp32 operands with IEEE dots (bf16 under the interpreter)."""
    o, _, kh, kw = w.shape
    nb, _, oh, ow = y.shape
    cfg = config(o)
    bh, bw, bn, bk = cfg["BLOCK_H"], cfg["BLOCK_W"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    # written channels-last: into y when it is (and can take a descriptor), else into a channels-last buffer copied
    # to y after (fp32 under the interpreter, which truncates fp32 -> bf16 where a GPU rounds to nearest)
    interp_bf16 = y.dtype == torch.bfloat16 and y.device.type != "cuda"
    y4 = y.permute(0, 2, 3, 1)
    y_strides = None if interp_bf16 else descriptor_strides(y4)
    direct = y_strides is not None
    if not direct:
        dt = torch.float32 if interp_bf16 else y.dtype
        y4 = empty((nb, o, oh, ow), dt, y.device, torch.channels_last).permute(0, 2, 3, 1)
        y_strides = descriptor_strides(y4)
    (x4, x_strides), (w4, w_strides) = _nhwc(x), _nhwc(w)
    desc = tensor_descriptor(KERNEL_ENV)
    wd = desc(w4, list(w4.shape), w_strides, [bn, 1, 1, bk])
    tiles = cdiv(oh, bh) * cdiv(ow, bw) * cdiv(o, bn)
    for start in range(0, nb, MAX_GRID_YZ):  # the grid's item axis is at most 65535: the same programs per item
        stop = min(nb, start + MAX_GRID_YZ)
        xs, ys = x4[start:stop], y4[start:stop]
        conv2d_tma_kernel[(tiles, stop - start)](
            # a slice of the batch keeps the tensor's strides (a size-1 batch's stride is never stepped)
            desc(xs, list(xs.shape), x_strides, [1, bh, bw, bk]), wd,
            desc(ys, list(ys.shape), y_strides, [1, bh, bw, bn]),
            bias if bias is not None else y4,
            x.shape[1], o, oh, ow, int(padding[0]), int(padding[1]),
            KH=kh,
            KW=kw,
            HAS_BIAS=bias is not None,
            DOT_F32=dot_f32,
            BLOCK_H=bh,
            BLOCK_W=bw,
            BLOCK_N=bn,
            BLOCK_K=bk,
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"], enable_fp_fusion=FP_FUSION,
        )  # fmt: skip
    if not direct:
        y.copy_(y4.permute(0, 3, 1, 2))
    return y
