"""Literal fp32 references for the GEMM kernels (ground truth for tests)."""

from __future__ import annotations

import torch


def matmul_ref(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, K], b [K, N], bias [N] or None -> fp32 [M, N] = a @ b + bias, computed in fp32."""
    out = a.float() @ b.float()
    if bias is not None:
        out = out + bias.float()
    return out


def bmm_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [B, M, K], b [B, K, N] -> fp32 [B, M, N], computed in fp32."""
    return torch.bmm(a.float(), b.float())
