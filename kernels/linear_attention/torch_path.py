"""The torch path of linear attention (CPU, or ``JETDET_BACKEND=torch``): fp32 math, one cast at the end. The
products go through the matmul path's row-tiled ``bmm_f32``, so an item's result does not depend on its batch
(plain ``torch.matmul`` did: a helper's sweep found 170 of 768 cases differing, up to 2e-3 in fp16)."""

from __future__ import annotations

import torch

from ..matmul.torch_path import bmm_f32


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` over leading dims ``[..., M, K] @ [..., K, N]`` in fixed row tiles."""
    lead = a.shape[:-2]
    out = bmm_f32(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
    return out.reshape(*lead, a.shape[-2], b.shape[-1])


def phi(x: torch.Tensor, feature_map: str) -> torch.Tensor:
    x = x.float()
    if feature_map == "relu":
        return torch.relu(x)
    if feature_map == "elu1":  # elu(x) + 1 from exp, which is exact per element on CPU (torch's elu kernel is not:
        return torch.where(x > 0, x + 1.0, torch.exp(x))  # its scalar tail rounds otherwise, jetdet/mode.py _h_act)
    return x


def linear_attention_state(k: torch.Tensor, v: torch.Tensor, feature_map: str):
    pk = phi(k, feature_map)
    return _bmm(pk.transpose(-1, -2), v.float()).contiguous(), pk.sum(dim=2)


def linear_attention_apply(q, kv, k_sum, feature_map: str, eps: float) -> torch.Tensor:
    pq = phi(q, feature_map)
    num = _bmm(pq, kv.float())
    den = _bmm(pq, k_sum.float().unsqueeze(-1)) + eps
    return (num / den).to(q.dtype)
