"""jetdet's modes on a ComfyUI ``ModelPatcher``: keyed wrappers on a clone, never changes to the model given.

Everything here works on ``model.clone()`` and registers wrappers with ``add_wrapper_with_key`` under keys that
start with ``jetdet.``; the input ``ModelPatcher``, its weights and its options are left as they are, so another
branch of the graph that uses the original MODEL samples exactly as if jetdet were not there.

* **Deterministic** (:func:`with_deterministic`): an ``APPLY_MODEL`` wrapper runs every model call inside
  ``jetdet.mode("deterministic")`` (the batch-invariant ops) and :func:`jetdet.comfy.attention.sdpa_attention`
  (ComfyUI's own SDPA attention, instead of the memory-dependent CPU attention or a non-invariant GPU one).
  ``APPLY_MODEL`` is the one wrapper every model type of ComfyUI 0.3.64 calls; ``DIFFUSION_MODEL`` does not reach
  SD3's MMDiT there. A ``PREDICT_NOISE`` wrapper does the same for the CFG combination around the model calls.
* **Fast** (:func:`with_fast`): an ``APPLY_MODEL`` wrapper puts jetdet's step cache
  (:class:`jetdet.cache.StepCacheController`) in front of the model, per batch row and per CFG branch, and an
  ``OUTER_SAMPLE`` wrapper gives every sampling run a fresh controller (so state never leaks from one run into
  the next, whatever the sampler). See :class:`FastState`.
* :func:`without_jetdet` removes both from a clone (mode "off").
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import warnings

import torch

from ..patch.call import ModelCall
from .attention import sdpa_attention

PREFIX = "jetdet."
KEY_DETERMINISTIC = "jetdet.deterministic"
KEY_FAST = "jetdet.fast"
KEY_COUNTER = "jetdet.counter"


def _wrappers():
    import comfy.patcher_extension as pe

    return pe.WrappersMP


def check_model(model, what: str = "model"):
    """A ComfyUI ``ModelPatcher`` with a diffusion model, or a clear error naming what was given."""
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(model, "clone") or not hasattr(model, "add_wrapper_with_key"):
        raise TypeError(f"{what}: expected a ComfyUI MODEL (a ModelPatcher), got {type(model).__name__}")
    if not hasattr(inner, "apply_model") or not hasattr(inner, "model_sampling"):
        raise TypeError(f"{what}: {type(inner).__name__} is not a diffusion model ComfyUI can sample (jetdet supports "
                        "every model class derived from comfy.model_base.BaseModel)")
    return model


def jetdet_keys(model) -> dict[str, list[str]]:
    """The jetdet wrapper keys on ``model``, per wrapper type."""
    out = {}
    for wtype, by_key in getattr(model, "wrappers", {}).items():
        keys = [k for k in by_key if isinstance(k, str) and k.startswith(PREFIX)]
        if keys:
            out[wtype] = keys
    return out


def without_jetdet(model):
    """A clone of ``model`` with every jetdet wrapper removed."""
    m = check_model(model).clone()
    for wtype, keys in jetdet_keys(m).items():
        for k in keys:
            m.remove_wrappers_with_key(wtype, k)
    return m


# --------------------------------------------------------------------------------------------- deterministic


class DeterministicWrapper:
    """``APPLY_MODEL`` wrapper: the call runs in ``jetdet.mode("deterministic")`` with ComfyUI's SDPA attention."""

    def __init__(self, warn_only: bool = False):
        self.warn_only = bool(warn_only)
        self.calls = 0

    def __call__(self, executor, *args, **kwargs):
        import jetdet

        self.calls += 1
        _check_full_load(getattr(executor, "class_obj", None))
        args, kwargs = _without_attention_override(args, kwargs)
        with _conditioning_named(getattr(executor, "class_obj", None), args, kwargs):
            with jetdet.mode("deterministic", warn_only=self.warn_only), sdpa_attention():
                return executor(*args, **kwargs)


def text_width(base_model) -> int | None:
    """The width of the text tokens (``c_crossattn``'s last dim) a ComfyUI model takes, where it says: the MMDiT's
    ``context_embedder`` (SD3), else its config's ``context_dim`` (SD1.5/SDXL UNets), ``context_in_dim`` (Flux) or
    ``text_dim`` (Wan); None where none is found."""
    lin = getattr(getattr(base_model, "diffusion_model", None), "context_embedder", None)
    n = getattr(lin, "in_features", None)
    if isinstance(n, int) and not isinstance(n, bool):
        return n
    cfg = getattr(getattr(base_model, "model_config", None), "unet_config", None)
    for key in ("context_dim", "context_in_dim", "text_dim"):
        n = cfg.get(key) if isinstance(cfg, dict) else None
        if isinstance(n, int) and not isinstance(n, bool):
            return n
    return None


@contextlib.contextmanager
def _conditioning_named(base_model, args: tuple, kwargs: dict):
    """A deterministic model call that fails on text tokens whose width is not the model's (a text encoder of
    another model family) raises an error naming the conditionings and both widths, chained from the model's own.
    A user trial over the HTTP server got jetdet's linear's own check instead, "weight: expected shape (N, 24) to
    match input's last dim, got (128, 16)", which the page shows as if it named an input of the node. Nothing is
    refused before the call: any other failure, and one with tokens of the model's width, is raised as it is."""
    try:
        yield
    except (RuntimeError, ValueError) as e:
        ctx = kwargs.get("c_crossattn", args[3] if len(args) > 3 else None)
        want = text_width(base_model)
        if not isinstance(ctx, torch.Tensor) or ctx.dim() < 2 or want is None or ctx.shape[-1] == want:
            raise
        raise _width_error(ctx, "for this model call", want, e) from e


class _WidthError(ValueError):
    """A conditioning whose text tokens are not as wide as the model takes, named (a ValueError to the user)."""


def _width_error(ctx: torch.Tensor, where: str, want: int, e: BaseException) -> ValueError:
    return _WidthError(
        f"positive, negative: the conditioning's text tokens are {ctx.shape[-1]} wide (shape "
        f"{tuple(ctx.shape)} {where}), but the model takes {want}: the conditioning comes from "
        "the text encoder of another model family (SD1.5: 768, SD2: 1024, SDXL: 2048, SD3, Flux, Wan: 4096); "
        "connect the conditioning of this model's own text encoder (the model's own error: "
        f"{type(e).__name__}: {str(e)[:200]})")


@contextlib.contextmanager
def conditionings_named(model, positive, negative):
    """For a node that samples its ``positive``/``negative`` in any mode (the Benchmark's off and fast runs come
    before its deterministic one): a sampling run that fails while a conditioning's text tokens are not as wide as
    the model takes raises the same error as a deterministic model call does, naming the conditionings and both
    widths, chained from the model's own. Outside jetdet's mode the failure was ComfyUI's own, "mat1 and mat2
    shapes cannot be multiplied (4x16 and 768x320)", from inside the model (a user trial over the HTTP server).
    Nothing is refused before the run: any other failure, and one with tokens of the model's width, is raised as
    it is."""
    try:
        yield
    except _WidthError:
        raise  # a deterministic model call's, named already
    except (RuntimeError, ValueError) as e:
        want = text_width(getattr(model, "model", None))
        for name, cond in (("positive", positive), ("negative", negative)):
            for entry in cond if isinstance(cond, list) else ():
                ctx = entry[0] if isinstance(entry, (list, tuple)) and entry else None
                if isinstance(ctx, torch.Tensor) and ctx.dim() >= 2 and want is not None and ctx.shape[-1] != want:
                    raise _width_error(ctx, f"in {name}", want, e) from e
        raise


_warned_partial_load = [False]
_warned_override = [False]
OVERRIDE = "optimized_attention_override"
_TO_ARG = 5  # BaseModel.apply_model passes (x, t, c_concat, c_crossattn, control, transformer_options) on


def _without_attention_override(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``APPLY_MODEL``'s arguments with ``transformer_options["optimized_attention_override"]`` left out (a copy of
    the options; the caller's stay as they are), with a warning the first time. ComfyUI hands every attention call
    to that function when a node has set it (Sage Attention patches do): it runs in place of the attention ComfyUI
    was given, outside jetdet's batch-invariant ops, and no torch function jetdet sees."""
    where = _TO_ARG if len(args) > _TO_ARG else None
    to = args[where] if where is not None else kwargs.get("transformer_options")
    if not isinstance(to, dict) or OVERRIDE not in to:
        return args, kwargs
    if not _warned_override[0]:
        _warned_override[0] = True
        warnings.warn(f"jetdet deterministic mode: transformer_options['{OVERRIDE}'] (set by a node such as a Sage "
                      "Attention patch) is not used in deterministic model calls: it would run attention outside "
                      "jetdet's batch-invariant ops. ComfyUI's own attention runs there instead", stacklevel=3)
    to = {k: v for k, v in to.items() if k != OVERRIDE}
    if where is not None:
        return args[:where] + (to,) + args[where + 1:], kwargs
    return args, {**kwargs, "transformer_options": to}


def _check_full_load(base_model) -> None:
    """Warn once when ComfyUI has loaded the model only partly (low VRAM) with weight patches (a LoRA) applied per
    call. A full load adds each patch in fp32 when it loads the weights; a partial load adds it in the weight's dtype
    at every call. Whether ComfyUI loads fully depends on the free memory it expects the batch to need, so an item
    sampled in a large batch could get other weights than the same item alone. Only on a GPU: on a CPU ComfyUI
    always loads fully."""
    if (not _warned_partial_load[0] and getattr(base_model, "model_lowvram", False)
            and getattr(base_model, "lowvram_patch_counter", 0)):
        _warned_partial_load[0] = True
        warnings.warn("jetdet deterministic mode: ComfyUI loaded this model partially (low VRAM) with weight patches "
                      "(a LoRA) applied at every call; they round differently from a full load, and whether ComfyUI "
                      "loads fully depends on the batch size and free memory, so an item may not match its run "
                      "alone. Free VRAM (fewer models loaded, a smaller batch) or start ComfyUI with --highvram",
                      stacklevel=2)


class EqualTextLengths:
    """``CALC_COND_BATCH`` wrapper: the cross-attention conditionings (``CONDCrossAttn``: the text of SD1.5, SDXL and
    other UNet models) of the conds that ComfyUI could batch together at this step repeated along their tokens to one
    length, the least common multiple of theirs, before ComfyUI batches them.

    ComfyUI runs cond and uncond in one model call when it expects enough free memory, and then repeats the shorter
    text to the common multiple (a 154-token prompt with a 77-token negative: the negative twice); apart, each sees
    its own length. Attention over repeated keys is the same in exact arithmetic, not in floats, and free VRAM
    depends on the batch, so a batch could pair them where the item alone ran them apart: the item's bits changed.
    With the lengths equal up front both ways see the same tokens, the ones a batched call sees.

    "Could batch": ComfyUI's own tests, among the conds active at this step (``get_area_and_mult``), with the same
    hooks: ``can_concat_cond`` (the same area, ControlNet and patches, and texts within 4x of their common multiple)
    for some chain of them. Conds that can never share a call keep their lengths (77 and 78 tokens: 6006 each)."""

    def __call__(self, executor, model, conds, x_in, timestep, *args, **kwargs):
        return executor(model, equal_text_lengths(conds, x_in, timestep), x_in, timestep, *args, **kwargs)


def _cross(x: dict) -> list:
    import comfy.conds

    return [(k, v) for k, v in (x.get("model_conds") or {}).items()
            if isinstance(v, comfy.conds.CONDCrossAttn) and v.cond.dim() == 3]


def _text_lengths(xs) -> dict:
    """``(key, width) -> {token counts}`` of the ``CONDCrossAttn`` of the conds ``xs``."""
    lengths = {}
    for x in xs:
        for k, v in _cross(x):
            lengths.setdefault((k, v.cond.shape[2]), set()).add(v.cond.shape[1])
    return lengths


def equal_text_lengths(conds: list, x_in: torch.Tensor, timestep: torch.Tensor) -> list:
    """``conds`` (a step's list of per-branch condition lists) with the ``CONDCrossAttn`` of every group of conds
    ComfyUI could batch together (see :class:`EqualTextLengths`) repeated to the group's least common multiple of
    token counts, per key and width; new lists and dicts, the given ones unchanged."""
    import comfy.samplers

    spots = [(i, j) for i, cond in enumerate(conds) for j, x in enumerate(cond or ())]
    if all(len(n) == 1 for n in _text_lengths(conds[i][j] for i, j in spots).values()):
        return conds  # one length per key: nothing to equalise (every SD3/Flux-type model, most UNet prompts)
    active = []
    for i, j in spots:
        p = comfy.samplers.get_area_and_mult(conds[i][j], x_in, timestep)
        if p is not None:
            active.append(((i, j), p))
    parent = list(range(len(active)))

    def root(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a in range(len(active)):
        for b in range(a + 1, len(active)):
            pa, pb = active[a][1], active[b][1]
            if pa.hooks == pb.hooks and comfy.samplers.can_concat_cond(pa, pb):
                parent[root(b)] = root(a)
    groups = {}
    for a, (spot, _) in enumerate(active):
        groups.setdefault(root(a), []).append(spot)
    out = [None if cond is None else list(cond) for cond in conds]
    for spots_of in groups.values():
        lengths = _text_lengths(conds[i][j] for i, j in spots_of)
        target = {kw: math.lcm(*n) for kw, n in lengths.items() if len(n) > 1}
        for i, j in spots_of if target else ():
            x = conds[i][j]
            grow = {k: v._copy_with(v.cond.repeat(1, target[k, v.cond.shape[2]] // v.cond.shape[1], 1))
                    for k, v in _cross(x) if target.get((k, v.cond.shape[2]), v.cond.shape[1]) != v.cond.shape[1]}
            if grow:
                out[i][j] = {**x, "model_conds": {**x["model_conds"], **grow}}
    return out


def deterministic_warn_only(model) -> bool:
    """Whether ``model``'s deterministic wrapper only warns on a torch op with no deterministic implementation
    (Mode Switch with ``strict`` off); False (strict) when it has none."""
    return any(getattr(fn, "warn_only", False) for fn in model.get_wrappers(_wrappers().APPLY_MODEL,
                                                                            KEY_DETERMINISTIC))


def with_deterministic(model, warn_only: bool | None = None):
    """A clone of ``model`` (with any other jetdet mode removed) whose model calls are deterministic.
    ``warn_only`` None keeps the setting of the model's own deterministic wrapper (the Mode Switch's ``strict``),
    strict when it has none.

    Three wrappers: ``APPLY_MODEL`` (every model call, whatever calls it), ``PREDICT_NOISE`` (one sampler step's
    prediction: the model calls and the CFG combination around them, where a ``sampler_cfg_function`` such as
    RescaleCFG's takes ``torch.std`` per item, a reduction whose bits on a GPU can depend on the batch) and
    ``CALC_COND_BATCH`` (:class:`EqualTextLengths`: texts of one length, however ComfyUI batches the branches)."""
    if warn_only is None:
        warn_only = deterministic_warn_only(check_model(model))
    m = without_jetdet(model)
    w = _wrappers()
    m.add_wrapper_with_key(w.APPLY_MODEL, KEY_DETERMINISTIC, DeterministicWrapper(warn_only))
    m.add_wrapper_with_key(w.PREDICT_NOISE, KEY_DETERMINISTIC, DeterministicWrapper(warn_only))
    m.add_wrapper_with_key(w.CALC_COND_BATCH, KEY_DETERMINISTIC, EqualTextLengths())
    return m


def is_deterministic(model) -> bool:
    return bool(model.get_wrappers(_wrappers().APPLY_MODEL, KEY_DETERMINISTIC))


# ---------------------------------------------------------------------------------------------------- fast


def _rows_of(v, bsz: int, rows: torch.Tensor):
    if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == bsz:
        return v.index_select(0, rows.to(v.device))
    if isinstance(v, list) and v and all(isinstance(e, torch.Tensor) for e in v):
        return [_rows_of(e, bsz, rows) for e in v]
    return v


def _patch_signature(transformer_options: dict) -> tuple:
    """What kind of call this is: the names and keys of its block replacements (``patches_replace``, e.g. Skip Layer
    Guidance's ``("dit", ("double_block", 1))``, PAG's ``("attn1", ("attn1", "middle", 0))``) and the names and
    counts of its patches. The functions themselves are left out: nodes make new ones per call."""
    rep = transformer_options.get("patches_replace") or {}
    pat = transformer_options.get("patches") or {}
    return (tuple(sorted((str(k), tuple(sorted(repr(b) for b in v))) for k, v in rep.items() if isinstance(v, dict))),
            tuple(sorted((str(k), len(v) if isinstance(v, (list, tuple)) else 1) for k, v in pat.items())))


def _hook_state(executor) -> tuple:
    """The weights a call runs with, as far as ComfyUI's conditioning hooks change them: each hook applied to the model
    now and its strength at this step (a hook LoRA's strength times its keyframe's). A keyframe that changes the
    strength mid-run changes the model: calls after it are another function of the input than those before."""
    model = getattr(executor, "class_obj", None)
    hooks = getattr(getattr(model, "current_patcher", None), "current_hooks", None)
    out = []
    for h in getattr(hooks, "hooks", None) or ():
        try:
            strength = float(h.strength)
        except (AttributeError, TypeError, ValueError):
            strength = None
        out.append((id(getattr(h, "hook_ref", h)), strength))
    return tuple(out)


class FastState:
    """jetdet's step cache for one fast-mode MODEL (shared by its clones; one sampling run at a time).

    The ``APPLY_MODEL`` wrapper sees ComfyUI's denoised prediction for a batch of rows ([cond; uncond] chunks, in
    any layout ``calc_cond_batch`` chose). The controller caches and forecasts, per row, the model's velocity in
    flow time: for a flow model (``CONST`` sampling, σ in [0, 1]) ``v = (x − denoised) / σ`` at time σ; for a
    model with variance-exploding σ (eps, v and EDM models: ``x = x0 + σ · noise``, σ up to 14.6 for SD1.5's table
    or 80 for EDM) the velocity of the flow model it is equivalent to, ``v = (x − (1 + σ) · denoised) / σ`` at
    flow time ``σ / (1 + σ)`` (latent ``x / (1 + σ)``). So the budget means the same for every model (it was
    chosen on flow models). Forecast in σ, the noise prediction ``(x − denoised) / σ`` of a variance-exploding model
    hides most of the change of the denoised image at high σ and is far from linear in σ at low σ: on the shapes
    model sampled in SD1.5's sigmas it skipped 16 of 20 calls at 29.7 dB, the flow view 13 at 39.9 dB
    (``tests/comfy/test_comfy_fast.py``). A forecast row's denoised is the inverse map at its own ``x``; a computed
    row's is the model's own, bit for bit. With a sampler that replaces the whole latent with new noise every step
    (lcm), every call runs (a warning says so). Rows are keyed by their CFG branch
    (``cond_or_uncond``), the kind of call (its block replacements and patches: Skip Layer Guidance's or PAG's extra
    call is another function than the sampler's own) and position, so batched and separate cond/uncond calls form
    the same streams. Calls at ``σ = 0``, and calls with a ControlNet attached when only some rows would run (its
    inputs are not row-sliceable), run the whole batch.

    Each sampling run (``OUTER_SAMPLE``) gets a new controller with the run's sigma schedule (in the controller's
    time) as its ``timesteps`` hint unless the options give one (taken as is); its statistics stay readable until
    the next run (:meth:`stats`).
    """

    def __init__(self, linear_attention=None, attention_cache=None, **controller_options):
        from ..cache import StepCacheController
        from ..patch import attncache, linattn

        StepCacheController(**controller_options)  # validate now, in the node, not at the first step
        self.options = dict(controller_options)
        self.note_nothing_saved = True  # log a noisy sampler's run that saved nothing (the Benchmark's table says so)
        self._noted: set = set()  # (sampler, budget) already logged: once each, not once per run, tile or pass
        self.linear_attention = linattn.parse_option(linear_attention)
        self.attention_cache = attncache.parse_option(attention_cache)
        if self.linear_attention and self.attention_cache:
            raise ValueError("linear_attention, attention_cache: both replace the model's softmax attention; "
                             "choose one")
        self.controller = None
        self.swap = None
        self.cache = None
        self.runs = 0
        self.last_stats: dict | None = None
        self._kinds: dict = {}  # call kind (block replacements and patches, see _patch_signature) -> its number
        self._conds: dict = {}  # a cond's uuid (ComfyUI's, one per cond per sampling run) -> its number
        self._hooked: dict = {}  # a cond's number -> (its hook state, whether a control acted) at its last call
        self._ve = False  # this run's model has variance-exploding sigma (see apply_model)
        self._lock = threading.Lock()

    # ----------------------------------------------------------------------------------------- budgets
    def set_budgets(self, device=None, cpu=None, disk=None) -> None:
        """Byte budgets of the cache tiers (``None`` = unlimited), from the next sampling run on. A CPU or disk
        budget of 0 means no such tier: streams skip it (nothing is written to disk with ``disk=0``) and go on to
        the next tier, or are dropped."""
        from ..cache import CacheManager

        spill = tuple(t for t, b in (("cpu", cpu), ("disk", disk)) if b != 0)
        CacheManager(memory_budget_bytes=device, cpu_budget_bytes=cpu, disk_budget_bytes=disk, spill=spill)
        self.options.update(memory_budget_bytes=device, cpu_budget_bytes=cpu, disk_budget_bytes=disk, spill=spill)

    def clear(self) -> None:
        """Drop the cached tensors of every tier now (the statistics of the last run are kept)."""
        ctl = self.controller
        if ctl is not None:
            self.last_stats = self.stats()
            ctl.clear()

    def held_bytes(self) -> dict:
        """Bytes of cached tensors held now, per tier: nothing outside a sampling run (each run's are freed when it
        ends, and by :meth:`clear`)."""
        ctl = self.controller
        held = dict(ctl.stats()["bytes"]) if ctl is not None else {}
        return {tier: held.get(tier, 0) for tier in ("device", "cpu", "disk")}

    def stats(self) -> dict:
        if self.controller is None:
            return dict(self.last_stats or {"runs": self.runs, "calls": 0})
        return self._with_parts(self.controller.stats())

    def _with_parts(self, s: dict) -> dict:
        """The controller's statistics ``s`` with the run count and the attention swaps' own."""
        s["runs"] = self.runs
        if self.swap is not None:
            s["linear_attention"] = self.swap.stats()
        if self.cache is not None:
            s["attention_cache"] = self.cache.stats()
        return s

    # ---------------------------------------------------------------------------------------- wrappers
    def outer_sample(self, executor, *args, **kwargs):
        from ..cache import StepCacheController
        from ..patch.attncache import AttentionCache
        from ..patch.linattn import LinearAttentionSwap

        sigmas = args[3] if len(args) > 3 else kwargs.get("sigmas")
        opts = dict(self.options)
        ve = _variance_exploding(executor)
        if isinstance(sigmas, torch.Tensor) and sigmas.numel() >= 2:
            vals = [float(v) for v in sigmas.detach().reshape(-1).cpu()]
            if all(b < a for a, b in zip(vals, vals[1:])) and all(math.isfinite(v) for v in vals):
                # a hint, in the controller's time (apply_model's tc); a schedule it cannot take is left out
                opts.setdefault("timesteps", [_flow_time(v) for v in vals] if ve else vals)
        sampler = args[2] if len(args) > 2 else kwargs.get("sampler")
        noisy = _adds_noise(sampler)
        if (_renoises(sampler) or _cfg_pp(sampler)) and opts.get("budget") != 0.0:
            noisy = False  # warned here: every call runs
            _warn_renoising(sampler)
            opts["budget"] = 0.0  # every call runs
        elif noisy:
            # the latent gets new noise at every step: forecast the denoised image (smooth in time) and take the
            # velocity at the row's own latent, with the branches of a call decided together (see _ADDS_NOISE)
            opts.setdefault("forecast_space", "x0")
            opts.setdefault("piggyback", 0.0)
        with self._lock:
            if self.controller is not None:
                self.controller.clear()
            self.controller = ctl = StepCacheController(**opts)
            self._ve = ve  # set with its run's controller, under the lock
            self._kinds = {}
            self._conds = {}
            self._hooked = {}
            self.swap = (LinearAttentionSwap(self.linear_attention, 1, 1, epoch_fn=ctl.epoch)
                         if self.linear_attention else None)
            self.cache = AttentionCache(self.attention_cache, epoch_fn=ctl.epoch) if self.attention_cache else None
            self.runs += 1
            swap, cache = self.swap, self.cache
        try:
            out = executor(*args, **kwargs)
        finally:
            s = ctl.stats()
            with self._lock:
                if self.controller is ctl:
                    self.last_stats = self._with_parts(dict(s))
                    self.controller = self.swap = self.cache = None
            ctl.clear()  # free the cached tensors; the statistics stay readable in last_stats
        self._note_attention_unused(swap, cache)
        # only where the budget decided: some row was eligible (past the guards: start/end percent, warm-up) and its
        # forecast was over budget; a run with no such row could not have saved a call at any budget
        if noisy and self.note_nothing_saved and ctl.budget > 0 and ctl.max_consecutive_skips > 0 and s["calls"] \
                and not s["rows_saved"] and s["reasons"].get("budget", 0):
            key = (_sampler_name(sampler), ctl.budget)
            with self._lock:
                first = key not in self._noted
                self._noted.add(key)
            if first:
                _note_nothing_saved(sampler, ctl.budget, s["calls"])
        return out

    def _note_attention_unused(self, swap, cache) -> None:
        """One warning per Fast Optimizer when its opt-in attention replacement replaced none of a run's attention
        calls (:func:`jetdet.patch.attention_replaced_nothing`)."""
        from ..patch import attention_replaced_nothing

        for name, part in (("linear_attention", swap), ("attention_cache", cache)):
            msg = attention_replaced_nothing(name, part)
            with self._lock:
                if msg is None or ("unused", name) in self._noted:
                    continue
                self._noted.add(("unused", name))
            warnings.warn(f"jetdet fast mode: {msg} (said once per Fast Optimizer)", stacklevel=3)

    def apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                    **kwargs):
        ctl = self.controller
        if transformer_options is None:
            transformer_options = {}
        args = (c_concat, c_crossattn, control, transformer_options)
        if ctl is None:  # called outside a sampling run (e.g. by another node's own loop): no cache
            return executor(x, t, *args, **kwargs)
        bsz = x.shape[0]
        sig = t.reshape(-1).to(x.dtype)
        if sig.numel() == 1 and bsz != 1:
            sig = sig.expand(bsz)
        if bool((sig == 0).any()):
            return executor(x, t, *args, **kwargs)
        # the controller sees every model as a flow model: variance-exploding sigma (eps, v, EDM models) maps to
        # flow time sigma / (1 + sigma), latent x / (1 + sigma), and its velocity (see the class docstring)
        scale, tc = None, sig
        if self._ve:
            scale = 1.0 + sig
            tc = _flow_time(sig)
        chunks = transformer_options.get("cond_or_uncond") or [0]
        per = bsz // len(chunks) if bsz % len(chunks) == 0 else bsz
        # a row's stream is its CFG branch and the kind of call: Skip Layer Guidance and Perturbed-Attention
        # Guidance make an extra call per step on the cond branch with some blocks replaced, whose output is
        # another function than the sampler's own call; filed under the same stream, each forecast its mix
        kind = self._kinds.setdefault(_patch_signature(transformer_options), len(self._kinds))
        # and which cond it is: two prompts on the positive side (Conditioning Combine) are both cond_or_uncond 0,
        # and so is Perp-Neg's empty prompt; when ComfyUI runs them in separate calls, each needs a history of its
        # own (sharing one, the second was served the first one's output at the same step)
        uuids = transformer_options.get("uuids")
        if not isinstance(uuids, (list, tuple)) or len(uuids) != len(chunks):
            uuids = [None] * len(chunks)
        ids = [self._conds.setdefault(u, len(self._conds)) for u in uuids]
        # the weights a cond runs with: a hook LoRA's keyframe that changes its strength mid-run changes the model, and
        # the whole latent's path with it (through CFG), so every stream starts over and is computed until it has a
        # history again (forecast across the change, a user trial lost 13-17 dB at the same budget); so does a
        # ControlNet that starts or stops acting (its start/end percent): ComfyUI then passes its residuals, or None
        # (one control of a chain stopping while another acts is not seen: the residuals come summed)
        state = (_hook_state(executor), control is not None)
        for c in set(ids):
            if self._hooked.setdefault(c, state) != state:
                self._hooked = {c: state}
                ctl._reset_all("model")
                break
        cond = torch.tensor([[float(chunks[c]), float(kind), float(ids[c])]
                             for c in (min(r // per, len(chunks) - 1) for r in range(bsz))])
        shape = (-1,) + (1,) * (x.dim() - 1)
        ran: dict = {}

        def run(rows):
            if rows is None or control is not None:
                den = self._call(executor, x, t, args, kwargs)
                xs, ss = x, sig
                if rows is not None:
                    den, xs, ss = den.index_select(0, rows), x.index_select(0, rows), sig.index_select(0, rows)
            else:
                den = self._call_rows(executor, x, t, args, kwargs, rows, per)
                xs, ss = _rows_of(x, bsz, rows), sig.index_select(0, rows)
            ran["rows"], ran["den"] = rows, den
            if scale is None:
                return (xs - den) / ss.reshape(shape)
            return (xs - den * (1.0 + ss).reshape(shape)) / ss.reshape(shape)  # v = (x - (1 + sigma) den) / sigma

        flow_x = None
        if ctl.forecast_space == "x0":  # the latent in flow form, whose denoised estimate is flow_x - tc * v
            flow_x = x if scale is None else x / scale.reshape(shape)
        d = ctl(ModelCall(x=x, t=tc, run=run, model_id=id(getattr(executor, "class_obj", None)), cond=cond,
                          flow_x=flow_x))
        if "den" in ran and ran["rows"] is None:
            return ran["den"]  # the whole batch ran: the model's own output, bit for bit
        out = x - d * sig.reshape(shape)
        if scale is not None:
            out = out / scale.reshape(shape)
        if "den" in ran:
            out.index_copy_(0, ran["rows"].to(out.device), ran["den"].to(out.dtype))
        return out

    def _call_rows(self, executor, x, t, args, kwargs, rows, per):
        """The model's output for the batch rows ``rows`` (in that order) alone, with ``transformer_options`` that
        describe those rows: ``cond_or_uncond`` (and ``uuids``) cut to the chunks they come from, for the models and
        attention patches that split the batch by it (ComfyUI's SeedVR2 and Trellis2, Self-Attention Guidance; given
        the whole batch's, a call of two uncond rows read as [uncond, cond]), and ``sigmas`` (ComfyUI's has one per
        item, not per row) cut to the items they come from. ComfyUI's chunks have
        one size, so rows that take different items from different chunks run as one call per item set. ``per``:
        the rows of a chunk (the whole batch where the batch is not ``cond_or_uncond``'s chunks of one size)."""
        c_concat, c_crossattn, control, topts = args
        bsz = x.shape[0]
        labels = topts.get("cond_or_uncond")
        wanted = [int(r) for r in rows.tolist()]
        if not per or not isinstance(labels, (list, tuple)) or len(labels) * per != bsz:
            groups = [(wanted, None, None)]
        else:
            items: dict = {}
            for r in wanted:
                items.setdefault(r // per, []).append(r % per)
            by_items: dict = {}
            for c in sorted(items):
                by_items.setdefault(tuple(sorted(items[c])), []).append(c)
            groups = [([c * per + i for c in cs for i in its], cs, its) for its, cs in by_items.items()]
        outs, order = [], []
        for rs, cs, its in groups:
            idx = torch.tensor(rs, dtype=torch.long)
            to = topts
            if cs is not None:
                to = dict(topts, cond_or_uncond=[labels[c] for c in cs])
                uuids = topts.get("uuids")
                if isinstance(uuids, (list, tuple)) and len(uuids) == len(labels):
                    to["uuids"] = [uuids[c] for c in cs]
                sg = topts.get("sigmas")
                if isinstance(sg, torch.Tensor) and sg.dim() >= 1:
                    # ComfyUI's is the latent's, one sigma per item (every chunk's rows share it); one per row is cut
                    # as the rows are
                    if sg.shape[0] == per and per != bsz:
                        to["sigmas"] = sg.index_select(0, torch.tensor(its, dtype=torch.long, device=sg.device))
                    else:
                        to["sigmas"] = _rows_of(sg, bsz, idx)
            a = [_rows_of(v, bsz, idx) for v in (x, t, c_concat, c_crossattn)]
            kw = {k: _rows_of(v, bsz, idx) for k, v in kwargs.items()}
            outs.append(self._call(executor, a[0], a[1], (a[2], a[3], control, to), kw))
            order += rs
        den = outs[0] if len(outs) == 1 else torch.cat(outs)
        if order != wanted:
            at = {r: i for i, r in enumerate(order)}
            den = den.index_select(0, torch.tensor([at[r] for r in wanted], device=den.device))
        return den

    def _call(self, executor, x, t, args, kwargs):
        if self.swap is None and self.cache is None:
            return executor(x, t, *args, **kwargs)
        with sdpa_attention():  # both intercept F.scaled_dot_product_attention, so the model must call it
            if self.swap is not None:
                with self.swap.mode(t):
                    out = executor(x, t, *args, **kwargs)
                self.swap.after_forward()
                return out
            with self.cache.mode(t) as m:
                out = executor(x, t, *args, **kwargs)
            self.cache.after_forward(m)
            return out


#: Sampler functions whose every step replaces the whole latent with the denoised image plus new noise: a model
#: call's output there is not a smooth function of the earlier calls' (a break-it run: lcm, 12 steps, one forecast
#: call at a predicted 3 % error cost the image 24 dB), so fast mode computes every call with them.
_RENOISING = frozenset({"sample_lcm", "sample_lcm_upscale"})
_warned_renoising: set = set()


#: Sampler functions that add new noise to the latent at every step (ancestral and SDE samplers, with their default
#: ``eta`` and ``s_noise``). The model's velocity at a step then carries that noise, and its forecast in time missed
#: by more than the budget: at 0.1 nothing was skipped with them. Their denoised image ``x − σ·v`` is smooth in time,
#: so fast mode forecasts it instead (``forecast_space="x0"``) and returns the velocity at the row's own noisy latent;
#: a call's rows run or are forecast together (``piggyback=0``): forecasting one CFG branch of an item alone cost 9 dB
#: there. Measured on the shapes model (``python bench/comfy_peers.py --sampler ...``, README "Fast mode with
#: ancestral and SDE samplers"). A sampler node's ``eta`` of 0 (``s_noise`` of 0 for one without ``eta``) makes them
#: deterministic samplers (not SA-Solver's node, which passes its eta inside a function: taken as adding noise);
#: dpm_adaptive adds noise with an ``eta`` above 0 (:data:`_NOISE_WITH_ETA`).
_ADDS_NOISE = frozenset(
    "sample_" + n for n in (
        "euler_ancestral", "euler_ancestral_RF", "euler_ancestral_cfg_pp", "dpm_2_ancestral", "dpm_2_ancestral_RF",
        "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_RF", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu",
        "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde",
        "dpmpp_3m_sde_gpu", "ddpm", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "er_sde", "seeds_2",
        "seeds_3", "sa_solver", "sa_solver_pece"))


#: Sampler functions that add noise only with an ``eta`` above 0 (0 by default): dpm_adaptive, as ComfyUI wraps it
#: (its SamplerDPMAdaptative node sets eta; ComfyUI's dpm_fast wrapper passes none)
_NOISE_WITH_ETA = frozenset({"dpm_adaptive_function", "sample_dpm_adaptive"})


def _adds_noise(sampler) -> bool:
    name = _sampler_name(sampler)
    if name not in _ADDS_NOISE and name not in _NOISE_WITH_ETA and not _named_as_adding_noise(name):
        return False
    kw = _sampler_options(sampler)
    if name in _NOISE_WITH_ETA and not (isinstance(kw.get("eta"), (int, float)) and kw["eta"] > 0):
        return False
    # eta 0 is the deterministic sampler; with eta above 0 and s_noise 0 the latent still jumps to the ancestral step's
    # lower sigma, and the velocity forecast then skipped nothing where the denoised one did (a review: 13-14 of 15
    # calls against 15 of 15); a sampler without eta (er_sde) is deterministic at s_noise 0
    if "eta" in kw:
        return kw["eta"] != 0
    return kw.get("s_noise") != 0


def _named_as_adding_noise(name: str) -> bool:
    """A sampler function jetdet does not know (a newer ComfyUI's) whose name says it adds noise, as ComfyUI's names
    it: ``sample_..._ancestral...`` or ``sample_..._sde...`` (a trial on ComfyUI 0.33: ``exp_heun_2_x0_sde``)."""
    return name.startswith("sample_") and any(w in name.split("_") for w in ("ancestral", "sde"))


def _sampler_options(sampler) -> dict:
    """A sampler's options: its function's (a ``functools.partial``'s arguments), then its node's ``extra_options``."""
    fn = getattr(sampler, "sampler_function", None)
    return dict(getattr(fn, "keywords", None) or {}, **(getattr(sampler, "extra_options", None) or {}))


def _sampler_name(sampler) -> str:
    fn = getattr(sampler, "sampler_function", None)
    fn = getattr(fn, "func", fn)  # a functools.partial
    return getattr(fn, "__name__", "")


def _renoises(sampler) -> bool:
    return _sampler_name(sampler) in _RENOISING


def _cfg_pp(sampler) -> bool:
    """The CFG++ samplers (``*_cfg_pp``, gradient_estimation with ``cfg_pp``): each step starts from the model's
    denoised images themselves (``x' = den_cond + sigma' * (x - den_uncond) / sigma``), so a forecast's error goes
    into the latent whole, where the other samplers scale it by the step (``x' = x + (sigma' - sigma) * v``). Measured
    on the shapes model at CFG 1 (``python bench/comfy_peers.py --sampler ... --cfg 1.0``): dpmpp_2m_cfg_pp at budget
    0.05 ran 23.2 of 30 forwards for 17.71 dB mean (7.10 min), at 0.01 28.8 for a 22.05 dB minimum, and euler_cfg_pp
    at 0.05 13.0 forwards for 27.29 dB (20.90 min), where euler gave 33.86 dB with 11.0; so fast mode computes every
    call with them."""
    name = _sampler_name(sampler)
    if name.endswith("_cfg_pp") or name == "sample_euler_pp":  # SamplerEulerCFG++'s "alternative" version
        return True
    return name == "sample_gradient_estimation" and bool(_sampler_options(sampler).get("cfg_pp"))


def _warn_renoising(sampler) -> None:
    name = _sampler_name(sampler)
    if name not in _warned_renoising:
        _warned_renoising.add(name)
        short = name.removeprefix("sample_")
        why = (f"the {short} sampler (CFG++) builds each step from the model's denoised images, so a forecast's error "
               "goes into the latent whole instead of scaled by the step (measured: dpmpp_2m_cfg_pp at budget 0.05 "
               "kept 17.7 dB)" if _cfg_pp(sampler) else
               f"the {short} sampler replaces the whole latent with new noise at every step, so a model call cannot be "
               "forecast from the earlier ones")
        warnings.warn(f"jetdet fast mode: {why}; fast mode computes every call with it", stacklevel=2)


#: The Fast Optimizer's largest budget (its widget's maximum): no budget to raise past it.
MAX_BUDGET = 1.0


def _note_nothing_saved(sampler, budget: float, calls: int) -> None:
    """One log line for a fast run with a sampler that adds noise at every step that saved no model call though
    the budget decided some (a user trial: nothing else outside the Cache Manager said so); once per Fast
    Optimizer, sampler and budget. It advises raising the budget only below :data:`MAX_BUDGET`."""
    name = _sampler_name(sampler).removeprefix("sample_") or "this"
    todo = ("Raise the Fast Optimizer's budget, or sample with a sampler that adds no noise, for a speed-up"
            if budget < MAX_BUDGET else
            f"The budget is at its maximum ({MAX_BUDGET:g}): sample with a sampler that adds no noise for a speed-up")
    logging.info(
        "jetdet fast mode: the %s run computed all %d model calls at budget %g (it saved none; logged once per Fast "
        "Optimizer, sampler and budget). Samplers that add noise at every step (ancestral, SDE) leave the step cache "
        "less to reuse than euler or dpmpp_2m do: on the shapes model at 20 steps euler_ancestral saved nothing at "
        "0.05 and 26%% of its calls at 0.1 (27 dB). %s (README, ComfyUI > Limits: 'The Fast Optimizer saves less "
        "with samplers that add noise')", name, calls, budget, todo)


def _flow_time(sigma):
    """The flow time of a variance-exploding sigma (a float or a tensor): ``sigma / (1 + sigma)``."""
    return sigma / (1.0 + sigma)


def _variance_exploding(executor) -> bool:
    """Whether the model an ``OUTER_SAMPLE`` executor samples has variance-exploding sigma (eps, v and EDM
    models: ``x = x0 + sigma * noise``), not a flow model's (``CONST`` sampling: sigma in [0, 1])."""
    import comfy.model_sampling as cms

    guider = getattr(executor, "class_obj", None)
    patcher = getattr(guider, "model_patcher", None)
    ms = None
    if patcher is not None:
        try:
            ms = patcher.get_model_object("model_sampling")
        except AttributeError:
            ms = None
    return ms is not None and not isinstance(ms, cms.CONST)


def with_fast(model, **options) -> tuple:
    """A clone of ``model`` (with any other jetdet mode removed) with the step cache; returns ``(clone, state)``.
    ``options``: every :class:`jetdet.cache.StepCacheController` option, plus ``linear_attention`` and
    ``attention_cache`` as in :func:`jetdet.patch`."""
    state = FastState(**options)
    m = without_jetdet(model)
    w = _wrappers()
    m.add_wrapper_with_key(w.OUTER_SAMPLE, KEY_FAST, state.outer_sample)
    m.add_wrapper_with_key(w.APPLY_MODEL, KEY_FAST, state.apply_model)
    return m, state


def fast_state(model) -> FastState | None:
    """The :class:`FastState` of a fast-mode MODEL, or None."""
    for fn in model.get_wrappers(_wrappers().APPLY_MODEL, KEY_FAST):
        st = getattr(fn, "__self__", None)
        if isinstance(st, FastState):
            return st
    return None


# ------------------------------------------------------------------------------------------------ counting


class CallCounter:
    """``APPLY_MODEL`` wrapper counting model calls and batch rows actually evaluated (innermost: register it
    last, so it sees only the calls that reach the model)."""

    def __init__(self):
        self.calls = 0
        self.rows = 0

    def __call__(self, executor, *args, **kwargs):
        self.calls += 1
        self.rows += int(args[0].shape[0]) if args and isinstance(args[0], torch.Tensor) else 0
        return executor(*args, **kwargs)


def with_counter(model) -> tuple:
    m = check_model(model).clone()
    counter = CallCounter()
    m.add_wrapper_with_key(_wrappers().APPLY_MODEL, KEY_COUNTER, counter)
    return m, counter


def finite_or_none(v):
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None
