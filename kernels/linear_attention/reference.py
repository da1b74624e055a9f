"""Literal fp32 torch math for bidirectional linear attention (the ground truth for the tests)."""

from __future__ import annotations

import torch


def feature_map(x: torch.Tensor, name: str) -> torch.Tensor:
    x = x.float()
    if name == "relu":
        return torch.relu(x)
    if name == "elu1":
        return torch.nn.functional.elu(x) + 1.0
    if name == "identity":
        return x
    raise ValueError(name)


def linear_attention_state_reference(k: torch.Tensor, v: torch.Tensor, feature_map_name: str = "relu"):
    """``(φ(K)ᵀV [B, H, D, Dv], φ(K)ᵀ1 [B, H, D])``, fp32."""
    pk = feature_map(k, feature_map_name)
    return torch.einsum("bhnd,bhne->bhde", pk, v.float()), pk.sum(dim=2)


def linear_attention_apply_reference(
    q: torch.Tensor, kv: torch.Tensor, k_sum: torch.Tensor, feature_map_name: str = "relu", eps: float = 1e-6
) -> torch.Tensor:
    pq = feature_map(q, feature_map_name)
    num = torch.einsum("bhnd,bhde->bhne", pq, kv.float())
    den = torch.einsum("bhnd,bhd->bhn", pq, k_sum.float()) + eps
    return num / den[..., None]


def linear_attention_reference(q, k, v, feature_map_name: str = "relu", eps: float = 1e-6) -> torch.Tensor:
    """fp32 ``φ(Q)·(φ(K)ᵀV) / (φ(Q)·(φ(K)ᵀ1) + eps)``, q ``[B, H, N, D]``, k ``[B, H, M, D]``,
    v ``[B, H, M, Dv]``."""
    kv, ks = linear_attention_state_reference(k, v, feature_map_name)
    return linear_attention_apply_reference(q, kv, ks, feature_map_name, eps)


def softmax_attention(q, k, v, scale: float | None = None) -> torch.Tensor:
    """Dense fp32 softmax attention, the model that linear attention approximates."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bhnd,bhmd->bhnm", q.float(), k.float()) * scale
    return torch.einsum("bhnm,bhme->bhne", s.softmax(dim=-1), v.float())
