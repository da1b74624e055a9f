"""The ops this folder serves (``jetdet::forecast``, ``jetdet::relative_change``), for :mod:`jetdet.ops.registry`."""

from __future__ import annotations

import torch

from jetdet.ops.spec import OpSpec

from . import reference as R
from . import torch_path as T


def _forecast_torch(history, timesteps, t, order):
    return T.forecast(*T.used_terms(history, timesteps, t, order))


def _forecast_triton(history, timesteps, t, order):
    from . import launch

    return launch.forecast(*T.used_terms(history, timesteps, t, order))


def _forecast_reference(history, timesteps, t, order):
    return R.forecast_reference(history, timesteps, t, order if order == "lagrange" else int(order))


def _forecast_sample(batch, dtype, gen):
    hist = [torch.randn(batch, 3, 10, generator=gen).to(dtype) for _ in range(3)]
    return hist, [0.9, 0.7, 0.4], 0.2, "2"


def _rc(relative_change):
    def body(a, b, tile):
        view, box, counts = T.tiled(a, tile)
        per_item, per_tile = relative_change(a.contiguous(), b.contiguous(), view, box)
        return T.per_tile_out(per_item, per_tile, counts)

    return body


def _rc_triton(a, b, tile):
    from . import launch

    return _rc(launch.relative_change)(a, b, tile)


def _rc_fake(a, b, tile):
    B = a.shape[0]
    if not tile:
        return a.new_empty((B,), dtype=torch.float32), a.new_empty((B, 0), dtype=torch.float32)
    counts = [-(-s // t) if 0 < t < s else 1 for s, t in zip(a.shape[1:], tile)]
    return a.new_empty((B,), dtype=torch.float32), a.new_empty((B, *counts), dtype=torch.float32)


def _rc_reference(a, b, tile):
    if not tile:
        return R.relative_change_reference(a, b), None
    return R.relative_change_reference(a, b), R.relative_change_tiles(a, b, tile)


def _rc_sample(batch, dtype, gen):
    a = torch.randn(batch, 3, 12, 10, generator=gen).to(dtype)
    return a, a + 0.1 * torch.randn(batch, 3, 12, 10, generator=gen).to(dtype), [0, 4, 4]


SPECS = (
    OpSpec(name="forecast", schema="(Tensor[] history, float[] timesteps, float t, str order) -> Tensor",
           fake=lambda history, timesteps, t, order: history[0].new_empty(history[0].shape), torch_path=_forecast_torch,
           launcher=_forecast_triton, reference=_forecast_reference, folder="forecast", sample=_forecast_sample,
           table="forecast", public="forecast"),
    OpSpec(name="relative_change", schema="(Tensor a, Tensor b, int[] tile) -> (Tensor, Tensor)", fake=_rc_fake,
           torch_path=_rc(T.relative_change), launcher=_rc_triton, reference=_rc_reference, folder="forecast",
           sample=_rc_sample, batched=(0, 1), table="forecast", public="relative_change"),
)
