"""The torch path of linear attention (CPU, or ``JETDET_BACKEND=torch``): fp32 math, one cast at the end."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def phi(x: torch.Tensor, feature_map: str) -> torch.Tensor:
    x = x.float()
    if feature_map == "relu":
        return torch.relu(x)
    if feature_map == "elu1":
        return F.elu(x) + 1.0
    return x


def linear_attention_state(k: torch.Tensor, v: torch.Tensor, feature_map: str):
    pk = phi(k, feature_map)
    return torch.matmul(pk.transpose(-1, -2), v.float()).contiguous(), pk.sum(dim=2)


def linear_attention_apply(q, kv, k_sum, feature_map: str, eps: float) -> torch.Tensor:
    pq = phi(q, feature_map)
    num = torch.matmul(pq, kv.float())
    den = torch.matmul(pq, k_sum.float().unsqueeze(-1)) + eps
    return (num / den).to(q.dtype)
