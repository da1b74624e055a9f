"""Peers, side by side in one run: jetdet's fast mode against diffusers' own cache hooks, on the bundled model.

    python bench/peers.py                                   # Euler, 8 seeds x 4 classes, 30 steps, batched CFG
    python bench/peers.py --sampler heun --json heun.json   # Heun
    python bench/peers.py --separate-cfg                    # cond and uncond as two forwards
    python bench/peers.py --seeds 1 --classes 0 --steps 6 --peers FirstBlockCache   # a smoke run

The model
---------
The bundled DiT's weights are loaded into diffusers' own ``DiTTransformer2DModel``
(:func:`jetdet.models.bundled.load_bundled_diffusers`; same function, bit for bit) and called as
``model(hidden_states=x, timestep=1000 * t, class_labels=y).sample``. Sampling is
:func:`jetdet.models.sampling.sample` (Euler or Heun, flow matching, CFG at the sampler's default scale) with a
``model_fn`` that drives the diffusers model the way a diffusers pipeline does (below). Every method gets its
own deep copy of the loaded model, so each keeps its hooks for the whole run and is reset between samples by
the library's own reset path; the copies are the same weights and class.

Methods
-------
* ``full``: the plain diffusers model, the reference every other method is compared with (same seed/class).
* ``jetdet``: ``jetdet.patch(model, mode="fast", quality=q, num_steps=steps)`` for each quality preset, and
  ``jetdet.patch(model, mode="fast", budget=b, num_steps=steps, **options)`` at several budgets (``0`` = never
  skip, which measures the patch's own overhead). The patch finds the model's ``transformer_blocks`` itself, so
  rows may run partly (block-level reuse) where the controller's settings allow. Nothing is reset by hand
  between samples: the controller detects the new trajectory itself (the timestep goes up).
* ``jetdet blocks`` (``--blocks BUDGET ...``): the same with partial rows (:data:`BLOCK_OPTIONS`): a row the
  controller would forecast runs the first transformer block and the final layer, and the residual of the other
  blocks is forecast. ``jetdet whole-call`` (``--whole-call BUDGET ...``): ``block_reuse=False``, the controller
  before partial rows. Both are compared with jetdet's presets and budgets like peers.
* diffusers 0.42 hooks, each at several settings across its speed/quality range. ``DiTTransformer2DModel``
  does not inherit ``CacheMixin`` in diffusers 0.42: it has no ``enable_cache``, and ``CacheMixin.enable_cache``
  cannot be called on it (it reads the mixin's ``is_cache_enabled`` property). So the bench does what
  ``enable_cache`` does (:func:`enable_cache`): ``diffusers.hooks.apply_first_block_cache(model, config)`` etc.,
  by config type, then the registry-cache invalidation. As diffusers pipelines do, every forward runs inside
  ``CacheMixin.cache_context(model, name, step_index=, sigma=, num_inference_steps=, timestep=)``
  (``"cond_uncond"`` for batched CFG, ``"cond"``/``"uncond"`` for separate forwards; ``step_index`` is the
  model-evaluation index in the trajectory and ``num_inference_steps`` the evaluations per trajectory,
  ``2 * steps - 1`` for Heun, as a diffusers loop over a Heun scheduler's timesteps counts them; ``sigma = t``),
  and ``CacheMixin._reset_stateful_cache(model)`` runs after every sample (what
  ``DiffusionPipeline.maybe_free_model_hooks`` does at the end of a pipeline call). Both work on the instance.
  Per-hook notes:

  - ``FirstBlockCache``: ``FirstBlockCacheConfig(threshold)``.
  - ``TaylorSeer``: the shipped defaults (their module patterns are tried as they are: the table says how many
    modules they hooked), the shipped lite mode, and explicit ``cache_identifiers`` for this model's attention
    and MLP modules (``transformer_blocks.N.attn1``, ``transformer_blocks.N.ff``) at several
    ``cache_interval``/``max_order``, Taylor factors in float32.
  - ``MagCache``: ``mag_ratios`` calibrated on this model as diffusers documents: one full-compute run
    (seed 0, first class) with ``MagCacheConfig(calibrate=True)``, the printed ratios parsed and passed to
    ``MagCacheConfig(mag_ratios=...)`` (with separate CFG the ``"cond"`` context's ratios; diffusers takes one
    list). ``num_inference_steps`` = model evaluations per trajectory.
  - ``SeaCache``: the generic path with a ``raw_vision_callback`` returning each item's latent as
    ``(C, T=1, H, W)``.
  - ``FasterCache``: ``current_timestep_callback`` returns the current ``1000 t``; ``tensor_format="BCHW"``;
    ``attention_weight_callback`` 0.5 (diffusers' default, made explicit). FasterCache assumes the CFG batch is
    ``[uncond; cond]`` and splits only the kwargs named in ``_unconditional_conditional_input_kwargs_identifiers``;
    the tuned rows swap the sampler's ``[cond; uncond]`` halves for it and add ``class_labels`` to that list.
    A row with the shipped identifiers shows what happens without that.
  - ``PyramidAttentionBroadcast``: ``current_timestep_callback`` as above, spatial self-attention skip ranges.

  A method that raises is kept in the table with the exception; a method that hooked nothing says so.

Metrics (per sample = one (seed, class), averaged over samples unless noted)
----------------------------------------------------------------------------
* ``fwd``: transformer forwards that ran (for jetdet: calls in which the controller ran the model, on all or
  some rows; for hooks: every forward, cached ones included); ``full``: forwards that ran every block's
  attention and MLP; ``rows``: batch rows through the transformer.
* ``calls``: model compute in full-evaluation units (full-model equivalents): the FLOP-weighted sum of attention
  and MLP sublayer work actually executed (counted with forward hooks on ``attn1.to_q`` and ``ff.net.2``, which
  run only when the sublayer really computes, on the rows and tokens it computes), divided by the work of one
  full CFG evaluation. Full compute = evaluations per sample (30 for Euler at 30 steps). This is the fair "model
  calls" for block-level caches, which still enter the model on a cached step; ``reduction`` = full / method.
* ``wall``: median wall time per sample (methods interleaved sample by sample, order rotated per sample, after
  one untimed warm-up sample each); ``speedup`` = median full / median method.
* ``PSNR``: per sample against full compute of the same seed and class, images in [-1, 1] (peak-to-peak 2),
  mean (each sample capped at 100 dB; ``inf`` when every sample is bit-identical) and min; ``max_abs``: largest
  absolute pixel difference; ``acc``: the bundled classifier's accuracy against the requested class.
* ``reset``: the first sample is sampled again at the end with the same hooked model; ``ok`` when it is
  bit-identical to the first time (no state leaked between trajectories).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/train_bundled.py: spin-waiting threads on shared cores

import argparse  # noqa: E402
import ast  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jetdet  # noqa: E402
from jetdet.models import bundled, sampling  # noqa: E402
from jetdet.models.evaluate import parse_options, psnr  # noqa: E402  (per item, images in [-1, 1], inf where identical)

#: Peer families, in table order.
PEER_FAMILIES = ("FirstBlockCache", "TaylorSeer", "MagCache", "SeaCache", "FasterCache", "PyramidAttentionBroadcast")
#: jetdet error budgets measured by default (0 = never skip: the patch's own overhead).
DEFAULT_BUDGETS = (0.0, 0.03, 0.04, 0.045, 0.05, 0.055, 0.06, 0.07, 0.08, 0.1, 0.12, 0.14, 0.17, 0.21, 0.25, 0.32)
#: jetdet's quality presets, measured as they are (no budget passed).
QUALITIES = ("high", "balanced", "fast")
#: jetdet families: the controller as shipped (its presets skip whole calls), (``--blocks``) with partial rows
#: (block-level reuse on the model's transformer_blocks), and (``--whole-call``) whole-call skipping only.
JETDET_FAMILIES = ("jetdet", "jetdet blocks", "jetdet whole-call")
#: The partial-row settings of the ``jetdet blocks`` family: rows predicted above half the budget run the first
#: transformer block and the final layer, the other nine blocks' residual is forecast.
BLOCK_OPTIONS = {"block_reuse": True, "skip_whole": 0.5, "block_signal": "off"}
PSNR_CAP = 100.0


# ------------------------------------------------------------------------------------------------ methods


@dataclass
class Method:
    """One row of the table: a family (``full``, ``jetdet`` or a diffusers hook) at one setting."""

    family: str
    setting: str
    build: object = None  # diffusers hooks: ctx -> config; jetdet: the budget
    uncond_first: bool = False  # FasterCache: feed the CFG batch as [uncond; cond]
    options: dict = field(default_factory=dict)  # jetdet controller options

    @property
    def name(self) -> str:
        return self.family if not self.setting else f"{self.family} {self.setting}"


class _Ctx:
    """What hook configs need at build time and at call time."""

    def __init__(self, evals: int):
        self.evals = evals  # model evaluations per trajectory
        self.timestep = 1000.0  # current timestep (1000 t), set before every forward
        self.mag_ratios = None

    def current_timestep(self) -> float:
        return self.timestep


def _sea_raw_vision(module, args, kwargs):
    """SeaCache's indicator input: each item's latent as ``(C, T=1, H, W)``."""
    hs = kwargs.get("hidden_states", args[0] if args else None)
    return [h.unsqueeze(1) for h in hs.unbind(0)]


_TS_BLOCKS = [r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.ff"]
_FC_KWARGS = ("hidden_states", "encoder_hidden_states", "timestep", "attention_mask", "encoder_attention_mask")


def peer_methods(families=PEER_FAMILIES) -> list[Method]:
    """The diffusers-hook rows (settings chosen to span each method's speed/quality range on this model)."""
    from diffusers.hooks import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        SeaCacheConfig,
        TaylorSeerCacheConfig,
    )

    unknown = set(families) - set(PEER_FAMILIES)
    if unknown:
        raise ValueError(f"peers: unknown {sorted(unknown)}; known: {', '.join(PEER_FAMILIES)}")
    out: list[Method] = []
    if "FirstBlockCache" in families:
        for th in (0.02, 0.05, 0.1, 0.2, 0.4):
            out.append(Method("FirstBlockCache", f"threshold={th}",
                              lambda c, th=th: FirstBlockCacheConfig(threshold=th)))
    if "TaylorSeer" in families:
        out.append(Method("TaylorSeer", "shipped defaults", lambda c: TaylorSeerCacheConfig()))
        out.append(Method("TaylorSeer", "use_lite_mode=True",
                          lambda c: TaylorSeerCacheConfig(use_lite_mode=True, taylor_factors_dtype=torch.float32)))
        for interval, order in ((2, 1), (3, 1), (4, 1), (3, 2), (5, 2)):
            out.append(Method(
                "TaylorSeer", f"attn1+ff interval={interval} order={order}",
                lambda c, i=interval, o=order: TaylorSeerCacheConfig(
                    cache_interval=i, max_order=o, disable_cache_before_step=3, taylor_factors_dtype=torch.float32,
                    cache_identifiers=list(_TS_BLOCKS))))
    if "MagCache" in families:
        for th in (0.02, 0.06, 0.12, 0.24):
            out.append(Method("MagCache", f"threshold={th} K=3", lambda c, th=th: MagCacheConfig(
                threshold=th, max_skip_steps=3, retention_ratio=0.2, num_inference_steps=c.evals,
                mag_ratios=c.mag_ratios)))
    if "SeaCache" in families:
        for th, k in ((0.1, 2), (0.25, 2), (0.5, 2), (0.5, 4), (1.0, 4), (2.0, 4)):
            out.append(Method("SeaCache", f"threshold={th} max_cached={k}", lambda c, th=th, k=k: SeaCacheConfig(
                threshold=th, max_consecutive_cached=k, residual_order=1, retention_steps=1, cache_end_steps=1,
                raw_vision_callback=_sea_raw_vision)))
    if "FasterCache" in families:
        def fc(c, uncond_skip=5, attn_skip=2, tuned=True):
            extra = {}
            if tuned:
                extra["_unconditional_conditional_input_kwargs_identifiers"] = [*_FC_KWARGS, "class_labels"]
            return FasterCacheConfig(
                spatial_attention_block_skip_range=attn_skip, unconditional_batch_skip_range=uncond_skip,
                tensor_format="BCHW", current_timestep_callback=c.current_timestep,
                attention_weight_callback=lambda _: 0.5, **extra)

        out.append(Method("FasterCache", "shipped kwargs identifiers, [cond; uncond]",
                          lambda c: fc(c, tuned=False)))
        for us, ak in ((5, 2), (3, 2), (2, 2)):
            out.append(Method("FasterCache", f"uncond_skip={us} attn_skip={ak}",
                              lambda c, us=us, ak=ak: fc(c, us, ak), uncond_first=True))
    if "PyramidAttentionBroadcast" in families:
        for skip, rng in ((2, (100, 800)), (3, (100, 800)), (4, (100, 800)), (4, (0, 1000))):
            out.append(Method(
                "PyramidAttentionBroadcast", f"spatial_skip={skip} t_range={rng}",
                lambda c, s=skip, r=rng: PyramidAttentionBroadcastConfig(
                    spatial_attention_block_skip_range=s, spatial_attention_timestep_skip_range=r,
                    current_timestep_callback=c.current_timestep)))
    return out


# ------------------------------------------------------------------------------------------------ counting


class _Counter:
    """Forward hooks on leaf layers that run only when the computation really happens."""

    def __init__(self, model):
        self.depth = len(model.transformer_blocks)
        self.reset()
        self._handles = []
        for blk in model.transformer_blocks:
            self._handles.append(blk.attn1.to_q.register_forward_hook(self._attn))
            self._handles.append(blk.ff.net[2].register_forward_hook(self._mlp))
        self._handles.append(model.proj_out_2.register_forward_hook(self._end))

    def reset(self):
        self.fwd = self.full = self.rows = 0
        self.work = 0.0
        self._sub = 0

    def snapshot(self):
        return (self.fwd, self.full, self.rows, self.work)

    def _attn(self, mod, inp, out):
        x = inp[0]  # [R, N, D]
        r, n, d = x.shape
        self.work += r * n * (4 * d * d + 2 * n * d)  # q, k, v, out projections + QK^T and AV, MACs
        self._sub += 1

    def _mlp(self, mod, inp, out):
        x = inp[0]  # [R, N, inner]
        r, n, inner = x.shape
        self.work += r * n * 2 * inner * mod.out_features
        self._sub += 1

    def _end(self, mod, inp, out):
        self.fwd += 1
        self.rows += inp[0].shape[0]
        if self._sub == 2 * self.depth:
            self.full += 1
        self._sub = 0


class _LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        msg = record.getMessage().strip().splitlines()[0]
        if msg not in self.messages:
            self.messages.append(msg)


def enable_cache(model, config) -> None:
    """``CacheMixin.enable_cache`` for a model class without the mixin: the same dispatch to
    ``diffusers.hooks.apply_*`` and the same registry-cache invalidation."""
    from diffusers import hooks as H

    apply = {
        H.FasterCacheConfig: H.apply_faster_cache, H.FirstBlockCacheConfig: H.apply_first_block_cache,
        H.MagCacheConfig: H.apply_mag_cache, H.PyramidAttentionBroadcastConfig: H.apply_pyramid_attention_broadcast,
        H.SeaCacheConfig: H.apply_sea_cache, H.TaylorSeerCacheConfig: H.apply_taylorseer_cache,
    }.get(type(config))
    if apply is None:
        raise ValueError(f"Cache config {type(config)} is not supported.")
    apply(model, config)
    H.HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
    model._cache_config = config


def _hooked_modules(model) -> int:
    return sum(1 for m in model.modules() if getattr(getattr(m, "_diffusers_hook", None), "hooks", None))


# ------------------------------------------------------------------------------------------------ runner


class _Runner:
    """One method on its own copy of the diffusers model: applies it, drives one sample, resets."""

    def __init__(self, method: Method, base, ctx: _Ctx, batch_cfg: bool, null_label: int, steps: int):
        self.m = method
        self.ctx = ctx
        self.batch_cfg = batch_cfg
        self.null = null_label
        self.steps = steps
        self.model = copy.deepcopy(base)
        self.counter = _Counter(self.model)
        self.error: str | None = None
        self.notes: list[str] = []
        self.log = _LogCapture()
        self.handle = None
        self.hooked = None
        self.times: list[float] = []
        self.images: list[torch.Tensor] = []
        self.per_sample: list[tuple] = []
        self.ctl0 = None
        self.repeat_diff = 0.0
        self.eval_index = -1
        self.uses_context = method.family not in ("full", *JETDET_FAMILIES)

    # ------------------------------------------------------------------ setup
    def apply(self):
        fam = self.m.family
        try:
            with self._capture():
                if fam in JETDET_FAMILIES:
                    opts = {"num_steps": self.steps, **self.m.options, **self.m.build}
                    self.handle = jetdet.patch(self.model, mode="fast", **opts)
                elif fam != "full":
                    config = self.m.build(self.ctx)
                    enable_cache(self.model, config)
                    self.hooked = _hooked_modules(self.model)
                    if self.hooked == 0:
                        self.notes.append("hooked 0 modules: the config matched nothing (silent no-op)")
        except Exception as e:  # noqa: BLE001 - recorded in the table
            self.error = f"apply: {_describe(e)}"

    @contextlib.contextmanager
    def _capture(self):
        lg = logging.getLogger("diffusers")
        lg.addHandler(self.log)
        try:
            yield
        finally:
            lg.removeHandler(self.log)

    # ------------------------------------------------------------------ one sample
    def model_fn(self, x, t, y):
        uncond = not self.batch_cfg and bool((y == self.null).all())
        if self.batch_cfg or not uncond:
            self.eval_index += 1
        tv = float(t.reshape(-1)[0])
        self.ctx.timestep = 1000.0 * tv
        b = x.shape[0] // 2
        swap = self.m.uncond_first and self.batch_cfg and x.shape[0] == 2 * b and b > 0
        if swap:  # FasterCache expects [uncond; cond]
            x, t, y = (torch.cat([v[b:], v[:b]]) for v in (x, t, y))
        kwargs = {"hidden_states": x, "timestep": 1000.0 * t, "class_labels": y}
        if self.uses_context:
            from diffusers.models.cache_utils import CacheMixin

            name = "cond_uncond" if self.batch_cfg else ("uncond" if uncond else "cond")
            with CacheMixin.cache_context(self.model, name, step_index=self.eval_index, sigma=tv,
                                          num_inference_steps=self.ctx.evals, timestep=1000.0 * tv):
                out = self.model(**kwargs).sample
        else:
            out = self.model(**kwargs).sample
        if swap:
            out = torch.cat([out[b:], out[:b]])
        return out

    def sample(self, plain, label, seed, sampler, cfg, device):
        """Sample one image; returns (image, seconds) or None after an error (recorded)."""
        if self.error is not None:
            return None
        self.eval_index = -1
        try:
            with self._capture():
                _sync(device)
                t0 = time.perf_counter()
                img = sampling.sample(plain, [label], steps=self.steps, cfg=cfg, sampler=sampler, seed=seed,
                                      batch_cfg=self.batch_cfg, model_fn=self.model_fn)
                _sync(device)
                dt = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - recorded in the table
            self.error = f"sampling: {_describe(e)}"
            return None
        finally:
            if self.uses_context and self.error is None:
                from diffusers.models.cache_utils import CacheMixin

                CacheMixin._reset_stateful_cache(self.model)
        return img, dt


def _describe(e: BaseException) -> str:
    """``Type: message (file:line in function)`` of the innermost frame, for the table."""
    import traceback

    msg = " ".join(str(e).split())
    frames = traceback.extract_tb(e.__traceback__)
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    return f"{type(e).__name__}: {msg}{where}"


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def calibrate_mag_ratios(base, plain, label, seed, steps, sampler, cfg, batch_cfg, device) -> list[float]:
    """MagCache calibration as diffusers documents it: one run with ``MagCacheConfig(calibrate=True)``, the
    printed ratio list parsed (the first context's list when there are several)."""
    from diffusers.hooks import MagCacheConfig

    evals = sampling.num_evaluations(steps, sampler)
    ctx = _Ctx(evals)
    r = _Runner(Method("MagCache", "calibrate", lambda c: MagCacheConfig(calibrate=True, num_inference_steps=evals)),
                base, ctx, batch_cfg, plain.null_label, steps)
    r.apply()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        res = r.sample(plain, label, seed, sampler, cfg, device)
    if res is None:
        raise RuntimeError(f"MagCache calibration failed: {r.error}")
    lists = []
    for ln in buf.getvalue().splitlines():
        try:
            val = ast.literal_eval(ln.strip())
        except (ValueError, SyntaxError):
            continue
        if isinstance(val, list):
            lists.append(val)
    if not lists:
        raise RuntimeError(f"MagCache calibration printed no ratios: {buf.getvalue()!r}")
    ratios = [float(v) for v in lists[0]]
    if len(ratios) != evals:
        raise RuntimeError(f"MagCache calibration gave {len(ratios)} ratios for {evals} evaluations")
    return ratios


# ------------------------------------------------------------------------------------------------ metrics


def _median(xs):
    return statistics.median(xs) if xs else math.nan


# ------------------------------------------------------------------------------------------------ core


def run_peers(*, seeds=range(8), classes=(0, 1, 2, 3), steps: int = 30, sampler: str = "euler",
              cfg: float | None = None, batch_cfg: bool = True, budgets=DEFAULT_BUDGETS, qualities=QUALITIES,
              block_budgets=(), whole_call_budgets=(), jetdet_options: dict | None = None, peers=PEER_FAMILIES,
              methods: list[Method] | None = None,
              weights=None, classifier_weights=None, device="cpu", threads: int | None = None,
              warmup: bool = True, reset_check: bool = True, repeats: int = 1, progress=None) -> dict:
    """Run full compute, jetdet at ``budgets`` and the diffusers hooks of ``peers`` side by side.

    Args:
        seeds, classes: every ``(seed, class)`` pair is one sample (batch 1 + CFG).
        steps, sampler, cfg, batch_cfg: sampler settings (``cfg`` default: the sampler's default scale).
        budgets: jetdet error budgets; ``qualities``: jetdet quality presets measured as they are;
            ``block_budgets``: budgets with partial rows (:data:`BLOCK_OPTIONS`); ``whole_call_budgets``: budgets of
            the whole-call controller (``block_reuse=False``), the controller before partial rows;
            ``jetdet_options``: other controller options (``num_steps=steps`` is passed unless given).
        peers: diffusers hook families (a subset of :data:`PEER_FAMILIES`); ``methods`` replaces the peer rows
            with an explicit list (full compute and the jetdet budgets are always measured).
        weights, classifier_weights: safetensors paths (default: the bundled files).
        threads: ``torch.set_num_threads`` (default: leave as is).
        warmup: one untimed sample per method first; ``reset_check``: sample the first pair again at the end.
        repeats: timed passes over all samples (wall = median over all of them; passes after the first must
            reproduce the first bit for bit, reported as ``repeat_max_diff``).
        progress: ``print``-like callable for progress lines.

    Returns:
        ``{"config", "env", "rows", "curve", "matched", "acceptance", "mag_ratios"}``; ``rows`` has one dict per
        method (see the module docstring for the metrics).
    """
    say = progress or (lambda *a, **k: None)
    if threads is not None:
        torch.set_num_threads(int(threads))
    cfg = sampling.DEFAULT_CFG if cfg is None else float(cfg)
    seeds, classes = list(seeds), list(classes)
    jobs = [(s, c) for s in seeds for c in classes]
    if not jobs:
        raise ValueError("seeds x classes: nothing to sample")
    evals = sampling.num_evaluations(steps, sampler)
    plain = bundled.load_bundled(device=device, path=weights)
    base = bundled.load_bundled_diffusers(device=device, path=weights)
    try:
        classifier = bundled.load_classifier(device=device, path=classifier_weights)
    except FileNotFoundError:
        classifier = None
    ctx = _Ctx(evals)

    all_methods = [Method("full", "")]
    for q in qualities:
        all_methods.append(Method("jetdet", f"quality={q}", {"quality": q}, options=dict(jetdet_options or {})))
    for b in budgets:
        all_methods.append(Method("jetdet", f"budget={b:g}", {"budget": float(b)},
                                  options=dict(jetdet_options or {})))
    for b in block_budgets:
        all_methods.append(Method("jetdet blocks", f"budget={b:g}", {"budget": float(b), **BLOCK_OPTIONS},
                                  options=dict(jetdet_options or {})))
    for b in whole_call_budgets:
        all_methods.append(Method("jetdet whole-call", f"budget={b:g}", {"budget": float(b), "block_reuse": False},
                                  options=dict(jetdet_options or {})))
    mag_ratios = None
    if methods is not None:
        all_methods += list(methods)
    elif peers:
        all_methods += peer_methods(tuple(peers))
    if any(m.family == "MagCache" for m in all_methods):
        try:
            mag_ratios = calibrate_mag_ratios(base, plain, jobs[0][1], jobs[0][0], steps, sampler, cfg, batch_cfg,
                                              device)
            say(f"MagCache calibrated ratios ({len(mag_ratios)}): {[round(r, 4) for r in mag_ratios]}")
        except Exception as e:  # noqa: BLE001 - the MagCache rows then record it
            mag_ratios = None
            say(f"MagCache calibration failed: {type(e).__name__}: {e}")
    ctx.mag_ratios = mag_ratios

    runners = [_Runner(m, base, ctx, batch_cfg, plain.null_label, steps) for m in all_methods]
    for r in runners:
        r.apply()
        if r.error:
            say(f"  {r.m.name}: {r.error}")

    if warmup:  # untimed: allocator, thread pool, first-call paths
        s0, c0 = jobs[0]
        for r in runners:
            r.sample(plain, c0, s0, sampler, cfg, device)
    for r in runners:
        r.counter.reset()
        if r.handle is not None:
            r.ctl0 = copy.deepcopy(r.handle.controller.stats())

    ctl_stats = {}
    for rep in range(repeats):
        for j, (seed, cls) in enumerate(jobs):
            k = (j + rep) % len(runners)  # rotate the order so that no method always runs right after another
            for r in runners[k:] + runners[:k]:
                c0 = r.counter.snapshot()
                res = r.sample(plain, cls, seed, sampler, cfg, device)
                if res is None:
                    continue
                img, dt = res
                c1 = r.counter.snapshot()
                r.times.append(dt)
                if rep == 0:
                    r.images.append(img)
                    r.per_sample.append(tuple(b - a for a, b in zip(c0, c1)))
                elif j < len(r.images):  # a repeat must reproduce the first pass bit for bit
                    r.repeat_diff = max(r.repeat_diff, (img - r.images[j]).abs().max().item())
            say(f"  pass {rep + 1}/{repeats}, sample {j + 1}/{len(jobs)} (seed {seed}, class {cls}): full "
                f"{1000 * runners[0].times[-1]:.0f} ms, load {_loadavg()}" if runners[0].times else
                f"  sample {j + 1}/{len(jobs)}")
        if rep == 0:
            for r in runners:
                if r.handle is not None and r.ctl0 is not None:
                    s1 = r.handle.controller.stats()
                    st = {key: s1[key] - r.ctl0.get(key, 0) for key in
                          ("calls", "calls_run", "calls_partial", "calls_saved", "rows", "rows_run", "rows_saved",
                           "rows_partial", "rows_cfg", "model_equivalents", "syncs")}
                    st["blocks"] = s1["blocks"]
                    st["resets"] = {key: v - r.ctl0["resets"].get(key, 0) for key, v in s1["resets"].items()}
                    st["reasons"] = {key: v - r.ctl0["reasons"].get(key, 0) for key, v in s1["reasons"].items()}
                    ctl_stats[r.m.name] = st

    reset_ok = {}
    if reset_check:
        s0, c0 = jobs[0]
        for r in runners:
            if r.error is not None or not r.images:
                continue
            res = r.sample(plain, c0, s0, sampler, cfg, device)
            if res is not None:
                diff = (res[0] - r.images[0]).abs().max().item()
                reset_ok[r.m.name] = diff
    for r in runners:
        if r.handle is not None:
            r.handle.remove()

    full = runners[0]
    if full.error or len(full.images) != len(jobs):
        raise RuntimeError(f"full compute failed: {full.error}")
    ref = torch.cat(full.images)
    labels = torch.tensor([c for _, c in jobs], device=ref.device)
    work_per_eval = sum(p[3] for p in full.per_sample) / (len(jobs) * evals)
    full_wall = _median(full.times)
    rows = []
    for r in runners:
        row = {"method": r.m.name, "family": r.m.family, "setting": r.m.setting, "error": r.error,
               "notes": list(r.notes), "warnings": list(r.log.messages), "hooked_modules": r.hooked}
        if r.m.family in JETDET_FAMILIES:
            row["budget"] = r.m.build.get("budget")
            row["controller"] = ctl_stats.get(r.m.name)
        n = len(r.images)
        if n == len(jobs):
            img = torch.cat(r.images)
            p = psnr(img, ref)
            identical = bool(torch.isinf(p).all())
            calls = sum(q[3] for q in r.per_sample) / (len(jobs) * work_per_eval)
            row.update({
                "samples": n,
                "fwd": sum(q[0] for q in r.per_sample) / n,
                "full_fwd": sum(q[1] for q in r.per_sample) / n,
                "rows": sum(q[2] for q in r.per_sample) / n,
                "calls": calls,
                "reduction": evals / calls if calls > 0 else math.inf,
                "wall_ms": 1000 * _median(r.times),
                "wall_ms_all": [round(1000 * t, 3) for t in r.times],
                "speedup": full_wall / _median(r.times),
                # the same, paired: median over (pass, sample) of full's time / this method's time
                "speedup_paired": _median([a / b for a, b in zip(full.times, r.times)]),
                "psnr_mean": math.inf if identical else p.clamp(max=PSNR_CAP).mean().item(),
                "psnr_min": p.min().item(),
                "psnr_all": [round(v, 3) if math.isfinite(v) else None for v in p.tolist()],
                "max_abs": (img - ref).abs().max().item(),
                "accuracy": (classifier.predict(img) == labels).double().mean().item() if classifier else None,
                "reset_max_diff": reset_ok.get(r.m.name),
                "repeat_max_diff": r.repeat_diff if repeats > 1 else None,
            })
            if identical and r.m.family not in ("full",) and not (r.m.family in JETDET_FAMILIES
                                                                   and r.m.build.get("budget") == 0):
                row["notes"].append("output bit-identical to full compute")
        elif r.error is None:
            row["error"] = f"only {n} of {len(jobs)} samples"
        rows.append(row)
    result = {
        "config": {"seeds": seeds, "classes": classes, "steps": steps, "sampler": sampler, "cfg": cfg,
                   "batch_cfg": batch_cfg, "evaluations_per_sample": evals, "budgets": list(budgets),
                   "qualities": list(qualities), "block_budgets": list(block_budgets),
                   "whole_call_budgets": list(whole_call_budgets), "block_options": dict(BLOCK_OPTIONS),
                   "jetdet_options": dict(jetdet_options or {}), "device": str(device),
                   "threads": torch.get_num_threads(), "warmup": warmup, "repeats": repeats},
        "env": _env(),
        "weights": {"dit": str(weights or bundled.DIT_FILE), "dit_sha256": _sha(weights or bundled.DIT_FILE),
                    "classifier": str(classifier_weights or bundled.CLASSIFIER_FILE) if classifier else None},
        "mag_ratios": mag_ratios,
        "rows": rows,
    }
    result["curve"] = [r for r in rows if r["family"] == "jetdet"]
    result["curve_whole_call"] = [r for r in rows if r["family"] == "jetdet whole-call"]
    result["curve_blocks"] = [r for r in rows if r["family"] == "jetdet blocks"]
    result["matched"] = matched_psnr(rows)
    result["acceptance"] = acceptance(rows, result["matched"])
    return result


def _sha(path) -> str | None:
    import hashlib

    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def _loadavg():
    try:
        return tuple(round(v, 2) for v in os.getloadavg())
    except OSError:
        return None


def _env() -> dict:
    try:
        import diffusers

        dv = diffusers.__version__
    except ImportError:
        dv = None
    load = _loadavg()
    import subprocess

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    head = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--", "jetdet", "bench/peers.py")
    return {"git_head": head, "git_dirty": dirty.splitlines() if dirty else [], "torch": torch.__version__,
            "diffusers": dv, "python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "loadavg": load,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "jetdet_backend": os.environ.get("JETDET_BACKEND")}


def _ok(r) -> bool:
    return r.get("error") is None and "calls" in r


def matched_psnr(rows) -> list[dict]:
    """For each peer row: the cheapest jetdet budget (fewest ``calls``, then wall) whose mean PSNR is at least
    the peer's, side by side."""
    jet = [r for r in rows if r["family"] == "jetdet" and _ok(r)]
    full_calls = next(r["calls"] for r in rows if r["family"] == "full")
    out = []
    for p in rows:
        if p["family"] in ("full", "jetdet"):
            continue
        m = {"peer": p["method"], "peer_error": p.get("error")}
        if not _ok(p):
            out.append(m)
            continue
        m.update({"peer_psnr": p["psnr_mean"], "peer_calls": p["calls"], "peer_fwd": p["fwd"],
                  "peer_wall_ms": p["wall_ms"], "peer_accuracy": p["accuracy"]})
        m["peer_saves_nothing"] = p["calls"] >= full_calls * (1 - 1e-9)
        cand = [j for j in jet if j["psnr_mean"] >= p["psnr_mean"]]
        if not cand:
            best = max((j["psnr_mean"] for j in jet), default=None)
            m["jetdet"] = None
            m["why"] = f"no jetdet budget reaches {p['psnr_mean']:.2f} dB (best {best})"
        else:
            j = min(cand, key=lambda r: (r["calls"], r["wall_ms"]))
            m.update({"jetdet": j["method"], "jetdet_psnr": j["psnr_mean"], "jetdet_calls": j["calls"],
                      "jetdet_fwd": j["fwd"], "jetdet_wall_ms": j["wall_ms"], "jetdet_accuracy": j["accuracy"],
                      "fewer_calls": j["calls"] < p["calls"], "less_wall": j["wall_ms"] < p["wall_ms"]})
        out.append(m)
    return out


def acceptance(rows, matched, psnr_bar: float = 35.0) -> dict:
    """The issue's bar for jetdet: >= 3x fewer full-model equivalents (``calls``: the FLOP-weighted work) and
    >= 2.5x wall speedup at mean PSNR >= 35 dB, classifier accuracy within 2 points of full compute; at matched
    PSNR fewer calls and less wall than every peer (the whole-call controller's rows count as peers). Reports
    the jetdet row with the best speedup among those at or above the PSNR bar."""
    full = next(r for r in rows if r["family"] == "full")
    ok = [r for r in rows if r["family"] == "jetdet" and _ok(r) and r["psnr_mean"] >= psnr_bar]
    a = {"psnr_bar": psnr_bar, "full_accuracy": full.get("accuracy")}
    if not ok:
        a["best"] = None
        return a
    best = max(ok, key=lambda r: (r["speedup"], r["reduction"]))
    acc_gap = None
    if best["accuracy"] is not None and full.get("accuracy") is not None:
        acc_gap = 100 * (full["accuracy"] - best["accuracy"])
    fwd_red = full["fwd"] / best["fwd"] if best["fwd"] else math.inf
    a.update({
        "best": best["method"], "psnr": best["psnr_mean"], "fwd_reduction": fwd_red,
        "call_reduction": best["reduction"], "speedup": best["speedup"], "accuracy_gap_points": acc_gap,
        "calls_ok": best["reduction"] >= 3.0, "speedup_ok": best["speedup"] >= 2.5,
        "accuracy_ok": acc_gap is not None and acc_gap <= 2.0,
    })
    live = [m for m in matched if not m.get("peer_error") and not m.get("peer_saves_nothing")]
    beaten = [m for m in live if m.get("jetdet")]
    a["matched_peers"] = len(live)
    a["matched_wins"] = sum(1 for m in beaten if m["fewer_calls"] and m["less_wall"])
    a["matched_losses"] = [m["peer"] for m in beaten if not (m["fewer_calls"] and m["less_wall"])]
    a["unmatched"] = [m["peer"] for m in live if not m.get("jetdet")]
    a["peers_failed"] = [m["peer"] for m in matched if m.get("peer_error")]
    a["peers_saving_nothing"] = [m["peer"] for m in matched if m.get("peer_saves_nothing")]
    return a


# ------------------------------------------------------------------------------------------------ printing


def _f(v, fmt="{:.2f}"):
    if v is None:
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return fmt.format(v)


def _family_order(r):
    fams = ("full", *JETDET_FAMILIES, *PEER_FAMILIES)
    return fams.index(r["family"]) if r["family"] in fams else len(fams)


def format_table(result) -> str:
    rows = sorted(enumerate(result["rows"]), key=lambda ir: (_family_order(ir[1]), ir[0]))
    lines = ["| method | setting | fwd | full fwd | rows | calls | reduction | wall ms | speedup | PSNR mean | "
             "PSNR min | max abs | acc % | reset | notes |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for _, r in rows:
        notes = list(r.get("notes", []))
        if r.get("error"):
            notes.insert(0, "**error**: " + r["error"].replace("|", "\\|").replace("\n", " ")[:300])
        notes += [f"warning: {w[:160]}" for w in r.get("warnings", [])
                  if "experimental" not in w and "attention_weight_callback" not in w][:2]
        if r.get("family") in JETDET_FAMILIES and r.get("controller"):
            c = r["controller"]
            notes.append(f"partial calls {c['calls_partial']}, rows saved {c['rows_saved']}/{c['rows']} "
                         f"({c.get('rows_partial', 0)} ran the head only, {c.get('rows_cfg', 0)} from the CFG "
                         f"partner)")
            runs = {k: v for k, v in c.get("reasons", {}).items() if v and k != "forecast"}
            if runs:
                notes.append("rows run by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(runs.items())))
        if "calls" not in r:
            lines.append(f"| {r['family']} | {r['setting']} | " + " | ".join(["–"] * 12) + " | "
                         + "; ".join(notes).replace("|", "\\|") + " |")
            continue
        rd = r.get("reset_max_diff")
        reset = "–" if rd is None else ("ok" if rd == 0 else f"differs ({rd:.2g})")
        if r.get("repeat_max_diff"):
            notes.append(f"repeat pass differs (max {r['repeat_max_diff']:.2g})")
        acc = None if r["accuracy"] is None else 100 * r["accuracy"]
        lines.append(
            f"| {r['family']} | {r['setting']} | {_f(r['fwd'], '{:.1f}')} | {_f(r['full_fwd'], '{:.1f}')} | "
            f"{_f(r['rows'], '{:.1f}')} | {_f(r['calls'], '{:.1f}')} | {_f(r['reduction'])}x | "
            f"{_f(r['wall_ms'], '{:.0f}')} | {_f(r['speedup'])}x | {_f(r['psnr_mean'])} | {_f(r['psnr_min'])} | "
            f"{_f(r['max_abs'], '{:.3f}')} | {_f(acc, '{:.1f}')} | {reset} | "
            + "; ".join(notes).replace("|", "\\|") + " |")
    return "\n".join(lines)


def format_curve(result, key="curve") -> str:
    lines = ["| jetdet setting | fwd | rows | calls | reduction | wall ms | speedup | PSNR mean | PSNR min | max abs | "
             "acc % |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result.get(key, []):
        if "calls" not in r:
            lines.append(f"| {r['setting']} | error: {r.get('error')} |")
            continue
        acc = None if r["accuracy"] is None else 100 * r["accuracy"]
        lines.append(f"| {r['setting']} | {r['fwd']:.1f} | {r['rows']:.1f} | {r['calls']:.1f} | "
                     f"{_f(r['reduction'])}x | {r['wall_ms']:.0f} | {r['speedup']:.2f}x | {_f(r['psnr_mean'])} | "
                     f"{_f(r['psnr_min'])} | {r['max_abs']:.3f} | {_f(acc, '{:.1f}')} |")
    return "\n".join(lines)


def format_matched(result) -> str:
    lines = ["| peer | peer PSNR | peer calls | peer wall ms | jetdet match | jetdet PSNR | jetdet calls (fwd) | "
             "jetdet wall ms | fewer calls | less wall |", "|---|---:|---:|---:|---|---:|---:|---:|---|---|"]
    for m in result["matched"]:
        if m.get("peer_error"):
            lines.append(f"| {m['peer']} | error | | | | | | | | |")
            continue
        head = (f"| {m['peer']} | {_f(m['peer_psnr'])} | {m['peer_calls']:.1f} | {m['peer_wall_ms']:.0f} |")
        if m.get("peer_saves_nothing"):
            lines.append(head + " (peer saves nothing) | | | | | |")
            continue
        if not m.get("jetdet"):
            lines.append(head + f" {m['why']} | | | | | |")
            continue
        lines.append(head + f" {m['jetdet']} | {_f(m['jetdet_psnr'])} | {m['jetdet_calls']:.1f} "
                     f"({m['jetdet_fwd']:.1f}) | {m['jetdet_wall_ms']:.0f} | "
                     f"{'yes' if m['fewer_calls'] else '**no**'} | {'yes' if m['less_wall'] else '**no**'} |")
    return "\n".join(lines)


def format_acceptance(result) -> str:
    a = result["acceptance"]
    if not a.get("best"):
        return f"acceptance: no jetdet budget reaches mean PSNR >= {a['psnr_bar']} dB"
    acc = "n/a" if a["accuracy_gap_points"] is None else f"{a['accuracy_gap_points']:+.1f} points vs full"
    lines = [
        f"acceptance (best speedup at mean PSNR >= {a['psnr_bar']} dB: {a['best']}, {a['psnr']:.2f} dB):",
        f"  full-model equivalents: {a['call_reduction']:.2f}x less compute ({a['fwd_reduction']:.2f}x fewer "
        f"forwards) (need >= 3x): {'PASS' if a['calls_ok'] else 'FAIL'}",
        f"  wall speedup: {a['speedup']:.2f}x (need >= 2.5x): {'PASS' if a['speedup_ok'] else 'FAIL'}",
        f"  classifier accuracy: {acc} (need within 2): {'PASS' if a['accuracy_ok'] else 'FAIL'}",
        f"  matched PSNR: jetdet needs fewer calls and less wall than {a['matched_wins']} of {a['matched_peers']} "
        f"peer rows that save compute; not beaten: {a['matched_losses'] or 'none'}; no jetdet budget at the "
        f"peer's PSNR: {a['unmatched'] or 'none'}",
        f"  (not compared: {len(a['peers_failed'])} peer rows failed, {len(a['peers_saving_nothing'])} saved nothing)",
    ]
    return "\n".join(lines)


def format_header(res) -> str:
    c, e = res["config"], res["env"]
    return (f"{c['sampler']}, {c['steps']} steps, CFG {c['cfg']:g} ({'batched' if c['batch_cfg'] else 'separate'}), "
            f"{len(c['seeds'])} seeds x {len(c['classes'])} classes, {c['evaluations_per_sample']} evaluations/sample, "
            f"{c['repeats']} timed pass(es); torch {e['torch']}, diffusers {e['diffusers']}, {c['threads']} thread(s), "
            f"load average {e['loadavg']} at the start")


def format_readme(res) -> str:
    """The two tables the README quotes: jetdet's curve against full compute, and the matched-PSNR table."""
    full = next(r for r in res["rows"] if r["family"] == "full")
    lines = ["| method | calls | fewer calls | wall ms | speedup | PSNR mean / min dB | acc % |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in [full] + [r for r in res["rows"] if r["family"] in JETDET_FAMILIES and "calls" in r]:
        name = "full" if r is full else f"{r['family']} {r['setting']}"
        acc = None if r["accuracy"] is None else 100 * r["accuracy"]
        lines.append(f"| {name} | {r['calls']:.1f} | {_f(r['reduction'])}x | {r['wall_ms']:.0f} | "
                     f"{_f(r['speedup'])}x | {_f(r['psnr_mean'])} / {_f(r['psnr_min'])} | {_f(acc, '{:.1f}')} |")
    lines += ["", "| peer setting | peer PSNR | peer calls / wall ms | jetdet match | jetdet PSNR | "
              "jetdet calls / wall ms | fewer calls | less wall |", "|---|---:|---:|---|---:|---:|---|---|"]
    for m in res["matched"]:
        if m.get("peer_error"):
            lines.append(f"| {m['peer']} | error: {str(m['peer_error'])[:60]} | | | | | | |")
            continue
        head = f"| {m['peer']} | {_f(m['peer_psnr'])} | {m['peer_calls']:.1f} / {m['peer_wall_ms']:.0f} |"
        if m.get("peer_saves_nothing"):
            lines.append(head + " (saves nothing) | | | | |")
        elif not m.get("jetdet"):
            lines.append(head + f" {m['why']} | | | | |")
        else:
            lines.append(head + f" {m['jetdet']} | {_f(m['jetdet_psnr'])} | {m['jetdet_calls']:.1f} / "
                         f"{m['jetdet_wall_ms']:.0f} | {'yes' if m['fewer_calls'] else '**no**'} | "
                         f"{'yes' if m['less_wall'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def plot(res, path) -> str | None:
    """PNG of mean PSNR against wall speedup for every method (jetdet as lines, peers as markers); returns the
    path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in res["rows"] if _ok(r) and r["family"] != "full"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = dict(zip(PEER_FAMILIES, "os^vDP"))
    for fam in JETDET_FAMILIES:
        pts = sorted((r["speedup"], min(r["psnr_mean"], 60.0)) for r in rows if r["family"] == fam
                     and r["setting"].startswith("budget"))
        if pts:
            ax.plot(*zip(*pts), "-" if fam == "jetdet" else "--", marker=".", label=fam, zorder=3,
                    color="black" if fam == "jetdet" else "gray")
    from jetdet.cache.controller import QUALITY

    preset_of = {f"budget={v['budget']:g}": f"quality={q} (budget={v['budget']:g})" for q, v in QUALITY.items()}
    quality_rows = any(r["family"] == "jetdet" and r["setting"].startswith("quality") for r in rows)
    for r in rows:
        label = None
        if r["family"] == "jetdet" and r["setting"].startswith("quality"):
            label = r["setting"]
        elif r["family"] == "jetdet" and not quality_rows and r["setting"] in preset_of:
            label = preset_of[r["setting"]]  # a run from before the presets: the preset's budget, the same outputs
        if label:
            ax.scatter([r["speedup"]], [min(r["psnr_mean"], 60.0)], marker="*", s=140, color="crimson", zorder=4)
            ax.annotate(label, (r["speedup"], min(r["psnr_mean"], 60.0)), textcoords="offset points",
                        xytext=(5, 5), fontsize=8, color="crimson")
    for fam in PEER_FAMILIES:
        pts = [(r["speedup"], min(r["psnr_mean"], 60.0)) for r in rows if r["family"] == fam]
        if pts:
            ax.scatter(*zip(*pts), marker=markers[fam], label=fam, alpha=0.75)
    ax.axhline(35.0, color="tab:green", lw=0.8, ls=":")
    ax.axvline(2.5, color="tab:green", lw=0.8, ls=":")
    ax.set_xlabel("wall-clock speedup over full compute (median per sample, interleaved)")
    ax.set_ylabel("mean PSNR against full compute (dB, capped at 60)")
    ax.set_title(format_header(res).split(";")[0], fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def format_markdown(res, command: str) -> str:
    return "\n\n".join([
        f"## Peers side by side: {format_header(res)}", f"`{command}`", format_table(res),
        "### jetdet speed/quality curve", format_curve(res),
        "### With partial rows (block-level reuse, " + str(BLOCK_OPTIONS) + ")", format_curve(res, "curve_blocks"),
        "### The whole-call controller (block_reuse=False)", format_curve(res, "curve_whole_call"),
        "### Matched PSNR (cheapest jetdet budget with mean PSNR >= the peer's)", format_matched(res),
        "```\n" + format_acceptance(res) + "\n```"]) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=8, help="number of seeds (0 .. n-1)")
    ap.add_argument("--classes", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--sampler", default="euler", choices=sampling.SAMPLERS)
    ap.add_argument("--cfg", type=float, default=None, help=f"guidance scale (default {sampling.DEFAULT_CFG})")
    ap.add_argument("--separate-cfg", action="store_true", help="cond and uncond as two forwards")
    ap.add_argument("--budgets", type=float, nargs="*", default=list(DEFAULT_BUDGETS))
    ap.add_argument("--qualities", nargs="*", default=list(QUALITIES), help="jetdet quality presets to measure")
    ap.add_argument("--blocks", type=float, nargs="*", default=[], metavar="BUDGET",
                    help="also measure jetdet with partial rows (block-level reuse) at these budgets")
    ap.add_argument("--whole-call", type=float, nargs="*", default=[], metavar="BUDGET",
                    help="also measure the whole-call controller (block_reuse=False) at these budgets")
    ap.add_argument("--plot", default=None, help="write a PNG of PSNR against wall speedup here")
    ap.add_argument("--replot", default=None, metavar="JSON",
                    help="measure nothing: read a --json result, write --plot from it and print its acceptance "
                         "against the current bar")
    ap.add_argument("--jetdet-option", action="append", default=[], metavar="KEY=VALUE",
                    help="extra StepCacheController option (value parsed as a Python literal), repeatable")
    ap.add_argument("--peers", nargs="*", default=list(PEER_FAMILIES), help="diffusers hook families to run")
    ap.add_argument("--weights", default=None, help="DiT safetensors (default: the bundled file)")
    ap.add_argument("--classifier", default=None, help="classifier safetensors (default: the bundled file)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: stable on shared cores)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--repeats", type=int, default=1, help="timed passes over all samples (wall: median of all)")
    ap.add_argument("--json", default=None, help="write the full result as JSON here")
    ap.add_argument("--markdown", default=None, help="write the tables as a markdown section here")
    ap.add_argument("--readme", default=None, help="write the README's two condensed tables here")
    args = ap.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            res = json.load(f)
        res["matched"] = matched_psnr(res["rows"])
        res["acceptance"] = acceptance(res["rows"], res["matched"])
        print(f"{args.replot}: {format_header(res)}; git {res['env'].get('git_head')}")
        print(format_acceptance(res))
        if args.plot:
            where = plot(res, args.plot)
            print(f"plot: {where}" if where else "plot: matplotlib is not installed (pip install '.[bench]')")
        return res
    opts = parse_options(args.jetdet_option)
    t0 = time.perf_counter()
    res = run_peers(seeds=range(args.seeds), classes=args.classes, steps=args.steps, sampler=args.sampler,
                    cfg=args.cfg, batch_cfg=not args.separate_cfg, budgets=args.budgets, qualities=args.qualities,
                    block_budgets=args.blocks, whole_call_budgets=args.whole_call, jetdet_options=opts,
                    peers=args.peers, weights=args.weights, classifier_weights=args.classifier, device=args.device,
                    threads=args.threads, warmup=not args.no_warmup, repeats=args.repeats,
                    progress=lambda s: print(s, flush=True))
    res["env"]["total_s"] = time.perf_counter() - t0
    print(f"\n## Peers: {format_header(res)}\n")
    print(format_table(res))
    print("\n### jetdet speed/quality curve\n")
    print(format_curve(res))
    if res.get("curve_blocks"):
        print(f"\n### With partial rows (block-level reuse, {BLOCK_OPTIONS})\n")
        print(format_curve(res, "curve_blocks"))
    if res.get("curve_whole_call"):
        print("\n### The whole-call controller (block_reuse=False)\n")
        print(format_curve(res, "curve_whole_call"))
    print("\n### Matched PSNR (cheapest jetdet budget with mean PSNR >= the peer's)\n")
    print(format_matched(res))
    print()
    print(format_acceptance(res))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(format_markdown(res, " ".join(["python bench/peers.py", *(argv if argv is not None else
                                                                                 sys.argv[1:])])))
        print(f"wrote {args.markdown}")
    if args.plot:
        where = plot(res, args.plot)
        print(f"plot: {where}" if where else "plot: matplotlib is not installed (pip install '.[bench]')")
    if args.readme:
        with open(args.readme, "w") as f:
            f.write(format_readme(res))
        print(f"wrote {args.readme}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
        print(f"\nwrote {args.json}")
    return res


if __name__ == "__main__":
    main()
