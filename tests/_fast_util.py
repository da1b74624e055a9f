"""Shared helpers for the fast-op tests."""

import torch

# relative RMS error allowed per input dtype (output rounding + fp32/TF32 accumulation), see the READMEs
REL_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_rms(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-12))


def assert_rel(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, factor: float = 1.0) -> None:
    assert torch.isfinite(out).all(), "non-finite output (an unwritten NaN-filled element?)"
    err = rel_rms(out, ref)
    assert err <= REL_TOL[dtype] * factor, f"relative RMS error {err:.3g} > {REL_TOL[dtype] * factor:.3g}"
