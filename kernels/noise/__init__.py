"""Counter-based Gaussian noise (Philox-4x32-10 + an inverse normal CDF from correctly rounded ops).

``reference`` (torch, CPU path) and ``kernel``/``launch`` (Triton) produce the same bits. Importing
``launch`` imports triton; ``reference`` and ``constants`` do not.
"""
