"""Literal fp32 norms, the ground truth for the kernels' tests. All return fp32."""

from __future__ import annotations

import torch


def layer_norm_reference(x, weight=None, bias=None, eps=1e-5) -> torch.Tensor:
    xf = x.float()
    mean = xf.mean(dim=-1, keepdim=True)
    var = ((xf - mean) ** 2).mean(dim=-1, keepdim=True)
    y = (xf - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y


def rms_norm_reference(x, weight=None, eps=1e-6) -> torch.Tensor:
    xf = x.float()
    y = xf / torch.sqrt((xf * xf).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y


def group_norm_reference(x, num_groups, weight=None, bias=None, eps=1e-5) -> torch.Tensor:
    bsz, chans = x.shape[0], x.shape[1]
    xg = x.float().reshape(bsz, num_groups, -1)
    mean = xg.mean(dim=-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(dim=-1, keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    affine_shape = (1, chans) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.float().reshape(affine_shape)
    if bias is not None:
        y = y + bias.float().reshape(affine_shape)
    return y
