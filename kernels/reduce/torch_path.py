"""The batch-invariant torch path of the row reductions (softmax, sum, mean): torch's row-wise CPU kernels,
which reduce each row serially in an order fixed by the row length, kept to >= 2 output rows (torch splits a
reduction across threads only when it has a single output). fp16/bf16 in fp32, rounded once."""

from __future__ import annotations

import torch

from ..matmul.torch_path import f32


def at_least_two_rows(x2d: torch.Tensor):
    """torch splits a reduction across threads only when there is a single output; keep >= 2 rows. And rows
    contiguous: torch reduces a strided row in another order than a contiguous one, and the ``[B * K, N]`` view of
    a permuted input (a sum over dim 1, an rms_norm of a transposed tensor) is strided at one batch size and a
    contiguous copy at another."""
    x2d = x2d.contiguous()
    if x2d.shape[0] == 1:
        return torch.cat([x2d, x2d.new_zeros(1, x2d.shape[1])]), 1
    return x2d, x2d.shape[0]


def rows_back(out: torch.Tensor, r: int, dtype, memory_format: torch.memory_format | None = None) -> torch.Tensor:
    """The first r rows (when a guard row was added), in the caller's dtype, and in ``memory_format`` when given
    (dtype and layout in one copy, none when both already match)."""
    if out.shape[0] != r:
        out = out[:r]
    if memory_format is not None:
        return out.to(dtype, memory_format=memory_format)
    return out if out.dtype == dtype else out.to(dtype)


def softmax(x):
    xf, r = at_least_two_rows(f32(x))
    return rows_back(torch.softmax(xf, dim=-1), r, x.dtype)


def sum_rows(x):
    xf, r = at_least_two_rows(f32(x))
    return rows_back(xf.sum(dim=-1), r, x.dtype)


def mean_rows(x):
    xf, r = at_least_two_rows(f32(x))
    return rows_back(xf.mean(dim=-1), r, x.dtype)
