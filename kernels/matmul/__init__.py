"""Batch-invariant GEMM (``matmul``, ``bmm``); see README.md. Import ``.launch`` for the host functions."""
