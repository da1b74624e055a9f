"""Gated GELU (GEGLU), ``x * gelu(gate)``: kernel, launch, compile specs, torch path, reference and ``op.py``
(the registered op and its public wrapper ``jetdet.ops.gelu_gate``). Importing this package imports no triton:
``launch`` does."""
