"""Literal torch math for the timestep-skip ops (ground truth for the tests)."""

from __future__ import annotations

import itertools
import math

import torch


def newton_extrapolate(history, timesteps, t: float) -> torch.Tensor:
    """The polynomial through ``(timesteps[i], history[i])`` evaluated at ``t``, by Newton divided
    differences in float64 (a different algorithm from the Lagrange weights the op uses)."""
    xs = [float(x) for x in timesteps]
    coef = [h.double() for h in history]
    n = len(xs)
    for level in range(1, n):
        for i in range(n - 1, level - 1, -1):
            coef[i] = (coef[i] - coef[i - 1]) / (xs[i] - xs[i - level])
    out = coef[n - 1]
    for i in range(n - 2, -1, -1):
        out = coef[i] + (t - xs[i]) * out
    return out


def forecast_reference(history, timesteps, t: float, order=1) -> torch.Tensor:
    """``order`` p in {1, 2, 3}: the degree-p polynomial through the last p + 1 points; ``"lagrange"``:
    the polynomial through all of them. Returned in float64."""
    k = len(history) if order == "lagrange" else int(order) + 1
    return newton_extrapolate(list(history)[-k:], list(timesteps)[-k:], t)


def relative_change_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Σ|a-b| / Σ|b|`` per item (dim 0), float64."""
    d = (a.double() - b.double()).abs().flatten(1).sum(1)
    n = b.double().abs().flatten(1).sum(1)
    return d / n


def relative_change_tiles(a: torch.Tensor, b: torch.Tensor, tile) -> torch.Tensor:
    """Per-tile ``Σ|a-b| / Σ|b|``: ``tile`` gives a size per non-batch dim (None = whole dim); returns
    float64 ``[B, n_1, ..., n_k]`` with ``n_i = ceil(size_i / tile_i)``."""
    sizes = a.shape[1:]
    tile = [s if (t is None or t <= 0 or t >= s) else t for s, t in zip(sizes, tile)]
    counts = [math.ceil(s / t) for s, t in zip(sizes, tile)]
    out = torch.zeros(a.shape[0], *counts, dtype=torch.float64)
    for idx in itertools.product(*[range(c) for c in counts]):
        sl = tuple(slice(i * t, (i + 1) * t) for i, t in zip(idx, tile))
        aa = a[(slice(None), *sl)]
        bb = b[(slice(None), *sl)]
        out[(slice(None), *idx)] = relative_change_reference(aa, bb)
    return out
