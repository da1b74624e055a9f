"""The persistent TMA GEMM (kernels/matmul/kernel_tma.py, opt-in with JETDET_MATMUL_KERNEL=tma): against the fp32
reference, bitwise batch invariant (prefix and needle) through the persistent loop, routed only for eligible
problems, and on sm_90 made of TMA loads and warpgroup MMAs with no spills and no atomics (cross-compiled)."""

from __future__ import annotations

import os
import random
import re
import subprocess
import tempfile

import pytest
import torch
from _devices import INTERPRETER, KERNEL_DEVICE, ON_GPU
from _invariance import assert_batch_invariant
from _kernel_util import count_calls
from _tolerances import KERNEL_ATOL_RTOL

import jetdet
from jetdet import static_report as sr
from jetdet.kernels.matmul import launch, launch_tma
from jetdet.kernels.matmul import specs as mm_specs

pytestmark = pytest.mark.skipif(not (ON_GPU or INTERPRETER), reason="needs CUDA or TRITON_INTERPRET=1")
DEV = KERNEL_DEVICE
# bf16 only compiled on a GPU: the interpreter's bf16 dot is wrong (DESIGN.md, section 5)
DTYPES = [torch.float16] + ([torch.bfloat16] if ON_GPU else [])
TOL = KERNEL_ATOL_RTOL["matmul_tma"]


def _operands(m, k, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=g).to(dtype).to(DEV)
    w = (torch.randn(n, k, generator=g) * k**-0.5).to(dtype).to(DEV)
    b = torch.randn(n, generator=g).to(dtype).to(DEV)
    return a, w, b


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("m,k,n", [(37, 64, 80), (300, 128, 48), (5, 32, 1040), (1, 16, 8)])
def test_matches_fp32_reference(dtype, m, k, n):
    a, w, b = _operands(m, k, n, dtype)
    out = launch_tma.matmul_tma(a, w, b)
    ref = a.float() @ w.float().T + b.float()
    assert out.dtype == dtype and not out.isnan().any()
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(launch_tma.matmul_tma(a, w).float(), a.float() @ w.float().T, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_prefix_and_needle_bitwise_through_the_persistent_loop(dtype):
    """300 rows x 48 cols is 3 tiles of 128 rows: more tiles than the interpreter's 3 programs at full size, fewer
    for prefixes; every prefix and one row alone at a random slot give the same bits."""
    a, w, b = _operands(300, 128, 48, dtype)
    sizes = (1, 2, 127, 128, 129, 255, 300)
    rng = random.Random(0)
    assert_batch_invariant(lambda a: launch_tma.matmul_tma(a, w, b), [a], prefixes=sizes,
                           slots=[rng.randrange(m) for m in sizes])


def test_env_switch_routes_eligible_linears_only(monkeypatch):
    calls = count_calls(monkeypatch, launch_tma, "matmul_tma")
    monkeypatch.setenv("JETDET_BACKEND", "triton")
    a, w, b = _operands(33, 64, 48, torch.float16)
    default = jetdet.ops.linear(a, w, b)
    assert calls == []  # not the default
    monkeypatch.setenv(launch.KERNEL_ENV, "tma")
    tma = jetdet.ops.linear(a, w, b)
    assert calls == [1]
    torch.testing.assert_close(tma.float(), default.float(), atol=TOL[torch.float16][0], rtol=TOL[torch.float16][1])
    jetdet.ops.linear(a[:, :40], w[:, :40], b)  # rows of 40 fp16 = 80 bytes: aligned, but a is strided
    jetdet.ops.linear(a.float(), w.float(), b.float())  # fp32: never the TMA kernel
    jetdet.ops.linear(a[:, :36].contiguous(), w[:, :36].contiguous(), b)  # 72-byte rows: not 16-byte aligned
    assert calls == [1]
    monkeypatch.setenv(launch.KERNEL_ENV, "wgmma")
    with pytest.raises(ValueError, match="JETDET_MATMUL_KERNEL='wgmma': expected 'default' or 'tma'"):
        jetdet.ops.linear(a, w, b)
    with pytest.raises(ValueError, match="matmul_tma: expected fp16/bf16 row-major"):
        launch_tma.matmul_tma(a[:, :40], w[:, :40])


def _sass(spec) -> str:
    kernel = sr._compile(sr.as_jit_function(spec.fn), spec, 90)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        return subprocess.run([sr._tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout


@pytest.mark.slow
def test_sm90_sass_is_tma_and_wgmma_without_spills_or_atomics():
    """Every shipped TMA config on sm_90: HGMMA and UTMALDG in the SASS, no spills, no atomics (the report's
    rows); negative control: the default GEMM kernel at a similar tile has no UTMALDG."""
    specs = mm_specs.tma_specs()
    rows = sr.report(specs, archs=(90,))
    assert sr.violations(rows) == []
    assert all(r["hgmma"] > 0 and r["atomics"] == 0 and r["stack"] == 0 for r in rows), rows
    with sr.compiling():
        tma = _sass(specs[-1])
        plain = _sass(next(s for s in mm_specs.gemm_specs() if s.name.startswith("matmul_bf16_128x128x64")))
    assert re.search(r"\bUTMALDG\b", tma) and re.search(r"\bHGMMA\b", tma)
    assert not re.search(r"\bUTMALDG\b", plain)
