"""The ops this folder serves (``jetdet::layer_norm``, ``rms_norm``, ``group_norm``), for
:mod:`jetdet.ops.registry`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jetdet.kernels._common import out_memory_format
from jetdet.ops.spec import OpSpec

from . import reference as R
from . import torch_path as T


def _rows(batch, dtype, gen):
    return torch.randn(batch, 37, generator=gen).to(dtype) * 3 + 1, torch.randn(37, generator=gen).to(dtype)


def _ln_sample(batch, dtype, gen):
    x, w = _rows(batch, dtype, gen)
    return x, w, torch.randn(37, generator=gen).to(dtype), 1e-5


def _rms_sample(batch, dtype, gen):
    x, w = _rows(batch, dtype, gen)
    return x, w, 1e-6


def _gn_sample(batch, dtype, gen):
    x = torch.randn(batch, 6, 25, generator=gen).to(dtype) * 2 - 1
    return x, 3, torch.randn(6, generator=gen).to(dtype), torch.randn(6, generator=gen).to(dtype), 1e-5


def _gn_fake(x, num_groups, weight, bias, eps):
    # both paths return x's layout: channels-last for channels-last 4-D input (torch.compile trusts these strides)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=out_memory_format(x))


_LN = (F.layer_norm, torch.layer_norm)
_RMS = tuple(f for f in (getattr(F, "rms_norm", None), getattr(torch, "rms_norm", None)) if f is not None)

SPECS = (
    OpSpec(name="layer_norm", schema="(Tensor x, Tensor? weight, Tensor? bias, float eps) -> Tensor",
           fake=lambda x, weight, bias, eps: x.new_empty(x.shape), torch_path=T.layer_norm, launcher="layer_norm",
           reference=R.layer_norm_reference, folder="norms", sample=_ln_sample, table="norms", routed=_LN,
           public="layer_norm"),
    OpSpec(name="rms_norm", schema="(Tensor x, Tensor? weight, float eps) -> Tensor",
           fake=lambda x, weight, eps: x.new_empty(x.shape), torch_path=T.rms_norm, launcher="rms_norm",
           reference=R.rms_norm_reference, folder="norms", sample=_rms_sample, table="norms", routed=_RMS,
           public="rms_norm"),
    OpSpec(name="group_norm",
           schema="(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps) -> Tensor",
           fake=_gn_fake, torch_path=T.group_norm,
           launcher="group_norm", reference=R.group_norm_reference, folder="norms", sample=_gn_sample,
           table="norms", routed=(F.group_norm, torch.group_norm), public="group_norm"),
)
