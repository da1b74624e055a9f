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

The map runs in fp32 (in ``sqrt(ᾱ)``, ``sqrt(1 − ᾱ)``, so that ``ᾱ = 0``, zero terminal SNR, is flow time 1), and
the controller keeps fp32 velocities. Rows the model computed are returned as the model's own output, bit for bit;
only forecast rows go through the inverse map. Output channels beyond the latent's (a learned variance) pass as they
are; latent channels beyond the output's (an inpainting U-Net's mask and image) are not mapped.
"""

from __future__ import annotations

import torch

#: accepted ``prediction=`` values: ``"flow"`` forecasts the output as it is (flow-matching models, and any model
#: whose output and timestep are already flow-like); the others are diffusers' VP prediction types
PREDICTIONS = ("flow", "epsilon", "v_prediction", "sample")
#: diffusers' prediction types of flow-matching schedulers, forecast as they are
_FLOW_TYPES = ("flow", "flow_prediction")


def _config(scheduler, key, default=None):
    cfg = getattr(scheduler, "config", None)
    if hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _prediction_of(scheduler) -> str | None:
    pred = _config(scheduler, "prediction_type")
    return getattr(scheduler, "prediction_type", None) if pred is None else pred


#: diffusers schedulers that reuse each model output in the next steps' multistep formula with large weights (PNDM,
#: LMS: 4th order). A forecast output inside the budget can cost an image far more there (README, "eps and v models in
#: diffusers"): jetdet warns once.
MULTISTEP_WARN = frozenset({"PNDMScheduler", "LMSDiscreteScheduler", "IPNDMScheduler"})
#: diffusers schedulers fast mode has been measured with (README, "eps and v models in diffusers": ``python
#: bench/diffusers_eps.py``; the flow-matching Euler on SD3/Flux-type models; and those that add noise every step,
#: whose denoised image is forecast: :data:`ADDS_NOISE`). With any other scheduler ``jetdet.patch`` warns once
#: that the budget's result is unmeasured there.
MEASURED = frozenset({
    "EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "DDIMScheduler", "UniPCMultistepScheduler",
    "HeunDiscreteScheduler", "DEISMultistepScheduler", "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "DPMSolverSDEScheduler", "DDPMScheduler", "LCMScheduler", "TCDScheduler",
})
#: diffusers schedulers that call the model twice at (nearly) the same timestep with fresh noise added between the
#: calls: the second output is not a smooth function of the first, so fast mode computes every call with them
RENOISE_SAME_T = frozenset({"KDPM2AncestralDiscreteScheduler"})
#: diffusers schedulers that add fresh noise to the latent at every step (ancestral and SDE schedulers, DDPM and its
#: parallel-sampling twin, whose ``step`` is DDPM's); DPM-Solver also with an ``sde-`` algorithm type
ADDS_NOISE = frozenset({"EulerAncestralDiscreteScheduler", "DPMSolverSDEScheduler", "DDPMScheduler",
                        "DDPMParallelScheduler"})
#: consistency-model schedulers: every step replaces the latent with the model's denoised estimate plus new noise, so
#: a call's output is no smooth function of the earlier ones (a forecast output cost LCM 13.8 dB mean, 6.0 min, in
#: ``bench/diffusers_eps.py --schedulers lcm`` as is; ComfyUI's lcm sampler, 24 dB): fast mode computes every call
RENOISE_ALL = frozenset({"LCMScheduler", "TCDScheduler", "FlowMatchLCMScheduler"})
#: every scheduler fast mode computes every call with (budget 0)
RENOISE = RENOISE_SAME_T | RENOISE_ALL


def adds_noise(scheduler) -> bool:
    """A scheduler that adds new noise to the latent at every step (:data:`ADDS_NOISE`, or an SDE algorithm type)."""
    if scheduler is None:
        return False
    if type(scheduler).__name__ in ADDS_NOISE:
        return True
    return str(_config(scheduler, "algorithm_type", "") or "").startswith("sde-")


def is_flow_scheduler(scheduler) -> bool:
    """A flow-matching scheduler: its model's output is forecast as it is."""
    return (_prediction_of(scheduler) in _FLOW_TYPES or bool(_config(scheduler, "use_flow_sigmas", False))
            or "FlowMatch" in type(scheduler).__name__)


def from_options(scheduler=None, prediction=None):
    """The parametrization ``jetdet.patch(mode="fast", scheduler=..., prediction=...)`` asks for: ``None`` (forecast
    the output as it is) or a :class:`VPParametrization`. Raises ``ValueError``/``TypeError`` naming the argument."""
    if prediction is not None and prediction not in PREDICTIONS:
        raise ValueError(f"prediction: expected one of {PREDICTIONS} or None, got {prediction!r}")
    if isinstance(scheduler, type):
        raise TypeError(f"scheduler: got the class {scheduler.__name__}; pass the scheduler object the pipeline "
                        "samples with (scheduler=pipe.scheduler, or the pipeline: scheduler=pipe)")
    if isinstance(scheduler, (str, bytes, int, float)):
        raise TypeError("scheduler: expected the scheduler object the pipeline samples with "
                        f"(scheduler=pipe.scheduler), got {type(scheduler).__name__} {scheduler!r}")
    if scheduler is None:
        if prediction in (None, "flow"):
            return None
        raise ValueError(f"prediction={prediction!r}: a VP model's map needs its noise schedule; pass the "
                         "scheduler too (scheduler=pipe.scheduler, or any object with alphas_cumprod)")
    name = type(scheduler).__name__
    pred = prediction
    if pred is None:
        if is_flow_scheduler(scheduler):
            return None  # a flow-matching scheduler (FlowMatchEulerDiscreteScheduler has no prediction type)
        pred = _prediction_of(scheduler)
        if pred is None:
            raise TypeError(f"scheduler: {name} says neither a prediction type nor that it is flow matching; jetdet "
                            f"maps VP schedulers ({PREDICTIONS[1:]}, with alphas_cumprod) and leaves flow-matching "
                            "ones as they are. Pass prediction= to say what the model outputs "
                            "(prediction='flow': as it is)")
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
        raise TypeError(f"scheduler: {name} has no alphas_cumprod, so its timesteps cannot be mapped to noise levels "
                        f"for prediction {pred!r} (EDM-preconditioned schedulers such as EDMEulerScheduler are not "
                        "mapped). Pass prediction='flow' to forecast the output as it is")
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
        if ac.numel() < 2 or not bool(torch.isfinite(ac).all()) or bool((ac < 0).any()) or bool((ac >= 1).any()):
            raise ValueError(f"scheduler.alphas_cumprod: expected at least 2 values in [0, 1), got "
                             f"{ac.numel()} values in [{float(ac.min()):g}, {float(ac.max()):g}]")
        # sigma = sqrt((1 - abar) / abar); a zero-terminal-SNR schedule (abar = 0 at its last timestep) gives inf there
        self._sig = torch.where(ac > 0, ((1 - ac) / ac.clamp_min(1e-300)).sqrt(), torch.inf).to(torch.float32)

    def describe(self) -> str:
        return f"{self.prediction} (VP, {'continuous' if self.continuous else len(self._sig)} timesteps)"

    # ---------------------------------------------------------------------------------------- sigma
    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """``σ`` at timesteps ``t`` (a float tensor on any device; no host sync); ``inf`` at zero SNR."""
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
        lo_v, hi_v = table[lo], table[lo + 1]
        # linear in sigma between integer timesteps; the ends alone where the weight is 0 (inf * 0 would be NaN)
        mid = torch.where(w > 0, lo_v * (1 - w) + hi_v * w, lo_v)
        return torch.where(w < 1, mid, hi_v)

    @staticmethod
    def _ab(sig: torch.Tensor):
        """``(sqrt(ᾱ), sqrt(1 − ᾱ))`` of ``σ``, exact at ``σ = 0`` and ``σ = inf``."""
        a = torch.rsqrt(1 + sig * sig)
        b = torch.rsqrt(1 + 1 / (sig * sig))
        return a, b

    def flow_time(self, t: float) -> float:
        """The flow time of one model timestep (for the controller's schedule hints)."""
        a, b = self._ab(self.sigma(torch.tensor([float(t)])))
        return float(b[0] / (a[0] + b[0]))

    # ---------------------------------------------------------------------------------------- the map
    def wrap(self, x: torch.Tensor, t: torch.Tensor, run):
        """``(x_flow, t_flow, run_flow, finish)``: the call as the controller sees it, and ``finish(v)`` that turns
        the controller's ``[B, ...]`` velocity into the model's output (the model's own rows where it ran).

        The map acts on the output channels that match the latent's (dim 1): ``min(C_in, C_out)`` of them, so an
        inpainting or pix2pix U-Net (latent plus mask or image channels in, 4 out) maps its 4, and a learned-variance
        model (DiT, PixArt, DeepFloyd IF: 2 C out) maps its prediction and passes the variance half as it is."""
        shape = (-1,) + (1,) * (x.dim() - 1)
        a, b = self._ab(self.sigma(t))
        a, b = a.reshape(shape), b.reshape(shape)
        if self.prediction == "epsilon":
            a = a.clamp_min(2.0 ** -12)  # no noise prediction at zero SNR: treated as sigma 4096 there
        elif self.prediction == "sample":
            b = b.clamp_min(2.0 ** -12)
        ab = a + b
        xf32 = x.to(torch.float32)
        ran: dict = {}

        def rows_of(v, rows):
            return v if rows is None else v.index_select(0, rows.to(v.device))

        def to_flow(o, xr, ar, br, abr):
            if self.prediction == "epsilon":
                return (abr * o - xr) / ar
            if self.prediction == "v_prediction":
                return (br - ar) * xr + abr * o
            return (xr - abr * o) / br  # sample

        def from_flow(v, xr):
            if self.prediction == "epsilon":
                return (a * v + xr) / ab
            if self.prediction == "v_prediction":
                return (v - (b - a) * xr) / ab
            return (xr - b * v) / ab

        def run_flow(rows):
            out = run(rows)
            ran["rows"], ran["out"] = rows, out
            self._out_dtype = out.dtype
            o = out.to(torch.float32)
            c = _channels(x, o)
            xr = rows_of(xf32, rows)[:, :c]
            v = to_flow(o[:, :c], xr, rows_of(a, rows), rows_of(b, rows), rows_of(ab, rows))
            return v if c == o.shape[1] else torch.cat([v, o[:, c:]], dim=1)

        def finish(v: torch.Tensor) -> torch.Tensor:
            if "out" in ran and ran["rows"] is None:
                return ran["out"]  # the whole batch ran: the model's own output, bit for bit
            v = v.to(torch.float32)
            c = _channels(x, v)
            o = from_flow(v[:, :c], xf32[:, :c])
            if c != v.shape[1]:
                o = torch.cat([o, v[:, c:]], dim=1)
            o = o.to(ran["out"].dtype if "out" in ran else (self._out_dtype or x.dtype))
            if "out" in ran:
                o.index_copy_(0, ran["rows"].to(o.device), ran["out"].to(o.dtype))
            return o

        x_flow = xf32 / ab
        return x_flow, b.reshape(-1) / ab.reshape(-1), run_flow, finish


def _channels(x: torch.Tensor, out: torch.Tensor) -> int:
    """How many leading channels (dim 1) of ``out`` the map acts on; raises when the shapes cannot be matched."""
    if out.dim() == x.dim() and out.dim() >= 2 and out.shape[2:] == x.shape[2:]:
        return min(out.shape[1], x.shape[1])
    raise ValueError(f"scheduler=: the model's output {tuple(out.shape[1:])} does not match its latent "
                     f"{tuple(x.shape[1:])} outside the channel dim (1), so jetdet cannot map it as a VP output; "
                     "pass prediction='flow' to forecast it as it is")
