"""Helpers shared by the Triton kernel tests (``test_kernels_<op>.py``, one file per kernel folder): comparisons
against the kernels' literal fp32 references (tolerances from ``_tolerances.py``), input factories, and the checks
that are the same for every op (compile specs, shipped tables) with the op as the only argument.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from _devices import KERNEL_DEVICE
from _tolerances import KERNEL_ATOL_RTOL

from jetdet import _paths


def count_calls(monkeypatch, module, name: str) -> list:
    """A list that gets one entry per call of ``module.name`` (replaced by a counting wrapper through
    ``monkeypatch``): which launcher a call reached."""
    calls = []
    orig = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(1) or orig(*a, **kw))
    return calls


# ------------------------------------------------------------------------------- attention, norms, reduce


def close(out, ref, dtype, kind):
    assert out.dtype == dtype, (out.dtype, dtype)
    atol, rtol = KERNEL_ATOL_RTOL[kind][dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol, equal_nan=True)


def same_nonfinite(out, ref):
    """NaN and +-Inf appear exactly where the reference has them."""
    out = out.float()
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.isposinf(), ref.isposinf())
    assert torch.equal(out.isneginf(), ref.isneginf())


def check_compile_specs(mod):
    """``mod.compile_specs()`` (a kernel folder's ``specs`` module) names every kernel parameter, once."""
    specs = mod.compile_specs()
    assert len({s.name for s in specs}) == len(specs)
    dtypes = {d for s in specs for d in ("fp32", "fp16", "bf16") if f"{d}," in s.name}
    assert dtypes == {"fp32", "fp16", "bf16"}
    for s in specs:
        names = set(s.signature) | set(s.constexprs)
        assert names == set(s.fn.arg_names), s.name  # what triton.compile(ASTSource(...)) needs
        assert not set(s.signature) & set(s.constexprs)
        assert s.deterministic and {"num_warps"} <= set(s.options)


# ------------------------------------------------------------------------------------------ matmul, conv2d

needs_kernels = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
    reason="needs CUDA or TRITON_INTERPRET=1",
)

DEV = KERNEL_DEVICE  # CUDA tensors through the compiled kernels on a GPU, else CPU tensors in the interpreter

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def close_gemm(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """The matmul tolerances (conv2d shares them), and no NaN: an element left unwritten fails."""
    assert out.dtype == dtype and out.shape == ref.shape
    assert not out.isnan().any(), "NaN in the output (an element was never written?)"
    atol, rtol = KERNEL_ATOL_RTOL["matmul"][dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)


def rand(*shape, dtype, scale=1.0):
    return (torch.randn(*shape) * scale).to(dtype).to(DEV)


def check_shipped_tables(op):
    """Every shipped table of ``op`` parses, has size keys and complete power-of-two tile configs; the names the
    brief promises exist; configs never key on anything batch-dependent (lookup by N / O only)."""
    base = os.path.join(_paths.configs_dir(), op)
    names = sorted(os.listdir(base))
    for want in ("NVIDIA_A100-SXM4-80GB", "NVIDIA_H100_80GB_HBM3", "sm_80", "sm_90"):
        assert f"device_name={want}.json" in names
        assert f"device_name={want},dtype=fp32.json" in names
    for fname in names:
        with open(os.path.join(base, fname)) as f:
            table = json.load(f)
        assert table, fname
        for key, cfg in table.items():
            assert key.isdigit(), (fname, key)
            assert set(cfg) == {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"}, fname
            for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps"):
                assert cfg[name] & (cfg[name] - 1) == 0, (fname, key, name)
            assert cfg["BLOCK_K"] >= 16, "tl.dot needs K >= 16"
