"""``jetdet.patch(model, mode=...)``: make a model deterministic or fast without editing its code.

::

    handle = jetdet.patch(model, mode="deterministic")   # or mode="fast", budget=..., ...
    handle.stats()
    handle.remove()                                       # or jetdet.unpatch(model)

What patching changes, and what ``remove()`` puts back exactly:

* ``mode="deterministic"``: every supported leaf layer (``nn.Linear``, ``nn.Conv2d`` with groups=1 and
  dilation=1, ``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.RMSNorm``) gets an instance-level ``forward`` that
  calls the batch-invariant ``jetdet.ops``, and the model's own ``forward`` runs inside
  ``jetdet.mode("deterministic")`` so functional calls in model code (``F.scaled_dot_product_attention``,
  ``@``, ``softmax``) are routed as well. Every other submodule's ``forward`` enters the mode too when it is
  called outside it, so the model's other entry points (a VAE's ``decode``/``encode``, a block called on its own)
  are routed as well; only code in such a method's own body, outside any submodule, is not. Determinism then
  holds without a ``with`` block.
* ``mode="fast"``: the model's ``forward`` is wrapped by a step-cache controller
  (:class:`jetdet.cache.StepCacheController`) that decides per batch row whether to run the model or forecast
  its output, and runs the model only on the rows that need it.

Patching never touches parameters, buffers, classes or hooks; it only sets instance ``forward`` attributes,
and ``remove()`` deletes them again (or restores a ``forward`` attribute the user had set). Patching an
already patched model raises; call ``remove()`` first. So does patching a model that contains a patched
submodule, or a submodule of a patched model.

A module with an accelerate hook (diffusers' ``enable_model_cpu_offload`` and ``enable_sequential_cpu_offload``,
``device_map``) keeps the forward the hook wraps in ``_old_forward``, and the hook puts that back as ``forward``
when it is removed: a diffusers pipeline removes and re-adds its offload hooks after every call. jetdet's forward
then goes in ``_old_forward``, under the hook, so it survives that and the hook keeps running around it. A hook
added after the patch wraps jetdet's forward; ``remove()`` takes jetdet's forward out of ``forward`` or
``_old_forward``, wherever it is then, and leaves the hook. A jetdet forward that something else captured (another
library's wrapper) passes calls straight to the forward from before once its handle is removed.

Each installed ``forward`` is a method bound to its module, so ``copy.deepcopy`` of a patched model binds the copy's
to the copy: it runs on the copy's own weights. A copy of a deterministic model is deterministic too. A copy of a
fast model runs without the step cache (the cache and its statistics belong to the original), with a one-time
warning. ``jetdet.unpatch(copy)`` removes what the copy inherited; then it can be patched itself.
"""

from __future__ import annotations

import functools
import inspect
import threading
import types
import warnings
import weakref
from collections import Counter
from typing import NamedTuple

import torch
import torch.nn as nn

from ..mode import _routes_here, check_warn_only, compiled_router
from ..mode import mode as _mode
from . import layers
from .adapters import UnsupportedModelError, make_adapter
from .call import ModelCall

__all__ = ["patch", "unpatch", "PatchHandle", "UnsupportedModelError", "ModelCall"]

# model -> weakref to its live PatchHandle. The handle is kept alive by the model's installed forward
# (PatchHandle._set_forward), so a patched model that the user drops without remove() is freed with its handle.
_handles: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _handle_of(model):
    ref = _handles.get(model)
    return ref() if ref is not None else None
_MISSING = object()
MODES = ("deterministic", "fast")


class PatchHandle:
    """Returned by :func:`patch`. ``stats()`` reports what was patched (and the cache statistics in fast
    mode); ``remove()`` restores the model exactly. Usable as a context manager that removes on exit."""

    def __init__(self, model, mode, options):
        self.model = model
        self.mode = mode
        self.options = dict(options)
        self.adapter = None
        self._threads: _PerThread | None = None  # fast mode: the step cache's state, one per calling thread
        # (module, the installed function, the slot's value before it or _MISSING)
        self._saved: list[tuple[nn.Module, object, object]] = []
        self._layers: Counter = Counter()
        self._skipped: Counter = Counter()
        self._entered = 0
        self._bypassed = 0  # fast mode: calls run past the cache (pipe.scheduler with other rules)
        self._lock_bypassed = threading.Lock()
        self._attention_noted = False  # fast mode: linear_attention/attention_cache checked for replacing nothing
        self._sana = None  # fast mode, sana_linear_attention=True: the SanaRoute
        self.removed = False

    # the calling thread's fast-mode state (the first thread's before any call, None for a deterministic patch)
    @property
    def controller(self):
        return self._threads.current().controller if self._threads is not None else None

    @property
    def linear_attention(self):
        return self._threads.current().swap if self._threads is not None else None

    @property
    def attention_cache(self):
        return self._threads.current().cache if self._threads is not None else None

    # --------------------------------------------------------------------------------------------- api
    def stats(self) -> dict:
        s = {
            "mode": self.mode,
            "model": type(self.model).__name__,
            "removed": self.removed,
            "layers_patched": dict(self._layers),
            "layers_left_to_router": dict(self._skipped),
        }
        if self.mode == "deterministic":  # the other submodules, whose forward enters the mode when called alone
            s["modules_entering_mode"] = self._entered
        if self.adapter is not None:
            s["adapter"] = self.adapter.kind
            s["latent_arg"] = self.adapter.latent
            s["timestep_arg"] = self.adapter.timestep
            s["prediction"] = self.adapter.param.describe() if self.adapter.param is not None else "as is"
        if self.controller is not None:
            s["cache"] = self.controller.stats()
            # calls run as the model, past the cache, while pipe.scheduler has other rules than the patch's
            s["calls_bypassed"] = self._bypassed
        if self.linear_attention is not None:
            s["linear_attention"] = self.linear_attention.stats()
        if self.attention_cache is not None:
            s["attention_cache"] = self.attention_cache.stats()
        if self._sana is not None:
            s["sana_linear_attention"] = self._sana.stats()
        if self._threads is not None and self._threads.count() > 1:
            s.update(self._threads.stats())
        return s

    def remove(self) -> None:
        if self.removed:
            return
        self.removed = True  # first: a jetdet forward held where remove() cannot reach now passes calls through
        for module, fn, prev in reversed(self._saved):
            for slot in _SLOTS:
                if getattr(module.__dict__.get(slot), "__func__", None) is fn:
                    _put_back(module, slot, prev)
                    break
        self._saved.clear()
        if self._threads is not None:
            self._threads.clear()
        if _handle_of(self.model) is self:
            del _handles[self.model]

    def new_trajectory(self) -> None:
        """Fast mode: the next call starts a new sampling run, with nothing of the cache's history. Needed between
        runs only where the next run starts at or below the timestep where the last one stopped (a run stopped
        early, then img2img) and no ``scheduler=`` was given; with one, a diffusers pipeline's ``set_timesteps`` at
        the start of each run is seen. A run starting higher is seen by itself, and a call that raises resets too.
        Called from a thread that has called the model, it resets that thread's run; from another, every thread's."""
        if self._threads is None:
            raise RuntimeError(f"new_trajectory: this handle patched mode={self.mode!r}; only a fast-mode patch has "
                               "a step cache")
        self._threads.new_trajectory()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    def __repr__(self):
        state = "removed" if self.removed else "active"
        return f"<jetdet PatchHandle {self.mode} on {type(self.model).__name__} ({state})>"

    # ----------------------------------------------------------------------------------------- helpers
    def _set_forward(self, module: nn.Module, body) -> None:
        """Install ``body(this, inner, *args, **kwargs)`` as ``module``'s instance ``forward`` (in ``_old_forward``
        under an accelerate hook: :func:`_slot`), reversibly.

        ``this`` is the module the call is on and ``inner`` its forward from before the patch. The forward is bound
        to ``module``, so ``copy.deepcopy`` binds a copy's to the copy: ``this`` is then the copy, and ``inner`` the
        copy's own previous forward, so nothing of the copy reaches the original's weights. Once the handle is
        removed, a call that still reaches it on ``module`` goes to ``inner``."""
        slot = _slot(module)
        prev = module.__dict__.get(slot, _MISSING)
        inner = _inner(module)
        handle = self

        def forward(this, *args, **kwargs):
            if this is module:
                if handle.removed:
                    return inner(*args, **kwargs)
                return body(this, inner, *args, **kwargs)
            return body(this, _previous_forward(this, module, prev), *args, **kwargs)

        wrapped = inner.__func__ if isinstance(inner, types.MethodType) else None
        if wrapped is not None:  # inspect.signature(model.forward) keeps the model's own signature
            functools.update_wrapper(forward, wrapped)
        setattr(forward, _JETDET_ATTR, (module, prev))
        # the handle, for _dead; the forward keeps it alive anyway (the closure above), and the patched model's
        # forward keeps it as long as the model (a cycle the collector frees with the model)
        forward.__jetdet_handle__ = self
        self._saved.append((module, forward, prev))
        module.__dict__[slot] = types.MethodType(forward, module)


_NO_FORWARD = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)  # containers: nothing to call
_JETDET_ATTR = "__jetdet_forward__"  # (module it was installed on, that module's previous value of the slot)
# where a jetdet forward can be: the instance forward, or under an accelerate hook the forward the hook wraps
_SLOTS = ("forward", "_old_forward")


def _slot(module: nn.Module) -> str:
    """Where jetdet installs ``module``'s forward: ``"_old_forward"`` under an accelerate hook (``_hf_hook``), whose
    own forward calls ``module._old_forward`` and which puts it back as ``forward`` when it is removed; else
    ``"forward"``."""
    d = module.__dict__
    return "_old_forward" if "_hf_hook" in d and "_old_forward" in d else "forward"


def _inner(module: nn.Module):
    """The forward a jetdet forward installed now on ``module`` wraps (see :func:`_slot`)."""
    return module.__dict__["_old_forward"] if _slot(module) == "_old_forward" else module.forward


def _put_back(module: nn.Module, slot: str, prev) -> None:
    """``module``'s ``slot`` as it was before jetdet: ``prev``, or for ``_MISSING`` no instance forward (the
    class's forward, bound, where an accelerate hook took jetdet's forward into ``_old_forward`` after the patch)."""
    if prev is not _MISSING:
        module.__dict__[slot] = prev
    elif slot == "forward":
        module.__dict__.pop("forward", None)
    else:
        module.__dict__[slot] = types.MethodType(type(module).forward, module)


def _rebound(prev, orig: nn.Module, this: nn.Module, bind):
    """``prev`` (a forward ``orig`` had before it was patched) for ``this``, a copy of ``orig``: a method of ``orig``
    is rebound to ``this`` with ``bind(func, this)``, a ``functools.partial`` over ``orig`` is remade over ``this``,
    anything else is kept as it is."""
    if isinstance(prev, types.MethodType) and prev.__self__ is orig:
        return bind(prev.__func__, this)
    if isinstance(prev, functools.partial) and prev.args and prev.args[0] is orig:
        return functools.partial(prev.func, this, *prev.args[1:], **prev.keywords)
    return prev


def _previous_forward(this: nn.Module, orig: nn.Module, prev):
    """The forward ``this`` (a copy of ``orig``) had before ``orig`` was patched, the class's forward when there was
    none. Partials rather than new bound methods, which ``torch.compile(fullgraph=True)`` cannot trace."""
    if prev is _MISSING:
        return functools.partial(type(this).forward, this)
    return _rebound(prev, orig, this, functools.partial)


def _wrapped(module: nn.Module) -> bool:
    """Whether ``module`` has an instance forward that does more than its class's (not accelerate's hook, whose
    wrapped forward jetdet takes the place of; not the class's own forward bound to it, as ``torch.load`` of a
    patched model leaves)."""
    f = module.__dict__.get("forward")
    if f is None or _slot(module) != "forward":
        return False
    return not (isinstance(f, types.MethodType) and f.__self__ is module
                and f.__func__ is getattr(type(module).forward, "__func__", type(module).forward))


def _dead(module: nn.Module, slot: str) -> bool:
    """Whether the jetdet forward in ``module``'s ``slot`` belongs to a removed handle: another wrapper kept it past
    ``remove()`` and put it back later (a diffusers hook removed after the patch)."""
    h = getattr(getattr(module.__dict__.get(slot), "__func__", None), "__jetdet_handle__", None)
    return h is not None and h.removed


def _strip_dead(model: nn.Module) -> int:
    """Take out the dead jetdet forwards (:func:`_dead`) of ``model``'s modules; how many there were."""
    n = 0
    for m in model.modules():
        meta = _jetdet_forward(m)
        if meta is not None and meta[0] is m and _dead(m, meta[2]):
            _put_back(m, meta[2], meta[1])
            n += 1
    return n


def _jetdet_forward(module: nn.Module):
    """``(module it was installed on, previous value of the slot, slot)`` when ``module`` carries a jetdet forward
    (in ``forward``, or in ``_old_forward`` under an accelerate hook)."""
    for slot in _SLOTS:
        meta = getattr(module.__dict__.get(slot), _JETDET_ATTR, None)
        if meta is not None:
            return (*meta, slot)
    return None


def _inherited(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that carry a jetdet forward installed on another module (``copy.deepcopy`` of a
    patched model)."""
    return [m for m in model.modules() if (meta := _jetdet_forward(m)) is not None and meta[0] is not m]


def _strip(module: nn.Module) -> None:
    """Put back ``module``'s forward from before the patch it inherited."""
    orig, prev, slot = _jetdet_forward(module)
    # the user's own forward, of the same kind it was (a bound method stays a bound method)
    _put_back(module, slot, prev if prev is _MISSING else _rebound(prev, orig, module, types.MethodType))


#: a diffusers pipeline's modules that see the batch, in the order a deterministic run needs them patched
_PIPE_MODULES = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer", "vae")


def _check_model(model, mode=None):
    if not isinstance(model, nn.Module):
        den = next((n for n in ("unet", "transformer") if isinstance(getattr(model, n, None), nn.Module)), None)
        if den is not None and hasattr(model, "scheduler"):  # a diffusers pipeline: name its denoiser
            if isinstance(mode, str) and mode.lower() == "deterministic":  # README "Prompts too"
                names = [n for n in _PIPE_MODULES if isinstance(getattr(model, n, None), nn.Module)]
                raise TypeError(f"model: got a {type(model).__name__} (a pipeline); patch each module that sees the "
                                f"batch: {', '.join('pipe.' + n for n in names)} (jetdet.patch(pipe.{den}, "
                                "mode='deterministic'), ...), or run the call in "
                                "`with jetdet.mode('deterministic'):`, which routes every module the pipeline runs")
            raise TypeError(f"model: got a {type(model).__name__} (a pipeline); patch its denoiser: "
                            f"jetdet.patch(pipe.{den}, mode='fast', scheduler=pipe), or mode='deterministic'")
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if type(model).__name__ == "ModelPatcher" or hasattr(model, "model_patches_to"):
        raise UnsupportedModelError(
            "model: a ComfyUI ModelPatcher is patched through the jetdet ComfyUI nodes (jetdet.comfy: 'jetdet Mode "
            "Switch', 'jetdet Fast Optimizer'; in Python jetdet.comfy.wrappers.with_deterministic/with_fast), not "
            "jetdet.patch()"
        )


def _found_summary(model) -> str:
    kinds = Counter(type(m).__name__ for m in model.modules())
    return ", ".join(f"{k} x{v}" for k, v in kinds.most_common(12)) or "no submodules"


def _patch_deterministic(handle: PatchHandle, model: nn.Module, warn_only: bool = False):
    check_warn_only(warn_only)
    layered = set()  # ids of the layers given a jetdet forward (their ops are jetdet's, mode or not)
    for module in model.modules():
        fwd = layers.deterministic_forward(module)
        if fwd is not None and _wrapped(module):
            # a forward of its own (diffusers' layerwise casting hook, a user's wrapper): a layer forward would replace
            # it without calling it (casting skipped: an fp8 weight then reached the matmul); the model's forward runs
            # in deterministic mode, so the router takes the layer's torch calls inside the wrapper instead
            handle._skipped[f"{type(module).__name__} (has a forward wrapper of its own: left to the router)"] += 1
        elif fwd is not None:
            handle._set_forward(module, lambda this, inner, *args, _f=fwd, **kwargs: _f(this, *args, **kwargs))
            handle._layers[type(module).__name__] += 1
            layered.add(id(module))
        elif type(module).__name__ in layers.SUPPORTED:
            handle._skipped[f"{type(module).__name__} ({layers.unsupported_reason(module)})"] += 1
    if not handle._layers:
        why = "; ".join(f"{k} x{v}" for k, v in handle._skipped.items())
        raise UnsupportedModelError(
            f"jetdet.patch(mode='deterministic'): {type(model).__name__} has no layer of torch's "
            f"{', '.join(layers.SUPPORTED)} that it can take; found: {_found_summary(model)}"
            + (f"; not taken: {why}" if why else "") + ". For a model built from functional calls or from layer "
            "classes of its own (ComfyUI's comfy.ops, say), use `with jetdet.mode('deterministic'):` around its "
            "calls instead (the router takes their torch calls)."
        )

    def forward(this, inner, *args, **kwargs):  # inner: the (possibly user-overridden) forward from before
        if torch.compiler.is_compiling():  # traced by torch.compile: the router alone (mode.compiled_router)
            with compiled_router():
                return inner(*args, **kwargs)
        with _mode("deterministic", warn_only=warn_only):
            return inner(*args, **kwargs)

    def enter(this, inner, *args, **kwargs):  # a submodule: the mode unless the call is inside it already
        # (an outer context's warn_only stands inside it: re-entering at every submodule cost ~20 % of a forward;
        # compiling: the root's compiled_router routes, when the root is what was compiled)
        if torch.compiler.is_compiling() or _routes_here():
            return inner(*args, **kwargs)
        with _mode("deterministic", warn_only=warn_only):
            return inner(*args, **kwargs)

    # Every other submodule's forward enters the mode too, so that the model's other entry points (a VAE's
    # decode() and encode(), which diffusers pipelines call instead of forward(), a block called on its own) run
    # their functional calls (F.silu, the attention processor's SDPA, F.interpolate) routed: before, only
    # forward() did, and a patched VAE's decode of an item alone differed from its row in a batch (a user trial:
    # 4 of 5 items). Inside the model's forward each costs a check of the current mode.
    entered = 0
    for module in model.modules():
        if module is model or id(module) in layered or isinstance(module, _NO_FORWARD):
            continue
        handle._set_forward(module, enter)
        entered += 1
    handle._entered = entered
    handle._set_forward(model, forward)


def _x0_forecast_blocker(model: nn.Module, param, options: dict) -> str | None:
    """Why ``jetdet.patch(mode="fast")`` cannot forecast the denoised image for a scheduler that adds noise (None: it
    can). It needs flow time (a VP model mapped through ``scheduler=``: a flow-matching model's timesteps are not
    known to be in ``[0, 1]``) and an output shaped like the latent (the model's ``config`` says so: in_channels ==
    out_channels, or no out_channels; an inpainting U-Net's extra latent channels or a learned variance do not)."""
    if options.get("forecast_space") not in (None, "x0"):
        return f"forecast_space={options['forecast_space']!r} was asked for"
    if param is None:
        return "the model is forecast as it is (a flow-matching scheduler, or prediction='flow')"
    from .prediction import _config

    c_in, c_out = _config(model, "in_channels"), _config(model, "out_channels")
    if c_in is None:
        return f"{type(model).__name__} has no config.in_channels to say that its output is shaped like the latent"
    if c_out is not None and c_out != c_in:
        return f"its output has {c_out} channels and the latent {c_in}"
    return None


def _user_stacklevel() -> int:
    """The ``stacklevel`` of a warning issued here that names the first caller outside jetdet, torch and diffusers
    (a patched forward is called through ``nn.Module.__call__`` and a pipeline's own code)."""
    import sys

    from .._paths import user_stacklevel

    return user_stacklevel(sys.modules.get("diffusers")) - 1


def _same_rules(a, b) -> bool:
    """Whether fast mode treats schedulers ``a`` and ``b`` alike: the same output map (prediction type, flow or VP,
    the same ``alphas_cumprod``, continuous timesteps or not) and the same noise rule (adds noise every step,
    re-noises, neither)."""
    from . import prediction as pm

    def rules(x):
        # a scheduler with no timestep_type in its config (DPM++, PNDM, DDIM, UniPC) uses discrete timesteps, as
        # Euler's default "discrete" says
        return (pm._prediction_of(x), pm.is_flow_scheduler(x), pm._config(x, "timestep_type") or "discrete",
                pm.adds_noise(x),
                type(x).__name__ in pm.RENOISE)

    if rules(a) != rules(b):
        return False
    ac_a, ac_b = getattr(a, "alphas_cumprod", None), getattr(b, "alphas_cumprod", None)
    if ac_a is None or ac_b is None:
        return ac_a is ac_b
    return torch.equal(torch.as_tensor(ac_a).detach().cpu().double(), torch.as_tensor(ac_b).detach().cpu().double())


class _Bundle(NamedTuple):
    controller: object  # jetdet.cache.StepCacheController
    swap: object  # LinearAttentionSwap or None
    cache: object  # AttentionCache or None


#: ``stats()["cache_total"]``: the step-cache counters summed over threads (the ratios are recomputed from them)
_TOTAL_KEYS = ("calls", "calls_run", "calls_partial", "calls_saved", "rows", "rows_run", "rows_saved", "rows_partial",
               "rows_cfg", "model_equivalents", "syncs", "host_ms", "sync_wait_ms")


class _PerThread:
    """A fast patch's state, one :class:`_Bundle` per thread that calls the model.

    The step cache follows one sampling run at a time: its streams are keyed by conditioning and row order, not by
    run. Two runs interleaved on one model (a server's worker threads sampling two requests at once) would read each
    other's histories (a trial: 29.2 and 18.8 dB against 37.5 and 32.1 run one after the other). Each thread gets a
    state of its own, so each thread's run is cached as if it were alone; the first thread to call takes the state
    made at patch time, so single-threaded use has exactly one. A thread that ended has its state's counters kept
    for ``stats()`` and its cached tensors freed when the next new thread calls. Each state has the byte budgets
    (``memory_budget_bytes``, ...) to itself."""

    def __init__(self, make):
        self._make = make
        self._first = make()  # validates the options when patching, before anything is changed
        self._by_thread: dict[int, _Bundle] = {}
        self._owner: dict[int, weakref.ref] = {}  # ident -> the thread it belongs to (idents are reused)
        self._ended: list[dict] = []  # stats of the states of threads that ended
        self._last = self._first  # the state of the last call
        self._lock = threading.Lock()

    def get(self) -> _Bundle:
        """The calling thread's state (made on its first call)."""
        ident = threading.get_ident()
        b, owner = self._by_thread.get(ident), self._owner.get(ident)
        if b is None or owner is None or owner() is not threading.current_thread():
            b = self._claim()
        self._last = b
        return b

    def _claim(self) -> _Bundle:
        # threading.current_thread() gives a thread threading did not start (a C or _thread one) a dummy that
        # threading.enumerate() lists, so its state is not taken for that of an ended thread
        me = threading.current_thread()
        with self._lock:
            ident = threading.get_ident()
            if not self._by_thread and not self._ended:
                b = self._first
            else:
                alive = {t.ident: t for t in threading.enumerate()}
                for other in list(self._by_thread):
                    ref = self._owner.get(other)
                    owner = ref() if ref is not None else None
                    if owner is None or alive.get(other) is not owner or (other == ident and owner is not me):
                        done = self._by_thread.pop(other)  # its thread ended (its ident may be this one's now)
                        self._owner.pop(other, None)
                        self._ended.append(self._stats_of(done))
                        self._clear_one(done)
                b = self._make()
            self._by_thread[ident] = b
            self._owner[ident] = weakref.ref(me)
            return b

    def _states(self) -> list[_Bundle]:
        with self._lock:
            return list(self._by_thread.values())

    def current(self) -> _Bundle:
        """The calling thread's state if it has one, else that of the last call (the first one before any)."""
        return self._by_thread.get(threading.get_ident(), self._last)

    def count(self) -> int:
        with self._lock:
            return len(self._by_thread) + len(self._ended)

    def new_trajectory(self) -> None:
        b = self._by_thread.get(threading.get_ident())
        for x in ([b] if b is not None else self._states() or [self._first]):
            x.controller.new_trajectory()

    @staticmethod
    def _clear_one(b: _Bundle) -> None:
        for part in b:
            if part is not None:
                part.clear()

    def clear(self) -> None:
        for b in {id(b): b for b in (self._first, *self._states())}.values():
            self._clear_one(b)

    @staticmethod
    def _stats_of(b: _Bundle) -> dict:
        s = {"cache": b.controller.stats()}
        if b.swap is not None:
            s["linear_attention"] = b.swap.stats()
        if b.cache is not None:
            s["attention_cache"] = b.cache.stats()
        return s

    def stats(self) -> dict:
        """``threads``: each thread's ``cache`` (and ``linear_attention``/``attention_cache``) stats, those of
        threads that ended first (``ended: True``); ``cache_total``: their step-cache counters summed."""
        with self._lock:
            ended, live = list(self._ended), list(self._by_thread.values())
        per = [dict(s, ended=True) for s in ended] + [dict(self._stats_of(b), ended=False) for b in live]
        from ..cache.controller import ratios

        total = {k: sum(p["cache"][k] for p in per) for k in _TOTAL_KEYS}
        return {"threads": per, "cache_total": {**total, **ratios(total)}}


def _patch_fast(handle: PatchHandle, model: nn.Module, latent_arg=None, timestep_arg=None, linear_attention=False,
                linear_attention_check: int = 1, linear_attention_state_refresh: int = 1, attention_cache=False,
                sana_linear_attention=False, blocks="auto", head_blocks: int = 1, tail_blocks: int | None = None,
                scheduler=None, prediction=None, **options):
    if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        raise TypeError(
            f"model: got a torch.compile'd module (wrapping {type(model._orig_mod).__name__}), whose forward takes "
            "(*args, **kwargs): the step cache cannot find the latent and timestep there. Patch the model itself, "
            "and compile its blocks for the model under the cache (block.compile() for each; a torch.compile of "
            "the whole patched model runs the cache and the model eagerly)"
        )
    from ..cache import StepCacheController
    from . import attncache
    from . import prediction as pred_map
    from .blocks import BlockHooks, find_blocks
    from .linattn import LinearAttentionSwap, parse_option
    from .sana import SanaRoute
    from .sana import parse_option as parse_sana

    inner = _inner(model)  # the forward the installed one wraps, not an accelerate hook's around it
    pipe = None
    if scheduler is not None and not hasattr(scheduler, "set_timesteps") and hasattr(scheduler, "scheduler"):
        if not hasattr(scheduler.scheduler, "set_timesteps"):
            raise TypeError(f"scheduler: got a {type(scheduler).__name__} whose .scheduler is "
                            f"{type(scheduler.scheduler).__name__}, not a diffusers scheduler; pass the scheduler the "
                            "pipeline samples with (scheduler=pipe.scheduler)")
        pipe, scheduler = scheduler, scheduler.scheduler  # a pipeline: follow pipe.scheduler (_same_rules)
    adapter = make_adapter(model, inner, latent_arg=latent_arg, timestep_arg=timestep_arg)
    accepted = [n for n in inspect.signature(StepCacheController).parameters if n != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"jetdet.patch(mode='fast'): unknown option(s) {unknown}; accepted: latent_arg, timestep_arg, "
                        "linear_attention, linear_attention_check, linear_attention_state_refresh, attention_cache, "
                        "sana_linear_attention, blocks, head_blocks, tail_blocks, scheduler, prediction, "
                        f"{', '.join(accepted)}")
    param = pred_map.from_options(scheduler, prediction)
    sname = type(scheduler).__name__
    if sname in pred_map.RENOISE and options.get("budget") != 0.0:
        why = ("calls the model twice at nearly the same timestep with new noise added between the calls, so the "
               "second output cannot be forecast from the first (measured: 17 dB at any budget)"
               if sname in pred_map.RENOISE_SAME_T else
               "replaces the latent with the model's denoised estimate plus new noise at every step, so no call's "
               "output can be forecast from the earlier ones (measured with LCM: 13.8 dB mean after one forecast "
               "call)")
        _warn_once(sname + ":renoise", f"{sname} {why}; fast mode computes every call with it (budget 0)")
        options["budget"] = 0.0  # every call runs
    noisy = None  # why a scheduler that adds noise every step does not get the denoised-image forecast
    if pred_map.adds_noise(scheduler) and options.get("budget") != 0.0:
        noisy = _x0_forecast_blocker(model, param, options)
        if noisy is None:
            # new noise in the latent at every step: forecast the denoised image (smooth in time) and give each
            # forecast row the velocity at its own noisy latent; the branches of a call are decided together
            options.setdefault("forecast_space", "x0")
            options.setdefault("piggyback", 0.0)
    if param is not None:  # the controller works in flow time: map the schedule hints given in model timesteps
        if options.get("timesteps") is not None:
            hint = StepCacheController._check_schedule(options["timesteps"])
            options["timesteps"] = [param.flow_time(v) for v in hint]
        if options.get("t_end") not in (None, 0, 0.0):
            options["t_end"] = param.flow_time(options["t_end"])
    fmap = parse_option(linear_attention)
    ac = attncache.parse_option(attention_cache)
    sana = parse_sana(sana_linear_attention)
    if fmap and ac:
        raise ValueError("attention_cache, linear_attention: both replace the model's softmax attention; "
                         "choose one")

    def make() -> _Bundle:
        ctl = StepCacheController(**options)
        swap = LinearAttentionSwap(fmap, linear_attention_check, linear_attention_state_refresh,
                                   epoch_fn=ctl.epoch) if fmap else None
        return _Bundle(ctl, swap, attncache.AttentionCache(ac, epoch_fn=ctl.epoch) if ac else None)

    threads = _PerThread(make)  # validates the options before anything is changed
    controller = threads.current().controller
    name = type(model).__name__
    if scheduler is None and prediction is None and adapter.kind == "diffusers" and name.startswith("UNet"):
        # a diffusers U-Net is nearly always a VP (eps or v) model, and nothing in the model says which
        _warn_once(name, f"{name} is patched without scheduler=; its output (for SD1.5/SDXL/SD2, the noise or v "
                   "prediction) is forecast as it is, which keeps far less quality at the same budget. Pass "
                   "scheduler=pipe.scheduler (or prediction='flow' if the model is a flow-matching one)")
    if scheduler is not None:
        _warn_scheduler(sname, "unmeasured")
    if noisy is not None:
        _warn_once(sname + ":noisy", f"{sname} adds new noise to the latent at every step, which a forecast of the "
                   f"model output cannot follow, so fast mode will compute nearly every call; it forecasts the "
                   f"denoised image instead where it can, not here: {noisy}")
    _warn_scheduler(sname, "multistep")
    split, reason = find_blocks(model, blocks, head_blocks, tail_blocks)
    adapter.param = param
    handle.adapter, handle._threads = adapter, threads
    if split is not None and controller.block_reuse:
        adapter.hooks = BlockHooks(split, handle._set_forward)
        reason = "ok"
    elif split is not None:
        reason = "block_reuse=False: whole-call skipping only"
    adapter.blocks_reason = reason
    if sana:
        handle._sana = SanaRoute()
        if not handle._sana.install(model, handle._set_forward):
            warnings.warn(f"jetdet.patch(mode='fast'): sana_linear_attention=True, but no attention module of "
                          f"{type(model).__name__} has diffusers' SanaLinearAttnProcessor2_0 (or a PAG variant of it); "
                          "nothing is routed", stacklevel=3)

    seen: dict = {}  # per thread: the schedule its last call saw (at first, the one at patch time)
    seen0 = getattr(scheduler, "timesteps", None)
    # the scheduler followed, and whether it is one the patch was not configured for (a pipeline's new scheduler
    # with another output map or noise rule than ``configured``, the one given at patch time)
    cur, configured, warned = [scheduler, False], scheduler, []

    def forward(this, inner, *args, **kwargs):
        if torch.compiler.is_compiling():  # torch.compile over the patched model: the cache is Python, run it as is
            return eager(this, inner, *args, **kwargs)
        return run(this, inner, *args, **kwargs)

    compiled_warned = []

    def compiled_call(this, inner, *args, **kwargs):
        if this is model and not compiled_warned:
            compiled_warned.append(True)
            _warn_compiled_fast(model)
        return run(this, inner, *args, **kwargs)

    # Dynamo traced the controller before: a new graph at every step as its state changed, then its recompile limit
    # (a user trial: the first 20-step run took 45-119 s against 0.2 s eager, and its bits differed from eager's)
    why = ("jetdet fast mode: the step cache decides in Python at every step; drop fullgraph=True, or compile the "
           "model's blocks instead (block.compile() for each)")
    try:
        eager = torch.compiler.disable(compiled_call, reason=why)
    except TypeError:  # torch before reason=
        eager = torch.compiler.disable(compiled_call)

    def run(this, inner, *args, **kwargs):
        if this is not model:  # a copy.deepcopy of the model: the cache is the original's
            _warn_fast_copy(model)
            return inner(*args, **kwargs)
        if any(isinstance(v, torch.Tensor) and v.is_meta for v in (*args, *kwargs.values())):
            # a meta call (shape inference) has no values to decide on: the model's own, the cache untouched
            return inner(*args, **kwargs)
        if pipe is not None and pipe.scheduler is not cur[0]:
            new = pipe.scheduler  # replaced since (pipe.scheduler = X.from_config(...))
            cur[0], cur[1] = new, new is None or not _same_rules(configured, new)
            if cur[1] and type(new) not in warned:
                warned.append(type(new))
                warnings.warn(f"jetdet.patch(mode='fast'): pipe.scheduler is now a {type(new).__name__}, whose "
                              f"output map or noise differs from the {type(configured).__name__} the patch was "
                              "made for; the model runs every call as it is (no step cache) while it is, or until "
                              "the model is patched again with it", stacklevel=_user_stacklevel())
            elif not cur[1]:  # cached with it: what a patch made with it would have said
                for what in ("unmeasured", "multistep"):
                    _warn_scheduler(type(new).__name__, what, stacklevel=None)
        if cur[1]:
            with handle._lock_bypassed:
                handle._bypassed += 1
            return inner(*args, **kwargs)
        controller, swap, cache = threads.get()
        if cur[0] is not None:
            # a diffusers pipeline calls scheduler.set_timesteps, which makes a new timesteps tensor, at the start of
            # every run: a new run even where it starts below where the last one stopped (an interrupted txt2img,
            # then img2img), which the controller cannot tell from the timesteps alone
            ts = getattr(cur[0], "timesteps", None)
            me = threading.get_ident()
            if ts is not seen.setdefault(me, seen0):
                seen[me] = ts
                # only where this thread alone uses the patch: the schedule is one pipeline's, and another thread's
                # run would reset this one mid-run (with threads, a new run is seen by its timestep going up)
                if threads.count() == 1:
                    controller._reset_all("trajectory")
        call, finish = adapter.bind(args, kwargs)
        if swap is not None:
            with swap.mode(call.t):
                out = controller(call)
            swap.after_forward()
            if not handle._attention_noted:
                _note_attention_unused(handle, "linear_attention", swap)
        elif cache is not None:
            with cache.mode(call.t) as m:
                out = controller(call)
            cache.after_forward(m)
            if not handle._attention_noted:
                _note_attention_unused(handle, "attention_cache", cache)
        else:
            out = controller(call)
        return adapter.pack(finish(out), kwargs)

    handle._set_forward(model, forward)


_warned_copies: set = set()
_warned_unmapped: set = set()


def attention_replaced_nothing(name: str, part) -> str | None:
    """What to tell the user whose opt-in attention replacement ``name`` (``linear_attention``, ``attention_cache``;
    ``part`` its swap or cache) replaced none of the model's attention calls in the forwards so far: every call left
    exact (a mask, dropout, a sequence too short: HunyuanVideo in ComfyUI with a text attention mask) or none reaching
    ``F.scaled_dot_product_attention`` (a model with its own softmax); None where it replaced some, or ran no forward.
    Its own approximation warning comes only from a replaced call, so the user who turned it on was told nothing."""
    if part is None or not part.forwards:
        return None
    st = part.stats()
    if st["replaced"] if "replaced" in st else st.get("refreshed", 0) + st.get("reused", 0):
        return None
    left = ", ".join(f"{k} {v}" for k, v in sorted(st.get("left_exact", {}).items()))
    n = part.forwards
    return (f"{name} replaced none of the model's attention calls in {n} model call{'s' if n != 1 else ''} "
            f"(left exact: {left or 'none reached F.scaled_dot_product_attention'}); the model ran with its softmax "
            "attention")


def _note_attention_unused(handle: PatchHandle, name: str, part) -> None:
    """After a patch's first model call (always computed: the step cache's warm-up), once per patch: the warning of
    :func:`attention_replaced_nothing` where it applies. A model's attention calls are the same at every step, so
    the first call decides, and later calls pay nothing for the check."""
    with handle._lock_bypassed:
        if handle._attention_noted:
            return
        handle._attention_noted = True
    msg = attention_replaced_nothing(name, part)
    if msg:
        warnings.warn(f"jetdet.patch(mode='fast'): {msg} (said once per patch)", stacklevel=_user_stacklevel())


def _warn_once(key: str, message: str, stacklevel: int | None = 4) -> None:
    """A fast-mode patch warning about the model or its scheduler, once per ``key`` (a class name) per process; called
    from :func:`_patch_fast`, so it points at the caller of :func:`patch` (``stacklevel=None``: at the first caller
    outside jetdet, torch and diffusers, for a warning issued while the patched model runs)."""
    if key not in _warned_unmapped:
        _warned_unmapped.add(key)
        warnings.warn(f"jetdet.patch(mode='fast'): {message}",
                      stacklevel=_user_stacklevel() if stacklevel is None else stacklevel)


def _warn_scheduler(sname: str, what: str, stacklevel: int | None = 5) -> None:
    """The once-per-process warnings about a diffusers scheduler the step cache runs with: ``what="unmeasured"``, one
    fast mode has not been measured with; ``"multistep"``, PNDM-type formulas. Given at :func:`patch`, and for a
    scheduler a ``scheduler=pipe`` patch follows to, when the pipeline first samples with it."""
    from . import prediction as pred_map

    if what == "unmeasured" and sname not in (pred_map.MEASURED | pred_map.MULTISTEP_WARN | pred_map.RENOISE):
        _warn_once(sname + ":unmeasured", f"fast mode has not been measured with {sname}: the error budget bounds "
                   "each forecast, not the image, and how a scheduler's formula carries a forecast's error differs "
                   "(README 'eps and v models in diffusers'). Compare a few images with mode off (jetdet.match), "
                   "or use quality='high'", stacklevel)
    if what == "multistep" and sname in pred_map.MULTISTEP_WARN:
        _warn_once(sname, f"{sname} reuses each model output in the next steps' 4th-order multistep formula, and the "
                   "budget does not bound the result (measured at the default quality: PNDM one image at 20.8 dB, "
                   "LMS 23.6 dB mean; README 'eps and v models in diffusers'); use Euler, DPM++ 2M, DDIM or UniPC "
                   "with fast mode", stacklevel)


def _warn_compiled_fast(model: nn.Module) -> None:
    """Once per patch (the caller keeps the flag)."""
    warnings.warn(
        f"jetdet: torch.compile over a {type(model).__name__} patched with mode='fast' runs the step cache and the "
        "model under it eagerly (the cache decides in Python at every step, which a compiled graph cannot follow). To "
        "compile the model under the cache, compile its blocks instead (regional compilation: block.compile() for "
        "each block), with block_reuse off (the default: its hooks on the blocks are Python too)",
        stacklevel=_user_stacklevel() + 1,  # the caller's line, past torch's compile frames and the pipeline's
    )


def _warn_fast_copy(model: nn.Module) -> None:
    key = id(model)
    if key not in _warned_copies:
        _warned_copies.add(key)
        warnings.warn(
            f"jetdet: a copy (copy.deepcopy) of a {type(model).__name__} patched with mode='fast' runs without the "
            "step cache, which belongs to the original; call jetdet.unpatch(copy), then jetdet.patch(copy, "
            "mode='fast') for a cache of its own",
            stacklevel=4,
        )


def patch(model: nn.Module, mode: str = "deterministic", **options) -> PatchHandle:
    """Patch ``model`` in place for ``mode`` ("deterministic" or "fast") and return a :class:`PatchHandle`.

    Options for ``"deterministic"``: ``warn_only`` (see :class:`jetdet.mode`).
    Options for ``"fast"``: ``latent_arg``/``timestep_arg`` (names of the forward's latent and timestep
    parameters, found automatically for common names) and every :class:`jetdet.cache.StepCacheController`
    option (``quality``, ``budget``, ``start_percent``, ``end_percent``, ``max_consecutive_skips``, ``forecast``,
    ``block_reuse``, ``token_budget``, ``cfg_reuse``, ...). ``blocks`` (``"auto"``, ``None``, or the name or names
    of the model's ``nn.ModuleList`` of blocks), ``head_blocks`` (default 1) and ``tail_blocks`` (default 0, 1 for
    U-Nets) say where the controller may run rows partly (:mod:`jetdet.patch.blocks`);
    ``handle.stats()["cache"]["blocks"]`` says which list was found, or why none was.
    ``scheduler`` (a diffusers scheduler: ``pipe.scheduler``; or the pipeline itself, whose ``pipe.scheduler`` is
    then followed: a later ``pipe.scheduler = X.from_config(...)`` is seen, and one with another output map or noise
    rule makes the patch run every call as the model, warned once) and ``prediction`` (``"flow"``, ``"epsilon"``,
    ``"v_prediction"``, ``"sample"``; default: the scheduler's ``prediction_type``) say what the model outputs. For
    an eps/v/sample (VP) model, SD1.5, SDXL or SD2 say, the controller then sees the flow model it is equivalent to
    (:mod:`jetdet.patch.prediction`), so the budget means what it means on flow models; without ``scheduler`` the
    output is forecast as it is (right for flow models: SD3, Flux, the bundled DiT), and a diffusers U-Net warns once.
    ``timesteps=`` and ``t_end=`` hints are given in the model's timesteps and mapped too (``t_end=0``, the default,
    stays the flow trajectory's end); without a hint, ``start_percent``/``end_percent`` count flow-time progress, so
    pass ``num_steps=`` for step-based guards. PNDM and LMS warn once; KDPM2 ancestral runs every call (warned).
    LCM and TCD run every call (warned). With a scheduler that adds noise every step (Euler a, DPM++ SDE and 2M SDE,
    DDPM) and a VP model
    whose output is shaped like its latent, the controller forecasts the denoised image (``forecast_space="x0"``,
    ``piggyback=0``, as ComfyUI's Fast Optimizer does for such samplers); otherwise it warns once, saying why.
    ``linear_attention`` (opt-in, **approximate**: ``True``/``"relu"``, ``"elu1"`` or ``"identity"``) replaces the
    model's softmax ``F.scaled_dot_product_attention`` calls by :func:`jetdet.ops.linear_attention`; during the
    first ``linear_attention_check`` forwards (default 1) each replaced call is also computed exactly and the
    relative error is recorded in ``stats()["linear_attention"]`` and printed once (:mod:`jetdet.patch.linattn`);
    ``linear_attention_state_refresh`` (default 1: off) reuses each call's K/V state for that many timesteps.
    ``attention_cache`` (opt-in, **approximate**: ``True`` or a dict with ``mass``, ``block_size``, ``pool_size``,
    ``refresh``, ``check``, ``max_sites``) computes attention block masks at refresh steps and runs the
    attention calls in between as block-sparse attention over them, one mask for all rows and both CFG
    branches; its counters and measured error are in ``stats()["attention_cache"]``
    (:mod:`jetdet.patch.attncache`).
    ``sana_linear_attention`` (opt-in, **exact**: ``True``) runs the linear attention of diffusers' SANA models
    (``SanaLinearAttnProcessor2_0`` and its PAG variants) through :func:`jetdet.ops.linear_attention`, the same math
    as diffusers' processor; ``stats()["sana_linear_attention"]`` counts the calls (:mod:`jetdet.patch.sana`).
    """
    _check_model(model, mode)
    if isinstance(mode, str):
        mode = mode.lower()  # as jetdet.mode() reads it
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    existing = _handle_of(model)
    if existing is not None and not existing.removed:
        raise RuntimeError(
            f"model: {type(model).__name__} is already patched by jetdet (mode={existing.mode!r}); call "
            "handle.remove() or jetdet.unpatch(model) before patching it again"
        )
    for m, ref in list(_handles.items()):
        h = ref()
        if h is None or h.removed or m is model:
            continue
        if any(sub is model for sub in m.modules()):
            raise RuntimeError(f"model: it is a submodule of a {type(m).__name__} already patched by jetdet "
                               f"(mode={h.mode!r}); remove that patch first, or patch only one of them")
    _strip_dead(model)  # a removed patch's forward that another wrapper put back is not a patch
    for name, m in model.named_modules():
        meta = _jetdet_forward(m)
        if meta is None:
            continue
        if meta[0] is not m:  # installed on another module: this one is a copy.deepcopy of a patched model's
            raise RuntimeError(
                f"model: {type(model).__name__} carries jetdet forwards copied from a patched model (copy.deepcopy); "
                "call jetdet.unpatch(model) to remove them before patching it"
            )
        # a submodule patched on its own, or shared with another patched model
        raise RuntimeError(f"model: its submodule {name or type(m).__name__!r} already carries a forward of "
                           "another jetdet patch (patched on its own, or shared with a patched model); remove "
                           "that patch first, or patch only one of them")
    handle = PatchHandle(model, mode, options)
    try:
        if mode == "deterministic":
            unknown = set(options) - {"warn_only"}
            if unknown:
                raise TypeError(f"jetdet.patch(mode='deterministic'): unknown option(s) {sorted(unknown)}; "
                                "accepted: warn_only")
            _patch_deterministic(handle, model, **options)
        else:
            _patch_fast(handle, model, **options)
    except BaseException:
        handle.remove()  # nothing of the user's model stays changed after an error
        raise
    _handles[model] = weakref.ref(handle)
    return handle


def unpatch(model: nn.Module) -> bool:
    """Remove jetdet's patch from ``model``, or the jetdet forwards a copy (``copy.deepcopy``) of a patched model
    inherited; returns False when there was neither."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    handle = _handle_of(model)
    if handle is not None:
        handle.remove()
        return True
    inherited = _inherited(model)
    for m in inherited:
        _strip(m)
    return bool(inherited) | bool(_strip_dead(model))
