"""Batch-invariant depthwise conv2d (one input channel per group): kernel, launch, compile specs, torch path,
reference and ``op.py``. Importing this package imports no triton: ``launch`` does."""
