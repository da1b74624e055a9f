"""Batch-invariant implicit-GEMM conv2d (NCHW); see README.md. Import ``.launch`` for the host function."""
