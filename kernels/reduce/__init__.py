"""Deterministic row softmax, row sum and row mean (one program per row, fixed reduction order)."""

from .launch import mean_rows, softmax, sum_rows
from .reference import mean_rows_reference, softmax_reference, sum_rows_reference
from .specs import compile_specs

__all__ = [
    "compile_specs",
    "mean_rows",
    "mean_rows_reference",
    "softmax",
    "softmax_reference",
    "sum_rows",
    "sum_rows_reference",
]
