"""Literal fp32 references for the GEMM kernels (ground truth for tests)."""

from __future__ import annotations

import torch


def mm_reference(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, K], b [K, N], bias [N] or None -> fp32 [M, N] = a @ b + bias, computed in fp32."""
    out = a.float() @ b.float()
    if bias is not None:
        out = out + bias.float()
    return out


def bmm_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [B, M, K], b [B, K, N] -> fp32 [B, M, N], computed in fp32."""
    return torch.bmm(a.float(), b.float())


def linear_reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K], w [N, K], bias [N] or None -> fp32 [..., N] = x @ w.T + bias, computed in fp32."""
    out = x.float() @ w.float().t()
    if bias is not None:
        out = out + bias.float()
    return out


def addmm_reference(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float = 1.0,
                    alpha: float = 1.0) -> torch.Tensor:
    """``beta * c + alpha * (a @ b)`` in fp32."""
    return beta * c.float() + alpha * (a.float() @ b.float())
