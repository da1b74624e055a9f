"""Opt-in, approximate: softmax attention replaced by linear attention inside a fast-patched model.

``jetdet.patch(model, mode="fast", linear_attention="relu")`` routes the model's
``F.scaled_dot_product_attention`` calls (diffusers' attention processors and plain torch models both use it)
to :func:`jetdet.ops.linear_attention` while the patched forward runs. Linear attention is exact only for
models trained with it (e.g. SANA). For a model trained with softmax attention it is an **approximation**, so:

* it is never on by default;
* during the first ``linear_attention_check`` forwards every replaced call is also computed exactly, and the
  relative L2 error ``‖linear − softmax‖ / ‖softmax‖`` is recorded (``handle.stats()["linear_attention"]``)
  and printed once as a warning;
* calls it cannot replace exactly in form (an attention mask, dropout, ``is_causal``, grouped-query attention,
  fewer than 3 dims, head dims over 128) run unchanged and are counted as ``left_exact``.

The softmax ``scale`` has no counterpart in linear attention and is ignored.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..mode import _arg

FEATURE_MAPS = ("relu", "elu1", "identity")


def parse_option(value):
    """``linear_attention`` option -> feature map name or None (off)."""
    if value is None or value is False:
        return None
    if value is True:
        return "relu"
    if isinstance(value, str) and value in FEATURE_MAPS:
        return value
    raise ValueError(f"linear_attention: expected False, True or one of {FEATURE_MAPS}, got {value!r}")


class LinearAttentionSwap:
    """State of the swap for one patched model: the feature map, the error check and the counters."""

    def __init__(self, feature_map: str, check_forwards: int = 1):
        if isinstance(check_forwards, bool) or not isinstance(check_forwards, int) or check_forwards < 0:
            raise ValueError(f"linear_attention_check: expected an int >= 0 (forwards whose attention calls are "
                             f"also computed exactly to measure the error), got {check_forwards!r}")
        self.feature_map = feature_map
        self.check_forwards = check_forwards
        self.forwards = 0
        self.replaced = 0
        self.left_exact: dict[str, int] = {}
        self.errors: list[float] = []
        self._warned = False

    def stats(self) -> dict:
        errs = self.errors
        return {
            "feature_map": self.feature_map, "approximate": True, "forwards": self.forwards,
            "replaced": self.replaced, "left_exact": dict(self.left_exact), "checked": len(errs),
            "rel_err_mean": sum(errs) / len(errs) if errs else None, "rel_err_max": max(errs) if errs else None,
        }

    def mode(self) -> _SwapMode:
        self.forwards += 1
        return _SwapMode(self, checking=self.forwards <= self.check_forwards)

    def after_forward(self) -> None:
        if self.errors and not self._warned:
            self._warned = True
            s = self.stats()
            warnings.warn(
                f"jetdet fast mode: linear attention ({self.feature_map}) replaces softmax attention and is an "
                f"approximation; measured relative L2 error of the attention outputs: mean {s['rel_err_mean']:.3f}, "
                f"max {s['rel_err_max']:.3f} over {s['checked']} calls", stacklevel=3)


def _why_not(args, kwargs):
    q, k, v = (_arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return "non-tensor inputs", None
    if _arg(args, kwargs, 3, "attn_mask") is not None:
        return "attn_mask", None
    if _arg(args, kwargs, 4, "dropout_p", 0.0):
        return "dropout_p", None
    if _arg(args, kwargs, 5, "is_causal", False):
        return "is_causal", None
    if kwargs.get("enable_gqa", False) and k.shape[-3] != q.shape[-3]:
        return "grouped-query attention", None
    if q.dim() < 3 or q.shape[:-2] != k.shape[:-2] or k.shape[:-1] != v.shape[:-1]:
        return "shape", None
    if q.shape[-1] > 128 or v.shape[-1] > 128:
        return "head dim > 128", None
    return None, (q, k, v)


class _SwapMode(TorchFunctionMode):
    def __init__(self, swap: LinearAttentionSwap, checking: bool):
        super().__init__()
        self.swap = swap
        self.checking = checking

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        why, qkv = _why_not(args, kwargs)
        if why:
            self.swap.left_exact[why] = self.swap.left_exact.get(why, 0) + 1
            return func(*args, **kwargs)
        from ..ops import linear_attention

        q, k, v = qkv
        lead = q.shape[:-2]
        q4, k4, v4 = (t.reshape(-1, 1, *t.shape[-2:]) for t in (q, k, v))
        out = linear_attention(q4, k4, v4, feature_map=self.swap.feature_map)
        out = out.reshape(*lead, q.shape[-2], v.shape[-1])
        self.swap.replaced += 1
        if self.checking:
            exact = func(*args, **kwargs).float()
            num = (out.float() - exact).norm().item()
            den = exact.norm().item()
            self.swap.errors.append(num / den if den > 0 else (0.0 if num == 0 else math.inf))
        return out
