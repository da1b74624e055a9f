"""Shared helpers for the fast-op tests."""

import torch
from _tolerances import FAST_REL_RMS


def rel_rms(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-12))


def assert_rel(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, factor: float = 1.0) -> None:
    assert torch.isfinite(out).all(), "non-finite output (an unwritten NaN-filled element?)"
    err = rel_rms(out, ref)
    assert err <= FAST_REL_RMS[dtype] * factor, f"relative RMS error {err:.3g} > {FAST_REL_RMS[dtype] * factor:.3g}"
