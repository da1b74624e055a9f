"""The torch path of ``forecast`` and ``relative_change``, and the host-side math both backends share: the
Lagrange weights and the tile view. fp32 math, one cast at the end."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def lagrange_weights(timesteps: list[float], t: float) -> list[float]:
    """``w_i = Π_{j≠i} (t - t_j) / (t_i - t_j)``: the value at ``t`` of the polynomial through the points is
    ``Σ_i w_i · h_i``. Float64 on the host."""
    w = []
    for i, ti in enumerate(timesteps):
        p = 1.0
        for j, tj in enumerate(timesteps):
            if j != i:
                p *= (t - tj) / (ti - tj)
        w.append(p)
    return w


def forecast(history: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    acc = history[0].float() * weights[0]
    for h, w in zip(history[1:], weights[1:]):
        acc = acc + h.float() * w
    return acc.to(history[0].dtype)


def tile_view(shape: tuple[int, ...], tile: list[int]) -> tuple[tuple[int, ...], tuple[int, ...], list[int]]:
    """Map the per-item shape ``shape`` (non-batch dims) and a tile size per dim (``<= 0`` or ``>= size``: the
    whole dim) onto a contiguous ``[S0, S1, S2, S3]`` view with box tiles ``[T0, T1, T2, T3]`` and the same
    tiles in the same (row-major) order. A dim followed by whole dims merges with them (its tiles stay
    contiguous), adjacent whole dims merge, and size-1 dims drop. Returns the view, the tile, and the tile
    count per original dim. Raises if more than four groups remain."""
    sizes = [int(s) for s in shape]
    tiles = [s if (t <= 0 or t >= s) else int(t) for s, t in zip(sizes, tile)]
    counts = [math.ceil(s / t) for s, t in zip(sizes, tiles)]
    groups: list[list[int]] = []
    for s, t in zip(sizes, tiles):
        if s == 1:
            continue
        if groups and t == s:
            groups[-1] = [groups[-1][0] * s, groups[-1][1] * s]
        else:
            groups.append([s, t])
    if len(groups) > 4:
        raise ValueError(
            f"tile: {list(tile)} on item shape {tuple(shape)} leaves {len(groups)} dim groups after merging "
            "whole dims into their left neighbour; at most 4 are supported (tile fewer dims)"
        )
    while len(groups) < 4:
        groups.insert(0, [1, 1])
    view = tuple(g[0] for g in groups)
    box = tuple(g[1] for g in groups)
    return view, box, counts  # type: ignore[return-value]


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    safe = torch.where(den > 0, den, torch.ones_like(den))
    inf_or_zero = torch.where(num > 0, torch.full_like(num, float("inf")), torch.zeros_like(num))
    return torch.where(den > 0, num / safe, inf_or_zero)


def relative_change(a: torch.Tensor, b: torch.Tensor, view=None, box=None):
    """Per-item (and, with ``view``/``box``, per-tile ``[B, n_tiles]``) ``Σ|a-b| / Σ|b|`` in fp32."""
    B = a.shape[0]
    af, bf = a.float(), b.float()
    diff, mag = (af - bf).abs(), bf.abs()
    if view is None:
        return _ratio(diff.reshape(B, -1).sum(1), mag.reshape(B, -1).sum(1)), None
    n = [math.ceil(s / t) for s, t in zip(view, box)]

    def tiles(x):
        x = x.reshape(B, *view)
        pad = []
        for s, t, c in reversed(list(zip(view, box, n))):
            pad += [0, c * t - s]
        x = F.pad(x, pad)
        x = x.view(B, n[0], box[0], n[1], box[1], n[2], box[2], n[3], box[3])
        return x.sum(dim=(2, 4, 6, 8)).reshape(B, -1)

    num, den = tiles(diff), tiles(mag)
    return _ratio(num.sum(1), den.sum(1)), _ratio(num, den)


def weights(timesteps: list[float], t: float, order: str) -> list[float]:
    """Per history entry, its weight in the forecast of ``order`` (``"1"``..``"3"`` or ``"lagrange"``): 0 for
    the entries the order does not use, else the Lagrange weights through the last ones. Unchecked (the public
    ``jetdet.ops.forecast_weights`` checks)."""
    k = len(timesteps)
    use = k if order == "lagrange" else int(order) + 1
    return [0.0] * (k - use) + lagrange_weights(timesteps[k - use:], t)


def used_terms(history: list[torch.Tensor], timesteps: list[float], t: float, order: str):
    """The history entries with a nonzero weight (contiguous) and their weights."""
    used = [(h.contiguous(), w) for h, w in zip(history, weights(timesteps, t, order)) if w != 0.0]
    used = used or [(history[0].contiguous(), 0.0)]
    return [h for h, _ in used], [w for _, w in used]


def tiled(a: torch.Tensor, tile: list[int]):
    """``(view, box, counts)`` of :func:`tile_view` for a non-empty ``tile``, else ``(None, None, [])``."""
    if not tile:
        return None, None, []
    return tile_view(tuple(a.shape[1:]), tile)


def per_tile_out(per_item: torch.Tensor, per_tile: torch.Tensor | None, counts: list[int]):
    """``relative_change``'s outputs: ``per_tile`` as ``[B, *counts]`` (``[B, 0]`` without tiles)."""
    if per_tile is None:
        return per_item, per_item.new_empty((per_item.shape[0], 0))
    return per_item, per_tile.view(per_item.shape[0], *counts)
