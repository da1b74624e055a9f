"""Pieces shared by the fast patch's attention replacements (:mod:`.linattn`, :mod:`.attncache`): reading an
``F.scaled_dot_product_attention`` call, the measured error of a replacement, and the sampler-step clock that
ages cached per-call state."""

from __future__ import annotations

import math

import torch

from ..mode import sdpa_args
from ..ops.fast import MAX_HEAD_DIM

__all__ = ["MAX_HEAD_DIM", "StepClock", "error_summary", "rel_l2", "sdpa_args", "sdpa_qkv"]


def sdpa_qkv(args, kwargs):
    """``(why_not, (q, k, v))`` for an SDPA call: ``why_not`` names what keeps the call exact (non-tensor
    inputs, a mask, dropout, ``is_causal``), else None. Callers add their own shape checks; a head dim over
    :data:`MAX_HEAD_DIM` (the fast attention ops' limit) is one."""
    a = sdpa_args(args, kwargs)
    q, k, v = a.query, a.key, a.value
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return "non-tensor inputs", None
    if a.attn_mask is not None:
        return "attn_mask", None
    if a.dropout_p:
        return "dropout_p", None
    if a.is_causal:
        return "is_causal", None
    return None, (q, k, v)


def rel_l2(out: torch.Tensor, exact: torch.Tensor) -> float:
    """``‖out − exact‖ / ‖exact‖`` in fp32 (0 when both are zero, inf when only ``exact`` is). Host syncs."""
    exact = exact.float()
    num = (out.float() - exact).norm().item()
    den = exact.norm().item()
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def error_summary(errors: list[float]) -> dict:
    """``checked``, ``rel_err_mean``, ``rel_err_max`` (None when nothing was checked) of measured errors."""
    return {"checked": len(errors), "rel_err_mean": sum(errors) / len(errors) if errors else None,
            "rel_err_max": max(errors) if errors else None}


class StepClock:
    """Sampler steps as the patched forward sees them, to age state cached per attention call.

    :meth:`begin` (once per patched forward, one host sync to read the timestep) counts a step per distinct
    timestep, so both forwards of a separate-CFG step are one step, and returns True when the timestep went up
    (a new trajectory, the step cache's own rule), when the caller must drop its state. :meth:`site` numbers
    the attention calls within the forward. :meth:`epoch_changed` tells whether the step cache reset since the
    last look; it is asked at the first attention call, after the controller has made this call's decisions."""

    def __init__(self, epoch_fn=None):
        self._epoch_fn = epoch_fn or (lambda: 0)
        self._epoch = None
        self.step = -1
        self._step_t = None
        self._prev_t = None
        self._site = 0

    def begin(self, t) -> bool:
        step_t = float(t.max()) if isinstance(t, torch.Tensor) and t.numel() else None
        if step_t is None or step_t != self._step_t:
            self.step += 1
            self._step_t = step_t
        went_up = step_t is not None and self._prev_t is not None and step_t > self._prev_t
        self._prev_t = step_t
        self._site = 0
        return went_up

    def site(self) -> int:
        self._site += 1
        return self._site - 1

    def epoch_changed(self) -> bool:
        e = self._epoch_fn()
        if e == self._epoch:
            return False
        self._epoch = e
        return True

    def forget_step(self) -> None:
        """The next :meth:`begin` counts a new step even at the same timestep (after a clear)."""
        self._step_t = None
