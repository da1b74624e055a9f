"""The ops this folder serves (``jetdet::linear_attention``, ``linear_attention_state``,
``linear_attention_apply``), for :mod:`jetdet.ops.registry`."""

from __future__ import annotations

import torch

from jetdet.ops.spec import OpSpec

from . import reference as R
from . import torch_path as T


def _la_torch(q, k, v, feature_map, eps):
    kv, ks = T.linear_attention_state(k, v, feature_map)
    return T.linear_attention_apply(q, kv, ks, feature_map, eps)


def _la_triton(q, k, v, feature_map, eps):
    from . import launch

    kv, ks = launch.state(k, v, feature_map)
    return launch.apply(q, kv, ks, feature_map, eps)


def _apply_triton(q, kv, k_sum, feature_map, eps):
    from . import launch

    return launch.apply(q, kv.contiguous(), k_sum.contiguous(), feature_map, eps)


def _qkv(batch, dtype, gen):
    return tuple(torch.randn(batch, 2, n, 16, generator=gen).to(dtype) for n in (9, 14, 14))


def _state_fake(k, v, feature_map):
    B, H, _, D = k.shape
    return (k.new_empty((B, H, D, v.shape[-1]), dtype=torch.float32), k.new_empty((B, H, D), dtype=torch.float32))


def _apply_sample(batch, dtype, gen):
    q, k, v = _qkv(batch, dtype, gen)
    kv, ks = R.linear_attention_state_reference(k, v, "elu1")
    return q, kv, ks, "elu1", 1e-6


SPECS = (
    OpSpec(name="linear_attention", schema="(Tensor q, Tensor k, Tensor v, str feature_map, float eps) -> Tensor",
           fake=lambda q, k, v, feature_map, eps: q.new_empty((*q.shape[:3], v.shape[-1])), torch_path=_la_torch,
           launcher=_la_triton, reference=R.linear_attention_reference, folder="linear_attention",
           sample=lambda b, dt, g: (*_qkv(b, dt, g), "relu", 1e-6), batched=(0, 1, 2), table="linear_attention",
           public="linear_attention"),
    OpSpec(name="linear_attention_state", schema="(Tensor k, Tensor v, str feature_map) -> (Tensor, Tensor)",
           fake=_state_fake, torch_path=T.linear_attention_state, launcher="state",
           reference=R.linear_attention_state_reference,
           folder="linear_attention", sample=lambda b, dt, g: (*_qkv(b, dt, g)[1:], "elu1"), batched=(0, 1),
           table="linear_attention", public="linear_attention"),
    OpSpec(name="linear_attention_apply",
           schema="(Tensor q, Tensor kv, Tensor k_sum, str feature_map, float eps) -> Tensor",
           fake=lambda q, kv, k_sum, feature_map, eps: q.new_empty((*q.shape[:3], kv.shape[-1])),
           torch_path=T.linear_attention_apply, launcher=_apply_triton, reference=R.linear_attention_apply_reference,
           folder="linear_attention", sample=_apply_sample, batched=(0, 1, 2), table="linear_attention",
           public="linear_attention"),
)
