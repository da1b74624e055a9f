"""What a diffusers-style model's output is, so that the step cache can see every model as a flow model.

The step cache forecasts a model's output polynomially in its timestep, and its budget was chosen on flow models
(velocity ``v = noise − x0`` at ``t`` in ``[0, 1]``, diffusers' ``FlowMatchEulerDiscreteScheduler``). Most
diffusers U-Nets (SD1.5, SDXL, SD2) are variance-preserving (VP) models instead: the latent they get is
``x = sqrt(ᾱ) x0 + sqrt(1 − ᾱ) noise`` at a discrete timestep ``0..999``, and they predict the noise (``epsilon``),
``v = sqrt(ᾱ) noise − sqrt(1 − ᾱ) x0`` (``v_prediction``) or ``x0`` (``sample``). Forecast as it is, the noise
prediction over timesteps hides most of the image's change at high noise; measured on the bundled DiT run as an
SD1.5-schedule eps model (``bench/diffusers_eps.py``, Euler, 30 steps), the default budget ran 8.6 of 30 calls at
23.6 dB mean PSNR as is, and 19.5 at 37.1 dB through this map.

:class:`VPParametrization` hands the controller the flow model a VP model is equivalent to (the same
probability-flow ODE). With ``σ = sqrt((1 − ᾱ) / ᾱ)`` at the call's timestep (``ᾱ`` from the scheduler's
``alphas_cumprod``, interpolated linearly in ``σ`` between integer timesteps as diffusers' Euler and Heun
schedulers do):

* flow time ``σ / (1 + σ)`` and flow latent ``x sqrt(1 + σ²) / (1 + σ)`` (``= (x0 + σ noise) / (1 + σ)``);
* flow velocity ``noise − x0``: ``(1 + σ) ε − x sqrt(1 + σ²)`` for ``epsilon``,
  ``((σ − 1) x + (1 + σ) v) / sqrt(1 + σ²)`` for ``v_prediction``, ``(x sqrt(1 + σ²) − (1 + σ) x0) / σ`` for
  ``sample``; a forecast velocity goes back through the inverse.

The map runs in fp32. Rows the model computed are returned as the model's own output, bit for bit; only forecast
rows go through the inverse map.
"""

from __future__ import annotations

import math

import torch

#: accepted ``prediction=`` values: ``"flow"`` forecasts the output as it is (flow-matching models, and any model
#: whose output and timestep are already flow-like); the others are diffusers' VP prediction types
PREDICTIONS = ("flow", "epsilon", "v_prediction", "sample")
#: diffusers' prediction types of flow-matching schedulers, forecast as they are
_FLOW_TYPES = ("flow", "flow_prediction")


def _prediction_of(scheduler) -> str | None:
    cfg = getattr(scheduler, "config", None)
    pred = cfg.get("prediction_type") if hasattr(cfg, "get") else getattr(cfg, "prediction_type", None)
    if pred is None:
        pred = getattr(scheduler, "prediction_type", None)
    return pred


def _config(scheduler, key, default=None):
    cfg = getattr(scheduler, "config", None)
    if hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def from_options(scheduler=None, prediction=None):
    """The parametrization ``jetdet.patch(mode="fast", scheduler=..., prediction=...)`` asks for: ``None`` (forecast
    the output as it is) or a :class:`VPParametrization`. Raises ``ValueError``/``TypeError`` naming the argument."""
    if prediction is not None and prediction not in PREDICTIONS:
        raise ValueError(f"prediction: expected one of {PREDICTIONS} or None, got {prediction!r}")
    if scheduler is None:
        if prediction in (None, "flow"):
            return None
        raise ValueError(f"prediction={prediction!r}: a VP model's map needs its noise schedule; pass the "
                         "scheduler too (scheduler=pipe.scheduler, or any object with alphas_cumprod)")
    pred = prediction
    if pred is None:
        pred = _prediction_of(scheduler)
        use_flow = bool(_config(scheduler, "use_flow_sigmas", False))
        if pred in _FLOW_TYPES or use_flow or (pred is None and not hasattr(scheduler, "alphas_cumprod")):
            return None  # a flow-matching scheduler (FlowMatchEulerDiscreteScheduler has no prediction type)
        if pred not in PREDICTIONS:
            raise ValueError(f"scheduler: its prediction type is {pred!r}; jetdet maps {PREDICTIONS[1:]} (or "
                             "forecasts flow models as they are); pass prediction= to say what the model outputs")
    if pred == "flow":
        return None
    if _config(scheduler, "timestep_type") == "continuous":
        if pred != "v_prediction":
            raise ValueError("scheduler: continuous timesteps (timestep_type='continuous') are mapped for "
                             "v_prediction only (diffusers' Euler: timestep = log(sigma) / 4)")
        return VPParametrization(pred, None, continuous=True)
    ac = getattr(scheduler, "alphas_cumprod", None)
    if ac is None:
        raise TypeError(f"scheduler: expected a diffusers scheduler (or an object) with alphas_cumprod for "
                        f"prediction {pred!r}; {type(scheduler).__name__} has none. For a flow-matching model "
                        "leave scheduler and prediction out")
    return VPParametrization(pred, ac)


class VPParametrization:
    """A VP model's output mapped to the flow velocity it is equivalent to, and back (module docstring)."""

    def __init__(self, prediction: str, alphas_cumprod, continuous: bool = False):
        self.prediction = prediction
        self.continuous = continuous
        self._tables: dict = {}
        self._out_dtype = None  # the model's output dtype, for a call whose rows are all forecast
        if continuous:
            self._sig = None
            return
        ac = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64).reshape(-1)
        if ac.numel() < 2 or not bool(torch.isfinite(ac).all()) or bool((ac <= 0).any()) or bool((ac > 1).any()):
            raise ValueError(f"scheduler.alphas_cumprod: expected at least 2 values in (0, 1], got "
                             f"{ac.numel()} values in [{float(ac.min()):g}, {float(ac.max()):g}]")
        self._sig = ((1 - ac) / ac).sqrt().to(torch.float32)

    def describe(self) -> str:
        return f"{self.prediction} (VP, {'continuous' if self.continuous else len(self._sig)} timesteps)"

    # ---------------------------------------------------------------------------------------- sigma
    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """``σ`` at timesteps ``t`` (a float tensor on any device; no host sync)."""
        t = t.to(torch.float32)
        if self.continuous:
            return torch.exp(4.0 * t)
        table = self._tables.get(t.device)
        if table is None:
            table = self._tables[t.device] = self._sig.to(t.device)
        n = table.shape[0]
        tc = t.clamp(0, n - 1)
        lo = tc.floor().clamp(max=n - 2)
        w = tc - lo
        lo = lo.long()
        return table[lo] * (1 - w) + table[lo + 1] * w

    def flow_time(self, t: float) -> float:
        """The flow time of one model timestep (for the controller's schedule hints)."""
        s = float(self.sigma(torch.tensor([float(t)]))[0])
        return 1.0 if math.isinf(s) else s / (1.0 + s)

    # ---------------------------------------------------------------------------------------- the map
    def wrap(self, x: torch.Tensor, t: torch.Tensor, run):
        """``(x_flow, t_flow, run_flow, finish)``: the call as the controller sees it, and ``finish(v)`` that turns
        the controller's ``[B, ...]`` velocity into the model's output (the model's own rows where it ran)."""
        shape = (-1,) + (1,) * (x.dim() - 1)
        sig = self.sigma(t)
        s = sig.reshape(shape)
        root = torch.sqrt(1 + s * s)  # 1 / sqrt(alpha_bar)
        xf32 = x.to(torch.float32)
        ran: dict = {}

        def rows_of(v, rows):
            return v if rows is None else v.index_select(0, rows.to(v.device))

        def run_flow(rows):
            out = run(rows)
            ran["rows"], ran["out"] = rows, out
            self._out_dtype = out.dtype
            o, xr = out.to(torch.float32), rows_of(xf32, rows)
            sr, rr = rows_of(s, rows), rows_of(root, rows)
            if self.prediction == "epsilon":
                return (1 + sr) * o - xr * rr
            if self.prediction == "v_prediction":
                return ((sr - 1) * xr + (1 + sr) * o) / rr
            return (xr * rr - (1 + sr) * o) / sr.clamp_min(1e-12)  # sample

        def finish(v: torch.Tensor) -> torch.Tensor:
            if "out" in ran and ran["rows"] is None:
                return ran["out"]  # the whole batch ran: the model's own output, bit for bit
            v = v.to(torch.float32)
            if self.prediction == "epsilon":
                o = (v + xf32 * root) / (1 + s)
            elif self.prediction == "v_prediction":
                o = (v * root - (s - 1) * xf32) / (1 + s)
            else:
                o = (xf32 * root - s * v) / (1 + s)
            o = o.to(ran["out"].dtype if "out" in ran else (self._out_dtype or x.dtype))
            if "out" in ran:
                o.index_copy_(0, ran["rows"].to(o.device), ran["out"].to(o.dtype))
            return o

        x_flow = xf32 * (root / (1 + s))
        return x_flow, sig / (1 + sig), run_flow, finish
