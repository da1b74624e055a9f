"""The ops this folder serves (``jetdet::softmax``, ``sum``, ``mean``: row reductions), for
:mod:`jetdet.ops.registry`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jetdet.ops.spec import OpSpec

from . import reference as R
from . import torch_path as T


def _sample(batch, dtype, gen):
    return (torch.randn(batch, 53, generator=gen).to(dtype) * 4,)


SPECS = (
    OpSpec(name="softmax", schema="(Tensor x) -> Tensor", fake=lambda x: x.new_empty(x.shape),
           torch_path=T.softmax, launcher="softmax", reference=R.softmax_reference, folder="reduce",
           sample=_sample, table="reduce", routed=(F.softmax, torch.softmax, torch.Tensor.softmax),
           public="softmax"),
    OpSpec(name="sum", schema="(Tensor x) -> Tensor", fake=lambda x: x.new_empty(x.shape[0]),
           torch_path=T.sum_rows, launcher="sum_rows", reference=R.sum_reference, folder="reduce",
           sample=_sample, table="reduce", public="sum"),
    OpSpec(name="mean", schema="(Tensor x) -> Tensor", fake=lambda x: x.new_empty(x.shape[0]),
           torch_path=T.mean_rows, launcher="mean_rows", reference=R.mean_reference, folder="reduce",
           sample=_sample, table="reduce", public="mean"),
)
