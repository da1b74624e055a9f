"""The batch-invariant torch path of layer/rms/group norm (row-wise torch kernels, >= 2 rows; see
``reduce/torch_path.py``)."""

from __future__ import annotations

import torch

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
    xf = f32(x).contiguous()
    w, b = f32(weight), f32(bias)
    if x.shape[0] == 1:  # same single-output guard as the row reductions
        xf2 = torch.cat([xf, xf.new_zeros(xf.shape)])
        return rows_back(torch.group_norm(xf2, num_groups, w, b, eps), 1, x.dtype)
    return rows_back(torch.group_norm(xf, num_groups, w, b, eps), x.shape[0], x.dtype)
