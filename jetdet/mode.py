"""The mode switch: ``off`` | ``fast`` | ``deterministic``.

``jetdet.mode("deterministic")`` is a context manager; ``set_mode``/``get_mode`` set and read the mode of
the current context. The mode lives in a :class:`contextvars.ContextVar`, so threads and asyncio tasks
each see their own mode (a new thread starts ``off``; an asyncio task inherits the mode of the code that
created it, and must not outlive that ``with`` block).

Deterministic mode
------------------
* Routes ``mm``, ``addmm``, ``bmm``, ``baddbmm``, ``matmul``/``@``, ``linear``, ``conv2d``,
  ``layer_norm``, ``rms_norm``, ``group_norm``, ``softmax`` and ``scaled_dot_product_attention`` through
  the batch-invariant ``jetdet.ops``; ``conv3d`` as a fixed-order sum of conv2d calls, ``einsum`` as itself
  (no sum) or as ``bmm`` (a two-operand contraction); ``sum``, ``mean``, 2-norms, ``var``/``std`` and
  ``var_mean``/``std_mean`` over given dims through the row reductions (:func:`_h_reduce`, :func:`_h_var`).
  The router is a ``TorchFunctionMode`` pushed on the thread's mode stack while at least one deterministic
  context is active on that thread; it consults the context's mode on every call, so a task or nested
  ``mode("off")`` on the same thread passes straight through.
  We chose a TorchFunctionMode over ``torch.library`` aten overrides because it is scoped (nothing global
  is replaced), sees ``F.linear``/``F.scaled_dot_product_attention`` before decomposition, and costs
  a few microseconds per routed call (``python -m jetdet.bench`` prints the measured overhead).
  Plain fp32 CPU calls of linear, layer_norm, group_norm and 4-D SDPA with no autograd to record go
  straight to the CPU path (the kernel folders' ``torch_path`` modules, the same bodies the ops run) once
  the handler has checked the shapes (``python bench/cpu_costs.py`` times both); plain CUDA calls of those
  and of conv2d and softmax go straight to the op's Triton launcher the same way (``python
  bench/host_cost.py``); everything else goes through ``jetdet.ops``.
* A call the jetdet ops cannot take (float64, grouped or dilated conv, dropout, ...) falls back to torch
  with a one-time warning naming the op and the reason: that call is then *not* covered by the guarantee.
  Reductions are the exception: their other forms (over every dim, integer or float64 input, ``dtype=``,
  ``out=``, other norms) run as torch's own call without a warning, as before they were routed.
* Sets ``torch.use_deterministic_algorithms(True)``, cuDNN deterministic on and benchmark off, TF32 and
  reduced-precision fp16/bf16 reductions off. These are process-wide torch flags: they are saved when the
  first deterministic context in the process starts and restored exactly when the last one ends (also on
  an exception).
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import math
import sys
import threading
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode, _pop_mode, _push_mode

from . import backend as _backend
from . import conv_forms as _conv_forms
from ._paths import user_stacklevel
from .kernels.attention import torch_path as _attention_torch
from .kernels.conv2d.op import out_size as _conv_out_size
from .kernels.matmul import torch_path as _matmul_torch
from .kernels.norms import torch_path as _norms_torch


class Mode(str, enum.Enum):
    OFF = "off"
    FAST = "fast"
    DETERMINISTIC = "deterministic"


class _Frame:
    """One link of the chain of modes a context sees: the mode, the thread that set it, and the frame it replaced
    (``parent``). The deterministic router and the thread's depth count belong to the thread that set the mode, so
    a frame counts only on that thread (:func:`_effective`): a thread that inherits the context (``asyncio.to_thread``,
    ``contextvars.copy_context().run``) starts ``off``, as every new thread does, and its own ``mode(...)`` works
    there. ``parent`` is rewritten when a context exits out of order (:meth:`mode.__exit__`). ``ctx``: made by a
    ``mode`` context (else by :func:`set_mode`, whose frame a later ``set_mode`` replaces and a context's exit
    discards, as a ``ContextVar`` reset would). ``closed``: its context has exited (with the frames it discarded); an
    asyncio task created inside the block still holds it in its copied context, and reads through it to the first
    open frame below (:func:`_open`), since the router and torch's flags it stood for are gone. ``held``: what making
    it did to its thread's hold on the router and torch's flags (+1 acquired, -1 released, 0 neither; with that of the
    ``set_mode`` frame it replaced, and of the frames an out-of-order exit took out below it). An exit undoes exactly
    the ``held`` of the frames it removes: reading the modes before and after, as it did, took a task's frame whose
    parent had closed meanwhile for one that held nothing or held twice (the counts went negative, or torch's flags
    stayed set after every context had exited). ``task``: the asyncio task that made it (None outside one). A hold
    is its maker's (:func:`_mine`): a task that inherits a deterministic frame from the code that created it
    (``asyncio.gather``, ``create_task`` inside the block) takes a hold of its own when it enters deterministic mode,
    and releases none when it turns the mode off (``mode("off")``, ``set_mode("off")``): releasing the creator's
    hold took the router and torch's flags away from the creator and the task's siblings, which still read
    ``deterministic`` (their calls ran unrouted), and a later release by the creator drove the counts negative."""

    __slots__ = ("mode", "thread", "task", "parent", "warn_only", "ctx", "closed", "held")

    def __init__(self, m: Mode, thread: object, parent: _Frame | None, warn_only: bool = False, ctx: bool = False,
                 held: int = 0, task: object = None):
        self.mode, self.thread, self.parent, self.warn_only, self.ctx = m, thread, parent, warn_only, ctx
        self.closed, self.held, self.task = False, held, task


_ROOT = _Frame(Mode.OFF, None, None)
_current: contextvars.ContextVar[_Frame] = contextvars.ContextVar("jetdet_mode", default=_ROOT)
_tls = threading.local()


def _me() -> object:
    """This thread's identity for frames: an object of its own (``threading.get_ident()`` values are reused once a
    thread ends, so a later thread could take an ended thread's frames for its own)."""
    me = getattr(_tls, "me", None)
    if me is None:
        me = _tls.me = object()
    return me


def _task() -> object:
    """The running asyncio task, or None (no event loop runs on this thread, or asyncio was never imported)."""
    aio = sys.modules.get("asyncio")
    if aio is None:
        return None
    try:
        return aio.current_task()
    except RuntimeError:  # no running event loop on this thread
        return None


def _mine(frame: _Frame) -> bool:
    """Whether ``frame`` was made by the calling thread and asyncio task: whose hold (``_Frame.held``) it carries."""
    return frame.thread is _me() and frame.task is _task()


def _ended(task) -> bool:
    """Whether ``task`` (a frame's) is an asyncio task that has finished (None: the thread's code outside tasks)."""
    done = getattr(task, "done", None)
    return done is not None and done()


def _open(frame: _Frame) -> _Frame:
    """``frame``, or the first frame below it whose context has not exited (see ``_Frame.closed``)."""
    while frame.closed:
        frame = frame.parent
    return frame


def _effective(frame: _Frame) -> Mode:
    """``frame``'s mode on the calling thread: its own, on the thread that set it; ``off`` on any other (and that of
    the first open frame below it, for a frame whose context has exited)."""
    frame = _open(frame)
    return frame.mode if frame.thread is _me() else Mode.OFF
_lock = threading.Lock()
_global_users = 0
_saved_flags: list | None = None
_warned: set[str] = set()


def _warn_once(key: str, message: str, stacklevel: int = 4) -> None:
    """``message`` as a warning, once per process for ``key`` (a misuse of the mode contexts, not a routed call)."""
    key = f"mode: {key}"
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"jetdet: {message}", stacklevel=stacklevel)


def _as_mode(m) -> Mode:
    if isinstance(m, Mode):
        return m
    try:
        return Mode(str(m).lower())
    except ValueError:
        raise ValueError(f"mode: expected one of 'off', 'fast', 'deterministic', got {m!r}") from None


def get_mode() -> Mode:
    """The mode of the current thread / asyncio task (``off`` in a thread that inherited another thread's context:
    nothing is routed there until that thread enters a mode itself)."""
    return _effective(_current.get())


# ----------------------------------------------------------------------------------------- torch flags


def _cudnn_tf32() -> tuple:
    """cuDNN's TF32 state: conv's and rnn's ``fp32_precision`` and the legacy ``allow_tf32``, a flag of its own that
    torch (>= 2.9) keeps beside them. Reading ``allow_tf32`` raises while it disagrees with them ("a mix of the legacy
    and new APIs"); it is then read by setting both to "tf32" for a moment (the read succeeds exactly when the flag
    is True) and putting them back."""
    c = torch.backends.cudnn
    try:
        legacy = c.allow_tf32
    except RuntimeError:
        with _fp32_precision_for_a_moment((c.conv, c.rnn), "tf32"):
            try:
                legacy = c.allow_tf32
            except RuntimeError:
                legacy = False
    return c.conv.fp32_precision, c.rnn.fp32_precision, legacy


@contextlib.contextmanager
def _fp32_precision_for_a_moment(backends, value: str):
    """``fp32_precision = value`` on each of ``backends`` for the block, each one's own put back after it: how a TF32
    state torch refuses to read while the legacy and new APIs disagree is read (:func:`_cudnn_tf32`,
    :func:`_matmul_precision`)."""
    saved = [b.fp32_precision for b in backends]
    for b in backends:
        b.fp32_precision = value
    try:
        yield
    finally:
        for b, v in zip(backends, saved):
            b.fp32_precision = v


def _set_cudnn_tf32(value: tuple) -> None:
    """Sets :func:`_cudnn_tf32`'s state: the legacy flag first (its setter also writes conv and rnn), then conv and
    rnn. Setting conv and rnn to "ieee" alone left the flag True, and code reading ``cudnn.allow_tf32`` during a
    deterministic call (``torch.backends.cudnn.flags()``, a ComfyUI node) raised."""
    conv, rnn, legacy = value
    c = torch.backends.cudnn
    c.allow_tf32 = legacy
    c.conv.fp32_precision, c.rnn.fp32_precision = conv, rnn


def _matmul_precision() -> tuple:
    """The fp32 matmul state: ``torch.get_float32_matmul_precision()`` (a setting of its own, which the legacy
    ``cuda.matmul.allow_tf32`` reads) and the cuda and mkldnn matmul ``fp32_precision``. torch refuses to read the
    precision while the new API disagrees with it ("a mix of the legacy and new APIs"), as after
    ``torch.backends.cuda.matmul.fp32_precision = "tf32"`` (or the global ``torch.backends.fp32_precision``), the new
    API's way to turn TF32 on: it is then read with both set to "ieee" for a moment, which torch reads with every
    precision, and put back."""
    b = torch.backends
    try:
        prec = torch.get_float32_matmul_precision()
    except RuntimeError:
        with _fp32_precision_for_a_moment((b.cuda.matmul, b.mkldnn.matmul), "ieee"):
            prec = torch.get_float32_matmul_precision()
    return prec, b.cuda.matmul.fp32_precision, b.mkldnn.matmul.fp32_precision


def _set_matmul_precision(value: tuple) -> None:
    """Sets :func:`_matmul_precision`'s state: the precision first (it also writes both ``fp32_precision``), then
    them. Setting ``cuda.matmul`` to "ieee" alone after a user's ``set_float32_matmul_precision("high")`` left
    ``cuda.matmul.allow_tf32`` raising on read during a deterministic call."""
    prec, cuda, mkldnn = value
    b = torch.backends
    torch.set_float32_matmul_precision(prec)
    b.cuda.matmul.fp32_precision, b.mkldnn.matmul.fp32_precision = cuda, mkldnn


def _flag_specs():
    """(name, getter, setter, deterministic value) for every global flag deterministic mode sets."""
    b = torch.backends
    specs = [
        (
            "use_deterministic_algorithms",
            lambda: (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled()),
            lambda v: torch.use_deterministic_algorithms(v[0], warn_only=v[1]),
            None,  # set from the mode's warn_only
        ),
        ("cudnn.deterministic", lambda: b.cudnn.deterministic,
         lambda v: setattr(b.cudnn, "deterministic", v), True),
        ("cudnn.benchmark", lambda: b.cudnn.benchmark, lambda v: setattr(b.cudnn, "benchmark", v), False),
        ("cuda.matmul.allow_fp16_reduced_precision_reduction",
         lambda: b.cuda.matmul.allow_fp16_reduced_precision_reduction,
         lambda v: setattr(b.cuda.matmul, "allow_fp16_reduced_precision_reduction", v), False),
        ("cuda.matmul.allow_bf16_reduced_precision_reduction",
         lambda: b.cuda.matmul.allow_bf16_reduced_precision_reduction,
         lambda v: setattr(b.cuda.matmul, "allow_bf16_reduced_precision_reduction", v), False),
    ]
    # fp16 accumulation in cuBLAS (ComfyUI's --fast fp16_accumulation sets it) and reduced-precision reductions in
    # the math SDPA kernel (ComfyUI sets that one on any torch >= 2.5): only fallbacks reach either
    if hasattr(b.cuda.matmul, "allow_fp16_accumulation"):
        specs.append(("cuda.matmul.allow_fp16_accumulation", lambda: b.cuda.matmul.allow_fp16_accumulation,
                      lambda v: setattr(b.cuda.matmul, "allow_fp16_accumulation", v), False))
    if hasattr(b.cuda, "fp16_bf16_reduction_math_sdp_allowed"):
        specs.append(("cuda.fp16_bf16_reduction_math_sdp", b.cuda.fp16_bf16_reduction_math_sdp_allowed,
                      b.cuda.allow_fp16_bf16_reduction_math_sdp, False))
    if hasattr(b, "fp32_precision"):  # torch >= 2.9: the fp32_precision API replaces allow_tf32
        specs.append(("matmul.fp32 (precision, cuda, mkldnn)", _matmul_precision, _set_matmul_precision,
                      ("highest", "ieee", "ieee")))
        specs.append(("cudnn.tf32 (conv, rnn, allow_tf32)", _cudnn_tf32, _set_cudnn_tf32, ("ieee", "ieee", False)))
    else:  # pragma: no cover - older torch
        specs += [
            ("cuda.matmul.allow_tf32", lambda: b.cuda.matmul.allow_tf32,
             lambda v: setattr(b.cuda.matmul, "allow_tf32", v), False),
            ("cudnn.allow_tf32", lambda: b.cudnn.allow_tf32,
             lambda v: setattr(b.cudnn, "allow_tf32", v), False),
        ]
    return specs


def torch_flags() -> dict:
    """A snapshot of every torch flag deterministic mode touches (for tests and reports). Read under the mode's lock:
    the TF32 getters set some flags for a moment, which a mode entered meanwhile on another thread saved as the
    user's (and put back on exit), and two such reads at once saw each other's moment."""
    with _lock:
        return {name: get() for name, get, _, _ in _flag_specs()}


def _warn_kept_warn_only(warn_only: bool) -> None:
    _warn_once(
        f"warn_only={warn_only}",
        f"jetdet.mode('deterministic', warn_only={warn_only}) inside another deterministic context keeps that "
        f"context's warn_only={not warn_only}: torch.use_deterministic_algorithms is one process-wide flag, set by "
        "the first deterministic context and restored by the last",
        stacklevel=5,  # the user's with-statement or set_mode call, through _switch
    )


def _acquire(warn_only: bool) -> None:
    global _global_users, _saved_flags
    with _lock:
        if _global_users and warn_only != torch.is_deterministic_algorithms_warn_only_enabled():
            _warn_kept_warn_only(warn_only)  # another thread's context set it
        if _global_users == 0:
            specs = _flag_specs()
            _saved_flags = [(set_, get()) for _, get, set_, _ in specs]
            try:
                for name, _, set_, value in specs:
                    set_((True, warn_only) if name == "use_deterministic_algorithms" else value)
            except BaseException:
                for set_, old in reversed(_saved_flags):
                    set_(old)
                _saved_flags = None
                raise
        _global_users += 1
    depth = getattr(_tls, "depth", 0)
    if depth == 0:
        router = _Router()
        _insert_at_bottom(router)
        _tls.router = router
    _tls.depth = depth + 1


def _insert_at_bottom(router) -> None:
    """Push ``router`` under this thread's torch function modes, not on top of them. A mode the user has entered
    (``torch.device("meta")``, a counter) pops the top of the stack when it exits; with the router below every such
    mode that top is always the user's own, however the user's ``with`` blocks interleave with jetdet's contexts
    and ``set_mode`` calls. The user's modes see each torch call first and pass it down to the router."""
    above = [_pop_mode() for _ in range(torch._C._len_torch_function_stack())]
    _push_mode(router)
    for m in reversed(above):
        _push_mode(m)


def _remove(router) -> None:
    """Take ``router`` out of this thread's torch function mode stack, wherever it is, and leave every other mode
    where it was (nothing when it is not there)."""
    above = []
    while torch._C._len_torch_function_stack():
        m = _pop_mode()
        if m is router:
            break
        above.append(m)
    for m in reversed(above):
        _push_mode(m)


def _release() -> None:
    global _global_users, _saved_flags
    _tls.depth -= 1
    if _tls.depth == 0:
        router, _tls.router = _tls.router, None
        _remove(router)
    with _lock:
        _global_users -= 1
        if _global_users == 0 and _saved_flags is not None:
            for set_, old in reversed(_saved_flags):
                set_(old)
            _saved_flags = None


def _transition(old: Mode, new: Mode, warn_only: bool = False) -> None:
    if old is not Mode.DETERMINISTIC and new is Mode.DETERMINISTIC:
        _acquire(warn_only)
    elif old is Mode.DETERMINISTIC and new is not Mode.DETERMINISTIC:
        _release()


def _switch(new: Mode, warn_only: bool, ctx: bool) -> tuple[_Frame, Mode]:
    """Make ``new`` the current context's mode on this thread (``ctx``: for a ``mode`` context, else for
    :func:`set_mode`): the router and torch's flags follow, and a new frame goes on the chain. Returns the frame
    and the mode it replaced."""
    cur = _open(_current.get())  # a task that outlived the block it was created in: the mode below that block
    old = _effective(cur)
    if new is Mode.FAST:
        _warn_once("fast context", "mode 'fast' changes nothing by itself: models run as in mode 'off' (and a "
                   "deterministic context around it is suspended). Fast mode's step cache is applied to a model with "
                   "jetdet.patch(model, mode='fast', scheduler=pipe.scheduler) (in ComfyUI: the Fast Optimizer node)")
    if new is old is Mode.DETERMINISTIC and warn_only != cur.warn_only:
        _warn_kept_warn_only(warn_only)
    mine = _mine(cur)
    if not mine and cur.thread is _me() and _ended(cur.task):
        # a frame whose task has finished, held by this one's context: Jupyter runs each cell in a task of its own
        # over one persistent context, so a cell's set_mode("off") or mode("off") met an earlier cell's frame. No task
        # is left to own its hold: this one takes it over (kept, set_mode("off") left torch's flags deterministic and
        # the router on, and a mode("off") block ran with torch's flags deterministic)
        cur.task, mine = _task(), True
    if not ctx and not cur.ctx and cur.parent is not None and mine and new is old and _current.get() is cur:
        # set_mode with the mode its own last set_mode set (an init run twice): nothing changes, so the frame stays.
        # Replacing it closed it for the tasks and copied contexts holding it: they read off while the process held
        # deterministic mode (their calls ran unrouted)
        return cur, old
    # what this context holds through cur: nothing through a frame inherited from another task (see _Frame)
    _transition(old if mine else Mode.OFF, new, warn_only)
    held = (new is Mode.DETERMINISTIC) - (mine and old is Mode.DETERMINISTIC)
    # a set_mode frame replaces an earlier set_mode frame (no chain grows); a frame that keeps its parent's mode keeps
    # its warn_only too: that is what holds meanwhile
    parent = cur if ctx or cur.ctx or cur.parent is None else cur.parent
    if parent is not cur and mine:
        held += cur.held  # the replaced frame's hold, which the exit that discards this one undoes
        cur.closed = True  # for a task created since, which holds it in its context: its hold is gone
    frame = _Frame(new, _me(), parent, cur.warn_only if new is old else warn_only, ctx, held, _task())
    _current.set(frame)
    return frame, old


def check_warn_only(warn_only) -> bool:
    """``warn_only`` if it is a bool, else a TypeError naming it (torch's own error came only at the first
    deterministic call, and named torch's argument)."""
    if not isinstance(warn_only, bool):
        raise TypeError(f"warn_only: expected True or False, got {warn_only!r}")
    return warn_only


def set_mode(m, *, warn_only: bool = False) -> Mode:
    """Set the mode of the current context until changed again; returns the previous mode."""
    return _switch(_as_mode(m), check_warn_only(warn_only), ctx=False)[1]


class mode:  # noqa: N801 - used like a function: ``with jetdet.mode("deterministic"):``
    """Context manager selecting a mode; nests, restores the outer mode and every flag on exit, also when
    the body raises. ``warn_only=True`` makes torch warn instead of raising on an op that has no
    deterministic implementation (``torch.use_deterministic_algorithms(True, warn_only=True)``)."""

    def __init__(self, m="deterministic", *, warn_only: bool = False):
        self.mode = _as_mode(m)
        self.warn_only = check_warn_only(warn_only)
        self._frames: list[_Frame] = []

    def __enter__(self):
        self._frames.append(_switch(self.mode, self.warn_only, ctx=True)[0])
        return self

    def __exit__(self, *exc):
        cur = _current.get()
        # this object's frame in the current chain: one mode object may be open in several tasks at once
        # (``DET = jetdet.mode(...)`` shared like ``torch.no_grad()``), so not simply the last one it entered
        f, lowest_open = cur, None  # walk down to that frame; the open context nearest above it, if any
        while f is not None and not any(f is mine for mine in self._frames):
            if f.ctx and not f.closed:
                lowest_open = f
            f = f.parent
        held = 0  # what the frames this exit removes did to this thread's hold (see _Frame.held)
        if f is not None:  # an exit elsewhere removes nothing: the entering thread's own exit still finds its frame
            self._frames = [x for x in self._frames if x is not f]
            # closed for a task created inside the block that runs after it (it holds these frames in its context)
            g = lowest_open.parent if lowest_open is not None else cur
            while g is not f.parent:
                # (on this thread, whichever task exits: an async generator left suspended in a block is closed by
                # asyncio.run's shutdown, in a task of its own)
                if not g.closed and g.thread is _me():
                    held += g.held
                g.closed, g = True, g.parent
        if f is not None and lowest_open is None:
            # the usual, nested exit (set_mode calls made inside are discarded with it, as a ContextVar reset did)
            _current.set(f.parent)
            for _ in range(held):
                _release()
            for _ in range(-held):
                _acquire(_open(f.parent).warn_only)
        elif f is not None:
            # Out of order: a context entered after this one is still open (interleaved generators, a manual
            # __exit__). The current mode stays that context's; this frame (and set_mode frames made inside it)
            # leaves the chain, so the later context restores what this one replaced when it exits: it takes over
            # their hold, so the router and torch's flags end as they started.
            lowest_open.parent = f.parent
            lowest_open.held += held
        else:
            _warn_once("exit elsewhere", "a jetdet.mode context exited in a context (thread or task) where it was not "
                       "entered: the mode there is left as it is, and the context stays open where it was entered "
                       "until it exits there")
        return False

    def __repr__(self):
        return f"jetdet.mode({self.mode.value!r})"


# ---------------------------------------------------------------------------------------------- router


def _warn_fallback(func, why: str, key: str | None = None) -> None:
    """The fallback warning for ``func`` and ``why``, once per pair. It points at the line that made the torch call
    (the user's or their model's), past torch's dispatch (``torch/overrides.py`` for a Python function such as
    ``F.dropout``, nothing for a builtin) and jetdet's handlers."""
    name = getattr(func, "__name__", str(func))
    key = f"{name}: {why if key is None else key}"
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"jetdet deterministic mode: {name} falls back to torch ({why}); this call is not covered by "
            "the batch-invariance guarantee",
            stacklevel=user_stacklevel(),
        )


def _fallback(func, args, kwargs, why: str):
    _warn_fallback(func, why)
    return func(*args, **kwargs)


def _torch_or_fallback(func, args, kwargs, why: str):
    """``func`` itself, for a call the handler does not take: torch's own error where torch refuses it, else its
    result with the named fallback warning (:func:`_fallback`), since that call is not covered."""
    out = func(*args, **kwargs)
    _warn_fallback(func, why)
    return out


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _ok(*ts) -> str | None:
    """None when jetdet can take these tensors, else the reason."""
    dev = None
    for t in ts:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            return f"non-tensor argument {type(t).__name__}"
        if t.dtype not in _FLOATS:
            return f"dtype {t.dtype}"
        if t.device.type not in ("cpu", "cuda"):
            return f"device {t.device}"
        if dev is not None and t.device != dev:
            return "mixed devices"
        dev = t.device
        if t.is_sparse or t.is_quantized or t.is_nested:
            return "sparse/quantized/nested tensor"
    return None


_ops_module = None


def _ops():
    """jetdet.ops, imported on first use (it imports this module)."""
    global _ops_module
    if _ops_module is None:
        from . import ops

        _ops_module = ops
    return _ops_module


def call_arg(args, kwargs, i: int, name: str, default=None):
    """Argument ``name`` of a torch call as a ``__torch_function__`` handler receives it: positional ``i`` if
    that many were passed, else the keyword, else ``default``."""
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


class _Signature(NamedTuple):
    """A torch function's parameters as a handler reads them (:func:`_read`): ``(name, default)`` in order, how
    many may be given positionally (the rest are keyword-only), and their names."""

    params: tuple
    positional: int
    names: frozenset


def _signature(*params, positional: int | None = None) -> _Signature:
    return _Signature(params, len(params) if positional is None else positional, frozenset(n for n, _ in params))


def _read(sig: _Signature, args, kwargs) -> list | None:
    """A call's arguments in ``sig``'s order, defaults filled in (:func:`call_arg`); None when the call passes more
    positional arguments or other keywords than ``sig`` knows (the handler then leaves it to torch)."""
    if len(args) > sig.positional or not sig.names.issuperset(kwargs):
        return None
    vals = []
    for i, (n, d) in enumerate(sig.params):  # a loop, not a comprehension: one Python call less per routed call
        vals.append(call_arg(args, kwargs, i, n, d))
    return vals


class SdpaArgs(NamedTuple):
    """The arguments of an ``F.scaled_dot_product_attention`` call (:func:`sdpa_args`)."""

    query: object
    key: object
    value: object
    attn_mask: object
    dropout_p: float
    is_causal: bool
    scale: object


_SDPA_PARAMS = (("query", None), ("key", None), ("value", None), ("attn_mask", None), ("dropout_p", 0.0),
                ("is_causal", False), ("scale", None))


def sdpa_args(args, kwargs) -> SdpaArgs:
    """An ``F.scaled_dot_product_attention`` call's arguments by name, with torch's defaults (one reading for
    the router and the fast patch's attention replacements)."""
    return SdpaArgs(*[args[i] if len(args) > i else kwargs.get(n, d) for i, (n, d) in enumerate(_SDPA_PARAMS)])


def _direct(*ts) -> str | None:
    """The body a routed call can go straight to, skipping the public op's layers (its argument checks, the
    custom-op entry): ``"torch"`` (the folder's CPU path) for plain fp32 CPU tensors, ``"triton"`` (the op's
    launcher) for plain CUDA tensors of one float dtype on one device, or for CPU tensors of one float dtype
    under ``JETDET_BACKEND=triton`` (the interpreter); None otherwise. Plain means: no tensor subclass, no autograd
    to record, not under ``torch.compile`` (which must see the custom op). The handler then checks the shapes it
    needs itself; anything else, bad shapes included, takes the full path and its clear errors.

    What it saves, launches stubbed (``python bench/host_cost.py``, this 2-core CPU): on the CPU path ~20 us per
    linear (5% of a TinyDiT forward at 1 thread); on the Triton path the layers between the router and the
    launcher, which a GPU pays on the host per routed call before Triton's own launch."""
    x = ts[0]
    if type(x) not in _backend.PLAIN or torch.compiler.is_compiling():
        return None
    dtype, device = x.dtype, x.device
    grad = torch.is_grad_enabled()
    for t in ts:
        if t is not None and (type(t) not in _backend.PLAIN or t.dtype != dtype or t.device != device
                              or (grad and t.requires_grad)):
            return None
    if dtype not in _FLOATS:
        return None
    if not _backend.overridden():
        if device.type == "cuda":
            return "triton"
        return "torch" if device.type == "cpu" and dtype == torch.float32 else None
    # JETDET_BACKEND set: the Triton route when it names Triton (its checks and errors as the full path's)
    return "triton" if _backend.requested() == "triton" and _backend.backend_for(x) == "triton" else None


def _run_triton(name: str, *args):
    """The registered op ``name``'s Triton launcher, run as the op's body runs it: torch functions off (the
    launcher's own torch calls are the implementation), torch's NaN fill of new tensors off
    (:func:`jetdet.backend.run_body`)."""
    with torch._C.DisableTorchFunction():
        return _backend.run_body(_ops().registry.OPS[name].launch, *args)


def _is_last_dim(normalized_shape, d: int) -> bool:
    if isinstance(normalized_shape, int):
        return normalized_shape == d
    try:
        return tuple(normalized_shape) == (d,)
    except TypeError:
        return False


def _h_linear(func, args, kwargs):
    ops = _ops()

    x, w = call_arg(args, kwargs, 0, "input"), call_arg(args, kwargs, 1, "weight")
    b = call_arg(args, kwargs, 2, "bias")
    route = _direct(x, w, b)
    if (route and w.dim() == 2 and x.dim() >= 1 and x.shape[-1] == w.shape[1] and x.numel()
            and w.numel() and (b is None or (b.dim() == 1 and b.shape[0] == w.shape[0]))):
        if route == "triton":
            return _run_triton("linear", x, w, b)
        out = _backend.run_body(_matmul_torch.mm_f32, x.reshape(-1, x.shape[-1]), w.t(), b)
        return out.reshape(*x.shape[:-1], w.shape[0])
    why = _ok(x, w, b)
    if why:
        return _fallback(func, args, kwargs, why)
    return ops.linear(x, w, b)


def _h_mm(func, args, kwargs):
    ops = _ops()

    a, b = call_arg(args, kwargs, 0, "input"), call_arg(args, kwargs, 1, "mat2")
    why = _ok(a, b) or ("out= given" if "out" in kwargs else None)
    if why or a.dim() != 2 or b.dim() != 2:
        return _fallback(func, args, kwargs, why or "not 2-D")
    return ops.mm(a, b)


def _h_addmm(func, args, kwargs):
    ops = _ops()

    c, a, b = (call_arg(args, kwargs, i, n) for i, n in enumerate(("input", "mat1", "mat2")))
    why = _ok(c, a, b) or ("out= given" if "out" in kwargs else None)
    if why or a.dim() != 2 or b.dim() != 2:
        return _fallback(func, args, kwargs, why or "not 2-D")
    return ops.addmm(c, a, b, beta=kwargs.get("beta", 1), alpha=kwargs.get("alpha", 1))


def _h_bmm(func, args, kwargs):
    ops = _ops()

    a, b = call_arg(args, kwargs, 0, "input"), call_arg(args, kwargs, 1, "mat2")
    why = _ok(a, b) or ("out= given" if "out" in kwargs else None)
    if why or a.dim() != 3 or b.dim() != 3:
        return _fallback(func, args, kwargs, why or "not 3-D")
    return ops.bmm(a, b)


def _h_baddbmm(func, args, kwargs):
    ops = _ops()

    c, a, b = (call_arg(args, kwargs, i, n) for i, n in enumerate(("input", "batch1", "batch2")))
    why = _ok(c, a, b) or ("out= given" if "out" in kwargs else None)
    if why or a.dim() != 3 or b.dim() != 3:
        return _fallback(func, args, kwargs, why or "not 3-D")
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    prod = ops.bmm(a, b)
    out = prod if alpha == 1 else prod * alpha
    if beta != 0:
        out = out + (c if beta == 1 else c * beta)
    return out


def _h_in_place(handler, out_of_place):
    """``x.addmm_(...)`` and its like: the out-of-place call's handler, written into ``x``."""
    def h(func, args, kwargs):
        target = call_arg(args, kwargs, 0, "input", kwargs.get("self"))
        if not isinstance(target, torch.Tensor) or "self" in kwargs:
            return func(*args, **kwargs)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            args = (target.clone(), *args[1:])  # the handler may keep its input for backward: not the one written to
        return target.copy_(handler(out_of_place, args, kwargs))

    return h


def _h_matmul(func, args, kwargs):
    ops = _ops()

    a, b = call_arg(args, kwargs, 0, "input"), call_arg(args, kwargs, 1, "other")
    why = _ok(a, b) or ("out= given" if "out" in kwargs else None)
    if why:
        return _fallback(func, args, kwargs, why)
    if a.dim() and b.dim() and (a.shape[-1] != b.shape[-2 if b.dim() > 1 else 0] or a.shape[-1] == 0):
        return func(*args, **kwargs)  # torch's own shape error; or an empty sum: zeros, the same whatever the batch
    if b.dim() == 2 and a.dim() >= 2:
        lead = a.shape[:-1]
        return ops.mm(a.reshape(-1, a.shape[-1]), b).reshape(*lead, b.shape[-1])
    if a.dim() >= 3 and b.dim() >= 3:
        try:
            batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        except RuntimeError:
            return func(*args, **kwargs)  # let torch raise its own shape error
        a3 = a.expand(*batch, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
        b3 = b.expand(*batch, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
        return ops.bmm(a3, b3).reshape(*batch, a.shape[-2], b.shape[-1])
    return _fallback(func, args, kwargs, f"matmul of {a.dim()}-D by {b.dim()}-D")


_CONV = _signature(("input", None), ("weight", None), ("bias", None), ("stride", 1), ("padding", 0),
                   ("dilation", 1), ("groups", 1))
_CONV_T = _signature(("input", None), ("weight", None), ("bias", None), ("stride", 1), ("padding", 0),
                     ("output_padding", 0), ("groups", 1), ("dilation", 1))


def _int_pair(v):
    """``v`` as a pair of ints when it is an int or a 2-sequence of ints, else None."""
    if type(v) is int:
        return v, v
    if isinstance(v, (tuple, list)) and len(v) == 2 and type(v[0]) is int and type(v[1]) is int:
        return v[0], v[1]
    return None


def _conv2d_basic(x, w, b, stride, padding):
    """conv2d with groups 1 and dilation 1: the Triton launcher straight away when it can take the call (see
    :func:`_direct`), else :func:`jetdet.ops.conv2d` (its checks and clear errors)."""
    s, p = _int_pair(stride), _int_pair(padding)
    if (s and p and x.dim() == 4 and w.dim() == 4 and _direct(x, w, b) == "triton" and w.shape[1] == x.shape[1]
            and min(s) >= 1 and min(p) >= 0 and x.numel() and w.numel()
            and (b is None or (b.dim() == 1 and b.shape[0] == w.shape[0]))):
        ho, wo = _conv_out_size(x, w, s, p)
        if ho > 0 and wo > 0:
            return _run_triton("conv2d", x, w, b, s, p)
    return _ops().conv2d(x, w, b, stride, padding)


def _same_dtype(x, w, b) -> bool:
    return w.dtype == x.dtype and (b is None or b.dtype == x.dtype)


def _h_conv(n: int):
    """``conv{n}d``. conv2d with groups 1 and dilation 1 is jetdet's conv2d op (``padding="same"`` with an even
    kernel aside); every other form (1-D and 3-D, dilation, groups, depthwise, ``"same"`` with any kernel) is
    rebuilt from batch-invariant calls by :mod:`jetdet.conv_forms`. Calls torch would refuse (bad shapes or
    arguments) go to torch for its error; a call torch takes and this does not (numpy ints as strides, say) runs
    as torch's, with the fallback warning."""

    def handler(func, args, kwargs):
        vals = _read(_CONV, args, kwargs)
        if vals is None:
            return _torch_or_fallback(func, args, kwargs, "arguments it does not know")
        x, w, b, stride, padding, dilation, groups = vals
        why = _ok(x, w, b)
        if why:
            return _fallback(func, args, kwargs, why)
        if (n == 2 and groups == 1 and dilation in (1, (1, 1), [1, 1])
                and (padding != "same" or w.dim() != 4 or (w.shape[2] % 2 and w.shape[3] % 2))):
            return _conv2d_basic(x, w, b, stride, padding)  # jetdet's own op, with its own errors
        st, dil = _conv_forms.tuple_of(stride, n), _conv_forms.tuple_of(dilation, n)
        if (st is None or dil is None or min(st) < 1 or min(dil) < 1 or type(groups) is not int or groups < 1
                or x.dim() not in (n + 1, n + 2) or w.dim() != n + 2 or not _same_dtype(x, w, b)
                or x.shape[-n - 1] != w.shape[1] * groups or w.shape[0] % groups
                or (b is not None and tuple(b.shape) != (w.shape[0],)) or not x.numel() or not w.numel()):
            return _torch_or_fallback(func, args, kwargs, "arguments or shapes it does not take")
        pads = _conv_forms.explicit_padding(padding, st, dil, w.shape[2:])
        if pads is None or any(i + p0 + p1 - d * (k - 1) < 1
                               for i, (p0, p1), d, k in zip(x.shape[-n:], pads, dil, w.shape[2:])):
            return _torch_or_fallback(func, args, kwargs, "a padding it does not take")
        batched = x.dim() == n + 2
        y = _conv_forms.CONV[n](x if batched else x.unsqueeze(0), w, b, st, pads, dil, groups, _conv2d_basic)
        return y if batched else y.squeeze(0)

    return handler


def _h_conv_transpose(n: int):
    """``conv_transpose{n}d``: one stride-1 convolution per output phase (:func:`jetdet.conv_forms.
    conv_transpose`). Calls torch would refuse go to torch for its error, others this does not take run as
    torch's with the fallback warning."""

    def handler(func, args, kwargs):
        vals = _read(_CONV_T, args, kwargs)
        if vals is None:
            return _torch_or_fallback(func, args, kwargs, "arguments it does not know")
        x, w, b, stride, padding, out_pad, groups, dilation = vals
        why = _ok(x, w, b)
        if why:
            return _fallback(func, args, kwargs, why)
        st, pd, op, dil = (_conv_forms.tuple_of(v, n) for v in (stride, padding, out_pad, dilation))
        if (st is None or pd is None or op is None or dil is None or min(st) < 1 or min(dil) < 1 or min(pd) < 0
                or min(op) < 0 or any(o >= max(s, d) for o, s, d in zip(op, st, dil))
                or type(groups) is not int or groups < 1 or x.dim() not in (n + 1, n + 2) or w.dim() != n + 2
                or not _same_dtype(x, w, b) or x.shape[-n - 1] != w.shape[0] or w.shape[0] % groups
                or (b is not None and tuple(b.shape) != (w.shape[1] * groups,)) or not x.numel() or not w.numel()
                or any((i - 1) * s - 2 * p + d * (k - 1) + o < 0
                       for i, s, p, d, k, o in zip(x.shape[-n:], st, pd, dil, w.shape[2:], op))):
            return _torch_or_fallback(func, args, kwargs, "arguments or shapes it does not take")
        batched = x.dim() == n + 2
        y = _conv_forms.conv_transpose(x if batched else x.unsqueeze(0), w, b, st, pd, op, groups, dil,
                                       _conv2d_basic)
        return y if batched else y.squeeze(0)

    return handler


def _h_fallback_named(why):
    def handler(func, args, kwargs):
        return _fallback(func, args, kwargs, why)

    handler.torch_itself = True  # under autocast: torch's call as torch runs it (_autocast_route)
    return handler


def _h_dropout(name: str, training_default: bool, train_kw: str = "training"):
    """Dropout in training mode draws its mask from torch's generator for the whole batch, so an item's mask depends
    on the batch: it runs as torch's with the one-time fallback warning. With ``training=False`` or ``p=0`` it is
    the identity and passes silently. ``train_kw`` is the flag's keyword: ``training`` in ``torch.nn.functional``,
    ``train`` in the low-level ``torch.dropout`` family."""
    def handler(func, args, kwargs):
        p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
        training = args[2] if len(args) > 2 else kwargs.get(train_kw, training_default)
        if training and p:
            return _fallback(func, args, kwargs, f"{name} in training mode draws one random mask for the whole batch")
        return func(*args, **kwargs)

    return handler


def _h_batch_norm(func, args, kwargs):
    """``F.batch_norm`` in training mode (or without running statistics) normalises each item with statistics of the
    whole batch, so an item's output depends on the batch by definition: torch's, with the one-time fallback warning.
    With running statistics in eval mode it is elementwise per item and passes silently."""
    training = call_arg(args, kwargs, 5, "training", False)
    if training or call_arg(args, kwargs, 1, "running_mean") is None:
        return _fallback(func, args, kwargs, "batch_norm in training mode normalises with the whole batch's "
                                             "statistics")
    return func(*args, **kwargs)


def _einsum_operands(args):
    if args and isinstance(args[0], str):
        eq, ops_ = args[0], args[1:]
        if len(ops_) == 1 and isinstance(ops_[0], (list, tuple)):
            ops_ = tuple(ops_[0])
        return eq, list(ops_)
    return None, None


def _h_einsum(func, args, kwargs):
    """Einsums that sum over nothing (permutations, outer products: ``"nhwpqc->nchpwq"``, ``"m,d->md"``) are exact
    per element and run as they are. A contraction of two operands (``"b i d, b j d -> b i j"`` in ComfyUI's
    basic/split attention) is lowered to the batch-invariant ``bmm``; anything else falls back with the warning."""
    eq, operands = _einsum_operands(args)
    if eq is None or kwargs or not all(isinstance(t, torch.Tensor) for t in operands):
        return _fallback(func, args, kwargs, "einsum call form not recognised")
    eq = eq.replace(" ", "")
    if "->" not in eq:
        return _fallback(func, args, kwargs, f"einsum '{eq}' (implicit output)")
    lhs, out_s = eq.split("->")
    ins = lhs.split(",")
    if "..." in eq:  # broadcast dims: fine when nothing is summed ("...n,d->...nd", RoPE tables)
        letters_in = set("".join(ins).replace(".", ""))
        if ("..." in out_s or not any("..." in s for s in ins)) and letters_in <= set(out_s.replace(".", "")):
            return func(*args, **kwargs)
        return _fallback(func, args, kwargs, f"einsum '{eq}' (ellipsis with a sum)")
    if len(ins) != len(operands) or any(len(s) != t.dim() for s, t in zip(ins, operands)):
        return func(*args, **kwargs)  # let torch raise its own error
    if any(len(set(s)) != len(s) for s in ins) or len(set(out_s)) != len(out_s):
        return _fallback(func, args, kwargs, f"einsum '{eq}' (repeated index: a diagonal or trace)")
    summed = set("".join(ins)) - set(out_s)
    if not summed:
        return func(*args, **kwargs)  # no sum: every output element is one product, exact in any batch
    why = _ok(*operands)
    if why:
        return _fallback(func, args, kwargs, why)
    if len(operands) != 2:
        return _fallback(func, args, kwargs, f"einsum '{eq}' ({len(operands)} operands with a contraction)")
    (sa, sb), (a, b) = ins, operands
    if any(c not in sa or c not in sb for c in summed):
        return _fallback(func, args, kwargs, f"einsum '{eq}' (an index summed inside one operand)")
    batch = [c for c in out_s if c in sa and c in sb]
    a_free = [c for c in out_s if c in sa and c not in sb]
    b_free = [c for c in out_s if c in sb and c not in sa]
    k = [c for c in sa if c in summed]
    size = {c: n for s, t in ((sa, a), (sb, b)) for c, n in zip(s, t.shape)}
    for c in batch + k:
        if a.shape[sa.index(c)] != b.shape[sb.index(c)]:
            return func(*args, **kwargs)  # broadcasting or a shape error: torch's own behaviour
    nb = math.prod(size[c] for c in batch)
    m = math.prod(size[c] for c in a_free)
    n = math.prod(size[c] for c in b_free)
    kk = math.prod(size[c] for c in k)
    a3 = a.permute(*[sa.index(c) for c in batch + a_free + k]).reshape(nb, m, kk)
    b3 = b.permute(*[sb.index(c) for c in batch + k + b_free]).reshape(nb, kk, n)
    y = _ops().bmm(a3, b3).reshape(*[size[c] for c in batch + a_free + b_free])
    order = batch + a_free + b_free
    return y.permute(*[order.index(c) for c in out_s])


def _h_layer_norm(func, args, kwargs):
    ops = _ops()

    x, ns = call_arg(args, kwargs, 0, "input"), call_arg(args, kwargs, 1, "normalized_shape")
    w, b = call_arg(args, kwargs, 2, "weight"), call_arg(args, kwargs, 3, "bias")
    eps = call_arg(args, kwargs, 4, "eps", 1e-5)
    route = _direct(x, w, b)
    if route and x.dim() >= 1 and x.numel() and isinstance(eps, float):
        d = x.shape[-1]
        if (_is_last_dim(ns, d) and (w is None or tuple(w.shape) == (d,))
                and (b is None or tuple(b.shape) == (d,))):
            if route == "triton":
                return _run_triton("layer_norm", x.reshape(-1, d), w, b, eps).reshape(x.shape)
            return _backend.run_body(_norms_torch.layer_norm, x.reshape(-1, d), w, b, eps).reshape(x.shape)
    why = _ok(x, w, b)
    if why:
        return _fallback(func, args, kwargs, why)
    return ops.layer_norm(x, ns, w, b, eps)


def _h_rms_norm(func, args, kwargs):
    ops = _ops()

    x, ns = call_arg(args, kwargs, 0, "input"), call_arg(args, kwargs, 1, "normalized_shape")
    w, eps = call_arg(args, kwargs, 2, "weight"), call_arg(args, kwargs, 3, "eps")
    why = _ok(x, w)
    if why:
        return _fallback(func, args, kwargs, why)
    return ops.rms_norm(x, ns, w, eps)


def _h_group_norm(func, args, kwargs):
    ops = _ops()

    x, g = call_arg(args, kwargs, 0, "input"), call_arg(args, kwargs, 1, "num_groups")
    w, b = call_arg(args, kwargs, 2, "weight"), call_arg(args, kwargs, 3, "bias")
    eps = call_arg(args, kwargs, 4, "eps", 1e-5)
    route = _direct(x, w, b)
    if (route and x.dim() >= 2 and x.numel() and isinstance(eps, float)
            and type(g) is int and g >= 1 and x.shape[1] % g == 0):
        c = x.shape[1]
        if (w is None or tuple(w.shape) == (c,)) and (b is None or tuple(b.shape) == (c,)):
            # x as it is (not a [B, C, H*W] view): the output keeps a channels-last x's layout
            if route == "triton":
                return _run_triton("group_norm", x, g, w, b, eps)
            return _backend.run_body(_norms_torch.group_norm, x, g, w, b, eps)
    why = _ok(x, w, b)
    if why:
        return _fallback(func, args, kwargs, why)
    return ops.group_norm(x, g, w, b, eps)


def _reduce_dims(dim, ndim: int):
    """``dim`` of a reduction as a sorted tuple of distinct dims, or None when it is not one or more int dims."""
    dims = (dim,) if type(dim) is int else tuple(dim) if isinstance(dim, (tuple, list)) and dim else None
    if dims is None or not all(type(d) is int and -ndim <= d < ndim for d in dims):
        return None
    found = sorted({d % ndim for d in dims})
    return tuple(found) if len(found) == len(dims) else None


#: The parameters of the routed reductions, in order, with their defaults.
_REDUCE_PARAMS = {
    "sum": (("input", None), ("dim", None), ("keepdim", False)),
    "mean": (("input", None), ("dim", None), ("keepdim", False)),
    "norm": (("input", None), ("p", "fro"), ("dim", None), ("keepdim", False)),
    "vector_norm": (("x", None), ("ord", 2), ("dim", None), ("keepdim", False)),
}


def _h_reduce(kind: str):
    """``sum``, ``mean`` or the 2-norm over given dims of a float tensor: jetdet's fixed-order row reductions
    (:func:`jetdet.ops.sum` / :func:`jetdet.ops.mean`; the norm as the square root of the fp32 sum of squares).
    torch's own reduction kernels choose how to split a reduction by how many outputs there are, so on a GPU the
    result for an item can depend on the batch (HunyuanVideo and Mochi pool their text tokens with ``sum``, Stable
    Cascade's GlobalResponseNorm takes ``torch.norm`` and ``mean``). Calls of other forms run as they are, as they
    did before these were routed, without a warning: a reduction over every dim (its result is a function of the
    whole batch anyway), integer and float64 inputs, ``dtype=`` (other than the input's) or ``out=`` given, norms
    other than the 2-norm."""
    params = _REDUCE_PARAMS[kind]
    names = {n for n, _ in params}

    def handler(func, args, kwargs):
        vals = {n: call_arg(args, kwargs, i, n, d) for i, (n, d) in enumerate(params)}
        x, dim, keepdim, p = vals[params[0][0]], vals["dim"], vals["keepdim"], vals.get("p", vals.get("ord", 2))
        if (not isinstance(x, torch.Tensor) or len(args) > len(params) or type(keepdim) is not bool
                or not (p == "fro" or (type(p) in (int, float) and p == 2)) or _ok(x) or not x.numel()
                or any(k not in names and v is not None and not (k == "dtype" and v == x.dtype)
                       for k, v in kwargs.items())):
            return func(*args, **kwargs)
        dims = _reduce_dims(dim, x.dim())
        if dims is None or (p == "fro" and len(dims) > 2):  # torch's Frobenius norm takes 1 or 2 dims (else raises)
            return func(*args, **kwargs)
        ops = _ops()
        if kind == "sum":
            return ops.sum(x, dims, keepdim)
        if kind == "mean":
            return ops.mean(x, dims, keepdim)
        return _norm2(x, dims, keepdim)

    return handler


def _norm2(x: torch.Tensor, dims: tuple, keepdim: bool) -> torch.Tensor:
    """The 2-norm of ``x`` over ``dims``: the square root of jetdet's fixed-order fp32 sum of squares, in
    ``x``'s dtype."""
    xf = x.float()
    ss = _ops().sum(xf * xf, dims, keepdim)
    # sqrt(ss), with a zero gradient (torch's choice) where ss = 0 instead of inf * 0 = NaN: the same forward bits
    nz = ss != 0  # NaN and inf pass through as torch's norm gives them
    return (torch.where(nz, ss, 1.0).sqrt() * nz).to(x.dtype)


_NORMALIZE = _signature(("input", None), ("p", 2.0), ("dim", 1), ("eps", 1e-12), ("out", None))


def _h_normalize(func, args, kwargs):
    """``F.normalize`` with ``p=2`` over given dims: ``x / max(‖x‖, eps)`` with the norm from jetdet's row
    reductions (Wan's and HunyuanVideo's VAEs normalise every feature map over its channels this way). torch's
    ``normalize`` takes the norm inside its own Python code, where the router does not see it. Other forms
    (other ``p``, ``out=``, non-float input) run as they are, as :func:`_h_reduce` leaves its own."""
    vals = _read(_NORMALIZE, args, kwargs)
    if vals is None:
        return func(*args, **kwargs)
    x, p, dim, eps, out = vals
    if (not isinstance(x, torch.Tensor) or out is not None or type(p) not in (int, float) or p != 2
            or type(eps) not in (int, float) or _ok(x) or not x.numel()):
        return func(*args, **kwargs)
    dims = _reduce_dims(dim, x.dim())
    if dims is None:
        return func(*args, **kwargs)
    return x / _norm2(x, dims, True).clamp_min(eps).expand_as(x)


#: ``var``/``std`` and their ``_mean`` forms: these in order (``correction`` is keyword-only), with their defaults
_VAR = _signature(("input", None), ("dim", None), ("unbiased", None), ("keepdim", False), ("correction", None),
                  positional=4)


def _h_var(kind: str):
    """``var``, ``std``, ``var_mean`` or ``std_mean`` over given dims of a float tensor, from jetdet's fixed-order
    row reductions in fp32: the mean, then the sum of squared deviations from it, divided by ``max(0, n -
    correction)`` as torch divides (``unbiased``/``correction`` as torch reads them). torch's own kernels choose how
    to split a reduction by how many outputs there are, so on a GPU an item's result can depend on the batch
    (ComfyUI's RescaleCFG takes ``torch.std`` over each item, ACE-Step's ControlNet ``std`` and ``mean``). The forms
    :func:`_h_reduce` passes through (every dim, non-float input, unknown arguments) run as they are, without a
    warning; so do a positional ``unbiased`` given in place of ``dim``."""

    def handler(func, args, kwargs):
        vals = _read(_VAR, args, kwargs)
        if vals is None:
            return func(*args, **kwargs)
        x, dim, unbiased, keepdim, correction = vals
        if (not isinstance(x, torch.Tensor) or type(keepdim) is not bool
                or (unbiased is not None and type(unbiased) is not bool)
                or (unbiased is not None and correction is not None)
                or (correction is not None and type(correction) not in (int, float)) or _ok(x) or not x.numel()):
            return func(*args, **kwargs)
        dims = _reduce_dims(dim, x.dim())
        if dims is None:
            return func(*args, **kwargs)
        corr = correction if correction is not None else (0 if unbiased is False else 1)
        n = math.prod(x.shape[d] for d in dims)
        ops = _ops()
        xf = x.float()
        m = ops.mean(xf, dims, True)
        dev = xf - m
        var = ops.sum(dev * dev, dims, keepdim) / max(0.0, n - corr)
        out = var.sqrt() if kind.startswith("std") else var
        if not kind.endswith("_mean"):
            return out.to(x.dtype)
        return out.to(x.dtype), (m if keepdim else m.squeeze(dims)).to(x.dtype)

    return handler


_LSE = _signature(("input", None), ("dim", None), ("keepdim", False))


def _h_logsumexp(func, args, kwargs):
    """``logsumexp`` over given dims of a float tensor: ``m + log(sum(exp(x - m)))`` with ``m`` the max (a
    selection, the same in any order; an infinite max is not subtracted, as torch's) and the sum jetdet's
    fixed-order row reduction, in fp32. Other forms run as they are (see :func:`_h_reduce`)."""
    vals = _read(_LSE, args, kwargs)
    if vals is None:
        return func(*args, **kwargs)
    x, dim, keepdim = vals
    if not isinstance(x, torch.Tensor) or type(keepdim) is not bool or _ok(x) or not x.numel():
        return func(*args, **kwargs)
    dims = _reduce_dims(dim, x.dim())
    if dims is None:
        return func(*args, **kwargs)
    shifted, m, log_sum = _shifted_log_sum(x.float(), dims)
    out = log_sum + m
    return (out if keepdim else out.squeeze(dims)).to(x.dtype)


def _shifted_log_sum(xf: torch.Tensor, dims: tuple):
    """``(x - m, m, log(sum(exp(x - m))))`` over ``dims`` (kept), with ``m`` the max (a selection, the same in any
    order; an infinite max is not subtracted, as torch's) and the sum jetdet's fixed-order row reduction: the parts
    of logsumexp (``m + log s``) and of log_softmax (``(x - m) - log s``)."""
    m = xf.amax(dims, keepdim=True)
    m = torch.where(m.isinf(), 0.0, m)
    shifted = xf - m
    return shifted, m, _ops().sum(shifted.exp(), dims, True).log()


_SCAN = _signature(("input", None), ("dim", None), ("dtype", None), positional=2)


def _h_scan(kind: str):
    """``cumsum``/``cumprod`` along a dim of a float tensor as a fixed-order doubling scan in fp32: after the
    pass with offset ``k`` (1, 2, 4, ...) each element holds the sum (product) of the ``2k`` elements ending at it,
    so every element's result is a fixed expression of its own row whatever the batch (torch's scans choose their
    blocking by shape). Integer inputs (exact), float64, ``out=`` and other dtypes run as they are."""
    def handler(func, args, kwargs):
        vals = _read(_SCAN, args, kwargs)
        if vals is None:
            return func(*args, **kwargs)
        x, dim, dtype = vals
        if (not isinstance(x, torch.Tensor) or _ok(x) or not x.numel() or type(dim) is not int
                or not -x.dim() <= dim < max(1, x.dim()) or (dtype is not None and dtype != x.dtype)):
            return func(*args, **kwargs)
        if x.dim() == 0:
            return x.clone()
        y = x.float().movedim(dim, -1)
        n, k = y.shape[-1], 1
        while k < n:
            step = y[..., k:] + y[..., :-k] if kind == "cumsum" else y[..., k:] * y[..., :-k]
            y = torch.cat([y[..., :k], step], dim=-1)
            k *= 2
        return y.movedim(-1, dim).to(x.dtype)

    return handler


_PROD = _signature(("input", None), ("dim", None), ("keepdim", False), ("dtype", None), positional=3)


def _h_prod(func, args, kwargs):
    """``prod`` along a dim of a float tensor as a fixed pairwise tree (padded with ones, exact factors) in fp32.
    The product of everything, integer inputs, float64, ``out=`` and other dtypes run as they are."""
    vals = _read(_PROD, args, kwargs)
    if vals is None:
        return func(*args, **kwargs)
    x, dim, keepdim, dtype = vals
    if (not isinstance(x, torch.Tensor) or _ok(x) or not x.numel() or type(dim) is not int or x.dim() == 0
            or not -x.dim() <= dim < x.dim() or type(keepdim) is not bool or (dtype is not None and dtype != x.dtype)):
        return func(*args, **kwargs)
    y = x.float().movedim(dim, -1)
    while y.shape[-1] > 1:
        if y.shape[-1] % 2:
            y = torch.cat([y, y.new_ones(*y.shape[:-1], 1)], dim=-1)
        h = y.shape[-1] // 2
        y = y[..., :h] * y[..., h:]
    out = y.movedim(-1, dim) if keepdim else y.squeeze(-1)
    return out.to(x.dtype)


_INSTANCE_NORM = _signature(("input", None), ("running_mean", None), ("running_var", None), ("weight", None),
                            ("bias", None), ("use_input_stats", True), ("momentum", 0.1), ("eps", 1e-5))


def _h_instance_norm(func, args, kwargs):
    """``F.instance_norm`` from each item's own statistics is a group norm with one group per channel (jetdet's
    group_norm). With running statistics to update it falls back, with the warning; from running statistics alone
    (``use_input_stats=False``) it is elementwise and runs as it is."""
    vals = _read(_INSTANCE_NORM, args, kwargs)
    if vals is None or not vals[5]:  # unknown arguments (torch's error), or only running statistics: elementwise
        return func(*args, **kwargs)
    x, rm, rv, w, b, _, _, eps = vals
    if rm is not None or rv is not None:
        return _fallback(func, args, kwargs, "running statistics to update")
    if not isinstance(x, torch.Tensor) or x.dim() < 3 or type(eps) not in (int, float):
        return func(*args, **kwargs)
    why = _ok(x, w, b)
    if why:
        return _fallback(func, args, kwargs, why)
    return _h_group_norm(F.group_norm, (x, x.shape[1], w, b, float(eps)), {})


def _h_unrouted(why: str, cpu_only: bool = False):
    """A reduction or contraction jetdet does not route: the named fallback warning when a tensor argument is floating
    point (where torch's kernels may sum in another order for another batch; also inside a list, as
    ``torch.linalg.multi_dot`` takes them, and when the first tensor is integer indices, as ``embedding_bag``'s),
    silence when every one is integer or boolean (exact). ``cpu_only``: an elementwise function whose CPU kernel
    computes a tensor's last elements another way than the rest (found batch dependent, not rebuilt here); CUDA's
    kernels apply one function to every element, so CUDA tensors pass silently."""
    def handler(func, args, kwargs):
        flat = [x for a in (*args, *kwargs.values()) for x in (a if isinstance(a, (list, tuple)) else (a,))]
        if any(isinstance(a, torch.Tensor) and a.is_floating_point() and (not cpu_only or a.device.type == "cpu")
               for a in flat):
            return _fallback(func, args, kwargs, why)
        return func(*args, **kwargs)

    handler.torch_itself = True
    return handler


def _h_softmax(func, args, kwargs):
    ops = _ops()

    x, dim = call_arg(args, kwargs, 0, "input"), call_arg(args, kwargs, 1, "dim")
    dtype = kwargs.get("dtype", call_arg(args, kwargs, 3 if func is F.softmax else 2, "dtype"))
    if (dtype is None and type(dim) is int and _direct(x) == "triton" and x.dim() >= 1
            and -x.dim() <= dim < x.dim() and x.numel()):
        d = dim % x.dim()
        xm = x.movedim(d, -1) if d != x.dim() - 1 else x
        shape = xm.shape
        out = _run_triton("softmax", xm.reshape(-1, shape[-1])).reshape(shape)
        return out.movedim(-1, d) if d != x.dim() - 1 else out
    why = _ok(x) or ("dim=None" if dim is None else None)
    if why:
        return _fallback(func, args, kwargs, why)
    if dtype is not None:
        x = x.to(dtype)
        if dtype not in _FLOATS:
            return _fallback(func, args, kwargs, f"dtype {dtype}")
    return ops.softmax(x, dim)


def _h_sdpa(func, args, kwargs):
    ops = _ops()

    q, k, v, mask, dropout, causal, scale = sdpa_args(args, kwargs)
    route = _direct(q, k, v) if mask is None and not dropout and not causal else None
    if (route and q.dim() == 4 and k.dim() == 4 and v.dim() == 4 and q.numel() and k.numel() and v.numel()
            and q.shape[:2] == k.shape[:2] and q.shape[3] == k.shape[3] and k.shape[:3] == v.shape[:3]
            and (scale is None or isinstance(scale, float))):
        d = q.shape[3]
        scale = 1.0 / math.sqrt(d) if scale is None else scale
        if route == "triton":
            return _run_triton("attention", q, k, v, None, scale)
        return _backend.run_body(_attention_torch.attention, q, k, v, None, scale)
    why = _ok(q, k, v, mask if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool else None)
    if not why and dropout:
        why = f"dropout_p={dropout}"
    gqa = kwargs.get("enable_gqa", False) and min(q.dim(), k.dim(), v.dim()) >= 3 and k.shape[-3] != q.shape[-3]
    if not why and gqa:
        hq, hk = q.shape[-3], k.shape[-3]
        if hk and v.shape[-3] == hk and hq % hk == 0:
            # torch's rule for enable_gqa: each key/value head serves hq // hk query heads in a row, exactly as if
            # repeated; ACE-Step's and Cosmos 3's attention ask for it (they fell back to torch here before)
            k, v = k.repeat_interleave(hq // hk, dim=-3), v.repeat_interleave(hq // hk, dim=-3)
        else:
            why = "grouped-query attention"
    if not why and (q.dim() < 2 or q.shape[:-2] != k.shape[:-2] or k.shape[:-1] != v.shape[:-1]):
        why = "broadcast batch dims"
    if why:
        return _fallback(func, args, kwargs, why)
    if causal:
        nq, nk = q.shape[-2], k.shape[-2]
        cm = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            return _fallback(func, args, kwargs, "attn_mask together with is_causal")
        mask = cm
    if q.dim() == 4:  # [B, H, N, D] as is: no copies of strided q/k/v, the mask broadcasts in the op
        return ops.attention(q, k, v, attn_mask=mask, scale=scale)
    lead = q.shape[:-2]
    q4, k4, v4 = (t.reshape(-1, 1, *t.shape[-2:]) for t in (q, k, v))
    if mask is not None and mask.dim() > 2:
        mask = mask.expand(*lead, *mask.shape[-2:]).reshape(-1, 1, *mask.shape[-2:])
    out = ops.attention(q4, k4, v4, attn_mask=mask, scale=scale)
    return out.reshape(*lead, q.shape[-2], v.shape[-1])


def _h_log_softmax(func, args, kwargs):
    """``log_softmax`` along an int dim: ``(x - m) - log(sum(exp(x - m)))`` in fp32 with ``m`` the max (a
    selection) and the sum jetdet's fixed-order row reduction (as :func:`_h_logsumexp`), rounded once. ``F.log_softmax``
    is a Python function that torch hands to the router whole: without this, its reduction ran as torch's."""
    x, dim = call_arg(args, kwargs, 0, "input", kwargs.get("self")), call_arg(args, kwargs, 1, "dim")
    dtype = kwargs.get("dtype", call_arg(args, kwargs, 3 if func is F.log_softmax else 2, "dtype"))
    if not isinstance(x, torch.Tensor) or type(dim) is not int or not -max(x.dim(), 1) <= dim < max(x.dim(), 1):
        return _torch_or_fallback(func, args, kwargs, "dim is not one int dim")
    if dtype is not None:
        if dtype not in _FLOATS:
            return _fallback(func, args, kwargs, f"dtype {dtype}")
        x = x.to(dtype)
    why = _ok(x)
    if why or not x.numel() or x.dim() == 0:
        return _fallback(func, args, kwargs, why) if why else func(*args, **kwargs)
    shifted, _, log_sum = _shifted_log_sum(x.float(), (dim % x.dim(),))
    return (shifted - log_sum).to(x.dtype)  # not x - (m + log s), which loses m's ulp (1.2e-4 at logits of 3000)


def _h_softmin(func, args, kwargs):
    """``F.softmin`` is ``softmax`` of ``-x`` (torch's own definition), through the routed softmax."""
    x, dim = call_arg(args, kwargs, 0, "input"), call_arg(args, kwargs, 1, "dim")
    dtype = call_arg(args, kwargs, 3, "dtype")
    if not isinstance(x, torch.Tensor) or type(dim) is not int:
        return _torch_or_fallback(func, args, kwargs, "dim is not one int dim")
    return _h_softmax(F.softmax, (-x, dim), {} if dtype is None else {"dtype": dtype})


def _h_rmatmul(func, args, kwargs):
    """``other @ tensor`` where ``other`` is not a tensor's own ``__matmul__`` (a subclass or NumPy first)."""
    this, other = call_arg(args, kwargs, 0, "self"), call_arg(args, kwargs, 1, "other")
    if not isinstance(other, torch.Tensor):
        return func(*args, **kwargs)
    return _h_matmul(torch.matmul, (other, this), {})


_MHA_SIG = None


def _h_mha(func, args, kwargs):
    """``F.multi_head_attention_forward``, the body of ``nn.MultiheadAttention``: a Python function that torch hands
    to the router as one call, so none of the products inside it were routed and an item alone differed from the
    same item in a batch, silently (an acceptance sweep: HunyuanDiT's text pooler in diffusers). Rebuilt from the
    routed ops in torch's own order of operations: the input projections (one GEMM for self-attention), the masks
    made additive and merged as torch does (a True in a boolean mask is a position left out), then attention
    through the routed scaled_dot_product_attention, or, when the weights are asked for (``need_weights``, the
    module's default), the scores by ``bmm``/``baddbmm``, the routed softmax, the weights times the values by
    ``bmm``, and the heads averaged by the routed mean; then the output projection. ``bias_k``/``bias_v``,
    ``add_zero_attn``, ``static_k``/``static_v`` and dropout in training mode fall back to torch with the warning."""
    global _MHA_SIG
    if _MHA_SIG is None:
        import inspect

        _MHA_SIG = inspect.signature(F.multi_head_attention_forward)
    try:
        bound = _MHA_SIG.bind(*args, **kwargs)
    except TypeError:
        return func(*args, **kwargs)  # torch's own error
    bound.apply_defaults()
    p = bound.arguments
    q_in, k_in, v_in, nh = p["query"], p["key"], p["value"], p["num_heads"]
    sep = p["use_separate_proj_weight"]
    ws = (p["q_proj_weight"], p["k_proj_weight"], p["v_proj_weight"]) if sep else (p["in_proj_weight"],)
    masks = [m for m in (p["attn_mask"], p["key_padding_mask"]) if isinstance(m, torch.Tensor)]
    why = None
    if p["bias_k"] is not None or p["bias_v"] is not None:
        why = "bias_k/bias_v"
    elif p["add_zero_attn"]:
        why = "add_zero_attn"
    elif p["static_k"] is not None or p["static_v"] is not None:
        why = "static_k/static_v"
    elif p["training"] and p["dropout_p"]:
        why = f"dropout_p={p['dropout_p']} in training mode"
    else:
        why = _ok(q_in, k_in, v_in, *ws, p["in_proj_bias"], p["out_proj_weight"], p["out_proj_bias"],
                  *(m for m in masks if m.dtype != torch.bool))
    if not why and p["need_weights"] and any(m.dtype != torch.bool and m.dtype != q_in.dtype for m in masks):
        # torch refuses a float mask of another dtype than the query's in baddbmm: its own error, or its result
        return _torch_or_fallback(func, args, kwargs, "a float mask of another dtype than the query's")
    shapes_ok = (not why and q_in.dim() in (2, 3) and k_in.dim() == q_in.dim() == v_in.dim()
                 and type(nh) is int and nh > 0 and q_in.shape[-1] == p["embed_dim_to_check"]
                 and q_in.shape[-1] % nh == 0 and k_in.shape[:-1] == v_in.shape[:-1]
                 and q_in.shape[1:-1] == k_in.shape[1:-1] and all(w is not None for w in ws))
    if why or not shapes_ok:
        return _torch_or_fallback(func, args, kwargs, why or "argument shapes")
    batched = q_in.dim() == 3
    kpm, am = p["key_padding_mask"], p["attn_mask"]
    if not batched:
        q_in, k_in, v_in = q_in.unsqueeze(1), k_in.unsqueeze(1), v_in.unsqueeze(1)
        kpm = kpm.unsqueeze(0) if kpm is not None else None
    L, N, E = q_in.shape
    S, hd = k_in.shape[0], E // nh
    need_weights, causal = p["need_weights"], p["is_causal"]
    if causal and am is None:
        return func(*args, **kwargs)  # torch's error: is_causal is a hint that attn_mask is the causal mask

    def lin(x, w, b):
        return _h_linear(F.linear, (x, w, b), {})

    bias = p["in_proj_bias"]
    bq, bk, bv = bias.chunk(3) if bias is not None else (None, None, None)
    if sep:
        q, k, v = lin(q_in, ws[0], bq), lin(k_in, ws[1], bk), lin(v_in, ws[2], bv)
    elif q_in is k_in and k_in is v_in:
        q, k, v = lin(q_in, ws[0], bias).unflatten(-1, (3, E)).unbind(-2)
    else:
        wq, wk, wv = ws[0].chunk(3)
        q, k, v = lin(q_in, wq, bq), lin(k_in, wk, bk), lin(v_in, wv, bv)

    def additive(m):
        if m is None or m.dtype != torch.bool:
            return m
        return torch.zeros(m.shape, dtype=q.dtype, device=m.device).masked_fill_(m, float("-inf"))

    am, kpm = additive(am), additive(kpm)
    if causal and kpm is None and not need_weights:
        am = None  # the kernel's own causal mask, as torch's
    else:
        causal = False
    if am is not None:
        if am.dim() == 2 and am.shape == (L, S):
            am = am.unsqueeze(0)
        elif not (am.dim() == 3 and am.shape == (N * nh, L, S)):
            return func(*args, **kwargs)  # torch's error for the mask's shape
    if kpm is not None:
        if kpm.shape != (N, S):
            return func(*args, **kwargs)
        kpm = kpm.view(N, 1, 1, S).expand(-1, nh, -1, -1).reshape(N * nh, 1, S)
        am = kpm if am is None else am + kpm
    q = q.reshape(L, N * nh, hd).transpose(0, 1)
    k = k.reshape(S, N * nh, hd).transpose(0, 1)
    v = v.reshape(S, N * nh, hd).transpose(0, 1)
    if need_weights:
        qs = q * math.sqrt(1.0 / float(hd))
        kt = k.transpose(-2, -1)
        scores = (_h_baddbmm(torch.baddbmm, (am, qs, kt), {}) if am is not None
                  else _h_bmm(torch.bmm, (qs, kt), {}))
        weights = _h_softmax(F.softmax, (scores, -1), {})
        out = _h_bmm(torch.bmm, (weights, v), {})
        out = out.transpose(0, 1).contiguous().view(L * N, E)
        out = lin(out, p["out_proj_weight"], p["out_proj_bias"]).view(L, N, -1)
        weights = weights.view(N, nh, L, S)
        if p["average_attn_weights"]:
            weights = _HANDLERS[torch.mean](torch.mean, (weights,), {"dim": 1})
        return (out, weights) if batched else (out.squeeze(1), weights.squeeze(0))
    if am is not None:
        am = am.unsqueeze(0) if am.shape[0] == 1 else am.view(N, nh, -1, S)
    q4, k4, v4 = q.view(N, nh, L, hd), k.view(N, nh, S, hd), v.view(N, nh, S, hd)
    out = _h_sdpa(F.scaled_dot_product_attention, (q4, k4, v4), {"attn_mask": am, "is_causal": causal})
    out = out.permute(2, 0, 1, 3).contiguous().view(L * N, E)
    out = lin(out, p["out_proj_weight"], p["out_proj_bias"]).view(L, N, -1)
    return (out, None) if batched else (out.squeeze(1), None)


# Elementwise activations on CPU. torch's vectorized CPU kernels compute a tensor's last elements (the loop's scalar
# tail) with another implementation than the body, so an element's bits depended on where it sat in the tensor: on
# an Intel Xeon with AVX-512, silu, gelu (both), sigmoid, elu, softplus and mish of an item alone differed from the
# same item in a batch whenever the item's size was not a multiple of the vector width (e.g. 888 or 24 elements).
# exp, expm1, tanh, erf and log1p were exact per element there (1,422 checks each: sizes 1-70001, fp32/fp16/bf16,
# 1 and 2 threads), so deterministic mode computes the activations from them, in fp32, rounded once. CUDA's
# elementwise kernels apply one function to every element: CUDA tensors pass through.
_SQRT_HALF = 0.7071067811865476
_SQRT_2_OVER_PI = 0.7978845608028654


def _softplus(x: torch.Tensor, beta: float, threshold: float) -> torch.Tensor:
    bx = x * beta
    return torch.where(bx > threshold, x, torch.log1p(torch.exp(bx)) / beta)


def _act_math(kind: str, x: torch.Tensor, p: dict) -> torch.Tensor:
    if kind == "sigmoid":
        return 1.0 / (1.0 + torch.exp(-x))
    if kind == "silu":
        return x / (1.0 + torch.exp(-x))
    if kind == "gelu":
        if p["approximate"] == "tanh":
            return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))
        return 0.5 * x * (1.0 + torch.erf(x * _SQRT_HALF))
    if kind == "elu":
        return torch.where(x > 0, x, p["alpha"] * torch.expm1(x))
    if kind == "softplus":
        return _softplus(x, p["beta"], p["threshold"])
    if kind == "selu":
        return _SELU_SCALE * torch.where(x > 0, x, _SELU_ALPHA * torch.expm1(x))
    if kind == "celu":
        return torch.where(x > 0, x, p["alpha"] * torch.expm1(x / p["alpha"]))
    return x * torch.tanh(_softplus(x, 1.0, 20.0))  # mish = x tanh(softplus(x)), torch's threshold


_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946


_ACT_PARAMS = {  # kind -> (positional names after the input, defaults); "inplace" is handled by the handler
    "silu": (("inplace",), {"inplace": False}),
    "sigmoid": ((), {}),
    "gelu": (("approximate",), {"approximate": "none"}),
    "elu": (("alpha", "inplace"), {"alpha": 1.0, "inplace": False}),
    "softplus": (("beta", "threshold"), {"beta": 1.0, "threshold": 20.0}),
    "mish": (("inplace",), {"inplace": False}),
    "selu": (("inplace",), {"inplace": False}),
    "celu": (("alpha", "inplace"), {"alpha": 1.0, "inplace": False}),
}


def _h_act(kind: str, in_place: bool = False):
    """The activation ``kind`` from exact-per-element ops (above); ``in_place``: the call is ``x.sigmoid_()`` and
    its like, which write into ``x``."""
    names, defaults = _ACT_PARAMS[kind]

    def handler(func, args, kwargs):
        x = call_arg(args, kwargs, 0, "input", kwargs.get("self"))
        if (not isinstance(x, torch.Tensor) or x.device.type != "cpu" or x.dtype not in _FLOATS or "out" in kwargs
                or len(args) > 1 + len(names) or set(kwargs) - set(names) - {"input", "self"}):
            return func(*args, **kwargs)
        p = dict(defaults)
        p.update(zip(names, args[1:]))
        p.update({k: v for k, v in kwargs.items() if k in names})
        if (kind == "gelu" and p["approximate"] not in ("none", "tanh")) or (kind == "celu" and p["alpha"] == 0):
            return func(*args, **kwargs)  # torch's own error
        out = _act_math(kind, x.to(torch.float32), p).to(x.dtype)  # differentiable as it is
        if p.get("inplace") or in_place:
            return x.copy_(out)
        return out

    return handler


# Found by an adversarial trial on an AMD EPYC (Zen 4, AVX-512), items of sizes 1-79 alone against the same items in
# a batch of 5: rsqrt in fp16/bf16 (about 300 of 395 items differed), pow with most exponents (fp32: 1.5, 1.7, 3 of
# -3, 4, 5, 10; bf16: -0.5), exp2 in fp32 (209 of 395) and pow with a scalar base. exp and log in fp64 and sqrt and
# division in fp32 (IEEE, one rounding) were exact per element there; pow(x, 2), pow(x, 0.5) and pow(x, -1) in every
# dtype too (torch computes them as x*x, sqrt and a division), so those pass as they are.
_POW_AS_IS = (0, 1, 2, 0.5, -1)


def _cpu_floats(*xs) -> bool:
    """Whether the tensors among ``xs`` (at least one) are CPU tensors of the routed float dtypes, and the rest are
    Python numbers (not bools)."""
    seen = False
    for x in xs:
        if isinstance(x, torch.Tensor):
            if x.device.type != "cpu" or x.dtype not in _FLOATS:
                return False
            seen = True
        elif isinstance(x, bool) or not isinstance(x, (int, float)):
            return False
    return seen


def _pow64(x: torch.Tensor, y) -> torch.Tensor:
    """``x ** y`` in fp64 from exp and log (``x`` an fp64 tensor, ``y`` one or a float): negative bases give NaN
    for non-integer exponents and the sign of odd ones, and ``y == 0`` or ``x == 1`` give 1, as torch's pow does."""
    if not isinstance(y, torch.Tensor) and math.isfinite(y) and y != 0:  # a number: its cases decided here
        mag = torch.exp(y * torch.log(x.abs()))  # (x == 1 gives exp(0) = 1 exactly)
        if not float(y).is_integer():
            return torch.where((x < 0) & torch.isfinite(x), torch.nan, mag)
        return torch.where(torch.signbit(x), -mag, mag) if y % 2 else mag
    y = y if isinstance(y, torch.Tensor) else torch.tensor(float(y), dtype=torch.float64)
    mag = torch.exp(y * torch.log(x.abs()))
    whole = y == torch.floor(y)  # (infinite exponents too: C's pow treats them as even)
    odd = whole & torch.isfinite(y) & (torch.fmod(y, 2.0) != 0)
    out = torch.where((x < 0) & torch.isfinite(x) & ~whole, torch.nan,
                      torch.where(torch.signbit(x) & odd, -mag, mag))
    return torch.where((y == 0) | (x == 1) | ((x == -1) & torch.isinf(y)), 1.0, out)


def _powi64(x: torch.Tensor, e: int) -> torch.Tensor:
    """``x ** e`` for an integer ``e`` by squaring, in fp64 (IEEE multiplications and one division)."""
    out, base, n = None, x, abs(e)
    while n:
        if n & 1:
            out = base if out is None else out * base
        n >>= 1
        if n:
            base = base * base
    out = torch.ones_like(x) if out is None else out
    return 1.0 / out if e < 0 else out


def _h_pow(in_place: bool = False, reflected: bool = False):
    """``torch.pow``, ``Tensor.pow``/``**`` (``reflected``: ``2 ** x``) and ``pow_`` on CPU: fp64 from exact ops,
    rounded once to the result's dtype. CUDA tensors, ``out=`` and other dtypes pass as they are."""
    def handler(func, args, kwargs):
        if reflected:
            base, e = call_arg(args, kwargs, 1, "other"), call_arg(args, kwargs, 0, "self")
        else:
            base = call_arg(args, kwargs, 0, "input", kwargs.get("self"))
            e = call_arg(args, kwargs, 1, "exponent", kwargs.get("other"))
        if "out" in kwargs or len(args) > 2 or not _cpu_floats(base, e):
            return func(*args, **kwargs)
        if not isinstance(e, torch.Tensor) and e in _POW_AS_IS and not isinstance(base, (int, float)):
            return func(*args, **kwargs)
        try:
            dtype = torch.result_type(base, e)
            shape = torch.broadcast_shapes(*(t.shape for t in (base, e) if isinstance(t, torch.Tensor)))
        except RuntimeError:
            return func(*args, **kwargs)  # torch's own error
        if dtype not in _FLOATS or (in_place and tuple(shape) != tuple(base.shape)):
            return func(*args, **kwargs)
        if in_place:
            if base.is_leaf and base.requires_grad and torch.is_grad_enabled():
                return func(*args, **kwargs)  # torch's own error: a leaf that requires grad used in place
            # computed from a copy: autograd may keep the input, and the input is what is written to
            grad = torch.is_grad_enabled() and (base.requires_grad or isinstance(e, torch.Tensor) and e.requires_grad)
            return base.copy_(_pow_any(base.clone() if grad else base, e, base.dtype))
        return _pow_any(base, e, dtype)

    return handler


_CHUNK = 1 << 20  # elements per fp64 pass: the fp64 copies of a large tensor at once took 22x its size


def _as64(t):
    """``t`` (a tensor or a number) in fp64; half-precision tensors through fp32 (exact both ways; torch's direct
    bf16/fp16 <-> fp64 conversion on CPU took 12 ms per million elements, fp32's 0.2)."""
    if not isinstance(t, torch.Tensor):
        return torch.tensor(float(t), dtype=torch.float64)
    return (t.to(torch.float32) if t.dtype in (torch.float16, torch.bfloat16) else t).to(torch.float64)


def _from64(t: torch.Tensor, dtype) -> torch.Tensor:
    """An fp64 result in ``dtype`` (half precision through fp32: the same per element wherever it sits)."""
    return (t.to(torch.float32) if dtype in (torch.float16, torch.bfloat16) else t).to(dtype)


def _pow_value(x: torch.Tensor, e) -> torch.Tensor:
    """``x ** e`` in fp64 (``x`` fp64; ``e`` a Python number or an fp64 tensor)."""
    if not isinstance(e, torch.Tensor) and float(e).is_integer() and abs(e) <= 64:
        return _powi64(x, int(e))
    return _pow64(x, e)


def _pow_chunked(base, e, dtype) -> torch.Tensor:
    """``base ** e`` rounded to ``dtype``, in passes of :data:`_CHUNK` elements where one operand is a number."""
    scalar_e, scalar_b = not isinstance(e, torch.Tensor), not isinstance(base, torch.Tensor)
    t = e if scalar_b else base
    if not (scalar_e or scalar_b) or t.numel() <= _CHUNK:
        return _from64(_pow_value(_as64(base), e if scalar_e else _as64(e)), dtype)
    flat = t.reshape(-1)
    out = torch.empty(flat.shape, dtype=dtype)
    for i in range(0, flat.numel(), _CHUNK):
        part = _as64(flat[i:i + _CHUNK])
        out[i:i + _CHUNK] = _from64(_pow_value(part, e) if scalar_e else _pow_value(_as64(base), part), dtype)
    out = out.reshape(t.shape)
    if not t.is_contiguous():  # the input's layout (channels_last, say), as torch's elementwise result has it
        return torch.empty_like(t, dtype=dtype).copy_(out)
    return out


def _pow_any(base, e, dtype=None) -> torch.Tensor:
    """The exact ``base ** e`` (either one a tensor), differentiable when autograd needs it."""
    dtype = torch.result_type(base, e) if dtype is None else dtype
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (base, e)):
        return _ExactPow.apply(base, e, dtype)
    return _pow_chunked(base, e, dtype)


class _ExactPow(torch.autograd.Function):
    """The exact pow with torch's derivatives (``d/dx = e x^(e-1)``, 0 where ``e == 0``; ``d/de = x^e log x``, 0 where
    ``x == 0`` and ``e >= 0``), written with differentiable calls (the exact pow again for ``x^(e-1)``), so second
    derivatives are right too. Reviews: differentiating the fp64 formula through its special-case ``where``s gave 0
    for ``x ** 1.5`` at ``x == 1``; a once-differentiable backward silently dropped the pow term of a Hessian-vector
    product."""

    @staticmethod
    def forward(base, e, dtype):
        return _pow_chunked(base, e, dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        base, e, _ = inputs
        ctx.base_num = None if isinstance(base, torch.Tensor) else base
        ctx.e_num = None if isinstance(e, torch.Tensor) else e
        ctx.save_for_backward(base if ctx.base_num is None else None, e if ctx.e_num is None else None, output)

    @staticmethod
    def backward(ctx, g):
        base, e, out = ctx.saved_tensors
        b = base if base is not None else ctx.base_num
        y = e if e is not None else ctx.e_num
        gb = ge = None
        if ctx.needs_input_grad[0]:
            if isinstance(y, torch.Tensor):
                d = g * y * _pow_any(b, y - 1)
                d = torch.where(y == 0, torch.zeros_like(d), d)
            else:
                d = torch.zeros_like(g) if y == 0 else g * y * _pow_any(b, y - 1)
            gb = d.sum_to_size(base.shape).to(base.dtype)
        if ctx.needs_input_grad[1]:
            bt = b if isinstance(b, torch.Tensor) else torch.tensor(float(b), dtype=out.dtype)
            d = g * torch.where((bt == 0) & (e >= 0), torch.zeros_like(out), out * torch.log(bt))
            ge = d.sum_to_size(e.shape).to(e.dtype)
        return gb, ge, None


def _exp2_64(x: torch.Tensor) -> torch.Tensor:
    """``2 ** x`` in fp64: ``exp(frac(x) ln 2)`` times ``2 ** floor(x)`` made from its exponent bits, so integer inputs
    give exact powers of two (``exp(x ln 2)`` gave 2^-149 for ``exp2(-150.)`` in fp32 where torch gives 0: a review)."""
    n = torch.floor(x)
    finite = torch.isfinite(x)
    n_safe = torch.where(finite, n, 0.0).clamp(-1000, 1000)
    two_n = ((n_safe.to(torch.int64) + 1023) << 52).view(torch.float64)
    out = torch.exp((torch.where(finite, x, 0.0) - n_safe) * 0.6931471805599453) * two_n
    # inf, 0 and NaN, with torch's gradients there (inf, 0, NaN): torch's exp2 is exact on them
    return torch.where(finite, out, torch.exp2(torch.where(finite, 0.0, x)))


def _rsqrt_exact(x: torch.Tensor) -> torch.Tensor:
    """``rsqrt`` as ``1 / sqrt`` in fp32 (two IEEE operations), rounded once to the input's dtype."""
    return (1.0 / torch.sqrt(x.to(torch.float32))).to(x.dtype)


def _exp2_exact(x: torch.Tensor) -> torch.Tensor:
    return _from64(_exp2_64(_as64(x)), x.dtype)


def _h_cpu_unary(exact, in_place: bool = False):
    """A one-tensor elementwise function on a CPU float tensor as ``exact(x)`` (``x.copy_`` of it for the in-place
    spelling); CUDA tensors, ``out=`` and other dtypes pass as they are."""
    def handler(func, args, kwargs):
        x = call_arg(args, kwargs, 0, "input", kwargs.get("self"))
        if "out" in kwargs or len(args) > 1 or not _cpu_floats(x):
            return func(*args, **kwargs)
        out = exact(x)
        return x.copy_(out) if in_place else out

    return handler


_HANDLERS = {
    F.silu: _h_act("silu"),
    F.gelu: _h_act("gelu"),
    torch.sigmoid: _h_act("sigmoid"),
    torch.Tensor.sigmoid: _h_act("sigmoid"),
    F.elu: _h_act("elu"),
    F.softplus: _h_act("softplus"),
    F.mish: _h_act("mish"),
    F.selu: _h_act("selu"),
    F.celu: _h_act("celu"),
    torch.selu: _h_act("selu"),
    torch.celu: _h_act("celu"),
    torch.selu_: _h_act("selu", in_place=True),
    torch.celu_: _h_act("celu", in_place=True),
    # the spellings of sigmoid that are not torch.sigmoid (a trial found them batch dependent while it was not)
    torch.sigmoid_: _h_act("sigmoid", in_place=True),
    torch.Tensor.sigmoid_: _h_act("sigmoid", in_place=True),
    torch.special.expit: _h_act("sigmoid"),
    torch.rsqrt: _h_cpu_unary(_rsqrt_exact),
    torch.Tensor.rsqrt: _h_cpu_unary(_rsqrt_exact),
    torch.rsqrt_: _h_cpu_unary(_rsqrt_exact, in_place=True),
    torch.Tensor.rsqrt_: _h_cpu_unary(_rsqrt_exact, in_place=True),
    torch.pow: _h_pow(),
    torch.Tensor.pow: _h_pow(),
    torch.Tensor.__pow__: _h_pow(),
    torch.Tensor.__rpow__: _h_pow(reflected=True),
    torch.Tensor.pow_: _h_pow(in_place=True),
    torch.Tensor.__ipow__: _h_pow(in_place=True),
    torch.exp2: _h_cpu_unary(_exp2_exact),
    torch.Tensor.exp2: _h_cpu_unary(_exp2_exact),
    torch.special.exp2: _h_cpu_unary(_exp2_exact),
    torch.Tensor.exp2_: _h_cpu_unary(_exp2_exact, in_place=True),
    **{f: _h_unrouted(f"{getattr(f, '__name__', f)} computes a CPU tensor's last elements another way than the "
                      "rest (so an item's bits depend on its place in the batch)", cpu_only=True)
       for f in (torch.sinh, torch.Tensor.sinh, torch.cosh, torch.Tensor.cosh, torch.atan2, torch.Tensor.atan2,
                 torch.arctan2)},
    F.linear: _h_linear,
    torch.mm: _h_mm,
    torch.Tensor.mm: _h_mm,
    torch.addmm: _h_addmm,
    torch.Tensor.addmm: _h_addmm,
    torch.bmm: _h_bmm,
    torch.Tensor.bmm: _h_bmm,
    torch.baddbmm: _h_baddbmm,
    torch.Tensor.baddbmm: _h_baddbmm,
    torch.matmul: _h_matmul,
    torch.linalg.matmul: _h_matmul,  # an alias, but a function object of its own
    torch.Tensor.matmul: _h_matmul,
    torch.Tensor.__matmul__: _h_matmul,
    torch.conv1d: _h_conv(1),
    F.conv1d: _h_conv(1),
    torch.conv2d: _h_conv(2),
    F.conv2d: _h_conv(2),
    torch.conv3d: _h_conv(3),
    F.conv3d: _h_conv(3),
    F.conv_transpose1d: _h_conv_transpose(1),
    F.conv_transpose2d: _h_conv_transpose(2),
    F.conv_transpose3d: _h_conv_transpose(3),
    torch.einsum: _h_einsum,
    torch.tensordot: _h_fallback_named("tensordot is not routed"),
    **{getattr(F, n): _h_dropout(n, t) for n, t in (("dropout", True), ("dropout1d", True), ("dropout2d", True),
                                                   ("dropout3d", True), ("alpha_dropout", False),
                                                   ("feature_alpha_dropout", False))},
    # the low-level calls under them, which some models call directly: (input, p, train), in place with a "_"
    **{getattr(torch, n + ip): _h_dropout(f"torch.{n}{ip}", True, "train")
       for n in ("dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout") for ip in ("", "_")},
    F.layer_norm: _h_layer_norm,
    torch.layer_norm: _h_layer_norm,
    F.group_norm: _h_group_norm,
    torch.group_norm: _h_group_norm,
    F.softmax: _h_softmax,
    torch.softmax: _h_softmax,
    torch.Tensor.softmax: _h_softmax,
    torch.special.softmax: _h_softmax,
    F.log_softmax: _h_log_softmax,
    torch.log_softmax: _h_log_softmax,
    torch.Tensor.log_softmax: _h_log_softmax,
    torch.special.log_softmax: _h_log_softmax,
    F.softmin: _h_softmin,
    torch.Tensor.__rmatmul__: _h_rmatmul,
    F.multi_head_attention_forward: _h_mha,
    torch.trace: _h_unrouted("trace is not routed"),
    torch.Tensor.trace: _h_unrouted("trace is not routed"),
    F.scaled_dot_product_attention: _h_sdpa,
    torch.sum: _h_reduce("sum"),
    torch.Tensor.sum: _h_reduce("sum"),
    torch.mean: _h_reduce("mean"),
    torch.Tensor.mean: _h_reduce("mean"),
    torch.norm: _h_reduce("norm"),
    torch.Tensor.norm: _h_reduce("norm"),
    torch.linalg.vector_norm: _h_reduce("vector_norm"),
    F.normalize: _h_normalize,
    torch.logsumexp: _h_logsumexp,
    torch.Tensor.logsumexp: _h_logsumexp,
    torch.cumsum: _h_scan("cumsum"),
    torch.Tensor.cumsum: _h_scan("cumsum"),
    torch.cumprod: _h_scan("cumprod"),
    torch.Tensor.cumprod: _h_scan("cumprod"),
    torch.prod: _h_prod,
    torch.Tensor.prod: _h_prod,
    F.instance_norm: _h_instance_norm,
    F.batch_norm: _h_batch_norm,
    **{f: _h_unrouted(f"{getattr(f, '__name__', f)} is a reduction jetdet does not route") for f in (
        torch.cosine_similarity, torch.cdist, torch.pdist, torch.pairwise_distance, torch.mv, torch.Tensor.mv,
        torch.dot, torch.Tensor.dot, torch.vdot, torch.inner, torch.addmv, torch.addbmm, torch.nansum,
        torch.Tensor.nansum, torch.nanmean, torch.Tensor.nanmean, torch.logcumsumexp, torch.Tensor.logcumsumexp,
        F.local_response_norm, torch.linalg.norm, torch.cov, torch.corrcoef)},
    # contractions jetdet does not route: warned, as the reductions (ComfyUI's fp8 matmul, --fast
    # fp8_matrix_mult, is torch._scaled_mm)
    **{f: _h_unrouted(f"{getattr(f, '__name__', f)} is a contraction jetdet does not route") for f in (
        torch._scaled_mm, torch.linalg.multi_dot, torch.chain_matmul, torch.linalg.vecdot, F.bilinear,
        F.embedding_bag, torch.Tensor.addbmm_, torch.Tensor.addmv_, torch.addmv_)},
    # the recurrent layers' whole loop is one torch call (nn.GRU and nn.RNN: 0 of 7 items equal to their batch-1 runs
    # in a trial, silently; nn.LSTM happened to match there, which nothing guarantees)
    **{f: _h_unrouted(f"{getattr(f, '__name__', f)} is a recurrent layer jetdet does not route") for f in (
        torch.gru, torch.rnn_tanh, torch.rnn_relu, torch.lstm, torch.gru_cell, torch.rnn_tanh_cell,
        torch.rnn_relu_cell, torch.lstm_cell)},
    # in-place spellings of routed contractions (a trial: c.addmm_(x, w) was batch dependent while torch.addmm was not)
    torch.Tensor.addmm_: _h_in_place(_h_addmm, torch.addmm),
    torch.Tensor.baddbmm_: _h_in_place(_h_baddbmm, torch.baddbmm),
    torch.var: _h_var("var"),
    torch.Tensor.var: _h_var("var"),
    torch.std: _h_var("std"),
    torch.Tensor.std: _h_var("std"),
    torch.var_mean: _h_var("var_mean"),
    torch.std_mean: _h_var("std_mean"),
}
if hasattr(F, "rms_norm"):
    _HANDLERS[F.rms_norm] = _h_rms_norm
    if hasattr(torch, "rms_norm"):
        _HANDLERS[torch.rms_norm] = _h_rms_norm

ROUTED = sorted({getattr(f, "__name__", str(f)) for f in _HANDLERS})
# the routed Tensor operators torch defines in Python (``Tensor.__pow__``, ``__rpow__``, ``__rmatmul__``: wrappers in
# torch._tensor). Dynamo (torch 2.13) finds such an operator, handed to a torch function mode as ``func``, absent from a
# dict that holds it, then guards on it being absent: "Guard failed on the same frame it was created" (``x ** 2`` under
# torch.compile in deterministic mode crashed; ComfyUI's Flux RoPE has ``theta ** scale``). Traced lookups take the
# key from here, by identity
_PY_OPERATORS = tuple(f for f in _HANDLERS if getattr(f, "__module__", None) == "torch._tensor")


def route_op(func, handler=None, *, unrouted: str | None = None) -> None:
    """Route ``func`` (a torch function or a custom op, e.g. an ``OpOverloadPacket``) in deterministic mode: through
    ``handler(func, args, kwargs)``, which computes it with routed calls (:func:`routed`); or, with ``unrouted`` (the
    reason) and no handler, torch's own call with the named fallback warning, once, when a floating-point tensor is
    among its arguments. For integrations (``jetdet.comfy``) whose library ops the router cannot otherwise see."""
    if (handler is None) == (unrouted is None):
        raise TypeError("route_op: give exactly one of a handler and an unrouted reason")
    _HANDLERS[func] = handler if handler is not None else _h_unrouted(unrouted)
    global _PY_OPERATORS
    if getattr(func, "__module__", None) == "torch._tensor" and not any(f is func for f in _PY_OPERATORS):
        _PY_OPERATORS += (func,)  # (``1 - x`` under torch.compile crashed once Tensor.__rsub__ was routed here)


def routed(func, *args, **kwargs):
    """``func(*args, **kwargs)`` as deterministic mode runs it: its handler when it is routed, else ``func`` itself.
    For handlers given to :func:`route_op` (inside a handler the router does not see the torch calls it makes)."""
    return _route(func, args, kwargs)


def handler_for(func):
    """The handler deterministic mode runs for the torch function ``func`` (called as ``handler(func, args,
    kwargs)``), or None when ``func`` passes through unrouted; for benchmarks and audits of the router."""
    return _HANDLERS.get(func)


# torch.autocast's policy for the routed functions: the matmul family, convolutions, einsum and SDPA run in the
# autocast dtype (CPU and CUDA); on CUDA, layer_norm, group_norm, softmax, sum and the norms run in fp32 (torch's
# "autocast to float32" list, rms_norm too where torch puts it there; mean is not on it; on CPU they keep their
# inputs' dtype, as torch's CPU autocast does)
_AUTOCAST_LOW = frozenset({
    F.linear, torch.mm, torch.Tensor.mm, torch.addmm, torch.Tensor.addmm, torch.bmm, torch.Tensor.bmm, torch.baddbmm,
    torch.Tensor.baddbmm, torch.matmul, torch.linalg.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.conv1d,
    torch.conv2d,
    torch.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, torch.einsum,
    F.scaled_dot_product_attention,
    F.multi_head_attention_forward,  # (torch's linears and SDPA inside it run in the autocast dtype: so does its body)
})
# on torch's CPU autocast "float32" list (a trial: jetdet's prod under CPU autocast came out bf16, torch's fp32)
_AUTOCAST_FP32_CPU = frozenset({torch.prod, torch.Tensor.prod})
_AUTOCAST_FP32_CUDA = frozenset({F.layer_norm, torch.layer_norm, F.group_norm, torch.group_norm, F.softmax,
                                 torch.softmax, torch.Tensor.softmax, torch.sum, torch.Tensor.sum, torch.norm,
                                 torch.Tensor.norm, torch.linalg.vector_norm,
                                 F.normalize})  # var/std: not on torch's list


def _torch_autocasts_rms_norm_on_cuda() -> bool:
    """Whether this torch registers a CUDA autocast kernel for ``aten::rms_norm``: torch 2.12 put it on the
    "autocast to float32" list (2.11 and earlier: on no list, so the output keeps the input's dtype). Read from the
    dispatcher's table, which CPU builds have too. The table says that a CUDA autocast kernel exists, not which
    policy it has (every registration names the same source line): fp32, the policy of 2.12 and 2.13, is assumed."""
    try:
        return "AutocastCUDA:" in torch._C._dispatch_dump("aten::rms_norm")
    except Exception:  # noqa: BLE001 - no such op (torch < 2.4) or no dump: torch's older behaviour
        return False


if hasattr(F, "rms_norm") and _torch_autocasts_rms_norm_on_cuda():
    _AUTOCAST_FP32_CUDA = _AUTOCAST_FP32_CUDA | {F.rms_norm, *((torch.rms_norm,) if hasattr(torch, "rms_norm") else ())}


def _autocast_cast(a, to):
    if isinstance(a, torch.Tensor):
        # autocast casts floating tensors other than fp64 (fp64 stays, and takes the fallback)
        return a.to(to) if a.is_floating_point() and a.dtype != to and a.dtype != torch.float64 else a
    if isinstance(a, (list, tuple)) and a and any(isinstance(t, torch.Tensor) for t in a):
        return type(a)(_autocast_cast(t, to) for t in a)
    return a


def _autocast_route(func, handler, args, kwargs):
    """A routed call under ``torch.autocast``: its inputs cast as autocast would cast them for ``func``, then the
    handler with autocast off, so that jetdet's bodies (whose torch calls are the implementation) are not recast
    op by op. Without this the router's call ran in the inputs' dtype (autocast acts below ``__torch_function__``)
    and its body's inner matmuls were recast."""
    dev = next((a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
    if dev is None or not torch.is_autocast_enabled(dev):
        return handler(func, args, kwargs)
    if getattr(handler, "torch_itself", False):  # a warned fallback: torch's call, under autocast as torch runs it
        return handler(func, args, kwargs)
    to = None
    if func in _AUTOCAST_LOW:
        to = torch.get_autocast_dtype(dev)
    elif dev == "cuda" and func in _AUTOCAST_FP32_CUDA and kwargs.get("dtype") is None:
        to = torch.float32
    elif dev == "cpu" and func in _AUTOCAST_FP32_CPU and kwargs.get("dtype") is None:
        to = torch.float32
    if to is not None:
        args = tuple(_autocast_cast(a, to) for a in args)
        kwargs = {k: _autocast_cast(v, to) for k, v in kwargs.items()}
    with torch.autocast(dev, enabled=False):
        return handler(func, args, kwargs)


def _refused(func, args, kwargs, error: Exception):
    """A call whose jetdet op refused its arguments: where torch takes them (jetdet's checks are stricter in places: a
    broadcast linear bias, a conv stride as a 1-tuple), torch's own result with the one-time fallback warning naming
    why; where torch refuses them too, jetdet's error, which names the argument."""
    try:
        out = func(*args, **kwargs)
    except Exception:
        raise error from None
    # once per op and argument named (the message holds shapes, which would warn again for every shape); a jetdet bug
    # that raises one of these errors shows here too, named, instead of stopping the model
    _warn_fallback(func, f"jetdet's op does not take these arguments: {error}", key=str(error).split(":")[0])
    return out


def _route(func, args, kwargs):
    """A torch call under the router: its handler (under ``torch.autocast``, with autocast's casts first) when
    ``func`` is routed, else ``func`` itself."""
    if torch.compiler.is_compiling():
        func = next((f for f in _PY_OPERATORS if f is func), func)  # see _PY_OPERATORS
    handler = _HANDLERS.get(func)
    if handler is None:
        return func(*args, **kwargs)
    if torch._C._is_any_autocast_enabled():
        return _autocast_route(func, handler, args, kwargs)
    return handler(func, args, kwargs)


def _routes_here() -> bool:
    """Whether this thread's router routes an eager torch call made now (a deterministic context is current, with
    either ``warn_only``)."""
    frame = _current.get()
    if frame.closed:
        frame = _open(frame)
    return frame.mode is Mode.DETERMINISTIC and frame.thread is getattr(_tls, "me", None)


def _routes_call() -> bool:
    """:func:`_routes_here` in eager code; in code ``torch.compile`` traces, which cannot read the mode's
    ``ContextVar``, :func:`_router_on_stack` (the rule traced routed calls follow)."""
    if torch.compiler.is_compiling():
        return _router_on_stack()
    return _routes_here()


def _router_on_stack() -> bool:
    """Whether a router is on this thread's torch function mode stack: what routes a traced call (see :class:`_Router`).
    Dynamo traces it (and guards on the stack), where it cannot read the mode's ``ContextVar``."""
    return any(isinstance(m, (_Router, compiled_router)) for m in torch.overrides._get_current_function_mode_stack())



class _Router(TorchFunctionMode):
    """The deterministic router of one thread: on its torch function mode stack while a deterministic context is
    active on the thread (:func:`_acquire`). Eager calls consult the context's mode, so an asyncio task in
    another mode on the same thread passes through.

    Code that ``torch.compile`` traces cannot read the mode's ``ContextVar`` (Dynamo breaks the graph at every
    call, and the model then runs eagerly frame by frame), so a traced call is routed whenever the router is on
    the stack: the compiled graph holds the ``torch.ops.jetdet.*`` custom ops. Dynamo guards a compiled graph on
    the torch function mode stack, so outside every deterministic context (the router off the stack, a nested
    ``mode("off")`` included) the same function recompiles without them. The one case this reads differently
    from eager code: a compiled function called from an asyncio task (or a generator) in another mode while a
    deterministic context is active on the same thread is routed."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.compiler.is_compiling():  # first: Dynamo cannot read the ContextVar below
            return _route(func, args, kwargs)
        frame = _current.get()
        if frame.closed:  # a task that outlived the block it was created in (see _Frame)
            frame = _open(frame)
        if frame.mode is Mode.DETERMINISTIC and frame.thread is getattr(_tls, "me", None):
            handler = _HANDLERS.get(func)
            if handler is not None:  # _route's body, inlined: one Python call less on every routed call
                try:
                    if torch._C._is_any_autocast_enabled():
                        return _autocast_route(func, handler, args, kwargs)
                    return handler(func, args, kwargs)
                except (ValueError, TypeError) as e:
                    return _refused(func, args, kwargs, e)
        return func(*args, **kwargs)


class compiled_router(TorchFunctionMode):  # noqa: N801 - a context manager, like ``mode``
    """The router alone, for code that ``torch.compile`` traces (a deterministic patch's forward under
    compilation): every routed torch function goes to its jetdet handler, so the traced graph holds the
    ``torch.ops.jetdet.*`` custom ops (opaque to the compiler, with their fake implementations) in place of
    torch's reductions. Unlike :class:`mode` it reads no context variable and sets no torch flag, neither of
    which Dynamo can trace; the compiled graph's own kernels (elementwise work between the custom ops) are the
    compiler's. Under ``torch.autocast`` routed calls take autocast's casts, as in eager deterministic mode.
    ``tests/test_compile.py`` checks the compiled model for batch invariance."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return _route(func, args, kwargs or {})
