"""Enumerate the shipped launch tables of an op, for ``compile_specs()``.

Resolves, per device file and dtype, the table :func:`jetdet.configs.find_table` would pick (a
``,dtype=<dt>`` file over the generic one), so the static report compiles exactly what can run.
"""

from __future__ import annotations

import inspect

from jetdet.kernels import _common

DTYPES = ("fp32", "fp16", "bf16")


def shipped_tables(op: str):
    """Yield ``(device_ident, dtype_name, table)`` for every shipped device file and dtype fp32/fp16/bf16."""
    for ident, _archs, dt, table in _common.shipped_tables(op):
        yield ident, dt, table


def signature(kernel, types: dict[str, str]) -> dict[str, str]:
    """Triton signature of every non-constexpr parameter of ``kernel``: ``types[name]``, else ``"i32"``
    (sizes and strides). Works on a ``JITFunction`` and on the interpreter's ``InterpretedFunction``."""
    params = inspect.signature(kernel.fn).parameters.values()
    return {p.name: types.get(p.name, "i32") for p in params if "constexpr" not in str(p.annotation)}
