"""The op this folder serves (``jetdet::attention``), for :mod:`jetdet.ops.registry`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jetdet.ops.spec import OpSpec

from . import reference as R
from . import torch_path as T


def _sample(batch, dtype, gen):
    q = torch.randn(batch, 2, 13, 16, generator=gen).to(dtype)
    k = torch.randn(batch, 2, 21, 16, generator=gen).to(dtype)
    v = torch.randn(batch, 2, 21, 8, generator=gen).to(dtype)
    mask = torch.randn(1, 2, 13, 21, generator=gen)
    return q, k, v, mask, 0.3


SPECS = (
    OpSpec(name="attention",
           schema="(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor",
           fake=lambda q, k, v, mask, scale: q.new_empty(*q.shape[:-1], v.shape[-1]),
           torch_path=T.attention, launcher="attention", reference=R.attention_reference, folder="attention",
           sample=_sample, batched=(0, 1, 2), table="attention", routed=(F.scaled_dot_product_attention,),
           public="attention"),
)
