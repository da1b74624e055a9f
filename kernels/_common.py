"""Shared pieces for the Triton kernels: compile specs for the static report, launch helpers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class CompileSpec:
    """One kernel at one shipped config, for ``triton.compile(ASTSource(...))`` cross-compilation.

    ``signature`` maps every non-constexpr argument name to a triton type string (``"*fp16"``, ``"i32"``,
    ``"fp32"``); ``constexprs`` maps constexpr names to values. ``deterministic`` kernels must contain no
    atomics (RED/ATOM) in SASS. ``options`` go to ``triton.compile`` (``num_warps``, ``num_stages``,
    ``enable_fp_fusion``).
    """

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    deterministic: bool = True
    archs: tuple[int, ...] = (80, 89, 90)
    # "no_fma" / "no_mufu" make the report fail the kernel if SASS contains FFMA / MUFU instructions
    forbid: tuple[str, ...] = ()
    # Set on the variants ``jetdet.static_report.jit_variants`` derives: ``(args, kwargs)`` of a launch
    # ``fn[grid](*args, **kwargs)``, turned into a signature by Triton's own JIT binder instead of from
    # ``signature``/``constexprs``. ``jit_class`` names the value class (``"ints=1"``).
    launch: tuple[tuple, dict] | None = None
    jit_class: str | None = None


TRITON_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}

#: The arch a table named after a device runs on (``configs.find_table`` picks it on that device only).
DEVICE_ARCHS = {"NVIDIA_A100-SXM4-80GB": (80,), "NVIDIA_H100_80GB_HBM3": (90,), "NVIDIA_H200": (90,)}


def tl_ptr(dtype) -> str:
    """``torch.float16`` -> ``"*fp16"``."""
    return "*" + TRITON_DTYPES[str(dtype).replace("torch.", "")]


def empty(shape, dtype, device):
    """``torch.empty`` that fills with NaN when ``JETDET_DEBUG_FILL_NAN=1`` (set by the test conftest), so an
    element a kernel forgets to write fails the test instead of passing on leftover memory."""
    import os

    import torch

    out = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get("JETDET_DEBUG_FILL_NAN") == "1" and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def shipped_tables(op: str) -> list[tuple[str, tuple[int, ...], str, dict]]:
    """Every shipped launch table of ``op`` per dtype it serves, as ``(device_ident, archs, dtype_name, table)``.

    A ``,dtype=<dt>`` file serves its dtype and a plain file the dtypes without their own file (what
    :func:`jetdet.configs.find_table` would pick). ``archs``: a ``device_name=sm_XY`` table runs only on that
    arch (when it is one of 80/89/90), a table named after a device in :data:`DEVICE_ARCHS` on its arch; any
    other is compiled for all three.
    """
    import glob
    import json
    import os

    from jetdet import _paths

    found: dict[str, dict] = {}
    for path in sorted(glob.glob(os.path.join(_paths.configs_dir(), op, "device_name=*.json"))):
        stem = os.path.basename(path)[len("device_name=") : -len(".json")]
        ident, _, dt = stem.partition(",dtype=")
        with open(path) as f:
            found.setdefault(ident, {})[dt or None] = json.load(f)
    out = []
    for ident in sorted(found):
        per_dtype = found[ident]
        arch = ident[3:] if ident.startswith("sm_") else ""
        archs = (int(arch),) if arch.isdigit() and int(arch) in (80, 89, 90) else DEVICE_ARCHS.get(ident, (80, 89, 90))
        for dn in ("fp32", "fp16", "bf16"):
            table = per_dtype.get(dn, per_dtype.get(None))
            if table is not None:
                out.append((ident, archs, dn, table))
    return out
