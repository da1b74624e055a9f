"""Deterministic layer norm, RMS norm and group norm (one program per row / per (sample, group))."""

from .launch import group_norm, layer_norm, rms_norm
from .reference import group_norm_reference, layer_norm_reference, rms_norm_reference
from .specs import compile_specs

__all__ = [
    "compile_specs",
    "group_norm",
    "group_norm_reference",
    "layer_norm",
    "layer_norm_reference",
    "rms_norm",
    "rms_norm_reference",
]
