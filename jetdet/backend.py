"""Which implementation runs an op: the Triton kernels or the batch-invariant torch path.

* ``auto`` (default): CUDA tensors use Triton; CPU tensors use the torch path.
* ``JETDET_BACKEND=triton`` forces the Triton kernels, also for CPU tensors, which then need
  ``TRITON_INTERPRET=1`` set before triton is first imported.
* ``JETDET_BACKEND=torch`` forces the torch path everywhere.

The variable is read on every call, so tests can switch it with ``monkeypatch.setenv``.
"""

from __future__ import annotations

import os

import torch

_VALID = ("auto", "triton", "torch")
_NAME = "JETDET_BACKEND"
# os.environ's own mapping, checked directly by overridden(): `name in os.environ` goes through
# Mapping.__contains__ and a KeyError, ~3 us, on every op call. Both attributes exist on CPython >= 3.2.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(_NAME) if hasattr(os.environ, "encodekey") else None


def overridden() -> bool:
    """Whether JETDET_BACKEND is set at all (the hot path only needs this)."""
    if _ENV_DATA is not None and _ENV_KEY is not None:
        return _ENV_KEY in _ENV_DATA
    return _NAME in os.environ  # pragma: no cover - other Pythons


def requested() -> str:
    if not overridden():
        return "auto"
    val = os.environ.get(_NAME, "auto").strip().lower() or "auto"
    if val not in _VALID:
        raise ValueError(f"JETDET_BACKEND={val!r}: expected one of {', '.join(_VALID)}")
    return val


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_for(t: torch.Tensor) -> str:
    """Return ``"triton"`` or ``"torch"`` for an op whose main input is ``t``."""
    req = requested()
    dev = t.device.type
    if req == "torch":
        return "torch"
    if req == "auto":
        return "triton" if dev == "cuda" else "torch"
    # forced triton
    if dev == "cpu" and not interpreter_enabled():
        raise RuntimeError(
            "JETDET_BACKEND=triton with CPU tensors needs TRITON_INTERPRET=1, set before triton is imported"
        )
    if dev not in ("cpu", "cuda"):
        raise RuntimeError(f"JETDET_BACKEND=triton: device {dev!r} is not supported (expected cuda or cpu)")
    return "triton"
