"""Literal fp32 gated GELU, the ground truth for the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gelu_gate_reference(h: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``h [..., 2H]`` -> fp32 ``x * gelu(gate)`` with ``x, gate = h.chunk(2, -1)``."""
    x, gate = h.float().chunk(2, dim=-1)
    return x * F.gelu(gate, approximate=approximate)
