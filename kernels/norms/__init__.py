"""Deterministic layer norm, RMS norm and group norm (one program per row / per (sample, group)): ``launch``,
``reference``, ``torch_path``; ``op.py`` registers the ops. Importing this package imports no triton: ``launch``
does."""
