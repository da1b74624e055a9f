"""Host side of the gated-GELU kernel: one program per (row, BLOCK columns)."""

from __future__ import annotations

import torch

from jetdet.kernels._common import FP_FUSION, cdiv, empty

from .kernel import gelu_gate_kernel

BLOCK = 1024
NUM_WARPS = 4


def gelu_gate(h: torch.Tensor, approximate: str) -> torch.Tensor:
    """``h [..., 2H]`` -> ``[..., H]`` in ``h.dtype``: ``x * gelu(gate)``, ``x, gate = h.chunk(2, -1)``."""
    two_h = h.shape[-1]
    n = two_h // 2
    rows = h.reshape(-1, two_h)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = empty((rows.shape[0], n), h.dtype, h.device)
    if rows.shape[0] and n:
        grid = (rows.shape[0], cdiv(n, BLOCK))
        gelu_gate_kernel[grid](rows, out, rows.stride(0), out.stride(0), n, APPROX_TANH=approximate == "tanh",
                               BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION)
    return out.reshape(*h.shape[:-1], n)
