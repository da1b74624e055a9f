"""Deterministic attention inside ComfyUI: ComfyUI's own SDPA path, whatever attention the process selected.

ComfyUI picks one attention function per process and binds it into its model modules as ``optimized_attention``
(and ``optimized_attention_masked``). On a CPU that is the sub-quadratic attention, which cuts keys into chunks
sized from the *free memory* and the batch (``attention_sub_quad``), so its numerics change with memory pressure
and batch size; on a GPU it may be sage, xformers or flash attention, none of them batch invariant.
:func:`sdpa_attention` makes every one of those bindings ComfyUI's own ``attention_pytorch`` (the
``F.scaled_dot_product_attention`` path ComfyUI uses by default on NVIDIA GPUs) while a deterministic model call
runs, so jetdet's router sends attention to the batch-invariant :func:`jetdet.ops.attention`; the bindings are
put back when the outermost call returns or raises. The swap is process-wide while active, reentrant, and safe to
nest, but each swapped binding decides per thread: ``attention_pytorch`` on a thread inside the block, the function
it replaced on any other (a thread outside jetdet's calls keeps the attention the user chose). Other modules'
globals of those names that hold one of ComfyUI's attention functions (a custom node's
``from comfy.ldm.modules.attention import optimized_attention``) are swapped too; an attention function a custom
node holds under another name, or calls through a reference of its own, is not seen.
For the same span ComfyUI's fp8 matrix multiply (``comfy.ops.fp8_linear``: ``torch._scaled_mm``, which jetdet does not
route) is off, so its fp8 layers cast their weights and call ``F.linear``, which it does; and the linears of scaled fp8
checkpoints always scale their weight (they scale the weight or the input, whichever has fewer elements, which
depends on the batch); in newer ComfyUI the layers with quantized weights (``mixed_precision_ops``) take their
full-precision path in deterministic calls, since an nvfp4 layer scales its input by the whole batch's maximum. The
layer classes are scanned again at every entry, nested ones included, so a model loaded during the span is swapped
from its first deterministic call on. Those replacements, too, hold ComfyUI's own and call it on a thread outside
deterministic mode.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading

import torch

from jetdet.mode import _routes_call

_NAMES = ("optimized_attention", "optimized_attention_masked")
_lock = threading.RLock()
_depth = 0
_saved: list = []


_binders: list = []  # the modules that have one of _NAMES, as of the last scan
_scanned = [-1]  # len(sys.modules) at that scan


def _modules_with_bindings() -> list:
    """Every loaded module with a global named as in ``_NAMES``; scanned again when the number of modules changed or
    one of those was replaced (a reload). A module that gains such a global after a scan is not seen until the next."""
    if len(sys.modules) != _scanned[0] or any(sys.modules.get(n) is not m for n, m in _binders):
        mods = [(n, m) for n, m in list(sys.modules.items()) if m is not None]
        _binders[:] = [(n, m) for n, m in mods if any(g in getattr(m, "__dict__", ()) for g in _NAMES)]
        _scanned[0] = len(sys.modules)
    return _binders


def _swap_in() -> None:
    import comfy.ldm.modules.attention as attn
    import comfy.ops

    target = attn.attention_pytorch
    # ComfyUI's attention functions (and what it bound at start-up): a custom node that imported one of them under
    # ComfyUI's name (``from comfy.ldm.modules.attention import optimized_attention``, as IPAdapter's attention patch
    # does) holds its own binding, which a swap of ComfyUI's modules alone would leave on xformers or sage
    names = ("attention_", "optimized_attention")
    comfy_fns = [f for k, f in vars(attn).items() if callable(f) and k.startswith(names)]
    # fp8 linears under --fast fp8_matrix_mult (or an fp8-optimised checkpoint) multiply through torch._scaled_mm,
    # which jetdet does not route (a fallback: cuBLASLt's own tiling). Without it ComfyUI casts the weight and calls
    # F.linear, which it routes
    # (on threads in deterministic calls; elsewhere ComfyUI's own, see _per_thread)
    fp8 = getattr(comfy.ops, "fp8_linear", None)
    if callable(fp8) and getattr(fp8, "_jetdet_own", None) is None:
        _install(comfy.ops, "fp8_linear", fp8, _per_thread(fp8, _no_fp8_linear))
    # the layers of scaled fp8 and of quantized (mixed-precision) checkpoints: see _swap_layer_classes
    _swap_layer_classes()
    _hook_new_classes()
    # newer ComfyUI's MLPs (Wan, LTX) call ``linear_input_act``, which hands an int8 layer's input straight to
    # comfy_kitchen's int8 kernel (unseen by the router): for the span ComfyUI's own plain path, ``linear(act(x))``
    if callable(getattr(comfy.ops, "linear_input_act", None)) and hasattr(comfy.ops, "INPUT_ACT_EAGER"):
        own = comfy.ops.linear_input_act
        _install(comfy.ops, "linear_input_act", own, _per_thread(own, _plain_linear_input_act))
    from . import kitchen

    kitchen.install()  # comfy_kitchen's ops routed or warned (once each; ops registered since then too)
    # each binding becomes ``target`` on the threads inside this block, and stays what it was on the others (see
    # _in_block): one stand-in per function, shared by the modules that bound it
    stand_ins: dict = {}
    for name, mod in _modules_with_bindings():
        ours = name == "comfy.ldm" or name.startswith("comfy.ldm.")
        d = getattr(mod, "__dict__", {})
        for g in _NAMES:
            f = d.get(g)
            if (callable(f) and f is not target and getattr(f, "_jetdet_own", None) is None
                    and (ours or any(f is c for c in comfy_fns))):
                if id(f) not in stand_ins:
                    stand_ins[id(f)] = _per_thread(f, target, when=_in_block)
                _install(mod, g, f, stand_ins[id(f)])


def _swap_layer_classes() -> None:
    """The layer classes' part of the swap, at every entry (nested ones too): a quantized model loaded after the
    outermost entry (a model built during sampling, then called through a deterministic call of its own) has layer
    classes of its own, created after that entry's scan. Classes already swapped are left as they are; all are put
    back when the outermost call returns."""
    import comfy.ops

    # scaled fp8 checkpoints' linears (``*_fp8_scaled``) apply their scale to the weight or to the input, whichever
    # has fewer elements: the input's count includes the batch, so an item alone and in a batch were rounded
    # differently. For the span they always scale the weight (ComfyUI's choice for large inputs)
    for cls in comfy.ops.manual_cast.Linear.__subclasses__():
        own = vars(cls).get("forward_comfy_cast_weights")
        if ".scaled_fp8_op." in cls.__qualname__ and own is not None and getattr(own, "_jetdet_own", None) is None:
            _install(cls, "forward_comfy_cast_weights", own, _per_thread(own, _scaled_fp8_forward))
    # newer ComfyUI (0.7, 0.33): checkpoints with quantized weights (fp8, nvfp4, mxfp8, int8: ``QuantizedTensor``) load
    # as ``mixed_precision_ops`` layers, which quantize their input too where the device computes in that format. An
    # nvfp4 layer without an ``input_scale`` scales its input by the absolute maximum of the whole input, batch
    # included, so an item alone and in a batch were rounded differently (a trial on 0.33: 3 of 4 items differed,
    # silently). For the span, on threads in deterministic calls, they take ComfyUI's own full-precision path
    # (``_full_precision_mm`` read as True, see _FullPrecisionFlag; what ComfyUI runs on a device without that format's
    # compute): the weight dequantized, the input as it is, F.linear, routed
    for cls in _mixed_precision_classes():
        _swap_mixed_precision(cls)


def _swap_mixed_precision(cls) -> None:
    """``cls`` (a mixed-precision layer class) for the span: ``_full_precision_mm`` read through
    :class:`_FullPrecisionFlag`, and its load code (``_load_from_state_dict``) marked as loading on its thread."""
    own = vars(cls).get(_FPMM, _ABSENT)
    if not isinstance(own, _FullPrecisionFlag):
        _install(cls, _FPMM, own, _FullPrecisionFlag(own))
        _note_full_precision()
    for name in _LOADERS:
        load = vars(cls).get(name)
        if callable(load) and getattr(load, "_jetdet_own", None) is None:
            _install(cls, name, load, _loading_call(load))


def _hook_new_classes() -> None:
    """For the span, a mixed-precision layer class created inside it (a model loaded during sampling and called in the
    same deterministic call, with no entry of its own to scan) is swapped as Python creates it: an
    ``__init_subclass__`` on ``comfy.ops.CastWeightBiasOp`` (chained to the one it had, if any), taken off with the
    rest."""
    import comfy.ops

    base = getattr(comfy.ops, "CastWeightBiasOp", None)
    if base is None:
        return
    prior = vars(base).get("__init_subclass__", _ABSENT)

    def __init_subclass__(cls, **kwargs):  # noqa: N807 - Python's hook
        if prior is _ABSENT:
            super(base, cls).__init_subclass__(**kwargs)
        else:
            prior.__get__(None, cls)(**kwargs)
        if ".MixedPrecisionOps." in cls.__qualname__:
            with _lock:
                if _depth > 0:
                    _swap_mixed_precision(cls)

    _install(base, "__init_subclass__", prior, classmethod(__init_subclass__))


_FPMM = "_full_precision_mm"
# ComfyUI's load code of the mixed-precision layers, which reads ``_full_precision_mm`` as the value to keep
# (``if not module._full_precision_mm: module._full_precision_mm = config``; 0.7.0 inline, 0.33 through
# ``_load_quantized_module``): there the layer's own value
_LOADERS = ("_load_from_state_dict",)
_ABSENT = object()
_noted: list = []
_loading = threading.local()  # .depth: this thread's calls into _LOADERS now running


class _FullPrecisionFlag:
    """Installed for the span as ``_full_precision_mm`` on ComfyUI's mixed-precision layer classes (a data
    descriptor: it wins over the instance's own attribute, and subclasses inherit it). Read on a thread that routes
    (a deterministic call) and outside the layer's load code, it is True: ComfyUI's full-precision path, whichever
    method reads it and however it is reached (an instance-level ``forward`` such as the LoRA bypass hook's, which
    holds the class's unwrapped forward, included). Elsewhere (another thread, fast mode, no mode, and load code on
    any thread) it is the layer's own value: the instance's, else the class's own attribute as it was (a data
    descriptor of the class's own, such as a property, first, as Python reads it). In code that ``torch.compile``
    traces (ComfyUI's TorchCompileModel), which cannot read the mode's ContextVar, it is True where a router is on the
    torch function mode stack, the rule for traced routed calls (Dynamo guards on the stack). Writes and deletes go to
    the instance (through that data descriptor where the class has one), so nothing shared is changed while a layer
    computes (two threads in one layer each read their own answer), and the instance's value holds again once the
    descriptor is taken off."""

    def __init__(self, own):
        self.own = own  # the class's own attribute it replaced, or _ABSENT

    def __get__(self, obj, objtype=None):
        if obj is not None:
            # traced code cannot read the mode's ContextVar (Dynamo broke the graph there, and ComfyUI's compiled Flux
            # then failed in the resumed frame): _routes_call asks the router on the mode stack there, and traced code
            # is no load code
            if _routes_call() and (torch.compiler.is_compiling() or not getattr(_loading, "depth", 0)):
                return True
            d = obj.__dict__
            if _FPMM in d and not _is_data_descriptor(self._own(type(obj))):
                return d[_FPMM]
        return self._inherited(obj, objtype if objtype is not None else type(obj))

    @staticmethod
    def _own(objtype):
        """The attribute the layer has without jetdet: the first in ``objtype``'s MRO, a flag's ``own`` for a flag
        (or _ABSENT)."""
        for klass in objtype.__mro__:
            v = vars(klass).get(_FPMM, _ABSENT)
            if isinstance(v, _FullPrecisionFlag):
                v = v.own
            if v is not _ABSENT:
                return v
        return _ABSENT

    @classmethod
    def _inherited(cls, obj, objtype):
        v = cls._own(objtype)
        if v is _ABSENT:
            raise AttributeError(_FPMM)
        return v.__get__(obj, objtype) if hasattr(type(v), "__get__") else v

    # a class's own data descriptor (a property with a setter) keeps its reads and writes: a write to the instance's
    # __dict__ instead (a checkpoint's setting stored by load code in the span) was lost once the property was back
    def __set__(self, obj, value):
        own = self._own(type(obj))
        if hasattr(type(own), "__set__"):
            own.__set__(obj, value)
        else:
            obj.__dict__[_FPMM] = value

    def __delete__(self, obj):
        own = self._own(type(obj))
        if hasattr(type(own), "__delete__"):
            own.__delete__(obj)
        elif obj.__dict__.pop(_FPMM, _ABSENT) is _ABSENT:
            raise AttributeError(_FPMM)


def _is_data_descriptor(v) -> bool:
    return hasattr(type(v), "__set__") or hasattr(type(v), "__delete__")


def _loading_call(load):
    """``load`` (a layer's ``_load_from_state_dict``) counted as load code on its thread for the duration of the
    call, so that ComfyUI's loader reads the layer's real ``_full_precision_mm`` and keeps a checkpoint's
    ``full_precision_matrix_mult`` when a model loads during the span."""

    @functools.wraps(load)
    def call(self, *args, **kwargs):
        _loading.depth = getattr(_loading, "depth", 0) + 1
        try:
            return load(self, *args, **kwargs)
        finally:
            _loading.depth -= 1

    call._jetdet_own = load
    return call


def _mixed_precision_classes() -> list:
    """ComfyUI's ``mixed_precision_ops`` layer classes now defined (one set per loaded quantized model; none in
    ComfyUI 0.3.64): the subclasses of ``comfy.ops.CastWeightBiasOp`` defined inside a ``MixedPrecisionOps``."""
    import comfy.ops

    base = getattr(comfy.ops, "CastWeightBiasOp", None)
    if base is None:
        return []
    found, todo, seen = [], list(base.__subclasses__()), set()
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        todo.extend(cls.__subclasses__())
        if ".MixedPrecisionOps." in cls.__qualname__:
            found.append(cls)
    return found


def _note_full_precision() -> None:
    if not _noted:
        _noted.append(True)
        import logging

        logging.info("jetdet: in deterministic model calls, layers with quantized weights (fp8, nvfp4, mxfp8, int8) "
                     "run ComfyUI's full-precision path (weight dequantized, input not quantized), so that an item "
                     "is rounded the same alone and in a batch")


def _per_thread(own, ours, when=_routes_call):
    """A process-wide swap that changes nothing for other threads: ``ours`` where ``when()`` (by default a thread that
    routes, a deterministic call, eager or traced: :func:`jetdet.mode._routes_call`), elsewhere ``own``, what it
    replaced (another thread, fast mode, no mode keep ComfyUI's own: an off thread's fp8 layers lost ComfyUI's
    ``torch._scaled_mm``, its int8 layers their kernel, its attention the user's choice while a call ran). Marked
    with ``own`` so that a swap is never swapped again."""

    @functools.wraps(own)
    def call(*args, **kwargs):
        return (ours if when() else own)(*args, **kwargs)

    call._jetdet_own = own
    return call


def _plain_linear_input_act(linear, x, input_act):
    """ComfyUI's plain path for ``linear_input_act``: ``linear(act(x))``."""
    import comfy.ops

    return linear(comfy.ops.INPUT_ACT_EAGER[input_act](x))


def _no_fp8_linear(layer, input):
    return None  # ComfyUI's fp8 layers then take their cast-weight F.linear path


def _scaled_fp8_forward(self, input):
    """A scaled fp8 linear's ``forward_comfy_cast_weights`` with the scale always on the weight (ComfyUI's own scales
    the weight or the input, whichever has fewer elements)."""
    import comfy.ops

    weight, bias = comfy.ops.cast_bias_weight(self, input)
    return torch.nn.functional.linear(input, weight * self.scale_weight.to(device=weight.device, dtype=weight.dtype),
                                      bias)


_here = threading.local()  # .depth: this thread's sdpa_attention blocks now open


def _in_block() -> bool:
    """Whether this thread is inside :func:`sdpa_attention` (a deterministic call, or fast mode's attention swap and
    cache, which intercept SDPA too): where ComfyUI's attention bindings are ``attention_pytorch``."""
    return bool(getattr(_here, "depth", 0))


def _install(obj, name: str, old, new, undo: list | None = None) -> None:
    """``obj.name = new``, noted in ``undo`` (the span's ``_saved`` by default) for :func:`put_back`, which puts
    ``old`` back (what ``obj`` itself held, or _ABSENT)."""
    (_saved if undo is None else undo).append((obj, name, old, new))
    setattr(obj, name, new)


def _swap_out() -> None:
    """Put back what :func:`_install` replaced, where it still holds jetdet's replacement. Where another extension
    (another thread, a wrapper inside the call) set the attribute during the span, its value stays: putting jetdet's
    saved one back lost that extension's patch (or brought back one it had taken off). A replacement of jetdet's that
    it wrapped is ComfyUI's own outside deterministic calls (see _per_thread)."""
    put_back(_saved)


def put_back(undo: list) -> None:
    """Undo ``(obj, name, old, new)`` swaps, last first, where ``obj`` still holds ``new`` (set by someone else
    since: theirs stays); ``old`` _ABSENT: the attribute was not ``obj``'s own, and is deleted."""
    while undo:
        obj, name, old, new = undo.pop()
        if vars(obj).get(name, _ABSENT) is not new:
            continue
        if old is _ABSENT:
            delattr(obj, name)
        else:
            setattr(obj, name, old)


@contextlib.contextmanager
def sdpa_attention():
    """Within this block, on this thread, ComfyUI's models use ``attention_pytorch`` (see the module docstring)."""
    global _depth
    with _lock:
        if _depth == 0:
            try:
                _swap_in()
            except BaseException:
                _swap_out()
                raise
        else:  # nested: layer classes and comfy_kitchen ops that appeared since the outer entry (put back with it)
            from . import kitchen

            _swap_layer_classes()
            kitchen.install()
        _depth += 1
    _here.depth = getattr(_here, "depth", 0) + 1
    try:
        yield
    finally:
        _here.depth -= 1
        with _lock:
            _depth -= 1
            if _depth == 0:
                _swap_out()


def active() -> bool:
    return _depth > 0
