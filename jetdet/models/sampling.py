"""Minimal flow-matching samplers (Euler, Heun) with classifier-free guidance for velocity models.

Convention (rectified flow, as the bundled model is trained): ``x_t = (1 - t) x0 + t noise``, the model
predicts ``v = noise - x0``, sampling integrates ``dx/dt = v`` from ``t = 1`` (noise) down to ``t = 0``.

Timestep grid: ``u_i = 1 - i / steps`` (``i = 0 .. steps``), optionally shifted as in SD3,
``t_i = shift u_i / (1 + (shift - 1) u_i)`` (``shift > 1`` spends more steps at high noise); the default
``shift = 1`` is the uniform grid.

Model evaluations per sample call (``E``; with CFG each evaluation is a cond and an uncond row per item):

* Euler: ``E = steps``;
* Heun: ``E = 2 * steps - 1``; every step takes an Euler predictor and a trapezoid corrector, except the last
  (to ``t = 0``), which is a plain Euler step (as in Karras et al.'s Heun sampler).

With ``cfg != 1`` and ``batch_cfg=True`` one evaluation is one call of ``model_fn`` on ``2B`` rows,
``[cond; uncond]`` concatenated; with ``batch_cfg=False`` it is two calls on ``B`` rows, cond then uncond. With
``cfg == 1`` only the cond rows run.

Noise: item ``i`` of the batch starts from ``jetdet.randn(..., seed, item_offset=item_offset + i)``, so one item
sampled alone (with its ``item_offset``) starts from exactly the noise it gets inside any batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: Guidance scale used by default (and by the acceptance numbers in ``bench/train_bundled.py``).
DEFAULT_CFG = 4.0
SAMPLERS = ("euler", "heun")


def timestep_grid(steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """``[steps + 1]`` float32 times from 1 down to 0 (see the module docstring for the shift)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    if not shift > 0:
        raise ValueError(f"shift: expected a float > 0, got {shift!r}")
    u = 1.0 - torch.arange(steps + 1, dtype=torch.float64) / steps
    t = (shift * u / (1.0 + (shift - 1.0) * u)).to(torch.float32)
    # a tiny shift (below about 1e-9) rounds the first time away from 1, or to inf (1 + (shift - 1) = 0): the
    # sampler then started from another time, or made NaN images silently
    if not (t[0] == 1.0 and t[-1] == 0.0 and bool(torch.isfinite(t).all()) and bool((t[1:] <= t[:-1]).all())):
        raise ValueError(f"shift: {shift!r} gives a timestep grid that does not run from 1 down to 0 in float32 "
                         f"(its first time {t[0].item()!r}); expected a shift of about 1e-9 or more")
    return t.to(device=device)


def num_evaluations(steps: int, sampler: str = "euler") -> int:
    """Model evaluations (cond + uncond counted once) one :func:`sample` call makes."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {SAMPLERS}, got {sampler!r}")
    return steps if sampler == "euler" else 2 * steps - 1


def initial_noise(shape, seed: int, item_offset: int = 0, device=None, dtype=torch.float32) -> torch.Tensor:
    """Per-item starting noise ``[B, C, H, W]`` from :func:`jetdet.randn` (item ``i`` <- ``item_offset + i``)."""
    import jetdet

    return jetdet.randn(tuple(shape), seed, item_offset=item_offset, device=device).to(dtype)


def guided_velocity(
    model_fn: Callable,
    x: torch.Tensor,
    t: float | torch.Tensor,
    labels: torch.Tensor,
    null_label: int,
    cfg: float,
    batch_cfg: bool = True,
) -> torch.Tensor:
    """One CFG evaluation: ``v_u + cfg (v_c - v_u)`` (just ``v_c`` when ``cfg == 1``).

    ``model_fn(x [R, C, H, W], t [R] float32, y [R] long) -> v [R, C, H, W]``.
    """
    b = x.shape[0]
    tt = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1).expand(b)
    if cfg == 1.0:
        return model_fn(x, tt, labels)
    null = torch.full_like(labels, null_label)
    if batch_cfg:
        v = model_fn(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null]))
        v_c, v_u = v[:b], v[b:]
    else:
        v_c = model_fn(x, tt, labels)
        v_u = model_fn(x, tt, null)
    return v_u + cfg * (v_c - v_u)


@torch.no_grad()
def sample(
    model,
    labels,
    *,
    steps: int = 30,
    cfg: float = DEFAULT_CFG,
    sampler: str = "euler",
    seed: int = 0,
    item_offset: int = 0,
    batch_cfg: bool = True,
    model_fn: Callable | None = None,
    shift: float = 1.0,
    noise: torch.Tensor | None = None,
    clamp: bool = True,
) -> torch.Tensor:
    """Sample images for class ``labels`` from a velocity model.

    Args:
        model: the velocity model, ``model(x, t, y)``; supplies the device, dtype, image shape (``config``) and
            null label (``model.null_label``, else ``model.config["num_classes"]``).
        labels: ``[B]`` class indices (tensor or sequence of ints).
        steps: number of sampler steps (>= 1).
        cfg: classifier-free guidance scale; 1.0 turns guidance (and the uncond rows) off.
        sampler: ``"euler"`` or ``"heun"`` (evaluation counts in the module docstring).
        seed: noise seed for :func:`jetdet.randn`.
        item_offset: noise index of the first item (item ``i`` uses ``item_offset + i``).
        batch_cfg: run cond and uncond as one ``2B``-row call (True) or as two ``B``-row calls (False).
        model_fn: the callable invoked per evaluation, ``model_fn(x, t [R], y [R]) -> v`` (default ``model``);
            a caching layer wraps it.
        shift: timestep-grid shift (1.0 = uniform).
        noise: optional starting noise ``[B, C, H, W]`` in place of the ``jetdet.randn`` draw.
        clamp: clamp the result to ``[-1, 1]``.

    Returns:
        ``[B, C, H, W]`` images (in ``[-1, 1]`` when ``clamp``).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {SAMPLERS}, got {sampler!r}")
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
    null_label = getattr(model, "null_label", None)
    if null_label is None:
        null_label = model.config["num_classes"]
    if labels.numel() and (labels.min() < 0 or labels.max() > null_label):
        raise ValueError(f"labels: expected values in [0, {null_label}]")
    fn = model if model_fn is None else model_fn
    b = labels.shape[0]
    cfgd = model.config
    shape = (b, cfgd["in_channels"], cfgd["sample_size"], cfgd["sample_size"])
    if noise is None:
        x = initial_noise(shape, seed, item_offset, device=device, dtype=dtype)
    else:
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise: expected shape {shape}, got {tuple(noise.shape)}")
        x = noise.to(device=device, dtype=dtype)
    ts = timestep_grid(steps, shift).tolist()
    for i in range(steps):
        t_cur, t_next = ts[i], ts[i + 1]
        dt = t_next - t_cur  # negative
        d = guided_velocity(fn, x, t_cur, labels, null_label, cfg, batch_cfg)
        x_next = x + dt * d
        if sampler == "heun" and t_next > 0:
            d2 = guided_velocity(fn, x_next, t_next, labels, null_label, cfg, batch_cfg)
            x_next = x + dt * 0.5 * (d + d2)
        x = x_next
    return x.clamp(-1.0, 1.0) if clamp else x
