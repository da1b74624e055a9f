"""Deterministic flash-style attention forward (``launch.attention``; ``launch_tma``: its opt-in TMA-fed twin), its
fp32 reference and torch path; ``op.py`` registers ``jetdet::attention``. Importing this package imports no triton:
``launch`` does."""
