"""Timestep-skip kernels: ``forecast`` (extrapolate a skipped model output from ≤ 4 computed ones) and
``relative_change`` (‖a−b‖₁/‖b‖₁ per item and per tile): Triton kernels, launch, fp32 reference. Public
entry points: ``jetdet.ops.forecast`` and ``jetdet.ops.relative_change``."""
