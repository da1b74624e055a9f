"""The step-cache controller: per batch row and per CFG branch, run the model or forecast its output.

The patcher turns each model evaluation into a :class:`~jetdet.patch.call.ModelCall` (latent ``x [B, ...]``,
per-row timestep ``t [B]``, optional per-row conditioning summary ``cond``, and ``run(rows)``, which evaluates
the original model on a subset of the rows). :class:`StepCacheController` is called with it and returns the
full ``[B, ...]`` output: the rows it chose to compute come from one ``run(rows)`` call (row compaction; no
call at all when every row is forecast), the others are forecast from that row's own cached history.

Streams (which cached history a row belongs to)
-----------------------------------------------
A *stream* is one row of one CFG branch followed through one sampling trajectory. Its key is

* with ``call.cond`` (per-row conditioning summary, e.g. class labels with a null label for the
  unconditional branch, or pooled text embeddings): ``(cond value, k)``, where ``k`` counts the earlier rows
  of the same call with the same cond value. The key does not depend on how the sampler lays the batch out,
  so CFG as one ``[cond; uncond]`` batch and CFG as two forwards give the same streams, and a batch-size
  change keeps every row whose key survives. (Up to 64 evenly spaced values of each row's cond are
  compared exactly.) Two rows with identical x, t and cond have identical outputs, so a collision between
  "different" rows with the same cond value at the same timestep is harmless.
* without ``cond``: ``(branch, row)``, where ``branch`` is the position of the call among the calls at the
  same timestep, modulo the number of calls seen at the trajectory's first timestep (learned, e.g. 2 for CFG
  as two forwards, 1 for batched CFG). This assumes a fixed number of forwards per timestep; adapters that
  can should pass ``cond``. A batch-size change then resets every stream (reason ``"batch"``).

A stream's history is its last ``order + 1`` *computed* outputs, at distinct timesteps (a new output at an
existing timestep, as in Heun's re-evaluation of ``t_{i+1}`` at the corrected ``x``, replaces the older one),
plus host floats: the timesteps, the error-rate estimates, the count of consecutive skips. That is at most
three latent-sized tensors per stream (``forecast="order2"``); nothing per layer.

State resets by itself on:

* a new trajectory: a row's timestep is larger than its stream's previous distinct timestep. That stream
  restarts, and every stream that is not in the current call is dropped (with CFG as two forwards the other
  branch then starts fresh on its next call). A trajectory that starts *below* where the previous one
  stopped is not detectable this way: call :meth:`StepCacheController.new_trajectory` between runs then;
* a change of model (``call.model_id``), of the per-item latent shape, dtype or device, or of the per-item
  output shape: everything is dropped;
* without ``cond``, a change of batch size (see above).

The error rule
--------------
``budget`` is the largest *predicted relative L1 error* ``‖ŷ − y‖₁ / ‖y‖₁`` of a forecast output row ``ŷ``
against the output ``y`` the model would have produced, per row. A row is forecast when its prediction is
at most ``budget`` (and no guard forces it), else computed.

The prediction comes from the forecast's own truncation error. A degree-``q`` polynomial through the last
``q + 1`` computed outputs at ``t_k, t_{k-1}, ...`` misses the true output at ``t`` by
``f[t, t_k, ..., t_{k-q}] · Π_j (t − t_{k-j})`` (the divided difference times the node polynomial). At every
computed step the controller *back-tests* the same forecast: it predicts the output it just computed at
``t_k`` from the nodes before it and measures the miss with ``jetdet.ops.relative_change``; dividing by that
step's node polynomial gives the rate ``D_q ≈ ‖f[t_k, ..., t_{k-q-1}]‖₁ / ‖y_k‖₁``. The prediction at a later
``t`` is then ``D_q · Π_{j=0..q} |t − t_{k-j}|``: for ``forecast="none"`` the output change rate per unit
timestep times the timestep distance since the last compute; for the higher orders the growth is
quadratic/cubic in the distance, as the actual error is. The estimate grows with the distance since the
last computed step, so a run of skips ends by itself.

That term assumes the latent moves as it would have with exact outputs. It does not: each forecast's error
``e_j`` (its prediction), applied over the sampler step ``Δt_j`` that follows it, moves ``x`` by about
``e_j · |Δt_j| · ‖y‖``, and the model answers a change ``δx`` of its input with an output change of about
``‖δx‖ / (t − t_end)`` (exact for a rectified-flow velocity ``(x − x̂₀) / t`` in the directions the
denoiser does not follow; the same order for ε- and v-prediction at noise level ``t``). So the prediction
adds a *drift* term ``drift_gain · Σ_j e_j |Δt_j| / |t − t_end|`` over the forecasts since the last
compute. It is what makes late skips expensive: at 30 Euler steps with forecasts of 5 % predicted error
the drift term is 0.2 % of ``‖y‖`` per skipped step at ``t = 0.8`` and 5 % at ``t = 0.033``.

A timestep that coincides with a history node (Heun's second evaluation of ``t_{i+1}``, at the corrected
``x``) is served with that node's output, the polynomial being exact there. The corrector moved ``x`` by
``(h/2)(y_{i+1} − y_i)`` (``h`` the step), about ``(h²/2) D_0 ‖y‖``, so the prediction is
``drift_gain · (D_0 h² / 2) / |t − t_end|`` plus the drift term. ``drift_gain = 0`` turns both off.

Rows of one timestep are kept in step: with ``piggyback < 1``, when the model runs for some rows at a
timestep (in this call, or in the previous call at the same timestep, as with CFG as two forwards), the
rows whose prediction exceeds ``piggyback · budget`` run with them; and when the previous call at the same
timestep was served from the cache entirely, this call is too if no row's prediction exceeds
``budget / piggyback``, at most ``2 · budget`` (reason ``"follow"``). With CFG as two forwards on the bundled DiT
(Euler, 4 seeds x 4
classes) that second rule moved budget 0.07 from 2.16x fewer calls at 28.5 dB to 2.31x at 30.3 dB, and 0.1
from 2.67x at 28.7 dB to 2.82x at 30.9 dB. Without it the CFG branches of an item
can fall out of step, and then every computed output sees a latent moved by the other branch's forecast
error multiplied by the guidance scale.

Guards: rows are always computed while their stream has fewer than two computed points (no rate yet), in
the first ``start_percent`` and last ``end_percent`` of the trajectory, and after ``max_consecutive_skips``
forecasts in a row.

Partial rows: block-level, token-level and CFG reuse
----------------------------------------------------
Besides "run" and "forecast", a row can run *partly*, under the same budget:

* **Block level** (``block_reuse=True`` and a call that carries ``blocks``, see :mod:`jetdet.patch.blocks` for the
  interface an adapter provides). A row the rule above would forecast, whose prediction is above
  ``skip_whole · budget``, runs the model's first ``head`` block(s) and its ``tail`` instead; the blocks between
  (the body) are forecast: their residual ``h_out − h_in`` (or, for U-Nets, the body output) from the row's own
  body history, the last ``order + 1`` computed nodes (``(head output, body target)`` pairs, full order only:
  a stream with fewer nodes is computed, reason ``"warmup"``). So the x-dependent head and tail are exact and
  only the body is extrapolated in t. ``block_signal`` decides what the first-block output says: ``"off"``
  (the time-based prediction alone decides), ``"veto"`` (the body is computed after all when
  ``kappa · delta > budget``, with ``delta`` the relative L1 miss of the head output against its own forecast
  and ``kappa`` the ratio of the body forecast's miss, relative to the body output, to ``delta``, back-tested at
  the stream's last computed body), or ``"decide"`` (also forecast the body of rows the time rule would run when
  ``kappa · delta <= budget``). Rows of one call stay in step: when some body is computed, forecast bodies
  predicted above ``piggyback · budget`` are computed too. The decision at the split costs one more host sync.
* **Token level** (``token_budget``, a float): inside a computed body block, a token-wise module (a feed-forward
  network) recomputes only the ``token_tile``-token tiles whose input moved by more than ``token_budget``
  (relative L1, :func:`jetdet.ops.relative_change` per tile) from its forecast out of the module's last
  ``order + 1`` full computations (anchors), and forecasts the output of the others from the same anchors; a
  row with more than half its tiles changed is computed in full and becomes a new anchor. The first use of each
  module checks that a token subset gives what the full call gives (else that module is left alone). The token
  selection costs host syncs per module call.
* **CFG reuse** (``cfg_reuse=True``): rows with the same latent at the same timestep (sampled values compared
  exactly at the per-call sync; in one call, or in the previous call when CFG runs as two forwards) are CFG
  partners; the later one is served as the first one's output plus their difference, forecast from the
  difference's own history, when that forecast's back-tested error (the same rate times node-distance rule as
  outputs) plus the drift term is within budget and the partner is computed.

Measured on the bundled DiT (Euler and Heun, 30 steps, CFG 4, 2 seeds x 4 classes, ``python -m
jetdet.models.evaluate``): none of the three moved the speed/quality curve of whole-call skipping. At budget
0.06 (Euler), whole calls gave 1.73x fewer full-model equivalents at 37.6 dB; partial rows for predictions in
(0.5, 1] of the budget 1.64x at 37.2 dB; with the first-block veto 1.42x at 35.7 dB; at 0.08 and 0.1 the same
order. Heun at 0.06: whole calls 2.74x at 34.8 dB, partial rows 2.68x at 34.5 dB. The body's residual is no
easier to extrapolate in t than the model output on this model, and the exact head (the x-dependent part) does
not remove the error. Token reuse of whole blocks at a 5 % input change already cost 30 dB for 1.3x, and CFG
reuse (the uncond row as the cond row plus the last difference, every second step) 35.7 dB for 1.28x: the
guidance scale multiplies the difference's error. So the presets skip whole calls, and the partial modes are
opt-in.

Samplers that add noise
-----------------------
Ancestral and SDE samplers add new noise to the latent at every step. The output (a velocity ``noise − x0``) then
carries that noise, and a forecast of it in time misses by about the noise's share of the output, whatever the step:
on the shapes model in ComfyUI nothing was skipped at budgets up to 0.3 (euler_ancestral: 2 of 20 calls at 0.3). With
``forecast_space="x0"`` and a call that carries the latent in flow form (``flow_x``, with ``t`` flow time), the
histories hold the denoised estimate ``x0 = flow_x − t·y`` instead, which is smooth in time; a forecast row's output is
``(flow_x − x̂0) / t`` at its own latent, so the noise the sampler added is in it exactly. The error rule is the same,
on the output: a back-test's miss is measured as ``(flow_x − x̂0) / t`` against ``y``, and a prediction made at a
later ``t`` grows by ``t_k / t`` (a miss of ``x0`` is divided by ``t`` in the output). ComfyUI's Fast Optimizer uses
it, with ``piggyback=0``, for the samplers that add noise; on deterministic samplers it skipped fewer calls for the
same PSNR than forecasting the output, so it is not the default.

Quality presets
---------------
``quality="high" | "balanced" | "fast"`` (default ``"balanced"``) sets ``budget`` to 0.04 / 0.06 / 0.1 with
whole-call skipping; any option passed explicitly wins. They were chosen on the bundled DiT before any other
model was tried (``bench/peers.py``, 8 seeds x 4 classes, see the README): Euler 39.8 / 33.9 / 31.0 dB mean PSNR
at 1.45x / 1.98x / 2.74x fewer model calls, Heun 39.8 / 34.3 / 28.6 dB at 2.49x / 3.38x / 5.10x. "balanced" is the
highest budget that kept the bundled model's Euler samples above 33 dB.

Counting work
-------------
``stats()["model_equivalents"]`` counts each row in full-model equivalents: 1 for a computed row, ``(head +
tail) / num_blocks`` for a partial row (a call that runs 2 of 12 blocks is 2/12 of a call, not a skipped call),
0 for a forecast row. Token-level savings are not subtracted there (``stats()["tokens"]`` counts them).

Defaults of the rule (``forecast="order1"``, ``max_consecutive_skips=8``, ``drift_gain=1``,
``piggyback=0.5``, no start/end guard) were chosen on the bundled DiT (30 steps, CFG 4, batched CFG, 4 seeds x
4 classes, ``python -m jetdet.models.evaluate``). Measured there (mean PSNR against full compute, model-call
reduction): at budgets 0.05/0.07/0.1, ``piggyback=0`` gave 36.5/33.5/31.5 dB at 1.68/2.10/2.70x and ``0.5``
about the same, while ``piggyback=1`` (rows decided alone) lost 5 dB at the same budget, its CFG branches out
of step. ``drift_gain`` 0.3 and 3 moved points along the same curve. ``forecast="none"`` gave 35.9 dB at 1.61x and
29.1 dB at 2.59x, below ``"order1"``. The two warm-up computes are guard enough at the start: skipping any
single one of steps 3-6 alone already costs the final image 36-41 dB, and the error rule computes there by
itself.

Host syncs
----------
One per call, in steady state: the per-row timesteps, the sampled cond values and the pending error-rate
estimates of the previous computed step are gathered into one small float64 vector and copied to the host
together (nothing is copied when they already are on the CPU). The decisions, the row-compaction index and
the forecast weights are then computed on the host; the index goes back with a non-blocking copy from
pinned memory. Back-tests run on the device and are read at the next call's sync. The memory manager adds
a sync per spill to disk (see :mod:`jetdet.cache.manager`).
"""

from __future__ import annotations

import math
import numbers
import time
import warnings
from collections import deque
from dataclasses import dataclass

import torch

from .manager import CacheManager

FORECASTS = {"none": 0, "order1": 1, "order2": 2}
_RESET_REASONS = ("trajectory", "shape", "model", "batch", "output_shape", "evicted", "manual", "error")
SIGNALS = ("off", "veto", "decide")
#: what a stream's history holds and the polynomial forecasts: the model's output, or (``"x0"``, for calls that carry
#: ``flow_x``) its denoised estimate ``flow_x − t·output`` (module docstring, "Samplers that add noise")
SPACES = ("output", "x0")

#: ``quality`` presets: the settings a person picks by name. Each is whole-call skipping at a budget chosen on the
#: bundled DiT (module docstring, "Quality presets"); any entry is overridden by passing the option itself.
_PRESET_BASE = {"block_reuse": False, "block_signal": "off", "skip_whole": 0.9, "token_budget": None,
                "cfg_reuse": False}
QUALITY = {
    "high": {**_PRESET_BASE, "budget": 0.04},
    "balanced": {**_PRESET_BASE, "budget": 0.06},
    "fast": {**_PRESET_BASE, "budget": 0.1},
}
DEFAULT_QUALITY = "balanced"


def _parse_forecast(value) -> int:
    if isinstance(value, bool):
        value = None
    if isinstance(value, int) and value in (0, 1, 2):
        return value
    if isinstance(value, str) and value in FORECASTS:
        return FORECASTS[value]
    raise ValueError(f"forecast: expected one of 'none', 'order1', 'order2' (or 0, 1, 2), got {value!r}")


def _check_float(name: str, value, lo: float, hi: float | None, hi_open: bool = False, what: str = "") -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)  # numpy scalars too
    if ok:
        value = float(value)
        ok = value >= lo and (hi is None or (value < hi if hi_open else value <= hi))
    if not ok:
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name}: expected a finite number {rng}{what}, got {value!r}")
    return value


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected True or False, got {value!r}")
    return value


def _check_int(name: str, value, lo: int, what: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name}: expected an int >= {lo}{what}, got {value!r}")
    return value


def _floats(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when floating point (its ``tolist()`` values are exact), else as float64."""
    return t if t.is_floating_point() else t.to(torch.float64)


def _rows_at(t: torch.Tensor, pos: list[int]) -> torch.Tensor:
    """Rows ``pos`` of ``t``: a view when they are consecutive (no copy), else stacked."""
    if pos == list(range(pos[0], pos[0] + len(pos))):
        return t[pos[0]:pos[0] + len(pos)]
    return torch.stack([t[p] for p in pos])


def _same_t(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(abs(a), abs(b), 1e-12)


class _Stream:
    __slots__ = ("key", "gen", "ts", "rates", "last_t", "prev_t", "t_start", "distinct", "skips", "drift",
                 "last_skip", "bts", "blay", "cts", "tok")

    def __init__(self, key, gen: int):
        self.key = key
        self.gen = gen
        self.ts: list[float] = []  # timesteps of the cached computed outputs, oldest first
        self.rates: dict[int, float] = {}  # back-tested error rate D_q per forecast order q
        self.last_t: float | None = None  # last distinct timestep seen (computed or forecast)
        self.t_start: float | None = None  # first timestep of this stream's trajectory
        self.distinct = 0  # distinct timesteps seen since t_start
        self.skips = 0  # consecutive forecasts
        self.prev_t: float | None = None  # the distinct timestep before last_t
        self.drift = 0.0  # Σ |Δt| · predicted error of the forecasts since the last compute (x drift / ‖y‖)
        self.last_skip: tuple[float, float] | None = None  # (t, predicted error) of the latest forecast
        self.bts: list[float] = []  # timesteps of the cached body nodes (head output, body target), oldest first
        self.blay = None  # body node layout: (head leaf is a tensor, body leaf is a tensor, body leaf is residual)
        self.cts: list[float] = []  # timesteps of the cached CFG differences (this row minus its CFG partner)
        self.tok: dict[str, list[float]] = {}  # token-wise module key -> timesteps of its cached anchors


@dataclass(slots=True)
class _Decision:
    """What the controller does with one row of a call, and why (the decision log's ``reason``, ``est``,
    ``order``); later steps of the call (piggyback, block level, CFG reuse, the first-block signal) revise it."""

    run: bool  # the model computes the row (else it is forecast, or served by its CFG partner)
    reason: str  # why it runs ("new", "warmup", "piggyback", ...) or may be forecast ("budget", "follow")
    est: float | None  # the predicted relative L1 error of a forecast; None when none can be made yet
    order: int | None  # the forecast order the prediction is for
    node: int | None  # index of a history node at this very timestep (served as is), else None
    history: list | None = None  # the stream's cached outputs, read when the row is forecast


def ratios(n: dict) -> dict:
    """``call_ratio``, ``row_ratio`` and ``fme_ratio`` of a counter dict (see :meth:`StepCacheController.stats`): what
    was asked over what was run (inf when nothing ran, 1 when nothing was asked)."""
    def ratio(a, b):
        return a / b if b else math.inf if a else 1.0

    return {"call_ratio": ratio(n["calls"], n["calls_run"]), "row_ratio": ratio(n["rows"], n["rows_run"]),
            "fme_ratio": ratio(n["rows"], n["model_equivalents"])}


class StepCacheController:
    """Skip model evaluations per batch row by forecasting their outputs (see the module docstring).

    Args:
        budget: the largest predicted relative L1 error ``‖ŷ − y‖₁/‖y‖₁`` of a forecast output row, ``>= 0``;
            default: the ``quality`` preset's.
            ``0`` never skips: every call runs the whole batch and the output is the model's own, bit for bit.
        start_percent: always compute in the first fraction ``[0, 1)`` of the trajectory.
        end_percent: always compute in the last fraction ``[0, 1)`` of the trajectory.
            The trajectory position of a timestep ``t`` is, in order of preference: its place in
            ``timesteps`` (interpolated; ``0`` at the first entry, ``1`` at the last); else the number of
            distinct timesteps the stream has seen divided by ``num_steps``; else
            ``(t_start − t) / (t_start − t_end)`` with ``t_start`` the stream's first timestep (progress in
            timestep units, assuming the trajectory ends at ``t_end``).
        max_consecutive_skips: most forecasts in a row per stream (model evaluations, so a Heun step counts
            two), ``>= 0``; ``0`` never skips.
        forecast: ``"none"`` (reuse the last computed output), ``"order1"`` (linear extrapolation over the last
            two computed outputs) or ``"order2"`` (quadratic over three), also ``0``/``1``/``2``. Needs order+1
            cached outputs per stream; until a stream has order+2 computed points a lower order is used.
        memory_budget_bytes: most bytes of cached outputs on the compute device (``None`` = unlimited); the
            least recently used streams spill to ``cpu_budget_bytes`` of host memory, then to
            ``disk_budget_bytes`` in a temporary directory, then are dropped (:class:`CacheManager`).
        cpu_budget_bytes, disk_budget_bytes, spill: see :class:`~jetdet.cache.manager.CacheManager`.
        num_steps: hint, the number of sampler steps (``>= 1``), for the guards.
        timesteps: hint, the sampler's schedule (``>= 2`` strictly monotonic values, including the final one),
            for the guards.
        t_end: the timestep trajectories end at (default 0: flow-matching sigma and diffusion timesteps
            both end near 0): the guards' progress when neither hint is given, and the drift term's scale.
        drift_gain: ``>= 0``, the weight of the latent-drift terms of the prediction (module docstring):
            the output's sensitivity to its input, in units of ``1 / |t − t_end|``. ``0`` ignores the drift
            and always serves a repeated timestep (Heun) from the cache when the guards allow.
        piggyback: in ``[0, 1]``; when the model runs anyway at a timestep (for some rows of this call, or in
            the previous call at the same timestep), also compute the rows whose predicted error is above
            ``piggyback · budget``. ``1`` computes only the rows over budget; ``0`` computes the whole batch
            whenever any row needs it (one decision per call).
        log_limit: most entries kept in :attr:`decision_log` (oldest dropped), ``>= 0``.
        quality: ``"high"``, ``"balanced"`` (default) or ``"fast"``: the preset that sets ``budget`` and the
            options below unless they are passed (:data:`QUALITY`; module docstring, "Quality presets").
        block_reuse: run rows partly through ``call.blocks`` when the call has one (block-level reuse).
        block_signal: ``"off"``, ``"veto"`` or ``"decide"``: what the first-block output decides (module
            docstring, "Partial rows").
        skip_whole: in ``[0, 1]``; with block reuse, a row predicted at most ``skip_whole · budget`` is forecast
            whole (no head), one predicted above it runs partly.
        token_budget: ``None`` (off) or the largest relative L1 change of a token tile's input for its output to be
            forecast inside a computed block (token-level reuse), ``>= 0``.
        token_tile: tokens per tile for token-level reuse, ``>= 1``.
        cfg_reuse: serve a row as its CFG partner's output plus their forecast difference when that is within
            budget.
        forecast_space: ``"output"`` (default) forecasts the model's output; ``"x0"`` forecasts the denoised
            estimate ``call.flow_x − t·output`` of calls that carry ``flow_x`` (flow time, ``t_end=0``) and returns
            the output at the row's own latent, the error still measured on the output (module docstring, "Samplers
            that add noise").
    """

    def __init__(self, budget: float | None = None, start_percent: float = 0.0, end_percent: float = 0.0,
                 max_consecutive_skips: int = 8, forecast="order1", memory_budget_bytes: int | None = None,
                 cpu_budget_bytes: int | None = None, disk_budget_bytes: int | None = None,
                 spill=("cpu", "disk"), num_steps: int | None = None, timesteps=None, t_end: float = 0.0,
                 drift_gain: float = 1.0, piggyback: float = 0.5, log_limit: int = 10000,
                 quality: str | None = None, block_reuse: bool | None = None, block_signal: str | None = None,
                 skip_whole: float | None = None, token_budget: float | None = None, token_tile: int = 16,
                 cfg_reuse: bool | None = None, forecast_space: str = "output"):
        if quality is None:
            quality = DEFAULT_QUALITY
        if not isinstance(quality, str) or quality not in QUALITY:
            raise ValueError(f"quality: expected one of {tuple(QUALITY)}, got {quality!r}")
        self.quality = quality
        preset = QUALITY[quality]
        if budget is None:
            budget = preset["budget"]
        self.budget = _check_float("budget", budget, 0.0, None,
                                   what=" (the largest predicted relative L1 error of a forecast output row)")
        self.block_reuse = _check_bool("block_reuse", preset["block_reuse"] if block_reuse is None else block_reuse)
        sig = preset["block_signal"] if block_signal is None else block_signal
        if sig not in SIGNALS:
            raise ValueError(f"block_signal: expected one of {SIGNALS}, got {sig!r}")
        self.block_signal = sig
        self.skip_whole = _check_float("skip_whole", preset["skip_whole"] if skip_whole is None else skip_whole,
                                       0.0, 1.0)
        tb = preset["token_budget"] if token_budget is None else token_budget
        self.token_budget = None if tb is None or tb is False else _check_float(
            "token_budget", tb, 0.0, None, what=" (the largest relative L1 change of a token tile's input), or None")
        self.token_tile = _check_int("token_tile", token_tile, 1)
        self.cfg_reuse = _check_bool("cfg_reuse", preset["cfg_reuse"] if cfg_reuse is None else cfg_reuse)
        self.start_percent = _check_float("start_percent", start_percent, 0.0, 1.0, hi_open=True)
        self.end_percent = _check_float("end_percent", end_percent, 0.0, 1.0, hi_open=True)
        if self.start_percent + self.end_percent > 1.0:
            raise ValueError(f"start_percent + end_percent: expected at most 1, got "
                             f"{self.start_percent} + {self.end_percent}")
        self.max_consecutive_skips = _check_int("max_consecutive_skips", max_consecutive_skips, 0)
        self.order = _parse_forecast(forecast)
        if num_steps is not None:
            num_steps = _check_int("num_steps", num_steps, 1, " or None")
        self.num_steps = num_steps
        self.timesteps = self._check_schedule(timesteps)
        self.t_end = _check_float("t_end", t_end, -math.inf, None)
        self.drift_gain = _check_float("drift_gain", drift_gain, 0.0, None)
        self.piggyback = _check_float("piggyback", piggyback, 0.0, 1.0)
        if forecast_space not in SPACES:
            raise ValueError(f"forecast_space: expected one of {SPACES}, got {forecast_space!r}")
        if forecast_space == "x0" and self.t_end != 0.0:
            raise ValueError(f"forecast_space='x0' is for flow time, which ends at t_end=0; got t_end={self.t_end}")
        self.forecast_space = forecast_space
        self.log_limit = _check_int("log_limit", log_limit, 0)
        self.manager = CacheManager(memory_budget_bytes=memory_budget_bytes, cpu_budget_bytes=cpu_budget_bytes,
                                    disk_budget_bytes=disk_budget_bytes, spill=spill)
        self._cond_index_cache: dict = {}
        self.clear()

    @staticmethod
    def _check_schedule(timesteps):
        if timesteps is None:
            return None
        if isinstance(timesteps, torch.Tensor):
            timesteps = timesteps.detach().reshape(-1).tolist()
        try:
            vals = [float(v) for v in timesteps]
        except (TypeError, ValueError):
            raise ValueError(f"timesteps: expected None or a sequence of numbers, got {timesteps!r}") from None
        steps = [b - a for a, b in zip(vals, vals[1:])]
        if (len(vals) < 2 or not all(math.isfinite(v) for v in vals)
                or not (all(s > 0 for s in steps) or all(s < 0 for s in steps))):
            raise ValueError(f"timesteps: expected at least 2 finite, strictly monotonic values (the sampler's "
                             f"schedule including its final value), got {vals}")
        return vals

    # ---------------------------------------------------------------------------------------- public API
    def clear(self) -> None:
        """Forget everything: cached streams (all tiers, the temporary directory too), statistics and the
        decision log."""
        self.manager.clear()
        self._streams: dict = {}
        self._pending: list = []
        self._gen = 0
        self._env = None
        self._out_items: dict = {}  # per-row input shape -> its output row (shape, dtype, device)
        self._shape = None
        self._free_shape = None  # the per-row shape of the last call without cond
        self._batch = None
        self._prev_call_t = None
        self._calls_at_t = 0
        self._branches = None
        self._run_t = None
        self._skip_t = None
        self._prev_max_t = None
        self._n = {"calls": 0, "calls_run": 0, "calls_partial": 0, "calls_saved": 0, "rows": 0, "rows_run": 0,
                   "rows_saved": 0, "rows_partial": 0, "rows_cfg": 0, "model_equivalents": 0.0, "syncs": 0}
        self._tok_n = {"calls": 0, "tokens": 0, "tokens_run": 0, "anchors": 0}
        self._secs = {"step": 0.0, "model": 0.0, "sync": 0.0}  # time in _step, in the model's run, at the sync
        self._tok_checked: dict[str, str] = {}  # module key -> "ok" or why token reuse is off for it
        self._cfg_prev: dict = {}  # (t, x signature) -> (stream, output row, computed) of the previous call
        self._xsig = None
        self._xf = None  # forecast_space "x0": this call's (flow_x, per-row t)
        self._blocks_state = None  # None: not seen yet; ("on", description) or ("off", reason)
        self._resets = dict.fromkeys(_RESET_REASONS, 0)
        self._warned_grad = False
        self._reasons: dict[str, int] = {}
        self._orders: dict[int, int] = {}
        self._log: deque = deque(maxlen=self.log_limit) if self.log_limit else deque(maxlen=0)

    close = clear

    def epoch(self) -> int:
        """How many times cached state was dropped so far (any reset reason): state kept beside the
        controller, such as the patcher's attention block masks, is stale when this changes."""
        return sum(self._resets.values())

    def new_trajectory(self) -> None:
        """Drop the cached streams (statistics are kept): the next call starts a new trajectory."""
        self._reset_all("manual")

    @property
    def decision_log(self) -> list[dict]:
        """Per call: ``{"call", "t", "run", "forecast", "rows"}`` with ``rows`` a list of per-row dicts
        ``{"stream", "t", "decision" ("run"/"forecast"), "reason", "est", "order"}``. ``est`` is the predicted
        relative L1 error (None where none could be made); ``reason`` is why (``"budget"``: the
        prediction decided; ``"new"``/``"warmup"``/``"start"``/``"end"``/``"max_skips"``/``"evicted"``:
        a guard; ``"piggyback"``: computed because the model ran anyway; ``"follow"``: forecast because the
        previous call at this timestep was served from the cache entirely)."""
        return list(self._log)

    def stats(self) -> dict:
        """Counters since the last :meth:`clear`.

        ``calls``: controller calls; ``calls_run``: calls that ran the model (``calls_partial`` of them on
        a subset of rows); ``calls_saved``: calls fully served from the cache; ``rows``/``rows_run``/
        ``rows_saved``: the same per batch row; ``hits``: rows served from the cache (= ``rows_saved``);
        ``syncs``: device-to-host copies made by the controller; ``resets``: per reason; ``reasons``: per
        decision reason; ``orders``: forecasts per order; ``streams``: live streams; ``bytes``: bytes held per
        tier; ``manager``: the cache manager's counters.

        Partial rows count as saved rows (``rows_saved``) *and* as work: ``rows_partial`` rows ran the head and
        tail blocks only, ``rows_cfg`` rows were their CFG partner's output plus a forecast difference.
        ``model_equivalents`` is the work done in full-model evaluations of one row (block evaluations run /
        blocks per row: a row that runs 2 of 12 blocks counts 2/12; a token-level saving inside a computed block
        is not counted, see ``tokens``), ``fme_ratio`` = ``rows / model_equivalents`` (the reduction in
        full-model equivalents). The ratios are over the calls this run saw: a sampler that adapts its step count
        (dpm_adaptive) may take another number of steps than it would without the cache, so compare model calls
        against a run without it for the saving. ``blocks``: whether block-level reuse is used and on which block
        list, or why not. ``forecast_space``, ``piggyback``: the options in use (ComfyUI's Fast Optimizer sets them
        by sampler).
        ``tokens``: token-wise module calls in computed body blocks, tokens in them and tokens recomputed,
        anchors stored, and per module whether token reuse applies.

        ``host_ms``: wall time the controller spent on its own work (decisions, forecasts, caches, bookkeeping:
        everything in a call except the model's run and the wait at the sync), summed over calls; divided by
        ``calls`` it is the host cost per call that a GPU cannot overlap. ``sync_wait_ms``: time spent in the
        one device-to-host copy per call, which on a GPU includes waiting for the queued work before it."""
        m = self.manager.stats()
        n = dict(self._n)
        n["hits"] = n["rows_saved"]
        n.update(ratios(n))
        st = self._blocks_state
        blocks = "not used yet" if st is None else (f"used: {st[1]}" if st[0] == "on" else f"not used: {st[1]}")
        tokens = {**self._tok_n, "modules": dict(self._tok_checked),
                  "token_budget": self.token_budget}
        return {**n, "resets": dict(self._resets), "reasons": dict(self._reasons), "orders": dict(self._orders),
                "streams": len(self._streams), "bytes": m["bytes"], "manager": m, "quality": self.quality,
                "budget": self.budget, "forecast_space": self.forecast_space, "piggyback": self.piggyback,
                "blocks": blocks, "tokens": tokens,
                "host_ms": (self._secs["step"] - self._secs["model"] - self._secs["sync"]) * 1e3,
                "sync_wait_ms": self._secs["sync"] * 1e3}

    def __call__(self, call) -> torch.Tensor:
        x = call.x
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise ValueError(f"call.x: expected a tensor with a batch dim, got {type(x).__name__}")
        B = x.shape[0]
        self._n["calls"] += 1
        self._n["rows"] += B
        grad = torch.is_grad_enabled() and (call.extra.get("needs_grad", False) or any(
            isinstance(v, torch.Tensor) and v.requires_grad for v in (x, call.cond)))
        if self.budget == 0.0 or self.max_consecutive_skips == 0 or B == 0 or grad:
            if grad and self.budget != 0.0 and not self._warned_grad:
                self._warned_grad = True
                warnings.warn("jetdet fast mode: the model's input or a parameter requires grad (with "
                              "gradients on), and a forecast output has no gradient, so the step cache runs such "
                              "calls in full with the model's graph and leaves them out of its history; sample under "
                              "torch.no_grad() (or with the model's requires_grad_(False)) to skip calls",
                              stacklevel=3)
            y = call.run(None)
            self._n["calls_run"] += 1
            self._n["rows_run"] += B
            self._n["model_equivalents"] += B
            self._count_reason("grad" if grad else "off", B)
            return y
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                return self._step(call, x, B)
        except BaseException:
            # a call stopped midway (an error in the model, a KeyboardInterrupt) may leave the streams half updated,
            # and the next call may belong to another run that starts below this one: begin afresh
            self._reset_all("error")
            raise
        finally:
            self._secs["step"] += time.perf_counter() - t0

    # ------------------------------------------------------------------------------------------ internals
    def _count_reason(self, reason: str, n: int = 1) -> None:
        self._reasons[reason] = self._reasons.get(reason, 0) + n

    def _reset_all(self, reason: str) -> None:
        if self._streams or reason == "manual":
            self._resets[reason] += 1
        self._streams = {}
        self._pending = []
        self.manager.clear()
        self._prev_max_t = None  # the next call starts afresh, not "above the last one" (a trajectory counted twice)
        self._prev_call_t = None
        self._calls_at_t = 0
        self._branches = None
        self._run_t = None
        self._skip_t = None
        self._cfg_prev = {}
        if reason in ("shape", "model", "output_shape", "manual"):
            self._out_items = {}
            self._free_shape = None
        if reason == "model":
            self._blocks_state = None

    def _drop_stream(self, key) -> None:
        s = self._streams.pop(key, None)
        self.manager.drop(key)
        self.manager.drop((key, "body"))
        self.manager.drop((key, "cfg"))
        if s is not None:
            for k in s.tok:
                self.manager.drop((key, "tok", k))

    def _row_t(self, t, B: int, device) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            t = torch.as_tensor(t, dtype=torch.float64)
        t = t.detach().reshape(-1)
        if t.numel() == 1 and B != 1:
            t = t.expand(B)
        if t.numel() != B:
            raise ValueError(f"call.t: expected a scalar or {B} per-row timesteps, got shape {tuple(t.shape)}")
        return t

    def _cond_index(self, n: int, device) -> torch.Tensor:
        key = (n, str(device))
        idx = self._cond_index_cache.get(key)
        if idx is None:
            idx = (torch.arange(64, dtype=torch.long) * n // 64).to(device)
            self._cond_index_cache[key] = idx
        return idx

    def _fetch(self, call, B: int):
        """The one host sync of a call: timesteps, sampled cond values, pending back-test rates."""
        # float parts go as they are (their values are exact as Python floats, and one cat promotes them); only
        # integer parts are converted, so a GPU call launches a cat (and a conversion for integer conds) instead of
        # a conversion per part
        parts = [_floats(self._row_t(call.t, B, call.x.device))]
        m = 0
        if call.cond is not None:
            c = call.cond
            if not isinstance(c, torch.Tensor):
                c = torch.as_tensor(c)
            c = c.detach()
            if c.dim() == 0 or c.shape[0] != B:
                raise ValueError(f"call.cond: expected a per-row summary [B={B}, ...], got shape {tuple(c.shape)}")
            c = c.reshape(B, -1)
            if c.shape[1] > 64:
                c = c.index_select(1, self._cond_index(c.shape[1], c.device))
            m = c.shape[1]
            parts.append(_floats(c).reshape(-1))
        nx = 0
        if self.cfg_reuse:  # rows with the same latent at the same timestep are CFG partners
            xr = call.x.detach().reshape(B, -1)
            if xr.shape[1] > 64:
                xr = xr.index_select(1, self._cond_index(xr.shape[1], xr.device))
            nx = xr.shape[1]
            parts.append(_floats(xr).reshape(-1))
        pending, self._pending = self._pending, []
        parts += [_floats(p).reshape(-1) for p, _ in pending]
        host: list = [None] * len(parts)
        dev = [i for i, p in enumerate(parts) if p.device.type != "cpu"]
        if dev:
            t0 = time.perf_counter()
            flat = torch.cat([parts[i].to(parts[dev[0]].device) for i in dev]).tolist()
            self._secs["sync"] += time.perf_counter() - t0
            self._n["syncs"] += 1
            o = 0
            for i in dev:
                k = parts[i].numel()
                host[i] = flat[o:o + k]
                o += k
        for i, p in enumerate(parts):
            if host[i] is None:
                host[i] = p.tolist()
        t_rows = [float(v) for v in host[0]]
        sigs = None
        if call.cond is not None:
            vals = host[1]
            sigs = [tuple(vals[i * m:(i + 1) * m]) for i in range(B)]
        self._xsig = None
        if nx:
            vals = host[2 if call.cond is not None else 1]
            self._xsig = [tuple(vals[i * nx:(i + 1) * nx]) for i in range(B)]
        for (_, owners), vals in zip(pending, host[len(parts) - len(pending):]):
            for (s, gen, q), v in zip(owners, vals):
                if s.gen == gen:
                    s.rates[q] = float(v)
        return t_rows, sigs

    def _branch(self, t_rows: list[float]) -> int:
        """Call-order branch of a call without cond (see the module docstring)."""
        prev = self._prev_call_t
        if prev is not None and len(prev) == len(t_rows) and all(_same_t(a, b) for a, b in zip(prev, t_rows)):
            self._calls_at_t += 1
        else:
            if prev is not None and max(t_rows) > max(prev) and not _same_t(max(t_rows), max(prev)):
                self._branches = None  # a new trajectory: learn the branch count again
            elif prev is not None and self._branches is None:
                self._branches = self._calls_at_t + 1
            self._calls_at_t = 0
        self._prev_call_t = list(t_rows)
        return self._calls_at_t % self._branches if self._branches else self._calls_at_t

    def _progress(self, s: _Stream, t: float) -> float:
        sched = self.timesteps
        if sched is not None:
            n = len(sched)
            sign = 1.0 if sched[0] > sched[-1] else -1.0
            if sign * t >= sign * sched[0]:
                return 0.0
            for i in range(n - 1):
                a, b = sched[i], sched[i + 1]
                if sign * t >= sign * b:
                    return (i + (a - t) / (a - b)) / (n - 1)
            return 1.0
        if self.num_steps is not None:
            return s.distinct / self.num_steps
        span = s.t_start - self.t_end
        return (s.t_start - t) / span if span != 0 else 0.0

    def _keys(self, call, t_rows, sigs, B):
        if sigs is not None:
            seen: dict = {}
            keys = []
            for sig in sigs:
                k = seen.get(sig, 0)
                seen[sig] = k + 1
                keys.append(("cond", sig, k, self._shape))
            return keys
        if self._batch is not None and B != self._batch and self._streams:
            self._reset_all("batch")
        branch = self._branch(t_rows)
        return [("branch", branch, i) for i in range(B)]

    def _new_stream(self, key) -> _Stream:
        self._gen += 1
        old = self._streams.get(key)
        if old is not None:
            self._drop_stream(key)
        s = _Stream(key, self._gen)
        self._streams[key] = s
        self.manager.drop(key)
        self.manager.drop((key, "body"))
        self.manager.drop((key, "cfg"))
        return s

    def _history(self, s: _Stream):
        """The stream's cached outputs, or None when the memory budget dropped them (or some of them)."""
        tensors = self.manager.get(s.key)
        return tensors if tensors is not None and len(tensors) == len(s.ts) else None

    def _estimate(self, s: _Stream, t: float):
        """(predicted relative L1 error, forecast order, index of a history node equal to t or None),
        or (None, None, None) when no prediction can be made yet."""
        n = len(s.ts)
        g = self.drift_gain
        if self._xf is not None and t <= 0.0:  # x0 space: the output (flow_x - x0) / t has no forecast at t = 0
            return (math.inf, None, None) if s.ts else (None, None, None)
        to_end = abs(t - self.t_end)
        drift = 0.0
        if g:
            drift = math.inf if to_end == 0.0 else g * s.drift / to_end
        for j, tj in enumerate(s.ts):
            if _same_t(t, tj):
                if not g:
                    return 0.0, 0, j
                d0 = s.rates.get(0)
                if d0 is None or s.prev_t is None:
                    return None, None, None
                h = abs(tj - s.prev_t)  # the step that produced this x from the previous evaluation's
                node = math.inf if to_end == 0.0 else g * 0.5 * d0 * h * h / to_end
                return node * self._x0_gain(s, t) + drift, 0, j
        q = min(self.order, n - 1)
        while q >= 0 and s.rates.get(q) is None:  # not enough computed points yet for this order
            q -= 1
        if q < 0:
            return None, None, None
        d = s.rates[q]
        prod = 1.0
        for tj in s.ts[n - 1 - q:]:
            prod *= abs(t - tj)
        return d * prod * self._x0_gain(s, t) + drift, q, None

    def _x0_gain(self, s: _Stream, t: float) -> float:
        """How a miss of the forecast denoised estimate grows in the output at ``t``, relative to the back-tested
        step ``t_k`` (forecast_space "x0"): the output is ``(flow_x − x0) / t``, so ``t_k / t``; 1 otherwise."""
        if self._xf is None:
            return 1.0
        return s.ts[-1] / t if t > 0.0 else math.inf

    def _step(self, call, x: torch.Tensor, B: int) -> torch.Tensor:
        """One call: streams, per-row decisions, the model run on the rows that need it, forecasts for the rest,
        then the caches, counters and log."""
        self._check_env(call, x)
        self._xf = None
        if self.forecast_space == "x0":
            xf = call.flow_x
            if not isinstance(xf, torch.Tensor) or xf.shape != x.shape:
                raise ValueError(f"call.flow_x: forecast_space='x0' needs the latent in flow form, a tensor shaped "
                                 f"like call.x {tuple(x.shape)}, got "
                                 f"{tuple(xf.shape) if isinstance(xf, torch.Tensor) else type(xf).__name__}")
            self._xf = (xf.detach(), self._row_t(call.t, B, x.device).to(xf.device))
        t_rows, sigs = self._fetch(call, B)
        keys = self._keys(call, t_rows, sigs, B)
        self._batch = B
        self._start_trajectory(keys, t_rows)
        streams = self._advance_streams(keys, t_rows)
        decisions = [self._decide(s, ti) for s, ti in zip(streams, t_rows)]
        if self.piggyback < 1.0:
            self._piggyback(decisions, streams, t_rows)
        run_rows = [i for i, d in enumerate(decisions) if d.run]
        skip_rows = [i for i, d in enumerate(decisions) if not d.run]
        runner = call.blocks if self._blocks_usable(call) else None
        partial: list[int] = []
        if runner is not None:
            run_rows, skip_rows, partial = self._partial_rows(decisions, streams, run_rows, skip_rows)
        # CFG reuse: a row whose CFG partner runs is its partner's output plus their cached difference
        cfg_rows: dict[int, tuple] = {}
        if self.cfg_reuse:
            cfg_rows = self._cfg_candidates(call, run_rows, streams, t_rows, decisions, B)
            if cfg_rows:
                run_rows = [i for i in run_rows if i not in cfg_rows]
        for i in cfg_rows:
            decisions[i].run = False
        model_rows = sorted(run_rows + partial)

        # forecasts (before the run: their histories are read now)
        fc_parts = self._forecast_rows(skip_rows, streams, t_rows, decisions)

        y, plan = None, None
        if model_rows:
            y, plan = self._run_model(call, runner, model_rows, streams, t_rows, decisions, partial, B)
            if y is None:  # the output shape changed under an unchanged input shape: start over
                return self._rerun_all(call, B, t_rows, keys)
        approx = [model_rows[p] for p in range(len(model_rows)) if p not in plan.body_set] if plan is not None else []
        aset = set(approx)
        computed = [i for i in model_rows if i not in aset]
        if computed:
            self._run_t = t_rows[computed[0]]
        else:
            self._skip_t = t_rows[0]
        if plan is not None:
            self._apply_signal(decisions, approx, aset, partial)

        out = self._assemble(y, model_rows, fc_parts, B)
        if cfg_rows:
            self._cfg_assemble(out, cfg_rows, streams, t_rows)
        if computed:
            self._store(y, computed, model_rows, streams, t_rows, plan, B)
        if self.cfg_reuse:
            self._cfg_record(call, out, computed, streams, t_rows, keys, B)
        forecast_rows = skip_rows + approx + list(cfg_rows)
        self._note_forecasts(forecast_rows, streams, t_rows, decisions, cfg_rows, aset, plan)
        self._count_call(runner, B, model_rows, computed, approx, forecast_rows, cfg_rows)
        self._record_call(t_rows, keys, decisions, computed, forecast_rows, approx, cfg_rows, plan)
        return out

    def _check_env(self, call, x: torch.Tensor) -> None:
        """Start over when the model or the per-row input dtype or device changed, or the per-row shape of a call
        without ``cond``. With ``cond`` a stream's key holds the per-row shape (:meth:`_keys`), so calls of several
        shapes keep their streams side by side: ComfyUI runs an area prompt's rows on a crop of the latent, in calls
        of their own between the full-size ones (each change reset everything before, and nothing was skipped)."""
        shape = tuple(x.shape[1:])
        env = (call.model_id, x.dtype, x.device)
        if self._env is not None and env != self._env:
            self._reset_all("model" if self._env[0] != env[0] else "shape")
        elif call.cond is None and self._free_shape is not None and shape != self._free_shape:
            self._reset_all("shape")  # the branch streams of calls without cond hold one shape
        self._env = env
        if call.cond is None:  # (calls with and without cond may alternate: CFG as two forwards, uncond y=None)
            self._free_shape = shape
        self._shape = shape

    def _start_trajectory(self, keys, t_rows) -> None:
        """New trajectory: a row's timestep went up against its stream's, or a new stream starts above the
        previous call's timesteps (CFG as two forwards: the first forward of a new trajectory may bring only
        new streams, e.g. a new class label)."""
        went_up = [False] * len(keys)
        t_new = None
        prev_max = self._prev_max_t
        for i, k in enumerate(keys):
            s = self._streams.get(k)
            ti = t_rows[i]
            if s is not None and s.last_t is not None:
                up = ti > s.last_t and not _same_t(ti, s.last_t)
            else:
                up = prev_max is not None and ti > prev_max and not _same_t(ti, prev_max)
            if up:
                went_up[i] = True
                t_new = ti if t_new is None else max(t_new, ti)
        if t_new is not None:
            self._resets["trajectory"] += 1
            # the last call that ran / was served from the cache belongs to the earlier trajectory unless it was at
            # this trajectory's first timestep (the other forward of CFG as two forwards): the piggyback and
            # follow rules must not pair a call with it
            if self._run_t is not None and not _same_t(self._run_t, t_new):
                self._run_t = None
            if self._skip_t is not None and not _same_t(self._skip_t, t_new):
                self._skip_t = None
            live = set(keys)
            for k, s in list(self._streams.items()):
                # streams of the earlier trajectory go; those started at this trajectory's timesteps stay
                if k not in live and (s.last_t is None or (s.last_t < t_new and not _same_t(s.last_t, t_new))):
                    self._drop_stream(k)
            for i, k in enumerate(keys):
                if went_up[i]:
                    self._drop_stream(k)
        self._prev_max_t = max(t_rows)

    def _advance_streams(self, keys, t_rows) -> list[_Stream]:
        """Each row's stream (new ones created), moved to the row's timestep; caches the memory budget dropped
        are forgotten."""
        streams: list[_Stream] = []
        for i, k in enumerate(keys):
            s = self._streams.get(k)
            if s is None:
                s = self._new_stream(k)
            ti = t_rows[i]
            if s.last_t is None:
                s.t_start, s.distinct = ti, 0
            elif not _same_t(ti, s.last_t):
                s.distinct += 1
                s.prev_t = s.last_t
                if s.last_skip is not None:  # the forecast at t_j moved x until now
                    s.drift += s.last_skip[1] * abs(s.last_skip[0] - ti)
                    s.last_skip = None
            s.last_t = ti
            if s.ts and k not in self.manager:  # evicted by the memory budget
                self._resets["evicted"] += 1
                s.ts, s.rates = [], {}
            if s.bts and (k, "body") not in self.manager:
                s.bts, s.blay = [], None
                s.rates.pop("kappa", None)
            if s.cts and (k, "cfg") not in self.manager:
                s.cts = []
                s.rates.pop("cfg", None)
            streams.append(s)
        return streams

    def _decide(self, s: _Stream, ti: float) -> _Decision:
        """A row's own decision (host floats only): run, or forecast from the history within budget."""
        est, q, node = self._estimate(s, ti)
        if not s.ts:
            reason = "new"
        elif est is None:
            reason = "warmup"
        else:
            p = self._progress(s, ti)
            if p < self.start_percent:
                reason = "start"
            elif p > 1.0 - self.end_percent:
                reason = "end"
            elif s.skips >= self.max_consecutive_skips:
                reason = "max_skips"
            else:
                reason = "budget"
        d = _Decision(run=reason != "budget" or not est <= self.budget, reason=reason, est=est, order=q, node=node)
        if not d.run:
            d.history = self._history(s)
            if d.history is None:  # dropped by the memory budget meanwhile
                self._resets["evicted"] += 1
                s.ts, s.rates = [], {}
                d.run, d.reason, d.est = True, "evicted", None
        return d

    def _piggyback(self, decisions: list[_Decision], streams, t_rows) -> None:
        """Rows over piggyback * budget run too when the model runs anyway at this timestep: in this call, or in
        the previous call at the same timestep (CFG as two forwards), so branches stay in step."""
        here = any(d.run for d in decisions)
        for i, d in enumerate(decisions):
            if not d.run and d.est > self.piggyback * self.budget and (
                    here or (self._run_t is not None and _same_t(t_rows[i], self._run_t))):
                d.run, d.reason = True, "piggyback"
        # ... and the other way round: when the previous call at this timestep was served from the cache
        # entirely, this call follows it if every row it would run is within budget / piggyback (2 x budget at
        # most: with piggyback 0 the bound would be none)
        running = [d for d in decisions if d.run]
        follow = self.budget / max(self.piggyback, 0.5)
        if (running and self._skip_t is not None and all(_same_t(t, self._skip_t) for t in t_rows)
                and not (self._run_t is not None and _same_t(t_rows[0], self._run_t))
                and all(d.reason == "budget" and d.est <= follow for d in running)):
            for i, d in enumerate(decisions):
                if d.run:
                    tensors = self._history(streams[i])
                    if tensors is None:
                        break
                    d.run, d.reason, d.history = False, "follow", tensors

    def _partial_rows(self, decisions: list[_Decision], streams, run_rows, skip_rows):
        """Block level: a skipped row with a body history runs the head instead (the first block(s) and the
        tail), and its body is forecast unless the first-block signal says otherwise (see _Plan.split).
        Returns the new ``(run_rows, skip_rows, partial)``."""
        partial, warm = [], []
        for i in skip_rows:
            d = decisions[i]
            if d.est is None or d.est <= self.skip_whole * self.budget:
                continue
            # the body is forecast at the full order only (order + 1 nodes: exact on polynomials of that
            # degree); until a stream has them, such a row is computed
            if len(streams[i].bts) > self.order:
                partial.append(i)
            else:
                warm.append(i)
                d.run, d.reason = True, "warmup"
        if partial or warm:
            moved = set(partial) | set(warm)
            skip_rows = [i for i in skip_rows if i not in moved]
            run_rows = sorted(run_rows + warm)
        return run_rows, skip_rows, partial

    def _run_model(self, call, runner, model_rows, streams, t_rows, decisions, partial, B):
        """Run the model on ``model_rows`` (through the block runner when there is one): ``(y, plan)``, with
        ``plan`` None unless rows ran partly; ``(None, None)`` after a reset for a changed output shape."""
        x = call.x
        idx = None if len(model_rows) == B else self._index(model_rows, x.device)
        plan = None
        t0 = time.perf_counter()
        if runner is not None:
            plan = _Plan(self, model_rows, streams, t_rows, decisions, set(partial), runner)
            y, split_done = runner.run(idx, plan)
            if not split_done:
                self._blocks_state = ("off", f"the model's forward never returned from its last head block "
                                             f"({runner.describe}): whole-call skipping only")
                plan = None
        else:
            y = call.run(idx)
        self._secs["model"] += time.perf_counter() - t0
        if not isinstance(y, torch.Tensor) or y.dim() < 1 or y.shape[0] != len(model_rows):
            raise ValueError(f"call.run: expected a tensor with {len(model_rows)} rows, got "
                             f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
        item = (tuple(y.shape[1:]), y.dtype, y.device)
        known = self._out_items.get(self._shape)
        if known is not None and item != known:
            self._reset_all("output_shape")
            self._out_items[self._shape] = item
            return None, None
        self._out_items[self._shape] = item
        return y, plan

    @staticmethod
    def _apply_signal(decisions: list[_Decision], approx, aset, partial) -> None:
        """A run row whose body was forecast is a forecast row; a partial row computed in full is a run row."""
        for i in approx:
            d = decisions[i]
            if d.run:
                d.run, d.reason = False, "signal"
        for i in partial:
            if i not in aset:
                decisions[i].run, decisions[i].reason = True, "signal"

    def _assemble(self, y, model_rows, fc_parts, B: int) -> torch.Tensor:
        """The ``[B, ...]`` output: the model's rows and the forecast ones in place."""
        if y is not None and len(model_rows) == B:
            return y
        shape, dtype, device = self._out_items[self._shape]
        out = torch.empty((B, *shape), dtype=dtype, device=device)
        if y is not None:
            out.index_copy_(0, self._index(model_rows, device), y)
        for rows, val in fc_parts:
            out.index_copy_(0, self._index(rows, device), val)
        return out

    def _store(self, y, computed, model_rows, streams, t_rows, plan, B: int) -> None:
        """Push the computed rows' outputs (and body nodes) into their streams' caches."""
        if len(computed) == len(model_rows):
            stored = y.detach()  # the caller's `out` itself when every row ran (_assemble)
        else:
            pos = {r: p for p, r in enumerate(model_rows)}
            stored = y.detach().index_select(0, self._index([pos[i] for i in computed], y.device))
        self._push(computed, streams, t_rows, stored, owned=len(computed) == B)
        if plan is not None:
            self._update_body(plan, computed, streams, t_rows)

    def _note_forecasts(self, forecast_rows, streams, t_rows, decisions, cfg_rows, aset, plan) -> None:
        """Per forecast row: one more consecutive skip, its predicted error for the drift term, its order."""
        for i in forecast_rows:
            s = streams[i]
            s.skips += 1
            e = decisions[i].est
            if i in cfg_rows:
                e = cfg_rows[i][2]
            elif i in aset and plan is not None and plan.est.get(i) is not None:
                e = plan.est[i]
            e = 0.0 if e is None else e
            if s.last_skip is not None and _same_t(s.last_skip[0], t_rows[i]):
                e = max(e, s.last_skip[1])
            s.last_skip = (t_rows[i], e)
            o = decisions[i].order
            self._orders[o] = self._orders.get(o, 0) + 1

    def _count_call(self, runner, B, model_rows, computed, approx, forecast_rows, cfg_rows) -> None:
        L = runner.num_blocks if runner is not None else 1
        part = (runner.head + runner.tail) / L if runner is not None else 0.0
        self._n["rows_run"] += len(computed)
        self._n["rows_saved"] += len(forecast_rows)
        self._n["rows_partial"] += len(approx)
        self._n["rows_cfg"] += len(cfg_rows)
        self._n["model_equivalents"] += len(computed) + part * len(approx)
        if model_rows:
            self._n["calls_run"] += 1
            if len(model_rows) < B:
                self._n["calls_partial"] += 1
        else:
            self._n["calls_saved"] += 1

    def _record_call(self, t_rows, keys, decisions, computed, forecast_rows, approx, cfg_rows, plan) -> None:
        """Per-reason counts and the decision log entry of this call."""
        kinds = {}
        for i in approx:
            kinds[i] = "partial"
        for i in cfg_rows:
            kinds[i] = "cfg"
        for i, d in enumerate(decisions):
            self._count_reason(d.reason if d.run else kinds.get(i, "forecast"))
        if self.log_limit:
            self._log.append({
                "call": self._n["calls"], "t": t_rows, "run": computed, "forecast": sorted(forecast_rows),
                "partial": approx, "cfg": sorted(cfg_rows),
                "rows": [{"stream": repr(k), "t": t_rows[i], "decision": "run" if d.run else kinds.get(i, "forecast"),
                          "reason": d.reason, "est": d.est, "order": d.order,
                          "signal": plan.est.get(i) if plan is not None else None}
                         for i, (k, d) in enumerate(zip(keys, decisions))],
            })

    def _rerun_all(self, call, B, t_rows, keys):
        t0 = time.perf_counter()
        y = call.run(None)
        self._secs["model"] += time.perf_counter() - t0
        streams = [self._new_stream(k) for k in keys]
        for s, ti in zip(streams, t_rows):
            s.t_start = s.last_t = ti
        self._push(list(range(B)), streams, t_rows, y.detach(), owned=True)
        self._n["rows_run"] += B
        self._n["model_equivalents"] += B
        self._n["calls_run"] += 1
        self._count_reason("new", B)
        return y

    def _index(self, rows: list[int], device) -> torch.Tensor:
        idx = torch.tensor(rows, dtype=torch.long)
        if device.type == "cuda":
            return idx.pin_memory().to(device, non_blocking=True)
        return idx.to(device)

    def _forecast_rows(self, rows, streams, t_rows, decisions):
        """Forecast the skipped rows, grouped by (nodes, target t, order) so that rows with the same
        history timesteps are forecast together. Returns ``[(rows, tensor [len(rows), ...])]``."""
        from ..ops import forecast as _forecast

        groups: dict = {}
        hist: dict = {}
        for i in rows:
            s = streams[i]
            q, node, tensors = decisions[i].order, decisions[i].node, decisions[i].history
            if node is not None:
                gk = ("node", s.ts[node], t_rows[i])
                hist[i] = [tensors[node]]
            else:
                nodes = tuple(s.ts[len(s.ts) - 1 - q:])
                gk = ("fc", nodes, t_rows[i], q)
                hist[i] = tensors[len(tensors) - 1 - q:]
            groups.setdefault(gk, []).append(i)
        out = []
        for gk, members in groups.items():
            k = len(hist[members[0]])
            stacked = [torch.stack([hist[i][j] for i in members]) for j in range(k)]
            if gk[0] == "node" or gk[3] == 0:
                val = stacked[-1]
            else:
                _, nodes, t, q = gk
                val = _forecast(stacked, list(nodes), t, order=q)
            if self._xf is not None:  # a forecast denoised estimate: the output at these rows' own latent
                xf, _ = self._flow_rows(members)
                val = ((xf - val) / gk[2]).to(self._out_items.get(self._shape, (None, val.dtype))[1])
            out.append((members, val))
        return out

    def _flow_rows(self, rows: list[int]):
        """``(flow_x, t)`` of these rows of the call (forecast_space "x0") in float32 at least (a bf16 output's
        ``flow_x − t·y`` loses the forecast's precision), ``t`` shaped to broadcast per row."""
        xf, tt = self._xf
        if len(rows) != xf.shape[0]:
            idx = self._index(rows, xf.device)
            xf, tt = xf.index_select(0, idx), tt.index_select(0, idx)
        dt = torch.promote_types(xf.dtype, torch.float32)
        return xf.to(dt), tt.to(dt).reshape((-1,) + (1,) * (xf.dim() - 1))

    def _push(self, rows, streams, t_rows, y, owned: bool) -> None:
        """Push the computed output rows ``y`` into the histories: as they are (a copy when ``owned``: ``y`` is the
        caller's output), or (forecast_space "x0") as the denoised estimates ``flow_x − t·y``, a new tensor,
        back-tested on the output."""
        if self._xf is None:
            self._update(rows, streams, t_rows, y.clone() if owned else y)
            return
        xf, tt = self._flow_rows(rows)
        if y.shape != xf.shape:  # (a learned variance, an inpainting model's extra latent channels)
            raise ValueError(f"call.flow_x: forecast_space='x0' needs outputs shaped like the latent; output rows "
                             f"{tuple(y.shape[1:])}, flow_x rows {tuple(xf.shape[1:])}")
        yf = y.to(xf.dtype)
        self._update(rows, streams, t_rows, xf - tt * yf, back=(xf, yf))

    def _update(self, run_rows, streams, t_rows, stored, back=None) -> None:
        """Push the computed outputs into their streams' histories and queue the back-tests. With ``back`` =
        ``(flow_x, output)`` rows, ``stored`` holds denoised estimates, and a back-test's miss is measured on the
        output they give (``(flow_x − x0) / t``)."""
        from ..ops import forecast as _forecast
        from ..ops import relative_change as _relchange

        jobs: dict = {}
        rows = stored.unbind(0)  # one op for every row's view (indexing row by row is one op per row)
        for p, i in enumerate(run_rows):
            s = streams[i]
            ti = t_rows[i]
            prev = self.manager.get(s.key) or []
            ts = list(s.ts)
            if len(prev) != len(ts):
                prev, ts = [], []
            keep = [j for j, tj in enumerate(ts) if not _same_t(ti, tj)]
            prev = [prev[j] for j in keep]
            ts = [ts[j] for j in keep]
            yi = rows[p]
            for q in range(0, min(self.order, len(ts) - 1) + 1):
                if len(ts) < q + 1:
                    break
                nodes = tuple(ts[len(ts) - 1 - q:])
                jobs.setdefault((nodes, ti, q), []).append((s, prev[len(prev) - 1 - q:], p))
            s.ts = (ts + [ti])[-(self.order + 1):]
            s.rates = {}
            s.skips = 0
            s.drift, s.last_skip = 0.0, None
            self.manager.set(s.key, (prev + [yi])[-(self.order + 1):])
        for (nodes, ti, q), members in jobs.items():
            stacked = [torch.stack([m[1][j] for m in members]) for j in range(q + 1)]
            pos = [m[2] for m in members]
            pred = stacked[-1] if q == 0 else _forecast(stacked, list(nodes), ti, order=q)
            if back is None:
                truth = _rows_at(stored, pos)
            else:  # the miss on the output: (flow_x - x0_forecast) / t against the output
                xf, y = back
                truth = _rows_at(y, pos)
                pred = (_rows_at(xf, pos) - pred) / ti
            prod = 1.0
            for tj in nodes:
                prod *= abs(ti - tj)
            rate = _relchange(pred, truth) / prod
            self._pending.append((rate, [(m[0], m[0].gen, q) for m in members]))

    # ------------------------------------------------------------------------------------- block level
    def _blocks_usable(self, call) -> bool:
        runner = getattr(call, "blocks", None)
        if runner is None:
            reason = (call.extra or {}).get("blocks") if hasattr(call, "extra") else None
            if self._blocks_state is None or self._blocks_state[0] == "on":
                self._blocks_state = ("off", reason or "the call has no block runner: whole-call skipping only")
            return False
        if not self.block_reuse:
            self._blocks_state = ("off", "block_reuse=False: whole-call skipping only")
            return False
        if self._blocks_state is not None and self._blocks_state[0] == "off" and self._blocks_state[1].startswith(
                "the model's forward never"):
            return False
        self._blocks_state = ("on", runner.describe)
        return True

    def _body_nodes(self, s: _Stream):
        """The stream's body nodes as ``[(head tensors, target tensors)]`` (oldest first), or None."""
        if not s.bts or s.blay is None:
            return None
        flat = self.manager.get((s.key, "body"))
        nh, nb = sum(s.blay[0]), sum(s.blay[1])
        if flat is None or len(flat) != len(s.bts) * (nh + nb):
            return None
        w = nh + nb
        return [(flat[j * w:j * w + nh], flat[j * w + nh:(j + 1) * w]) for j in range(len(s.bts))]

    def _node_forecast(self, ts: list[float], values: list[list[torch.Tensor]], t: float) -> list[torch.Tensor]:
        """Per tensor slot, the order-``self.order`` polynomial through the last nodes at ``t`` (a node at ``t``
        itself is returned as is)."""
        from ..ops import forecast as _forecast

        for j, tj in enumerate(ts):
            if _same_t(t, tj):
                return list(values[j])
        q = min(self.order, len(ts) - 1)
        if q == 0:
            return list(values[-1])
        nodes = ts[len(ts) - 1 - q:]
        vals = values[len(values) - 1 - q:]
        return [_forecast([v[k] for v in vals], nodes, t, order=q) for k in range(len(vals[0]))]

    def _update_body(self, plan, computed, streams, t_rows) -> None:
        """Push the head output and the body target of every row whose body ran into its body history, and
        back-test the signal: ``kappa = (miss of the body forecast / ‖body output‖₁) / (miss of the head
        forecast / ‖head output‖₁)``, read at the next call's sync."""
        if plan.head is None or plan.body is None:
            return
        body_pos = sorted(plan.body_set)
        bpos = {p: k for k, p in enumerate(body_pos)}
        pos = {r: p for p, r in enumerate(plan.rows)}
        head_mask = tuple(isinstance(v, torch.Tensor) and v.dim() >= 1 for v in plan.head)
        body_mask = tuple(isinstance(v, torch.Tensor) and v.dim() >= 1 for v in plan.body)
        resid = tuple(bool(plan.residual and body_mask[j] and j < len(head_mask) and head_mask[j]
                           and plan.head[j].shape[1:] == plan.body[j].shape[1:]) for j in range(len(body_mask)))
        lay = (head_mask, body_mask, resid)
        kap_vals, owners = [], []
        for i in computed:
            p = pos.get(i)
            if p is None or p not in bpos:
                continue
            s = streams[i]
            k = bpos[p]
            heads = [v[p] for v, m in zip(plan.head, head_mask) if m]
            targets = []
            for j, m in enumerate(body_mask):
                if m:
                    b = plan.body[j][k]
                    targets.append((b - plan.head[j][p]) if resid[j] else b.detach().clone())
            nodes = self._body_nodes(s) if s.blay == lay else None
            ti = t_rows[i]
            if nodes:
                ts = list(s.bts)
                h_hat = self._node_forecast(ts, [n[0] for n in nodes], ti)
                r_hat = self._node_forecast(ts, [n[1] for n in nodes], ti)
                num_h = sum((a - b).abs().sum() for a, b in zip(heads, h_hat))
                den_h = sum(b.abs().sum() for b in h_hat)
                num_r = sum((a - b).abs().sum() for a, b in zip(targets, r_hat))
                bodies = [plan.body[j][k] for j, m in enumerate(body_mask) if m]
                den_r = sum(b.abs().sum() for b in bodies)
                miss = num_r / den_r.clamp_min(1e-30)
                delta = num_h / den_h.clamp_min(1e-30)
                kap_vals.append((miss / delta.clamp_min(1e-12)).float())
                owners.append((s, s.gen, "kappa"))
            else:
                nodes = []
                ts = []
            keep = [j for j, tj in enumerate(ts) if not _same_t(ti, tj)]
            new_nodes = [nodes[j] for j in keep] + [(heads, targets)]
            new_ts = [ts[j] for j in keep] + [ti]
            new_nodes, new_ts = new_nodes[-(self.order + 1):], new_ts[-(self.order + 1):]
            s.bts, s.blay = new_ts, lay
            self.manager.set((s.key, "body"), [v for hn, tn in new_nodes for v in (*hn, *tn)])
        if kap_vals:
            self._pending.append((torch.stack(kap_vals), owners))

    # ------------------------------------------------------------------------------------- token level
    def _tokens(self, plan, key: str, x: torch.Tensor, fn) -> torch.Tensor:
        """Token-level reuse in a token-wise module of a computed body block (see the module docstring)."""
        if self.token_budget is None:
            return fn(x)
        state = self._tok_checked.get(key)
        if state is None:  # evaluating a token subset must give what the full call gives, bit for bit or nearly
            full = fn(x)
            n = x.shape[1]
            sub_idx = torch.arange(0, n, 3, device=x.device)
            sub = fn(x[:1].index_select(1, sub_idx))
            ref = full[:1].index_select(1, sub_idx)
            ok = (isinstance(full, torch.Tensor) and full.dim() == 3 and full.shape[:2] == x.shape[:2]
                  and sub.shape == ref.shape and torch.allclose(sub.float(), ref.float(), rtol=1e-4, atol=1e-5))
            self._tok_checked[key] = "ok" if ok else "not token-wise (a token subset gave other values)"
            if not ok:
                return full
            return self._tok_store(plan, key, x, full)
        if state != "ok":
            return fn(x)
        return self._tok_reuse(plan, key, x, fn)

    def _tok_rows(self, plan):
        body_pos = sorted(plan.body_set)
        return [plan.rows[p] for p in body_pos]

    def _tok_store(self, plan, key, x, full):
        """Every token computed: make this the newest anchor of every row."""
        rows = self._tok_rows(plan)
        self._tok_n["calls"] += 1
        self._tok_n["tokens"] += x.shape[0] * x.shape[1]
        self._tok_n["tokens_run"] += x.shape[0] * x.shape[1]
        for k, i in enumerate(rows):
            self._tok_push(plan.streams[i], key, plan.t_rows[i], x[k], full[k])
        return full

    def _tok_push(self, s: _Stream, key, t, xin, xout) -> None:
        mk = (s.key, "tok", key)
        ts = s.tok.get(key, [])
        flat = self.manager.get(mk) if ts else None
        if flat is None or len(flat) != 2 * len(ts):
            flat, ts = [], []
        keep = [j for j, tj in enumerate(ts) if not _same_t(t, tj)]
        nodes = [(flat[2 * j], flat[2 * j + 1]) for j in keep] + [(xin.detach().clone(), xout.detach().clone())]
        ts = [ts[j] for j in keep] + [t]
        nodes, ts = nodes[-(self.order + 1):], ts[-(self.order + 1):]
        s.tok[key] = ts
        self._tok_n["anchors"] += 1
        self.manager.set(mk, [v for pair in nodes for v in pair])

    def _tok_reuse(self, plan, key, x, fn):
        from ..ops import relative_change

        rows = self._tok_rows(plan)
        R, N = x.shape[0], x.shape[1]
        tile = min(self.token_tile, N)
        fc_in, fc_out, have = [], [], []
        for k, i in enumerate(rows):
            s = plan.streams[i]
            ts = s.tok.get(key, [])
            flat = self.manager.get((s.key, "tok", key)) if ts else None
            if flat is None or len(flat) != 2 * len(ts):
                continue
            vals = [[flat[2 * j], flat[2 * j + 1]] for j in range(len(ts))]
            xin, xout = self._node_forecast(ts, vals, plan.t_rows[i])
            have.append(k)
            fc_in.append(xin)
            fc_out.append(xout)
        if not have:
            return self._tok_store(plan, key, x, fn(x))
        hidx = torch.tensor(have, dtype=torch.long, device=x.device)
        xs = x.index_select(0, hidx)
        _, per_tile = relative_change(xs, torch.stack(fc_in), tile=(tile, None))
        sel = (per_tile.reshape(len(have), -1) > self.token_budget)  # [rows, tiles]
        self._n["syncs"] += 1 if x.device.type != "cpu" else 0
        counts = sel.sum(1).tolist()
        ntiles = sel.shape[1]
        out = torch.empty((R, N, fc_out[0].shape[-1]), dtype=fc_out[0].dtype, device=x.device)
        full_rows = [k for k in range(R) if k not in set(have)]
        partial = []
        for h, k in enumerate(have):
            if counts[h] * 2 > ntiles:  # most tiles changed: compute the row and make it a new anchor
                full_rows.append(k)
            else:
                partial.append((h, k))
        if full_rows:
            full_rows.sort()
            fidx = torch.tensor(full_rows, dtype=torch.long, device=x.device)
            yf = fn(x.index_select(0, fidx))
            out.index_copy_(0, fidx, yf)
            for j, k in enumerate(full_rows):
                i = rows[k]
                self._tok_push(plan.streams[i], key, plan.t_rows[i], x[k], yf[j])
        run_tok = len(full_rows) * N
        if partial:
            token_ids = []
            for h, k in partial:
                out[k] = fc_out[h]
                if counts[h]:
                    tiles = sel[h].nonzero().reshape(-1)
                    tok = (tiles[:, None] * tile + torch.arange(tile, device=x.device)[None]).reshape(-1)
                    tok = tok[tok < N]
                    token_ids.append((k, tok))
            if token_ids:
                gathered = torch.cat([x[k].index_select(0, tok) for k, tok in token_ids])[None]
                yg = fn(gathered)[0]
                o = 0
                for k, tok in token_ids:
                    n = tok.numel()
                    out[k].index_copy_(0, tok, yg[o:o + n])
                    o += n
                run_tok += o
        self._tok_n["calls"] += 1
        self._tok_n["tokens"] += R * N
        self._tok_n["tokens_run"] += run_tok
        return out

    # --------------------------------------------------------------------------------------- CFG reuse
    def _cfg_candidates(self, call, run_rows, streams, t_rows, decisions, B) -> dict:
        """Rows that become their CFG partner's output plus the forecast difference:
        ``{row: (("row", j) or ("prev", tensor), difference forecast, predicted error)}``."""
        xsig = self._xsig
        if xsig is None:
            return {}
        groups: dict = {}
        for i in range(B):
            groups.setdefault((round(t_rows[i], 9), xsig[i]), []).append(i)
        run_set = set(run_rows)
        out = {}
        for gk, members in groups.items():
            prev = self._cfg_prev.get(gk)
            if prev is not None and prev[2]:
                anchor, deps = ("prev", prev[1]), members
            elif len(members) > 1 and members[0] in run_set:
                anchor, deps = ("row", members[0]), members[1:]
            else:
                continue
            for i in deps:
                d = decisions[i]
                s = streams[i]
                if i not in run_set or d.reason not in ("budget", "piggyback") or not s.cts:
                    continue
                rate = s.rates.get("cfg")
                flat = self.manager.get((s.key, "cfg"))
                if rate is None or flat is None or len(flat) != len(s.cts):
                    continue
                ti = t_rows[i]
                q = min(self.order, len(s.cts) - 1)
                prod = 1.0
                for tj in s.cts[len(s.cts) - 1 - q:]:
                    prod *= abs(ti - tj)
                to_end = abs(ti - self.t_end)
                drift = self.drift_gain * s.drift / to_end if self.drift_gain and to_end else 0.0
                e = rate * prod + drift
                if e <= self.budget:
                    delta = self._node_forecast(list(s.cts), [[v] for v in flat], ti)[0]
                    out[i] = (anchor, delta, e)
        return out

    def _cfg_assemble(self, out, cfg_rows, streams, t_rows) -> None:
        for i, (anchor, delta, _) in cfg_rows.items():
            base = out[anchor[1]] if anchor[0] == "row" else anchor[1]
            out[i] = base + delta.to(out.dtype)

    def _cfg_record(self, call, out, computed, streams, t_rows, keys, B) -> None:
        """Push ``y_row - y_partner`` of every CFG pair computed at this timestep and back-test its forecast;
        keep this call's outputs for a CFG partner in the next call (CFG as two forwards)."""
        xsig = self._xsig
        if xsig is None:
            return
        comp = set(computed)
        groups: dict = {}
        for i in range(B):
            groups.setdefault((round(t_rows[i], 9), xsig[i]), []).append(i)
        rates, owners = [], []
        new_prev = {}
        for gk, members in groups.items():
            prev = self._cfg_prev.get(gk)
            if prev is not None:
                anchor_y, anchor_ok, deps = prev[1], prev[2], members
            else:
                a = members[0]
                anchor_y, anchor_ok, deps = out[a], a in comp, members[1:]
                new_prev[gk] = (keys[a], out[a].detach().clone(), a in comp)
            if not anchor_ok:
                continue
            for i in deps:
                if i not in comp:
                    continue
                s = streams[i]
                ti = t_rows[i]
                delta = (out[i] - anchor_y).detach()
                flat = self.manager.get((s.key, "cfg")) if s.cts else None
                if flat is None or len(flat) != len(s.cts):
                    flat, s.cts = [], []
                if flat:
                    pred = self._node_forecast(list(s.cts), [[v] for v in flat], ti)[0]
                    prod = 1.0
                    q = min(self.order, len(s.cts) - 1)
                    for tj in s.cts[len(s.cts) - 1 - q:]:
                        prod *= abs(ti - tj) if not _same_t(ti, tj) else 1.0
                    num = (pred - delta).abs().sum()
                    den = out[i].abs().sum().clamp_min(1e-30)
                    rates.append((num / den / prod).float())
                    owners.append((s, s.gen, "cfg"))
                keep = [j for j, tj in enumerate(s.cts) if not _same_t(ti, tj)]
                vals = [flat[j] for j in keep] + [delta.clone()]
                ts = [s.cts[j] for j in keep] + [ti]
                s.cts = ts[-(self.order + 1):]
                self.manager.set((s.key, "cfg"), vals[-(self.order + 1):])
        self._cfg_prev = new_prev
        if rates:
            self._pending.append((torch.stack(rates), owners))


class _Plan:
    """The controller's side of one block-level run (:mod:`jetdet.patch.blocks` calls it)."""

    def __init__(self, ctl: StepCacheController, rows, streams, t_rows, decisions, partial: set, runner):
        self.ctl = ctl
        self.rows = rows  # batch rows of this run, in run order
        self.streams, self.t_rows, self.decisions = streams, t_rows, decisions
        self.partial = partial
        self.residual = bool(getattr(runner, "residual", True))
        self.body_set = set(range(len(rows)))  # run positions whose body is computed
        self.est: dict[int, float] = {}  # batch row -> the signal's prediction
        self.head = None
        self.body = None

    def split(self, leaves):
        ctl = self.ctl
        # copies: a model may update its hidden states in place after this block
        self.head = [v.detach().clone() if isinstance(v, torch.Tensor) else v for v in leaves]
        head_mask = tuple(isinstance(v, torch.Tensor) and v.dim() >= 1 for v in leaves)
        cands = []
        for p, i in enumerate(self.rows):
            s = self.streams[i]
            d = self.decisions[i]
            if s.blay is None or s.blay[0] != head_mask:
                continue
            if i in self.partial or (ctl.block_signal == "decide" and d.reason in ("budget", "piggyback")
                                     and "kappa" in s.rates and len(s.bts) > ctl.order):
                nodes = ctl._body_nodes(s)
                if nodes:
                    cands.append((p, i, s, nodes))
        if not cands:
            return sorted(self.body_set), None
        sig: dict[int, float] = {}
        if ctl.block_signal != "off":
            vals = []
            for p, i, s, nodes in cands:
                kap = s.rates.get("kappa")
                if kap is None:
                    continue
                h_hat = ctl._node_forecast(list(s.bts), [n[0] for n in nodes], self.t_rows[i])
                heads = [v[p] for v, m in zip(leaves, head_mask) if m]
                num = sum((a - b).abs().sum() for a, b in zip(heads, h_hat))
                den = sum(b.abs().sum() for b in h_hat)
                vals.append((i, kap, (num / den.clamp_min(1e-30)).double()))
            if vals:
                t = torch.stack([v[2] for v in vals])
                if t.device.type != "cpu":
                    ctl._n["syncs"] += 1
                for (i, kap, _), dv in zip(vals, t.tolist()):
                    sig[i] = kap * dv
        budget = ctl.budget
        fc = []
        for p, i, s, nodes in cands:
            e = sig.get(i)
            if i in self.partial:
                ok = e is None or e <= budget
            else:
                ok = e is not None and e <= budget
            if ok:
                fc.append((p, i, s, nodes, e))
        if fc and ctl.piggyback < 1.0 and len(fc) < len(self.rows):  # keep the rows of this timestep in step
            kept = []
            for item in fc:
                e = item[4] if item[4] is not None else self.decisions[item[1]].est
                if e is None or e <= ctl.piggyback * budget:
                    kept.append(item)
            fc = kept
        if not fc:
            return sorted(self.body_set), None
        per_leaf: list[list] = []
        lay = fc[0][2].blay
        body_mask, resid = lay[1], lay[2]
        for p, i, s, nodes, e in fc:
            self.est[i] = e if e is not None else self.decisions[i].est
            r_hat = ctl._node_forecast(list(s.bts), [n[1] for n in nodes], self.t_rows[i])
            vals = []
            k = 0
            for j, m in enumerate(body_mask):
                if not m:
                    vals.append(None)
                    continue
                v = r_hat[k]
                k += 1
                if resid[j]:
                    v = leaves[j][p] + v
                vals.append(v)
            per_leaf.append(vals)
        forecast = [None if per_leaf[0][j] is None else torch.stack([r[j] for r in per_leaf])
                    for j in range(len(body_mask))]
        self.body_set -= {p for p, *_ in fc}
        return sorted(self.body_set), forecast

    def body_done(self, leaves):
        self.body = [v.detach().clone() if isinstance(v, torch.Tensor) else v for v in leaves]

    def token(self, key, x, fn):
        return self.ctl._tokens(self, key, x, fn)
