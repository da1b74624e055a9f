"""Host side of the row softmax / row sum / row mean kernels: config lookup keyed by the row length."""

from __future__ import annotations

import torch

from jetdet import configs
from jetdet.kernels._common import FP_FUSION, empty

from .kernel import softmax_kernel, sum_rows_kernel

OP = "reduce"
DEFAULT_CONFIG = {"BLOCK": 1024, "num_warps": 4}


def config(n: int, dtype: torch.dtype, device=None) -> dict:
    """Config keyed by the row length, never the number of rows."""
    return configs.get_config(OP, n, dtype=dtype, device=device, default=DEFAULT_CONFIG)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x


def softmax(x) -> torch.Tensor:
    """Numerically stable softmax over the last dim of ``x [R, C]`` (leading dims flattened), fp32
    inside, returned in x.dtype. A row of all -inf, or holding NaN or +inf, is NaN, like torch.softmax."""
    x2 = _rows(x)
    out = empty(x.shape, x.dtype, x.device)
    o2 = out.view(x2.shape)
    if x2.shape[0]:
        cfg = config(x2.shape[1], x.dtype, x.device)
        softmax_kernel[(x2.shape[0],)](
            x2, o2, *x2.stride(), *o2.stride(), x2.shape[1], BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"],
            enable_fp_fusion=FP_FUSION,
        )
    return out


def _sum(x, mean: bool) -> torch.Tensor:
    x2 = _rows(x)
    out = empty(x.shape[:-1], x.dtype, x.device)
    if x2.shape[0]:
        cfg = config(x2.shape[1], x.dtype, x.device)
        sum_rows_kernel[(x2.shape[0],)](
            x2, out, *x2.stride(), x2.shape[1], MEAN=mean, BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"],
            enable_fp_fusion=FP_FUSION,
        )
    return out


def sum_rows(x) -> torch.Tensor:
    """Sum over the last dim of ``x [R, C]`` -> ``[R]`` in x.dtype, fp32 accumulation in a fixed order."""
    return _sum(x, mean=False)


def mean_rows(x) -> torch.Tensor:
    """Mean over the last dim of ``x [R, C]`` -> ``[R]`` in x.dtype (fp32 sum divided by C; NaN for C = 0)."""
    return _sum(x, mean=True)
