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
  fewer than 3 dims, head dims over ``jetdet.ops.fast.MAX_HEAD_DIM``, 128) run unchanged and are counted as
  ``left_exact``.

The softmax ``scale`` has no counterpart in linear attention and is ignored.
"""

from __future__ import annotations

import warnings

import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ._sdpa import MAX_HEAD_DIM, StepClock, error_summary, rel_l2, sdpa_qkv

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
    """State of the swap for one patched model: the feature map, the error check, the cached K/V states and
    the counters.

    ``state_refresh`` > 1 keeps each attention call's K/V state (``φ(K)ᵀV`` and ``Σφ(K)``, per item and head)
    and applies it to the new queries until it is ``state_refresh`` timesteps old, skipping the K/V pass; a
    step is a distinct timestep, so with CFG as two forwards the second forward reuses the first one's state
    (the other branch's keys: a further approximation). A state is reused only for a call with the same
    batch size it was built from (rows are not matched up, so a compacted call recomputes), and all states are
    dropped when the step cache resets."""

    def __init__(self, feature_map: str, check_forwards: int = 1, state_refresh: int = 1, epoch_fn=None):
        if isinstance(check_forwards, bool) or not isinstance(check_forwards, int) or check_forwards < 0:
            raise ValueError(f"linear_attention_check: expected an int >= 0 (forwards whose attention calls are "
                             f"also computed exactly to measure the error), got {check_forwards!r}")
        if isinstance(state_refresh, bool) or not isinstance(state_refresh, int) or state_refresh < 1:
            raise ValueError(f"linear_attention_state_refresh: expected an int >= 1 (timesteps a cached K/V "
                             f"state is reused for; 1 = never reused), got {state_refresh!r}")
        self.feature_map = feature_map
        self.check_forwards = check_forwards
        self.state_refresh = state_refresh
        self._clock = StepClock(epoch_fn)
        self._states: dict[tuple, tuple] = {}  # site key -> (LinearAttentionState, step index)
        self.forwards = 0
        self.replaced = 0
        self.states_computed = 0
        self.states_reused = 0
        self.left_exact: dict[str, int] = {}
        self.errors: list[float] = []
        self._warned = False

    def clear(self) -> None:
        self._states.clear()
        self._clock.forget_step()

    def stats(self) -> dict:
        return {
            "feature_map": self.feature_map, "approximate": True, "forwards": self.forwards,
            "replaced": self.replaced, "left_exact": dict(self.left_exact), **error_summary(self.errors),
            "state_refresh": self.state_refresh, "states_computed": self.states_computed,
            "states_reused": self.states_reused,
        }

    def mode(self, t=None) -> _SwapMode:
        self.forwards += 1
        if self.state_refresh > 1 and self._clock.begin(t):  # one host sync, only when states are kept
            self._states.clear()  # the timestep went up: a new trajectory
        return _SwapMode(self, checking=self.forwards <= self.check_forwards)

    def attend(self, q4, k4, v4):
        """Linear attention for one call, through the cached K/V state when one is fresh enough."""
        from ..ops import linear_attention

        fmap = self.feature_map
        if self.state_refresh == 1:
            self.states_computed += 1
            return linear_attention(q4, k4, v4, feature_map=fmap)
        if self._clock.epoch_changed():  # the step cache reset (asked after it decided this call)
            self._states.clear()
        key = (self._clock.site(), *q4.shape[1:], *k4.shape[1:], v4.shape[-1], q4.dtype, q4.device)
        step = self._clock.step
        ent = self._states.get(key)
        if ent is not None and ent[0].kv.shape[0] == q4.shape[0] and step - ent[1] < self.state_refresh:
            self.states_reused += 1
            return linear_attention(q4, None, None, feature_map=fmap, state=ent[0])
        out, st = linear_attention(q4, k4, v4, feature_map=fmap, return_state=True)
        self._states[key] = (st, step)
        self.states_computed += 1
        return out

    def after_forward(self) -> None:
        if self.errors and not self._warned:
            self._warned = True
            s = self.stats()
            warnings.warn(
                f"jetdet fast mode: linear attention ({self.feature_map}) replaces softmax attention and is an "
                f"approximation; measured relative L2 error of the attention outputs: mean {s['rel_err_mean']:.3f}, "
                f"max {s['rel_err_max']:.3f} over {s['checked']} calls", stacklevel=3)


def _why_not(args, kwargs):
    why, qkv = sdpa_qkv(args, kwargs)
    if why:
        return why, None
    q, k, v = qkv
    if kwargs.get("enable_gqa", False) and k.shape[-3] != q.shape[-3]:
        return "grouped-query attention", None
    if q.dim() < 3 or q.shape[:-2] != k.shape[:-2] or k.shape[:-1] != v.shape[:-1]:
        return "shape", None
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return f"head dim > {MAX_HEAD_DIM}", None
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
        q, k, v = qkv
        lead = q.shape[:-2]
        q4, k4, v4 = (t.reshape(-1, 1, *t.shape[-2:]) for t in (q, k, v))
        out = self.swap.attend(q4, k4, v4).reshape(*lead, q.shape[-2], v.shape[-1])
        self.swap.replaced += 1
        if self.checking:
            self.swap.errors.append(rel_l2(out, func(*args, **kwargs)))
        return out
