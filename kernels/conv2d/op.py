"""The op this folder serves (``jetdet::conv2d``), for :mod:`jetdet.ops.registry`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jetdet.kernels._common import out_memory_format
from jetdet.ops.spec import OpSpec

from . import reference as R
from . import torch_path as T


def out_size(x, w, stride, padding) -> tuple[int, int]:
    """The output height and width of a conv2d."""
    ho = (x.shape[2] + 2 * padding[0] - w.shape[2]) // stride[0] + 1
    wo = (x.shape[3] + 2 * padding[1] - w.shape[3]) // stride[1] + 1
    return ho, wo


def _fake(x, w, bias, stride, padding):
    shape = (x.shape[0], w.shape[0], *out_size(x, w, stride, padding))
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=out_memory_format(x))


def _torch(x, w, bias, stride, padding):
    # the torch path's output is contiguous NCHW; to contiguous_format this is a no-op
    return T.conv2d(x, w, bias, tuple(stride), tuple(padding)).contiguous(memory_format=out_memory_format(x))


def _triton(x, w, bias, stride, padding):
    from . import launch

    return launch.conv2d(x, w, bias, tuple(stride), tuple(padding))


def _sample(batch, dtype, gen):
    x = torch.randn(batch, 5, 9, 11, generator=gen).to(dtype)
    w = torch.randn(12, 5, 3, 3, generator=gen).to(dtype)
    return x, w, torch.randn(12, generator=gen).to(dtype), [1, 2], [1, 0]


SPECS = (
    OpSpec(name="conv2d",
           schema="(Tensor x, Tensor w, Tensor? bias, int[] stride, int[] padding) -> Tensor",
           fake=_fake, torch_path=_torch, launcher=_triton, reference=R.conv2d_reference, folder="conv2d",
           sample=_sample, table="conv2d",
           routed=(torch.conv1d, F.conv1d, torch.conv2d, F.conv2d, torch.conv3d, F.conv3d, F.conv_transpose1d,
                   F.conv_transpose2d, F.conv_transpose3d),
           public="conv2d"),
)
