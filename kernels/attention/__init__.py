"""Deterministic flash-style attention forward: ``attention(q, k, v, mask=None, scale=None)``."""

from .launch import attention
from .reference import attention_reference
from .specs import compile_specs

__all__ = ["attention", "attention_reference", "compile_specs"]
