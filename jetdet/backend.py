"""Which implementation runs an op: the Triton kernels or the batch-invariant torch path.

* ``auto`` (default): CUDA tensors use Triton; CPU tensors use the torch path.
* ``JETDET_BACKEND=triton`` forces the Triton kernels, also for CPU tensors, which then need
  ``TRITON_INTERPRET=1`` set before triton is first imported.
* ``JETDET_BACKEND=torch`` forces the torch path everywhere.

The variable is read on every call, so tests can switch it with ``monkeypatch.setenv``.

:func:`run_body` is how every caller runs an op body (``jetdet.ops`` after its checks, the deterministic-mode
router's direct CPU route).
"""

from __future__ import annotations

import contextlib
import importlib
import re

import torch

from . import _paths

#: Tensor types an op body may be handed directly: no subclass (fake, functional, ...) to dispatch through.
PLAIN = (torch.Tensor, torch.nn.Parameter)
_get_fill = torch._C._get_deterministic_fill_uninitialized_memory
_set_fill = torch._C._set_deterministic_fill_uninitialized_memory


def run_body(fn, *args):
    """Call an op body with torch's NaN fill of new tensors off.

    Under ``torch.use_deterministic_algorithms`` (which deterministic mode turns on) every new tensor is first
    filled with NaN (``torch.utils.deterministic.fill_uninitialized_memory``). The op bodies write every
    element they read back, so that fill only costs time. It is turned off for the body alone, by the thread
    that found it on, and turned back on afterwards. It cost ~20% of a TinyUNet forward when every call
    allocated fresh im2col buffers; with the per-thread scratch buffers of the torch paths the difference is
    within noise (``python bench/cpu_costs.py``), and the switch is kept because it costs nothing."""
    fill = _get_fill()
    if fill:
        _set_fill(False)
    try:
        return fn(*args)
    finally:
        if fill:
            _set_fill(True)


@contextlib.contextmanager
def fill_left_on():
    """Inside, :func:`run_body` leaves torch's NaN fill of new tensors as it finds it (on, under deterministic
    mode), for measuring what switching it off saves (``bench/cpu_costs.py``). Process-wide: not for threads
    running ops meanwhile."""
    global _get_fill
    saved = _get_fill
    _get_fill = lambda: False  # "off already": run_body then never switches it off
    try:
        yield
    finally:
        _get_fill = saved


_VALID = ("auto", "triton", "torch")
_NAME = "JETDET_BACKEND"


def overridden() -> bool:
    """Whether JETDET_BACKEND is set at all (the hot path only needs this; ``_paths.getenv`` reads os.environ's own
    mapping, as ``name in os.environ`` through Mapping.__contains__ and a KeyError cost ~3 us per op call)."""
    return _paths.getenv(_NAME) is not None


def requested() -> str:
    val = _paths.getenv(_NAME)
    if val is None:
        return "auto"
    val = val.strip().lower() or "auto"
    if val not in _VALID:
        raise ValueError(f"JETDET_BACKEND={val!r}: expected one of {', '.join(_VALID)}")
    return val


def interpreter_enabled() -> bool:
    return (_paths.getenv("TRITON_INTERPRET") or "0") not in ("", "0")


def _release(version: str) -> tuple[int, int]:
    """``"3.6.0+git1a2b"`` -> ``(3, 6)``."""
    parts = re.findall(r"\d+", version)[:2]
    return tuple(int(p) for p in parts) + (0,) * (2 - len(parts))


def interpreter_problem(triton_version: str | None = None, numpy_version: str | None = None) -> str | None:
    """Why the installed Triton interpreter cannot run jetdet's kernels here, or None.

    Triton's interpreter up to 3.6 turns a loop bound into a Python int with ``int()`` of a one-element array,
    which numpy 2.4 made an error, so every kernel with a loop over a runtime bound (nearly all of them) stops
    with "only 0-dimensional arrays can be converted to Python scalars". Triton 3.7 fixed it. torch 2.11 pins
    Triton 3.6, so that pair with a current numpy is a real install."""
    if triton_version is None:
        import triton

        triton_version = triton.__version__
    if numpy_version is None:
        import numpy

        numpy_version = numpy.__version__
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (
            f"the Triton interpreter (TRITON_INTERPRET=1) of triton {triton_version} cannot run with numpy "
            f"{numpy_version}: its loop bounds call int() on a one-element array, an error since numpy 2.4 (fixed in "
            "triton 3.7). Install 'numpy<2.4' or triton>=3.7 to run the Triton kernels on CPU; the default CPU "
            "path (JETDET_BACKEND unset or torch) does not use the interpreter"
        )
    return None


_interpreter_ok = False


def _check_interpreter() -> None:
    global _interpreter_ok
    problem = interpreter_problem()
    if problem:
        raise RuntimeError(f"JETDET_BACKEND=triton with CPU tensors: {problem}")
    _interpreter_ok = True


NO_TRITON = ("jetdet runs CUDA tensors through its Triton kernels, and this Python cannot import triton (ComfyUI's "
             "Windows portable and desktop builds ship without it): install it into the Python that runs this (Linux: "
             "pip install triton; Windows: pip install triton-windows) and restart")


def raise_if_no_triton(e: ModuleNotFoundError) -> None:
    """The clear error (:data:`NO_TRITON`) in place of ``e`` when ``e`` is triton itself missing (a missing submodule
    of an installed triton is not this); otherwise nothing: the caller re-raises ``e``."""
    if e.name == "triton":
        raise RuntimeError(NO_TRITON) from e


def import_launcher(module: str):
    """``import_module(module)`` for a Triton launcher module, with a clear error when triton is not installed."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise_if_no_triton(e)
        raise


def backend_for(t: torch.Tensor) -> str:
    """Return ``"triton"`` or ``"torch"`` for an op whose main input is ``t``."""
    req = requested()
    dev = t.device.type
    if req == "torch":
        return "torch"
    if req == "auto":
        return "triton" if dev == "cuda" else "torch"
    # forced triton
    if dev == "cpu":
        if not interpreter_enabled():
            raise RuntimeError(
                "JETDET_BACKEND=triton with CPU tensors needs TRITON_INTERPRET=1, set before triton is imported"
            )
        if not _interpreter_ok:
            _check_interpreter()
    if dev not in ("cpu", "cuda"):
        raise RuntimeError(f"JETDET_BACKEND=triton: device {dev!r} is not supported (expected cuda or cpu)")
    return "triton"
