"""Every per-dtype / per-op accuracy tolerance of the tests, in one place (the READMEs' accuracy tables quote
them). Batch invariance is never a tolerance: it is compared bit for bit (``_invariance.py``).

Each table names its error measure; a test looks its number up here instead of writing it down again.
"""

import torch

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

#: ``jetdet.ops`` (both paths) against the fp32 torch reference: ``max |err| <= tol * max(1, max |ref|)``;
#: README "Accuracy". The fp32 entry also bounds the deterministic router's einsum/conv3d against float64 torch.
OPS_MAX_ERR = {F32: 2e-5, F16: 4e-3, BF16: 3e-2}

#: The fast ops (block-sparse attention, ...) against their references: relative RMS error
#: ``‖out − ref‖₂ / ‖ref‖₂`` (output rounding plus fp32/TF32 accumulation), see the kernels' READMEs.
FAST_REL_RMS = {F32: 2e-5, F16: 2e-3, BF16: 1.6e-2}

#: ``jetdet.ops.forecast`` against its float64 reference: ``rtol``, and ``atol = tol * max |expected|``.
FORECAST_REL = {F32: 1e-5, F16: 1e-3, BF16: 8e-3}

#: The Triton kernels against their literal fp32 references: ``(atol, rtol)`` for ``torch.testing.assert_close``,
#: per kernel family (the kernel READMEs' tolerance tables; inputs scaled so that outputs are O(1)).
#: bf16 rtol of the attention/norm/reduce kernels is 2^-6: the interpreter converts fp32 -> bf16 by truncation
#: (up to 1 ulp = 2^-7 relative, measured 7.7e-3) where a GPU rounds to nearest (half an ulp).
KERNEL_ATOL_RTOL = {
    "attention": {F32: (2e-5, 2e-5), F16: (2e-3, 2e-3), BF16: (2e-2, 2e-2)},
    "norms": {F32: (1e-5, 1e-5), F16: (2e-3, 1e-3), BF16: (2e-2, 1.6e-2)},
    "softmax": {F32: (1e-6, 1e-5), F16: (1e-5, 1e-3), BF16: (1e-4, 1.6e-2)},
    "sum": {F32: (1e-4, 1e-5), F16: (1e-3, 1e-3), BF16: (1e-2, 1.6e-2)},
    "matmul": {F32: (1e-5, 1e-5), F16: (2e-3, 2e-3), BF16: (1.5e-2, 1e-2)},  # and conv2d (kernels/matmul/README.md)
    "matmul_tma": {F16: (2e-3, 2e-3), BF16: (1.6e-2, 1.6e-2)},
}

#: A whole fp32 model under ``jetdet.mode("deterministic")`` (or the deterministic patch) against the same model
#: with the mode off: ``max |err| < tol * max(1, max |ref|)`` (the same function up to rounding).
MODE_VS_OFF = 1e-4


def assert_max_err(out: torch.Tensor, ref: torch.Tensor, tol: float, label: str = "") -> None:
    """``max |out − ref| <= tol * max(1, max |ref|)``, the measure of :data:`OPS_MAX_ERR` (``out`` compared in
    fp32 on the CPU, where the references are computed)."""
    err = (out.detach().float().cpu() - ref.detach().float().cpu()).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    assert err <= tol * scale, f"{label}: max err {err:.3g} > {tol:.3g} x {scale:.3g}"
