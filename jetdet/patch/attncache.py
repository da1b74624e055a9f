"""Opt-in, approximate: attention block masks cached across steps and CFG branches inside a fast-patched model.

``jetdet.patch(model, mode="fast", attention_cache=True)`` (or a dict of the settings below) intercepts the
model's ``F.scaled_dot_product_attention`` calls while the patched forward runs:

* At a **refresh** the call runs exactly, and :func:`jetdet.ops.attention_block_mask` picks, per query block,
  the KV blocks that carry ``mass`` of the attention. The masks of all batch rows are merged (a block kept
  for any row is kept for all), so one mask serves every row: both CFG branches of a batched call, any rows
  the step cache runs on their own, and the second forward when CFG runs as two forwards.
* Until the mask is ``refresh`` denoising steps old, the call runs as
  :func:`jetdet.ops.block_sparse_attention` over the cached mask, whose work is proportional to the mask's
  density. Attention calls are told apart by their order within a forward and their shapes; a step is a
  distinct timestep, so both forwards of a separate-CFG step count as one.
* Masks are dropped when the step cache resets (a new trajectory, a shape or model change, an eviction) and
  when the timestep goes up (a new trajectory, also with ``budget=0``); at most ``max_sites`` masks are kept.

Dropping blocks is an **approximation** of softmax attention (``mass=1.0`` keeps every block and is exact up
to rounding), so it is never on by default, and during the first ``check`` reused forwards each reused call
is also computed exactly: the relative L2 error is recorded (``handle.stats()["attention_cache"]``) and
printed once. Calls it cannot take (an attention mask, dropout, ``is_causal``, grouped-query attention, not
``[B, H, N, D]``, head dims over ``jetdet.ops.fast.MAX_HEAD_DIM``, 128) run unchanged and are counted as ``left_exact``.

Where the time goes: the block-sparse kernel is the Triton one on CUDA. On CPU the torch path of
``block_sparse_attention`` runs a gather per query block and is *slower* than torch's dense attention at the
sizes of the bundled model; ``bench/attention_cache.py`` measures both the error and the wall time.
"""

from __future__ import annotations

import warnings

import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ._sdpa import MAX_HEAD_DIM, StepClock, error_summary, rel_l2, sdpa_args, sdpa_qkv

DEFAULTS = {"mass": 0.95, "block_size": 64, "pool_size": None, "refresh": 3, "check": 1, "max_sites": 256}


def parse_option(value) -> dict | None:
    """``attention_cache`` option -> settings dict, or None when off. Errors name the option and key."""
    if value is None or value is False:
        return None
    if value is True:
        return dict(DEFAULTS)
    if not isinstance(value, dict):
        raise ValueError(f"attention_cache: expected False, True or a dict of settings {sorted(DEFAULTS)}, "
                         f"got {value!r}")
    unknown = set(value) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"attention_cache: unknown setting(s) {sorted(unknown)}; accepted: {sorted(DEFAULTS)}")
    s = {**DEFAULTS, **value}
    from ..ops.fast import BLOCK_SIZES, POOL_SIZES

    if not isinstance(s["mass"], (int, float)) or isinstance(s["mass"], bool) or not 0.0 < s["mass"] <= 1.0:
        raise ValueError(f"attention_cache['mass']: expected a float in (0, 1], got {s['mass']!r}")
    if s["block_size"] not in BLOCK_SIZES:
        raise ValueError(f"attention_cache['block_size']: expected one of {BLOCK_SIZES}, got {s['block_size']!r}")
    if s["pool_size"] is not None and (s["pool_size"] not in POOL_SIZES or s["pool_size"] > s["block_size"]):
        raise ValueError(f"attention_cache['pool_size']: expected None or one of {POOL_SIZES} and <= block_size, "
                         f"got {s['pool_size']!r}")
    for key, low in (("refresh", 1), ("check", 0), ("max_sites", 1)):
        v = s[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"attention_cache[{key!r}]: expected an int >= {low}, got {v!r}")
    s["mass"] = float(s["mass"])
    return s


class AttentionCache:
    """Cached block masks and counters for one patched model."""

    def __init__(self, settings: dict, epoch_fn=None):
        self.s = settings
        self._clock = StepClock(epoch_fn)
        self._masks: dict[tuple, tuple] = {}  # site key -> (BlockMask shared by the batch, step index)
        self.forwards = 0
        self.refreshed = 0
        self.reused = 0
        self.blocks_visited = 0
        self.dense_blocks = 0
        self.left_exact: dict[str, int] = {}
        self.errors: list[float] = []
        self._checked_forwards = 0
        self._warned = False

    def clear(self) -> None:
        self._masks.clear()
        self._clock.forget_step()

    def stats(self) -> dict:
        return {
            "approximate": True, "mass": self.s["mass"], "block_size": self.s["block_size"],
            "refresh": self.s["refresh"], "forwards": self.forwards, "masks": len(self._masks),
            "refreshed": self.refreshed, "reused": self.reused, "left_exact": dict(self.left_exact),
            "density_reused": self.blocks_visited / self.dense_blocks if self.dense_blocks else None,
            **error_summary(self.errors),
        }

    def mode(self, t) -> _CacheMode:
        """The interception for one patched forward at timestep(s) ``t`` (one host sync to read it)."""
        self.forwards += 1
        if self._clock.begin(t):
            self._masks.clear()  # the timestep went up: a new trajectory
        checking = self._checked_forwards < self.s["check"]
        return _CacheMode(self, checking)

    def after_forward(self, mode: _CacheMode) -> None:
        if mode.reused_here and mode.checking:
            self._checked_forwards += 1
        if self.errors and not self._warned:
            self._warned = True
            s = self.stats()
            warnings.warn(
                f"jetdet fast mode: attention over cached block masks (mass {s['mass']}, block {s['block_size']}) "
                f"approximates softmax attention; measured relative L2 error of the attention outputs: mean "
                f"{s['rel_err_mean']:.4f}, max {s['rel_err_max']:.4f} over {s['checked']} calls", stacklevel=3)

    # -------------------------------------------------------------------------------------- per call
    def attend(self, func, args, kwargs, mode: _CacheMode):
        why, qkv = _why_not(args, kwargs)
        if why:
            self.left_exact[why] = self.left_exact.get(why, 0) + 1
            return func(*args, **kwargs)
        from ..ops import attention_block_mask, block_mask_from_bool, block_sparse_attention, block_sparse_work

        if self._clock.epoch_changed():
            self._masks.clear()
        q, k, v = qkv
        key = (self._clock.site(), *q.shape[1:], k.shape[2], v.shape[3], q.dtype, q.device)
        step = self._clock.step
        bs = self.s["block_size"]
        ent = self._masks.get(key)
        if ent is None or step - ent[1] >= self.s["refresh"]:
            out = func(*args, **kwargs)
            bm = attention_block_mask(q, k, bs, self.s["mass"], pool_size=self.s["pool_size"])
            shared = block_mask_from_bool(bm.mask.any(dim=0, keepdim=True), bs)
            if key not in self._masks and len(self._masks) >= self.s["max_sites"]:
                self._masks.pop(next(iter(self._masks)))
            self._masks[key] = (shared, step)
            self.refreshed += 1
            return out
        bm = ent[0]
        out = block_sparse_attention(q, k, v, bm, bs, scale=sdpa_args(args, kwargs).scale)
        work = block_sparse_work(bm, batch=q.shape[0])
        self.blocks_visited += work["blocks_visited"]
        self.dense_blocks += work["dense_blocks"]
        self.reused += 1
        mode.reused_here = True
        if mode.checking:
            self.errors.append(rel_l2(out, func(*args, **kwargs)))
        return out


def _why_not(args, kwargs):
    why, qkv = sdpa_qkv(args, kwargs)
    if why:
        return why, None
    q, k, v = qkv
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3]:
        return "not [B, H, N, D] with matching heads", None
    if q.shape[-1] != k.shape[-1] or q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return "head dim", None
    if q.shape[2] == 0 or k.shape[2] == 0 or q.shape[0] == 0:
        return "empty", None
    return None, (q, k, v)


class _CacheMode(TorchFunctionMode):
    def __init__(self, cache: AttentionCache, checking: bool):
        super().__init__()
        self.cache = cache
        self.checking = checking
        self.reused_here = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self.cache.attend(func, args, kwargs, self)
        return func(*args, **kwargs)
