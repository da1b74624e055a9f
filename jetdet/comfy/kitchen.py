"""comfy_kitchen's fused ops in deterministic mode (newer ComfyUI: 0.7, 0.33).

Newer ComfyUI calls the fused kernels of ``comfy_kitchen`` (a package it requires) from its models: Flux's RoPE
(``apply_rope``), LTX's and LTX-2's RMS-norm adaptive layer norm (``rms_adaln``), the RMS norm + RoPE of Lumina,
Cosmos, Ernie and others (``rms_rope*``), quantized matrix multiplies and int8 attention. They are custom ops
(``torch.ops.comfy_kitchen.*``): the deterministic router sees each as one call and, not knowing it, ran the library's
kernel (its own CUDA kernel on a GPU) with no warning, so the batch-invariance guarantee silently did not cover it.
:func:`install` tells the router about every op of the namespace, with an explicit allow-list, so that an op added to
comfy_kitchen later warns until it is looked at:

- ``adaln``, ``rms_adaln``, ``rms_rope*`` (a norm over the last dimension, a reduction): computed from their
  definitions with jetdet's routed ``layer_norm`` / ``rms_norm`` and elementwise arithmetic (the RoPE part through
  comfy_kitchen's own elementwise op). The result is in the input's dtype, as comfy_kitchen's CUDA and Triton kernels
  and the op's registered fake return it; its eager (CPU) backend returns the promoted dtype instead where the
  modulation's dtype is wider (``rms_adaln``/``adaln`` of a bf16 ``x`` with fp32 ``scale``/``shift``: fp32), so
  there jetdet's result is bf16 where the library's is fp32;
- left as they are (the allow-list, each checked against comfy_kitchen 0.2.31's eager source, :data:`_ALLOWED`): the
  elementwise ops, ``apply_rope*`` (each output element from its own pair and frequencies), the ``dequantize_*`` of
  fp8, nvfp4, mxfp8 and int8 (stored values times their scales), ``quantize_fp8`` (by the scale it is given); the
  quantizers whose scales come from one row alone, ``quantize_nvfp4`` / ``quantize_mxfp8`` (a maximum over each
  block of 16 or 32 elements of a row, exact in any order) and ``quantize_int8_rowwise`` (each row's maximum); the
  ConvRot weight (de)quantizers, whose Hadamard rotation is a product over a weight, which has no batch;
  ``dequantize_int8_embedding`` without ConvRot (a row gather and its scale; with it, a product over the looked-up
  rows, which are the batch's: warned);
- every other op, the named fallback warning: the quantized matrix multiplies (``scaled_mm_*``, ``int8_linear``,
  ``gemv_awq_w4a16``), the int8 attention (``int8_attention*``), ``na3d`` (neighbourhood attention),
  ``quantize_svdquant_w4a4`` (its low-rank branch is a product of the input), ``quantize_int8_tensorwise`` (one
  scale from the whole input's maximum, batch included), and any op not named here.

It runs once comfy_kitchen is imported (ComfyUI imports it at start-up), at every deterministic model call: an op is
handled once; an op registered since is handled at the next call. The namespace's ops are listed from torch's
dispatcher (``torch.ops.comfy_kitchen``'s attributes hold only the ops looked up so far: an op registered by
``Library.define`` or C++ and first called inside a deterministic call would otherwise run unseen that once), again
only when something may have been registered since the last look (a module imported, a library loaded, an op defined
from Python, the namespace's attributes changed).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

_done: set = set()
_sizes: dict = {}  # id(namespace) -> _registrations() when install last looked

# comfy_kitchen's ops that pass as they are, with why (comfy_kitchen 0.2.31's eager source)
_ALLOWED = {
    **{n: "elementwise: each output element from its own pair and frequencies" for n in (
        "apply_rope", "apply_rope_", "apply_rope1", "apply_rope1_", "apply_rope_split_half", "apply_rope_split_half_",
        "apply_rope_split_half1", "apply_rope_split_half1_")},
    **{n: "elementwise: the stored values times their scales" for n in (
        "dequantize_fp8", "dequantize_nvfp4", "dequantize_mxfp8", "dequantize_int8_simple",
        "dequantize_int8_simple_dtype")},
    "quantize_fp8": "elementwise: by the scale it is given",
    "quantize_nvfp4": "row-local: the given scale and the maximum of each block of 16 elements of a row",
    "quantize_mxfp8": "row-local: the maximum of each block of 32 elements of a row",
    "quantize_int8_rowwise": "row-local: each row's own maximum",
    **{n: "a weight's: the Hadamard rotation is a product over the weight, which has no batch" for n in (
        "quantize_int8_convrot_weight", "dequantize_int8_convrot_weight", "dequantize_int8_convrot_weight_dtype")},
}

# the reasons the fallback warning names, for the ops known to need it (any other: _UNKNOWN)
_UNROUTED = {
    **{n: "a quantized matrix multiply" for n in (
        "scaled_mm_nvfp4", "scaled_mm_mxfp8", "scaled_mm_svdquant_w4a4", "gemv_awq_w4a16", "int8_linear")},
    "int8_attention": "an int8 attention",
    "int8_attention_masked": "an int8 attention",
    "na3d": "neighbourhood attention",
    "quantize_svdquant_w4a4": "a quantizer whose low-rank branch is a matrix multiply of its input",
    "quantize_int8_tensorwise": "a quantizer scaled by the whole input's maximum, batch included",
    "dequantize_int8_embedding": "with ConvRot a matrix multiply over the looked-up rows",
}
_UNKNOWN = "an op jetdet does not know to be elementwise"


def _arg(args, kwargs, i, name, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


def _modulated(norm):
    """``adaln`` / ``rms_adaln``: ``norm(x) * (1 + scale) + shift``, the norm over the last dimension, routed."""
    def handler(func, args, kwargs):
        from jetdet.mode import routed

        x, scale, shift = (_arg(args, kwargs, i, n) for i, n in enumerate(("x", "scale", "shift")))
        eps = _arg(args, kwargs, 3, "eps", 1e-6)
        n = routed(norm, x, (x.shape[-1],), eps=eps)
        return (n * (1 + scale) + shift).to(x.dtype)

    return handler


def _rms_rope(ns, pair: bool, split_half: bool, in_place: bool):
    """``rms_rope*``: each tensor RMS-normed over its last dimension with its scale (routed), then rotated by
    comfy_kitchen's own elementwise RoPE (the first ``rot_dim`` dimensions where given, the rest passed through)."""
    rope = getattr(ns, "apply_rope_split_half1" if split_half else "apply_rope1")

    def one(x, freqs, scale, eps, rot_dim):
        from jetdet.mode import routed

        n = routed(F.rms_norm, x, (x.shape[-1],), scale, eps).to(x.dtype)
        if rot_dim and rot_dim != x.shape[-1]:
            return torch.cat((rope(n[..., :rot_dim].contiguous(), freqs), n[..., rot_dim:]), dim=-1)
        return rope(n, freqs)

    def handler(func, args, kwargs):
        if pair:
            q, k, freqs, qs = (_arg(args, kwargs, i, n) for i, n in enumerate(("q", "k", "freqs_cis", "q_scale")))
            ks = _arg(args, kwargs, 4, "k_scale")
            eps = _arg(args, kwargs, 5, "epsilon", 1e-6)
            rot = _arg(args, kwargs, 6, "rot_dim", 0)
            out = (one(q, freqs, qs, eps, rot), one(k, freqs, qs if ks is None else ks, eps, rot))
            if in_place:
                q.copy_(out[0])
                k.copy_(out[1])
                return None
            return out
        x, freqs, sc = (_arg(args, kwargs, i, n) for i, n in enumerate(("x", "freqs_cis", "scale")))
        out = one(x, freqs, sc, _arg(args, kwargs, 3, "epsilon", 1e-6), 0)
        if in_place:
            x.copy_(out)
            return None
        return out

    return handler


def _embedding_lookup(warned):
    """``dequantize_int8_embedding``: without ConvRot (``group_size <= 0``) a row gather and its scale, left as it is;
    with it the looked-up rows are rotated by a matrix multiply, so the fallback warning."""
    def handler(func, args, kwargs):
        if _arg(args, kwargs, 3, "group_size", 0) <= 0:
            return func(*args, **kwargs)
        return warned(func, args, kwargs)

    handler.torch_itself = True
    return handler


def _ops(ns) -> list:
    """The names of the namespace's ops, sorted: every op the dispatcher has under its name (``vars(ns)`` holds only
    those looked up so far: torch makes an op's packet on its first attribute access), and those in ``vars(ns)``."""
    names = {n for n, v in list(vars(ns).items()) if isinstance(v, torch._ops.OpOverloadPacket)}
    prefix = f"{getattr(ns, 'name', '')}::"
    if prefix != "::" and hasattr(torch._C, "_dispatch_get_all_op_names"):
        names.update(q[len(prefix):].split(".", 1)[0] for q in torch._C._dispatch_get_all_op_names()
                     if q.startswith(prefix))
    return sorted(names)


def _registrations(ns) -> tuple:
    """Cheap signs that an op may have been registered since they were last read: the namespace's attributes, the
    modules imported (a C++ extension registers its ops on import), the libraries loaded through ``torch.ops``, and
    the ops defined from Python (``torch.library`` keeps their names). Listing the dispatcher's ops takes about a
    millisecond; this, microseconds."""
    import torch.library

    return (len(vars(ns)), len(sys.modules), len(getattr(torch.ops, "loaded_libraries", ())),
            len(getattr(torch.library, "_defs", ())))


def install(ns=None) -> list:
    """Tell the router about comfy_kitchen's ops (see the module docstring): each op once, those registered since the
    last call too. ``ns``: the ops' namespace (``torch.ops.comfy_kitchen`` by default; nothing is done while
    comfy_kitchen is not imported). Returns the names newly routed or warned, sorted (the allowed ones are not
    listed)."""
    if ns is None:
        if "comfy_kitchen" not in sys.modules:
            return []
        ns = torch.ops.comfy_kitchen
    if _sizes.get(id(ns)) == _registrations(ns):
        return []  # nothing registered since (the common case: a few len() per deterministic call)
    from jetdet.mode import _h_unrouted, route_op

    handlers = {"adaln": lambda: _modulated(F.layer_norm), "rms_adaln": lambda: _modulated(F.rms_norm)}
    for base, pair, split in (("rms_rope", True, False), ("rms_rope1", False, False),
                              ("rms_rope_split_half", True, True), ("rms_rope_split_half1", False, True)):
        for in_place in (False, True):
            handlers[base + ("_" if in_place else "")] = (
                lambda p=pair, sp=split, ip=in_place: _rms_rope(ns, p, sp, ip))
    new = []
    for name in _ops(ns):
        key = (id(ns), name)
        if key in _done:
            continue
        if name in _ALLOWED:
            _done.add(key)
            continue
        try:
            packet = getattr(ns, name)
        except (AttributeError, RuntimeError):  # a name with kernels but no schema yet: looked at again later
            continue
        _done.add(key)
        if name in handlers:
            h = handlers[name]()
        else:
            why = f"comfy_kitchen's {name} is {_UNROUTED.get(name, _UNKNOWN)} jetdet does not route"
            h = _h_unrouted(why)
            if name == "dequantize_int8_embedding":
                h = _embedding_lookup(h)
        for f in (packet, *(getattr(packet, o) for o in packet.overloads())):
            route_op(f, h)
        new.append(name)
    _sizes[id(ns)] = _registrations(ns)  # after the loop, whose look-ups added attributes
    return sorted(new)
