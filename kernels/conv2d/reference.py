"""Literal fp32 reference for the conv2d kernel (ground truth for tests)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def conv2d_reference(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
) -> torch.Tensor:
    """x [B, C, H, W], w [O, C, kh, kw], bias [O] or None -> fp32 [B, O, OH, OW], computed in fp32."""
    return F.conv2d(
        x.float(),
        w.float(),
        None if bias is None else bias.float(),
        stride=tuple(stride),
        padding=tuple(padding),
    )
