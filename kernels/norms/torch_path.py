"""The batch-invariant torch path of layer/rms/group norm (row-wise torch kernels, >= 2 rows; see
``reduce/torch_path.py``)."""

from __future__ import annotations

import torch

from .._common import out_memory_format
from ..matmul.torch_path import f32
from ..reduce.torch_path import at_least_two_rows, rows_back


def layer_norm(x, weight, bias, eps):
    xf, r = at_least_two_rows(f32(x))
    # torch.layer_norm, not F.layer_norm: the same kernel without F's Python checks (~2 us a call)
    return rows_back(torch.layer_norm(xf, (xf.shape[-1],), f32(weight), f32(bias), eps), r, x.dtype)


def rms_norm(x, weight, eps):
    xf, r = at_least_two_rows(f32(x))
    ms = (xf * xf).mean(dim=-1, keepdim=True)
    out = (xf * torch.rsqrt(ms + eps))[:r]
    if weight is not None:
        out = out * f32(weight)
    return out.to(x.dtype).contiguous()  # the layout the fake (and the Triton path) gives


def group_norm(x, num_groups, weight, bias, eps):
    """torch's group norm on a contiguous fp32 copy of ``x [B, C, *spatial]`` (its NCHW kernel: one
    (sample, group) is one contiguous row; torch's channels-last kernel is not used), returned in x's layout
    (:func:`~jetdet.kernels._common.out_memory_format`: channels-last for channels-last 4-D input) and dtype
    with one copy."""
    xf = f32(x).contiguous()
    w, b = f32(weight), f32(bias)
    r = x.shape[0]
    if r == 1:  # same single-output guard as the row reductions
        xf = torch.cat([xf, xf.new_zeros(xf.shape)])
    # as [B, C, L]: a 4-D tensor with C = 1 or H = W = 1 counts as contiguous in both layouts, and torch would pick
    # its channels-last kernel for channels-last strides (a batch) but not for a fresh copy (an item alone: the
    # torch.cat above), which round differently; a 3-D view always takes the NCHW kernel, the same one as before
    y = torch.group_norm(xf.reshape(xf.shape[0], xf.shape[1], -1), num_groups, w, b, eps).reshape(xf.shape)
    # no copy for contiguous output in x's dtype (the NCHW fp32 case)
    return rows_back(y, r, x.dtype, out_memory_format(x))
