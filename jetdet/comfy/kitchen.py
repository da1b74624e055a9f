"""comfy_kitchen's fused ops in deterministic mode (newer ComfyUI: 0.7, 0.33).

Newer ComfyUI calls the fused kernels of ``comfy_kitchen`` (a package it requires) from its models: Flux's RoPE
(``apply_rope``), LTX's and LTX-2's RMS-norm adaptive layer norm (``rms_adaln``), the RMS norm + RoPE of Lumina,
Cosmos, Ernie and others (``rms_rope*``), and quantized matrix multiplies. They are custom ops
(``torch.ops.comfy_kitchen.*``): the deterministic router sees each as one call and, not knowing it, ran the library's
kernel (its own CUDA kernel on a GPU) with no warning, so the batch-invariance guarantee silently did not cover it.
:func:`install` tells the router about them:

- ``adaln``, ``rms_adaln``, ``rms_rope*`` (a norm over the last dimension, a reduction): computed from their
  definitions with jetdet's routed ``layer_norm`` / ``rms_norm`` and elementwise arithmetic (the RoPE part through
  comfy_kitchen's own elementwise op), in the input's dtype, as the library's op returns it;
- ``apply_rope*``, ``quantize_*``/``dequantize_*``: elementwise (each output element from its own inputs), left as
  they are;
- the quantized matrix multiplies and ``na3d`` (neighbourhood attention): not routed, the named fallback warning.

It runs once comfy_kitchen is imported (ComfyUI imports it at start-up), at the first deterministic model call.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

_done: set = set()

_UNROUTED = {
    "scaled_mm_nvfp4": "a quantized matrix multiply",
    "scaled_mm_mxfp8": "a quantized matrix multiply",
    "scaled_mm_svdquant_w4a4": "a quantized matrix multiply",
    "gemv_awq_w4a16": "a quantized matrix multiply",
    "na3d": "neighbourhood attention",
}


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


def install(ns=None) -> list:
    """Route comfy_kitchen's ops in deterministic mode (see the module docstring); once per op. ``ns``: the ops'
    namespace (``torch.ops.comfy_kitchen`` by default; nothing is done while comfy_kitchen is not imported). Returns
    the names newly routed."""
    if ns is None:
        if "comfy_kitchen" not in sys.modules:
            return []
        ns = torch.ops.comfy_kitchen
    from jetdet.mode import route_op

    new = []
    handlers = {"adaln": lambda: _modulated(F.layer_norm), "rms_adaln": lambda: _modulated(F.rms_norm)}
    for base, pair, split in (("rms_rope", True, False), ("rms_rope1", False, False),
                              ("rms_rope_split_half", True, True), ("rms_rope_split_half1", False, True)):
        for in_place in (False, True):
            handlers[base + ("_" if in_place else "")] = (
                lambda p=pair, sp=split, ip=in_place: _rms_rope(ns, p, sp, ip))
    for name, make in handlers.items():
        key = (id(ns), name)
        if key in _done or not hasattr(ns, name):
            continue
        packet = getattr(ns, name)
        h = make()
        for f in (packet, *(getattr(packet, o) for o in packet.overloads())):
            route_op(f, h)
        _done.add(key)
        new.append(name)
    for name, what in _UNROUTED.items():
        key = (id(ns), name)
        if key in _done or not hasattr(ns, name):
            continue
        packet = getattr(ns, name)
        why = f"comfy_kitchen's {name} is {what} jetdet does not route"
        for f in (packet, *(getattr(packet, o) for o in packet.overloads())):
            route_op(f, unrouted=why)
        _done.add(key)
        new.append(name)
    return new
