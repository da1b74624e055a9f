"""Triton kernels (imported as ``jetdet.kernels``). Only this package holds ``@triton.jit`` code.

Each op lives in ``kernels/<op>/``: ``kernel.py`` (``@triton.jit`` only), ``launch.py`` (checks the
already-validated inputs, allocates, picks the config, launches) and ``reference.py`` (literal fp32
torch math). Importing a kernel module imports triton; set ``TRITON_INTERPRET=1`` before that to run
kernels on CPU.
"""
