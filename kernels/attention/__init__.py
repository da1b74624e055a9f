"""Deterministic flash-style attention forward: ``attention(q, k, v, mask=None, scale=None)``."""

from .launch import attention, compile_specs
from .reference import attention_reference

__all__ = ["attention", "attention_reference", "compile_specs"]
