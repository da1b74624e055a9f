"""Argument validation shared by the ops. Every error names the argument and what was expected."""

from __future__ import annotations

import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dn(dtypes) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name: str, t, *, ndim=None, min_ndim=None, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {_dn(dtypes)}, got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(
                f"{name}: expected {' or '.join(map(str, allowed))} dims, got shape {tuple(t.shape)}"
            )
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dims, got shape {tuple(t.shape)}")
    return t


def check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, *, dtype=True) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (like {ref_name}), got {t.device}")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (like {ref_name}), got {t.dtype}")


def check_shape(name: str, t: torch.Tensor, shape, what: str = "") -> None:
    if tuple(t.shape) != tuple(shape):
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name}: expected shape {tuple(shape)}{extra}, got {tuple(t.shape)}")


def pair(name: str, v) -> tuple[int, int]:
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        v = (v, v)
    if not isinstance(v, (tuple, list, torch.Size)) or len(v) != 2 or not all(
            isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in v):
        raise ValueError(f"{name}: expected an int or a pair of ints, got {v!r}")
    return tuple(int(x) for x in v)


def number(name: str, v) -> float:
    """``v`` as a float, or a TypeError naming ``name`` (an ``eps`` of ``'x'`` said "could not convert string")."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {v!r}")
    return float(v)
