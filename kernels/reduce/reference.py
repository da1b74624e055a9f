"""Literal fp32 row softmax / sum / mean, the ground truth for the kernels' tests. All return fp32."""

from __future__ import annotations

import torch


def softmax_reference(x) -> torch.Tensor:
    return torch.softmax(x.float(), dim=-1)


def sum_reference(x) -> torch.Tensor:
    return x.float().sum(dim=-1)


def mean_reference(x) -> torch.Tensor:
    return x.float().mean(dim=-1)
