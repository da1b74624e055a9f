"""The op this folder serves, ``jetdet::depthwise_conv2d``, and its public wrapper ``jetdet.ops.depthwise_conv2d``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jetdet.kernels._common import out_memory_format
from jetdet.ops._checks import check_same, check_shape, check_tensor
from jetdet.ops.spec import OpSpec

from ..conv2d.op import out_size
from . import reference as R
from . import torch_path as T


def _pair(name, v):
    p = (v, v) if type(v) is int else tuple(v) if isinstance(v, (tuple, list)) else None
    if p is None or len(p) != 2 or not all(type(i) is int for i in p):
        raise TypeError(f"{name}: expected an int or a pair of ints, got {v!r}")
    return p


def depthwise_conv2d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1,
                     padding=0) -> torch.Tensor:
    """Like ``F.conv2d(input, weight, bias, stride, padding, groups=C)`` with ``input [B, C, H, W]`` (NCHW or
    channels-last; the output keeps the layout) and ``weight [M*C, 1, KH, KW]`` (``M`` outputs per input
    channel), zero padding. Batch invariant: output item b depends only on input item b, with the same tap order
    for every item."""
    check_tensor("input", input, ndim=4)
    check_tensor("weight", weight, ndim=4)
    check_same("weight", weight, "input", input)
    c = input.shape[1]
    if weight.shape[1] != 1 or c == 0 or weight.shape[0] % c:
        raise ValueError(f"weight: expected [M * {c}, 1, KH, KW] (one input channel per filter, M >= 1 filters "
                         f"per channel), got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        check_same("bias", bias, "input", input)
        check_shape("bias", bias, (weight.shape[0],), "one value per output channel")
    s, p = _pair("stride", stride), _pair("padding", padding)
    if min(s) < 1 or min(p) < 0:
        raise ValueError(f"stride, padding: expected stride >= 1 and padding >= 0, got {stride}, {padding}")
    if min(out_size(input, weight, s, p)) < 1:
        raise ValueError(f"input: spatial size {tuple(input.shape[2:])} is too small for kernel "
                         f"{tuple(weight.shape[2:])} with padding {p}")
    if input.numel() == 0 or weight.numel() == 0:
        return _fake(input, weight, bias, s, p).zero_()
    return _op()(input, weight, bias, list(s), list(p))


def _op():
    from jetdet.ops import registry

    return registry.get("depthwise_conv2d")


def _fake(x, w, bias, stride, padding):
    return torch.empty((x.shape[0], w.shape[0], *out_size(x, w, stride, padding)), dtype=x.dtype, device=x.device,
                       memory_format=out_memory_format(x))


def _torch(x, w, bias, stride, padding):
    return T.depthwise_conv2d(x, w, bias, tuple(stride), tuple(padding)).contiguous(
        memory_format=out_memory_format(x))


def _triton(x, w, bias, stride, padding):
    from . import launch

    return launch.depthwise_conv2d(x, w, bias, tuple(stride), tuple(padding))


def _sample(batch, dtype, gen):
    x = torch.randn(batch, 6, 9, 11, generator=gen).to(dtype)
    w = (torch.randn(12, 1, 3, 3, generator=gen) * 0.3).to(dtype)
    return x, w, torch.randn(12, generator=gen).to(dtype), [1, 2], [1, 0]


SPECS = (
    OpSpec(name="depthwise_conv2d",
           schema="(Tensor x, Tensor w, Tensor? bias, int[] stride, int[] padding) -> Tensor",
           fake=_fake, torch_path=_torch, launcher=_triton, reference=R.depthwise_conv2d_reference,
           folder="depthwise_conv2d", sample=_sample, public="depthwise_conv2d", wrapper=depthwise_conv2d,
           routed=(F.conv1d, F.conv2d, F.conv3d)),
)
