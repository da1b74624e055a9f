"""Deterministic row softmax, row sum and row mean (one program per row, fixed reduction order): ``launch``,
``reference``, ``torch_path``; ``op.py`` registers the ops. Importing this package imports no triton: ``launch``
does."""
