"""Deterministic attention inside ComfyUI: ComfyUI's own SDPA path, whatever attention the process selected.

ComfyUI picks one attention function per process and binds it into its model modules as ``optimized_attention``
(and ``optimized_attention_masked``). On a CPU that is the sub-quadratic attention, which cuts keys into chunks
sized from the *free memory* and the batch (``attention_sub_quad``), so its numerics change with memory pressure
and batch size; on a GPU it may be sage, xformers or flash attention, none of them batch invariant.
:func:`sdpa_attention` makes every one of those bindings ComfyUI's own ``attention_pytorch`` (the
``F.scaled_dot_product_attention`` path ComfyUI uses by default on NVIDIA GPUs) while a deterministic model call
runs, so jetdet's router sends attention to the batch-invariant :func:`jetdet.ops.attention`; the bindings are
put back when the outermost call returns or raises. It is process-wide while active (ComfyUI runs one prompt at
a time), reentrant, and safe to nest.
"""

from __future__ import annotations

import contextlib
import sys
import threading

_NAMES = ("optimized_attention", "optimized_attention_masked")
_lock = threading.RLock()
_depth = 0
_saved: list = []


def _swap_in() -> None:
    import comfy.ldm.modules.attention as attn

    target = attn.attention_pytorch
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == "comfy.ldm" or name.startswith("comfy.ldm.")):
            continue
        d = getattr(mod, "__dict__", {})
        for g in _NAMES:
            f = d.get(g)
            if callable(f) and f is not target:
                _saved.append((mod, g, f))
                setattr(mod, g, target)


def _swap_out() -> None:
    while _saved:
        mod, g, f = _saved.pop()
        setattr(mod, g, f)


@contextlib.contextmanager
def sdpa_attention():
    """Within this block ComfyUI's models use ``attention_pytorch`` (see the module docstring)."""
    global _depth
    with _lock:
        if _depth == 0:
            try:
                _swap_in()
            except BaseException:
                _swap_out()
                raise
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _swap_out()


def active() -> bool:
    return _depth > 0
