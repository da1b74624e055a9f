"""Launch-parameter tables: ``autotune_configs/<op>/device_name=<NAME>[,dtype=<dt>].json``.

Each file maps a problem-size key (an integer, as a string) to a config dict, e.g.
``{"64": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3}}``.
The nearest key (by |log2 difference|) wins. Lookup order for the file:

1. ``device_name=<NAME>,dtype=<dt>.json`` then ``device_name=<NAME>.json`` (NAME = CUDA device name with
   spaces replaced by ``_``: torch reports "NVIDIA H200", the file is ``device_name=NVIDIA_H200``), then the same
   for the name's shorter ``_``-prefixes of at least two words ("NVIDIA_H200_NVL" -> "NVIDIA_H200"),
2. the same for the architecture, ``device_name=sm_<major><minor>``,
3. the op's built-in default, with a one-time warning.

``$JETDET_CONFIG_DIR`` replaces the shipped folder. The Triton interpreter (``TRITON_INTERPRET=1`` on CPU)
uses the ``sm_80`` tables, so CI exercises the shipped configs.

Determinism rule: callers pass keys that never depend on the batch dimension (e.g. K, N, head_dim, row
length), so a batch-1 call and a batch-8 call run the very same config.

This is the one table module: besides the lookup it owns the dtype names (:data:`DTYPE_NAMES`), the arch each
shipped table runs on (:func:`table_archs`) and the enumeration of the shipped tables for the static report
(:func:`shipped_tables`, :func:`shipped_configs`). Every kernel folder reads its tables through it.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import math
import os
import warnings

import torch

from . import _paths

#: The dtypes the kernels serve and their names in table files (``,dtype=<name>``) and Triton types (``*<name>``).
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
DTYPES = tuple(DTYPE_NAMES.values())
#: The archs the shipped tables are compiled for by the static report.
ARCHS = (80, 89, 90)
#: The arch a table named after a device runs on (:func:`find_table` picks it on that device, or a variant of
#: it, only).
DEVICE_ARCHS = {"NVIDIA_A100-SXM4-80GB": (80,), "NVIDIA_H100_80GB_HBM3": (90,), "NVIDIA_H200": (90,)}
_warned: set[tuple[str, str]] = set()


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


_INTERPRETER = ("interpreter", "sm_80")
#: device index -> identity; a process's devices do not change name
_identities: dict[int, tuple[str, str]] = {}


def device_identity(device: torch.device | None) -> tuple[str, str]:
    """``(device_name, arch)`` used for lookup; ``("interpreter", "sm_80")`` for CPU tensors."""
    if device is None:
        return _INTERPRETER
    dev = device if isinstance(device, torch.device) else torch.device(device)
    if dev.type != "cuda":
        return _INTERPRETER
    ident = _identities.get(dev.index) if dev.index is not None else None
    if ident is None:
        name = torch.cuda.get_device_name(dev).replace(" ", "_")
        major, minor = torch.cuda.get_device_capability(dev)
        ident = (name, f"sm_{major}{minor}")
        if dev.index is not None:
            _identities[dev.index] = ident
    return ident


@functools.lru_cache(maxsize=256)
def _load(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON object mapping size keys to configs")
    return data


def name_candidates(name: str) -> list[str]:
    """``"NVIDIA_H200_NVL"`` -> ``["NVIDIA_H200_NVL", "NVIDIA_H200"]``: the device name, then its shorter
    ``_``-prefixes of at least two words (a variant of a device uses the device's tables)."""
    parts = name.split("_")
    return ["_".join(parts[:i]) for i in range(len(parts), 1, -1)] or [name]


def find_table(op: str, dtype: torch.dtype, device=None) -> tuple[dict | None, str | None]:
    base = os.path.join(_paths.configs_dir(), op)
    name, arch = device_identity(device)
    for ident in (*name_candidates(name), arch):
        for suffix in (f",dtype={dtype_name(dtype)}", ""):
            path = os.path.join(base, f"device_name={ident}{suffix}.json")
            table = _load(path)
            if table is not None:
                return table, path
    return None, None


def nearest(table: dict, key: int) -> dict:
    keys = [k for k in table if k != "default"]
    if not keys:
        return table["default"]
    key = max(int(key), 1)
    best = min(keys, key=lambda k: (abs(math.log2(max(int(k), 1)) - math.log2(key)), int(k)))
    return table[best]


#: (op, key, dtype, device identity, table folder) -> the table entry ``key`` resolves to, or None (no table):
#: a kernel launch looks its config up on every call, and reading the table path and the nearest key cost ~10 us
#: of the ~60 us of Python a linear paid before its launch (``python bench/host_cost.py``)
_entries: dict[tuple, dict | None] = {}
_MAX_ENTRIES = 4096


def get_config(op: str, key: int, *, dtype: torch.dtype, device=None, default: dict) -> dict:
    """Config for ``op`` at problem-size ``key`` (never a batch-dependent size): ``default`` updated by the
    table entry, a new dict on every call."""
    ident = device_identity(device)
    ck = (op, key, dtype, ident, _paths.configs_dir())
    try:
        entry = _entries[ck]
    except KeyError:
        table, _ = find_table(op, dtype, device)
        entry = None if table is None else nearest(table, key)
        if len(_entries) >= _MAX_ENTRIES:
            _entries.clear()
        _entries[ck] = entry
    if entry is None:
        tag = (op, f"{ident[0]}/{dtype_name(dtype)}")
        if tag not in _warned:
            _warned.add(tag)
            warnings.warn(
                f"jetdet: no launch table for op {op!r} on {ident[0]} ({ident[1]}, {dtype_name(dtype)}); "
                f"using the built-in default {default}",
                stacklevel=3,
            )
        return dict(default)
    cfg = dict(default)
    cfg.update(entry)
    return cfg


def table_archs(ident: str) -> tuple[int, ...]:
    """The archs (of :data:`ARCHS`) a table ``device_name=<ident>`` runs on: a table named after a device in
    :data:`DEVICE_ARCHS` on that device's arch, ``sm_XY`` on sm_XY. Any other (an unknown device, or an arch
    the report does not compile for, such as sm_86) is checked on all of :data:`ARCHS`, so no shipped table
    goes unchecked."""
    if ident in DEVICE_ARCHS:
        return DEVICE_ARCHS[ident]
    arch = ident[3:] if ident.startswith("sm_") else ""
    if arch.isdigit() and int(arch) in ARCHS:
        return (int(arch),)
    return ARCHS


def shipped_tables(op: str, default: dict | None = None) -> list[tuple[str, tuple[int, ...], str, dict]]:
    """Every shipped launch table of ``op`` per dtype it serves, as ``(device_ident, archs, dtype_name, table)``,
    sorted by ident, then in :data:`DTYPES` order; with ``default`` (a table of the op's built-in configs) also
    ``("default", ARCHS, dtype_name, default)`` for every dtype, last.

    A ``,dtype=<dt>`` file serves its dtype and a plain file the dtypes without their own file (what
    :func:`find_table` would pick); ``archs`` is :func:`table_archs` of the ident.
    """
    found: dict[str, dict] = {}
    for path in sorted(glob.glob(os.path.join(_paths.configs_dir(), op, "device_name=*.json"))):
        stem = os.path.basename(path)[len("device_name=") : -len(".json")]
        ident, _, dt = stem.partition(",dtype=")
        with open(path) as f:
            found.setdefault(ident, {})[dt or None] = json.load(f)
    out = []
    for ident in sorted(found):
        per_dtype = found[ident]
        for dn in DTYPES:
            table = per_dtype.get(dn, per_dtype.get(None))
            if table is not None:
                out.append((ident, table_archs(ident), dn, table))
    if default is not None:
        out.extend(("default", ARCHS, dn, default) for dn in DTYPES)
    return out


def shipped_configs(op: str, dtypes, default_for) -> list[tuple[torch.dtype, dict, tuple[int, ...]]]:
    """``(dtype, config, archs)`` for the built-in default ``default_for(dtype)`` (all :data:`ARCHS`) and every
    entry of every :func:`shipped_tables` table of ``op`` serving ``dtype``, on the table's archs (each entry
    completed by the default); equal configs are merged, their archs united."""
    tables = shipped_tables(op)
    merged: dict[tuple, tuple[torch.dtype, dict, set]] = {}
    for dtype in dtypes:
        dn = dtype_name(dtype)
        cands = [(default_for(dtype), ARCHS)]
        for _ident, archs, tdn, table in tables:
            if tdn == dn:
                cands.extend(({**default_for(dtype), **cfg}, archs) for cfg in table.values())
        for cfg, archs in cands:
            key = (dtype, tuple(sorted(cfg.items())))
            merged.setdefault(key, (dtype, cfg, set()))[2].update(archs)
    return [(dtype, cfg, tuple(sorted(archs))) for dtype, cfg, archs in merged.values()]


def clear_cache() -> None:
    """Forget what was read: the table files, the resolved entries, device names and the warnings given."""
    _load.cache_clear()
    _entries.clear()
    _identities.clear()
    _warned.clear()


@contextlib.contextmanager
def tables_from(path: str):
    """Launch tables read from the folder ``path`` inside (``$JETDET_CONFIG_DIR``, what was read forgotten on entry
    and exit); the previous setting comes back after. For tools that time or check candidate tables."""
    saved = os.environ.get("JETDET_CONFIG_DIR")
    os.environ["JETDET_CONFIG_DIR"] = path
    clear_cache()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("JETDET_CONFIG_DIR", None)
        else:
            os.environ["JETDET_CONFIG_DIR"] = saved
        clear_cache()
