"""Checksums, environment fingerprints and an output matcher for determinism checks.

* ``checksum(t)``: SHA-256 hex of dtype + shape + the raw bytes (row-major), the same for the same values on
  any device. Bitwise: ``-0.0`` and ``0.0`` differ, NaNs with different payloads differ.
* ``fingerprint()``: what produced a result (device, driver, library versions, threads, platform).
* ``match(a, b, tolerance)``: compares values (never hashes), in float64 on CPU, and says how they differ.

Nothing here probes a device at import time.
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
from dataclasses import dataclass

import torch

__all__ = ["checksum", "fingerprint", "match", "MatchResult", "TOLERANCES"]

TOLERANCES = ("exact", "1e-6", "1e-4", "structural")
_NUMERIC = {"1e-6": 1e-6, "1e-4": 1e-4}
STRUCTURAL_REL_RMS = 1e-2  # structural: rms(a - b) <= 1e-2 * rms(b) over finite elements ...
STRUCTURAL_ABS_RMS = 1e-6  # ... or rms(a - b) <= 1e-6 (absolute shortcut for an all-zero reference)


def _dname(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"{name}: expected a dense (strided) tensor, got layout {t.layout}")
    if t.is_meta:
        raise ValueError(f"{name}: a meta tensor has no values to hash or compare")
    if t.is_quantized:  # its bytes leave out the scale and zero point
        raise ValueError(f"{name}: expected a tensor of values, got a quantized one ({_dname(t.dtype)}); pass "
                         f"{name}.dequantize() (the values) or {name}.int_repr() (the stored integers)")
    return t


def _cpu_dense(t: torch.Tensor) -> torch.Tensor:
    """Detached, conj/neg views resolved, on CPU, contiguous."""
    return t.detach().resolve_conj().resolve_neg().to("cpu").contiguous()


def _bytes_2d(t: torch.Tensor) -> torch.Tensor:
    """[numel, itemsize] uint8 view of a contiguous CPU tensor (any dtype; bfloat16 included)."""
    return t.reshape(-1).view(torch.uint8).reshape(t.numel(), t.element_size())


def checksum(tensor: torch.Tensor) -> str:
    """SHA-256 hex digest of ``dtype``, ``shape`` and the row-major bytes of ``tensor``.

    Exactly: ``sha256(f"jetdet.checksum.v1|{dtype}|{shape}|".encode() + bytes)``, where ``dtype`` is torch's name
    without ``torch.`` (``float32``, ``bfloat16``), ``shape`` Python's repr of the shape tuple (``(1, 16, 32, 32)``,
    ``(5,)``, ``()``), and ``bytes`` the values in C order in the machine's byte order (little-endian on x86-64 and
    ARM64); none for an empty tensor. Not the SHA-256 of the bytes alone.

    The same for the same values on any device or memory layout (the tensor is copied to CPU and made
    contiguous). Bitwise: any flipped bit, ``-0.0`` vs ``0.0``, or a different NaN payload changes it.
    """
    t = _cpu_dense(_check_tensor("tensor", tensor))
    h = hashlib.sha256()
    h.update(f"jetdet.checksum.v1|{_dname(t.dtype)}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(_bytes_2d(t).numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- fingerprint


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def fingerprint(device=None) -> dict:
    """What a result was produced on: a flat dict of strings, ints and ``None``.

    ``device``: ``None`` (the current CUDA device when CUDA is available, else the CPU), or a device.
    Keys: ``device`` (CUDA device name or CPU model), ``device_type``, ``cpu``, ``capability``, ``cuda``
    (torch's CUDA runtime version), ``cuda_driver``, ``cudnn``, ``torch``, ``triton``, ``jetdet``,
    ``num_threads`` (``torch.get_num_threads()``), ``python``, ``platform``, ``machine``,
    ``triton_interpret``, ``jetdet_backend``. Keys that do not apply are ``None``.
    """
    import jetdet

    cpu = _cpu_model()
    if device is None:
        dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
        backend = getattr(torch, dev.type, None)
        if dev.type == "meta" or (dev.type != "cpu" and not (backend is not None and backend.is_available())):
            raise ValueError(f"device: {str(dev)!r}, which this machine does not have (its fingerprint would be the "
                             "CPU's under that name)")
    info = {
        "device": cpu,
        "device_type": dev.type,
        "cpu": cpu,
        "capability": None,
        "cuda": torch.version.cuda,
        "cuda_driver": None,
        "cudnn": None,
        "torch": torch.__version__,
        "triton": _version("triton"),  # metadata only: importing triton is not needed
        "jetdet": getattr(jetdet, "__version__", None),
        "num_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "jetdet_backend": os.environ.get("JETDET_BACKEND"),
    }
    if dev.type == "cuda" and torch.cuda.is_available():
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info["device"] = props.name
        info["capability"] = f"sm_{props.major}{props.minor}"
        get_driver = getattr(torch._C, "_cuda_getDriverVersion", None)
        if get_driver is not None:
            v = int(get_driver())  # e.g. 12040 -> "12.4"
            info["cuda_driver"] = f"{v // 1000}.{(v % 1000) // 10}"
        if torch.backends.cudnn.is_available():
            info["cudnn"] = torch.backends.cudnn.version()
    elif dev.type not in ("cpu", "cuda"):
        info["device"] = str(dev)
    return info


# ------------------------------------------------------------------------------------------------ match


@dataclass
class MatchResult:
    """Outcome of :func:`match`. ``bool(result)`` is ``result.ok``.

    ``mismatches`` counts elements outside the tolerance's elementwise rule (for ``structural``: a different
    NaN/Inf class, or a finite difference above ``1e-2 * (1 + |b|)``); ``first_mismatch`` is the row-major
    first such index. ``max_abs_err`` / ``max_rel_err`` are over elements where both values are finite
    (``max_rel_err`` over those with ``b != 0``); ``rel_rms`` is ``rms(a - b) / rms(b)`` over the same
    elements (``inf`` if ``rms(b) == 0 < rms(a - b)``). ``message`` explains a failure that is not about
    values (shape or dtype)."""

    ok: bool
    tolerance: str
    shape_a: tuple
    shape_b: tuple
    dtype_a: str
    dtype_b: str
    numel: int
    mismatches: int
    max_abs_err: float
    max_rel_err: float
    rel_rms: float
    first_mismatch: tuple | None
    message: str = ""

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        head = f"{'MATCH' if self.ok else 'MISMATCH'} {self.tolerance}"
        if self.message:
            return f"{head}: {self.message}"
        if self.tolerance == "exact" and self.mismatches == 0:
            return f"{head}: 0 of {self.numel} differ"
        s = f"{head}: {self.mismatches} of {self.numel} elements differ"
        if self.numel:
            s += f", max abs {self.max_abs_err:.3g}, max rel {self.max_rel_err:.3g}"
        if self.tolerance == "structural" and math.isinf(self.rel_rms) and self.mismatches == 0:
            s += (f", the reference is all zeros and the RMS difference is "
                  f"{'within' if self.ok else 'above'} {STRUCTURAL_ABS_RMS:g}")
        elif self.tolerance == "structural":
            s += f", rel-RMS {self.rel_rms:.3g} (limit {STRUCTURAL_REL_RMS:g})"
        if self.first_mismatch is not None:
            s += f", first at {self.first_mismatch}"
        if self.tolerance == "exact" and self.mismatches and self.max_abs_err == 0 and self.max_rel_err == 0:
            s += " (the bits differ where the values are equal: 0.0 against -0.0, or NaNs of other bit patterns)"
        return s


def _unravel(flat: int, shape: tuple) -> tuple:
    idx = []
    for d in reversed(shape):
        idx.append(flat % d)
        flat //= d
    return tuple(reversed(idx))


def _as_f64(t: torch.Tensor) -> torch.Tensor:
    if t.is_complex():
        return t.to(torch.complex128)
    return t.to(torch.float64)


def _int_differences(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|a - b|`` of two integer (or bool) tensors, flattened, as float64: the exact difference, rounded only past
    2^53 (so never to 0 where the values differ, as ``float64(a) - float64(b)`` can be). A 64-bit difference can
    overflow int64, so 64-bit inputs are subtracted as Python integers."""
    if max(a.element_size(), b.element_size()) < 8:
        return (a.reshape(-1).to(torch.int64) - b.reshape(-1).to(torch.int64)).abs().to(torch.float64)
    return torch.tensor([float(abs(p - q)) for p, q in zip(a.reshape(-1).tolist(), b.reshape(-1).tolist())],
                        dtype=torch.float64)


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of ``a`` against the reference ``b``, peak-to-peak = the reference's range (inf where they are equal)."""
    a, b = a.double(), b.double()
    mse = (a - b).pow(2).mean().item()
    rng = (b.max() - b.min()).item() or 1.0
    return math.inf if mse == 0 else 10 * math.log10(rng * rng / mse)


def match(a: torch.Tensor, b: torch.Tensor, tolerance: str = "exact") -> MatchResult:
    """Compare ``a`` with the reference ``b``, on CPU in float64 (complex128 for complex tensors).

    Tolerances:

    * ``"exact"``: the same dtype and the same bits (NaN equals NaN only with the same bits; ``-0.0`` differs
      from ``0.0``).
    * ``"1e-6"``, ``"1e-4"``: elementwise ``|a - b| <= tol * (1 + |b|)`` (absolute near 0, relative for
      large values); NaN positions must be the same, and infinities must be equal (same sign). The dtypes
      may differ: values are compared.
    * ``"structural"``: the same dtype, the same NaN and +-Inf positions, and over the finite elements
      ``rms(a - b) <= 1e-2 * rms(b)`` or ``rms(a - b) <= 1e-6``.

    A shape mismatch (or a dtype mismatch for ``exact``/``structural``) gives ``ok=False`` with a message,
    not an exception. Raises ``TypeError`` if ``a`` or ``b`` is not a tensor, ``ValueError`` for an unknown
    ``tolerance``.
    """
    _check_tensor("a", a)
    _check_tensor("b", b)
    if not isinstance(tolerance, str) or tolerance not in TOLERANCES:
        raise ValueError(f"tolerance: expected one of {', '.join(repr(t) for t in TOLERANCES)}, got {tolerance!r}")
    sa, sb = tuple(a.shape), tuple(b.shape)
    base = dict(tolerance=tolerance, shape_a=sa, shape_b=sb, dtype_a=_dname(a.dtype), dtype_b=_dname(b.dtype))
    inf = float("inf")
    if sa != sb:
        return MatchResult(
            ok=False, numel=max(a.numel(), b.numel()), mismatches=max(a.numel(), b.numel()), max_abs_err=inf,
            max_rel_err=inf, rel_rms=inf, first_mismatch=None, message=f"shape {sa} vs {sb}", **base,
        )  # fmt: skip
    if a.dtype != b.dtype and tolerance in ("exact", "structural"):
        return MatchResult(
            ok=False, numel=a.numel(), mismatches=a.numel(), max_abs_err=inf, max_rel_err=inf, rel_rms=inf,
            first_mismatch=None, message=f"dtype {_dname(a.dtype)} vs {_dname(b.dtype)}", **base,
        )  # fmt: skip

    ca, cb = _cpu_dense(a), _cpu_dense(b)
    n = ca.numel()
    x, y = _as_f64(ca).reshape(-1), _as_f64(cb).reshape(-1)
    nan_x, nan_y = torch.isnan(x), torch.isnan(y)
    inf_x, inf_y = torch.isinf(x), torch.isinf(y)
    finite = ~(nan_x | nan_y | inf_x | inf_y)
    integers = not (ca.is_floating_point() or ca.is_complex() or cb.is_floating_point() or cb.is_complex())
    diff = _int_differences(ca, cb) if integers else (x - y).abs()
    ref = y.abs()
    # statistics over elements where both are finite
    d_f, r_f = diff[finite], ref[finite]
    max_abs = d_f.max().item() if d_f.numel() else 0.0
    nz = r_f != 0
    max_rel = (d_f[nz] / r_f[nz]).max().item() if bool(nz.any()) else 0.0
    rms_d = d_f.pow(2).mean().sqrt().item() if d_f.numel() else 0.0
    rms_b = r_f.pow(2).mean().sqrt().item() if r_f.numel() else 0.0
    rel_rms = rms_d / rms_b if rms_b > 0 else (0.0 if rms_d == 0 else inf)
    # a non-finite on either side counts in max_abs as inf unless the classes agree
    same_class = (nan_x == nan_y) & (inf_x == inf_y) & (~inf_x | (x == y))

    if tolerance == "exact":
        bad = (_bytes_2d(ca) != _bytes_2d(cb)).any(dim=1)
        ok = not bool(bad.any())
    elif tolerance in _NUMERIC:
        tol = _NUMERIC[tolerance]
        bad = ~same_class | (finite & ~(diff <= tol * (1.0 + ref)))
        ok = not bool(bad.any())
    else:  # structural
        bad = ~same_class | (finite & ~(diff <= STRUCTURAL_REL_RMS * (1.0 + ref)))
        ok = bool(same_class.all()) and (rms_d <= STRUCTURAL_REL_RMS * rms_b or rms_d <= STRUCTURAL_ABS_RMS)
    if not bool(same_class.all()):  # NaN or inf where the other side has none: no statistic reads 0 (an all-NaN
        max_abs = max_rel = rel_rms = inf  # output showed rel-RMS 0 beside its MISMATCH verdict)
    count = int(bad.sum().item())
    first = _unravel(int(bad.nonzero()[0, 0].item()), sa) if count else None
    return MatchResult(
        ok=ok, numel=n, mismatches=count, max_abs_err=max_abs, max_rel_err=max_rel, rel_rms=rel_rms,
        first_mismatch=first, **base,
    )  # fmt: skip
