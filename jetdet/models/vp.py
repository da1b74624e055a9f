"""The bundled flow model as a variance-preserving (VP) model, so that diffusers' DDPM-family schedulers can sample
it as they sample SD1.5: the measurement model for ``jetdet.patch(mode="fast", scheduler=...)`` on eps/v models
(``bench/diffusers_eps.py``, ``tests/test_patch_prediction.py``), and :func:`sample`, the loop both run it in.
jetdet ships no trained eps model.

A VP latent at a discrete timestep with ``ᾱ = alphas_cumprod(timestep)`` is ``x = sqrt(ᾱ) x0 + sqrt(1 − ᾱ) noise``;
the flow model's latent is ``(1 − s) x0 + s noise`` at time ``s``. Both describe the same noisy image when
``s = sqrt(1 − ᾱ) / (sqrt(ᾱ) + sqrt(1 − ᾱ))`` and the flow latent is ``x / (sqrt(ᾱ) + sqrt(1 − ᾱ))``. From the flow
velocity ``u = noise − x0`` the VP outputs follow: ``noise = x_flow + (1 − s) u``, ``x0 = x_flow − s u``, ``v =
sqrt(ᾱ) noise − sqrt(1 − ᾱ) x0``. So sampling this model with a VP scheduler solves the flow model's own ODE.
Derived here from ``ᾱ`` directly, independently of :mod:`jetdet.patch.prediction` (which works from ``σ``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

#: SD1.5's (and SDXL's) noise schedule, as diffusers' schedulers are configured for it
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def sd_alphas_cumprod(n: int = 1000) -> torch.Tensor:
    """``alphas_cumprod`` of :data:`SD_SCHEDULE` as diffusers' schedulers compute it (in fp32), as float64."""
    betas = torch.linspace(SD_SCHEDULE["beta_start"] ** 0.5, SD_SCHEDULE["beta_end"] ** 0.5, n,
                           dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float64)


class VPModel(nn.Module):
    """``forward(sample, timestep, class_labels) -> output`` of a VP model at diffusers' timesteps, computed by a flow
    model ``flow(x, t, y)`` (``t`` in ``[0, 1]``, velocity output; e.g. :class:`jetdet.models.BundledDiT`).

    ``prediction``: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``. ``timestep`` may be fractional (diffusers'
    Euler schedulers): ``ᾱ`` comes from the noise level ``sqrt((1 − ᾱ) / ᾱ)`` interpolated linearly between integer
    timesteps, as those schedulers interpolate it. The conversion runs in float64.
    """

    def __init__(self, flow: nn.Module, alphas_cumprod=None, prediction: str = "epsilon"):
        super().__init__()
        if prediction not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction: expected 'epsilon', 'v_prediction' or 'sample', got {prediction!r}")
        self.flow = flow
        self.prediction = prediction
        ac = sd_alphas_cumprod() if alphas_cumprod is None else torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.register_buffer("noise_level", ((1 - ac) / ac).sqrt(), persistent=False)
        self.null_label = getattr(flow, "null_label", None)
        self.config = getattr(flow, "config", None)

    def alpha_bar(self, timestep: torch.Tensor) -> torch.Tensor:
        n = self.noise_level.shape[0]
        t = timestep.to(torch.float64).clamp(0, n - 1)
        lo = t.floor().clamp(max=n - 2)
        w = t - lo
        lv = self.noise_level[lo.long()] * (1 - w) + self.noise_level[lo.long() + 1] * w
        return 1.0 / (1.0 + lv * lv)

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor) -> torch.Tensor:
        b = sample.shape[0]
        ts = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(b)
        ab = self.alpha_bar(ts).reshape(-1, *([1] * (sample.dim() - 1)))
        a, s_ = ab.sqrt(), (1 - ab).sqrt()
        x_flow = sample.to(torch.float64) / (a + s_)
        time = s_ / (a + s_)
        u = self.flow(x_flow.to(sample.dtype), time.reshape(-1).to(torch.float32), class_labels).to(torch.float64)
        noise, x0 = x_flow + (1 - time) * u, x_flow - time * u
        if self.prediction == "epsilon":
            out = noise
        elif self.prediction == "v_prediction":
            out = a * noise - s_ * x0
        else:
            out = x0
        return out.to(sample.dtype)


@torch.no_grad()
def sample(model, scheduler, labels, seed: int, null_label: int, steps: int = 30, cfg: float = 4.0) -> torch.Tensor:
    """Images in ``[-1, 1]`` from ``model(sample, timestep, class_labels)`` (a :class:`VPModel`, patched or not) and a
    diffusers ``scheduler``, in a StableDiffusionPipeline-style loop: ``scale_model_input``, one batched CFG call per
    step (``labels`` then ``null_label`` rows), ``step``. The starting noise comes from ``seed``, and so does the global
    generator, from which ancestral schedulers draw."""
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    b = len(labels)
    cfgd = model.config
    lat = torch.randn(b, cfgd["in_channels"], cfgd["sample_size"], cfgd["sample_size"], generator=g)
    lat = lat * scheduler.init_noise_sigma
    y = torch.tensor(list(labels) + [null_label] * b)
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(torch.cat([lat, lat]), t), t, y)
        c, u = out[:b], out[b:]
        lat = scheduler.step(u + cfg * (c - u), t, lat).prev_sample
    return lat.clamp(-1, 1)
