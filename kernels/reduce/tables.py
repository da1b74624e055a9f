"""Enumerate the shipped launch tables of an op, for ``compile_specs()``.

Resolves, per device file and dtype, the table :func:`jetdet.configs.find_table` would pick (a
``,dtype=<dt>`` file over the generic one), so the static report compiles exactly what can run.
"""

from __future__ import annotations

import inspect
import json
import os
import re

from jetdet import _paths

DTYPES = ("fp32", "fp16", "bf16")
_FILE = re.compile(r"device_name=([^,]+?)(?:,dtype=(fp32|fp16|bf16))?\.json")


def shipped_tables(op: str):
    """Yield ``(device_ident, dtype_name, table)`` for every shipped device file and dtype fp32/fp16/bf16."""
    base = os.path.join(_paths.configs_dir(), op)
    files: dict[tuple[str, str | None], str] = {}
    for name in sorted(os.listdir(base)) if os.path.isdir(base) else ():
        m = _FILE.fullmatch(name)
        if m:
            files[(m[1], m[2])] = os.path.join(base, name)
    for dev in sorted({d for d, _ in files}):
        for dt in DTYPES:
            path = files.get((dev, dt)) or files.get((dev, None))
            if path is None:
                continue
            with open(path) as f:
                yield dev, dt, json.load(f)


def signature(kernel, types: dict[str, str]) -> dict[str, str]:
    """Triton signature of every non-constexpr parameter of ``kernel``: ``types[name]``, else ``"i32"``
    (sizes and strides). Works on a ``JITFunction`` and on the interpreter's ``InterpretedFunction``."""
    params = inspect.signature(kernel.fn).parameters.values()
    return {p.name: types.get(p.name, "i32") for p in params if "constexpr" not in str(p.annotation)}
