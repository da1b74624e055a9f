"""The TMA-fed attention kernel (kernels/attention/kernel_tma.py, opt-in with JETDET_ATTENTION_KERNEL=tma): against
the fp32 reference, the same bits as the default kernel at the same tile, bitwise batch invariant (prefix and
needle), routed only for eligible calls, and on sm_90 made of TMA loads and warpgroup MMAs with no spills and no
atomics (cross-compiled)."""

from __future__ import annotations

import math
import random
import re

import pytest
import torch
import torch.nn.functional as F
from _devices import INTERPRETER, KERNEL_DEVICE, ON_GPU
from _invariance import assert_batch_invariant, same_bits
from _kernel_util import count_calls
from _tolerances import KERNEL_ATOL_RTOL
from test_matmul_tma import _sass

import jetdet
from jetdet import static_report as sr
from jetdet.kernels._common import descriptor_strides
from jetdet.kernels.attention import launch, launch_tma
from jetdet.kernels.attention import specs as attn_specs

pytestmark = pytest.mark.skipif(not (ON_GPU or INTERPRETER), reason="needs CUDA or TRITON_INTERPRET=1")
DEV = KERNEL_DEVICE
DTYPES = [torch.float16, torch.bfloat16]
TOL = KERNEL_ATOL_RTOL["attention"]


@pytest.fixture
def tma(monkeypatch):
    monkeypatch.setenv(launch_tma.KERNEL_ENV, "tma")


def _qkv(b, h, nq, nk, d, dv, dtype, seed=0, permuted=True):
    """q as a [B, N, H, D] projection viewed as [B, H, N, D] (the strides a DiT gives), k and v contiguous."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, nq, h, d, generator=g).to(dtype)
    q = q.permute(0, 2, 1, 3) if permuted else q.transpose(1, 2).contiguous()
    k = torch.randn(b, h, nk, d, generator=g).to(dtype)
    v = torch.randn(b, h, nk, dv, generator=g).to(dtype)
    return q.to(DEV), k.to(DEV), v.to(DEV)


def _ref(q, k, v, scale=None):
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.softmax(q.float() @ k.float().transpose(-1, -2) * scale, -1) @ v.float()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize(
    "b,h,nq,nk,d,dv",
    [(2, 3, 37, 45, 64, 64), (1, 2, 200, 130, 72, 72), (2, 1, 5, 300, 40, 40), (1, 1, 129, 129, 128, 128),
     (2, 2, 17, 9, 16, 16), (1, 2, 33, 70, 80, 96), (1, 1, 3, 1, 8, 8)],
)  # fmt: skip
def test_matches_fp32_reference(tma, monkeypatch, dtype, b, h, nq, nk, d, dv):
    """Head dims that are one block and those read as a block plus a tail (72 = 64 + 16), Nk below, at and past the
    tile, one key, and D != Dv; all of them through the TMA kernel."""
    calls = count_calls(monkeypatch, launch_tma, "attention_tma")
    q, k, v = _qkv(b, h, nq, nk, d, dv, dtype)
    out = launch.attention(q, k, v)
    assert calls == [1] and out.dtype == dtype and out.shape == (b, h, nq, dv)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), _ref(q, k, v), atol=atol, rtol=rtol)
    # a negative scale goes through the launcher's q negation, as for the default kernel
    torch.testing.assert_close(launch.attention(q, k, v, scale=-0.3).float(), _ref(q, k, v, -0.3), atol=atol,
                               rtol=rtol)  # fmt: skip


@pytest.mark.skipif(ON_GPU, reason="the two kernels' bits are compared in the interpreter, where both run the same "
                    "operations; a GPU compiles them to different instruction schedules")  # fmt: skip
@pytest.mark.parametrize("d,dv", [(64, 64), (72, 72), (40, 40), (80, 96)])
def test_same_bits_as_the_default_kernel_at_the_same_tile(monkeypatch, d, dv):
    """The TMA kernel is the default kernel's algorithm with other loads: at the default kernel's tile its output is
    bit for bit the default kernel's (so its indexing of rows, heads, tails and partial blocks is that kernel's)."""
    q, k, v = _qkv(2, 3, 70, 45, d, dv, torch.float16)
    default = launch.attention(q, k, v)
    tile = launch.config(max(d, dv), torch.float16, q.device)
    monkeypatch.setattr(launch_tma, "CONFIGS", {64: tile, 128: tile})
    monkeypatch.setenv(launch_tma.KERNEL_ENV, "tma")
    calls = count_calls(monkeypatch, launch_tma, "attention_tma")
    assert same_bits(launch.attention(q, k, v), default) and calls == [1]
    # negative control: at its own tile (another KV block size) the online softmax rounds differently
    monkeypatch.undo()
    monkeypatch.setenv(launch_tma.KERNEL_ENV, "tma")
    assert not same_bits(launch.attention(q, k, v), default)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_prefix_and_needle_bitwise(tma, dtype):
    """Several query blocks per (batch, head) and a partial KV block: every prefix of the batch and one item alone
    at a random slot give the same bits as the batch."""
    q, k, v = _qkv(5, 2, 150, 77, 72, 72, dtype)
    rng = random.Random(0)
    assert_batch_invariant(lambda q, k, v: launch.attention(q, k, v), [q, k, v], prefixes=(1, 2, 4, 5),
                           slots=[rng.randrange(5) for _ in range(2)])  # fmt: skip


def test_strides_a_descriptor_cannot_take_are_read_from_copies(tma, monkeypatch):
    """A q whose rows start off a 16-byte boundary (a slice of a wider buffer) and a k with a non-unit last stride
    are read from contiguous copies: the same bits as contiguous inputs. A batch of one has its unused batch stride
    replaced, and gives the batch's first item."""
    calls = count_calls(monkeypatch, launch_tma, "attention_tma")
    q, k, v = _qkv(2, 2, 40, 50, 64, 64, torch.float16, permuted=False)
    base = launch.attention(q, k, v)
    wide = torch.zeros(2, 2, 40, 65, dtype=q.dtype, device=q.device)
    wide[..., 1:] = q
    k_t = k.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert descriptor_strides(wide[..., 1:]) is None and descriptor_strides(k_t) is None
    assert same_bits(launch.attention(wide[..., 1:], k_t, v), base)
    assert same_bits(launch.attention(q[:1], k[:1], v[:1]), base[:1])
    assert calls == [1, 1, 1]


def test_env_switch_routes_eligible_calls_only(monkeypatch):
    calls = count_calls(monkeypatch, launch_tma, "attention_tma")
    q, k, v = _qkv(1, 2, 33, 40, 64, 64, torch.float16)
    default = launch.attention(q, k, v)
    assert calls == []  # not the default
    monkeypatch.setenv(launch_tma.KERNEL_ENV, "TMA ")
    tma = launch.attention(q, k, v)
    assert calls == [1]
    atol, rtol = TOL[torch.float16]
    torch.testing.assert_close(tma.float(), default.float(), atol=atol, rtol=rtol)
    launch.attention(q, k, v, mask=torch.zeros(33, 40, device=q.device))  # a mask: the default kernel
    launch.attention(q.float(), k.float(), v.float())  # fp32: the default kernel
    q36, k36, v36 = _qkv(1, 2, 33, 40, 36, 36, torch.float16)  # 72-byte rows: no descriptor
    launch.attention(q36, k36, v36)
    assert calls == [1]
    # in deterministic mode, torch's SDPA reaches it too
    monkeypatch.setenv("JETDET_BACKEND", "triton")
    with jetdet.mode("deterministic"):
        routed = F.scaled_dot_product_attention(q, k, v)
    assert calls == [1, 1] and same_bits(routed, tma)
    monkeypatch.setenv(launch_tma.KERNEL_ENV, "fa3")
    with pytest.raises(ValueError, match="JETDET_ATTENTION_KERNEL='fa3': expected 'default' or 'tma'"):
        launch.attention(q, k, v)


@pytest.mark.slow
def test_sm90_sass_is_tma_and_wgmma_without_spills_or_atomics():
    """Every TMA spec on sm_90: HGMMA and UTMALDG in the SASS, no spills, no atomics (the report's rows); negative
    control: the default kernel at the H200 tile has no UTMALDG."""
    specs = attn_specs.tma_specs()
    assert {s.constexprs["BLOCK_D2"] for s in specs} == {0, 16, 32}  # tails of 16 and 32 columns compiled too
    rows = sr.report(specs, archs=(90,))
    assert sr.violations(rows) == []
    assert all(r["hgmma"] > 0 and r["atomics"] == 0 and r["stack"] == 0 for r in rows), rows
    with sr.compiling():
        tma = _sass(next(s for s in specs if s.name.startswith("attention_tma[bf16,D=72")))
        plain = _sass(next(s for s in attn_specs.table_specs()
                           if s.name.startswith("attention[bf16,D=72,mask=False") and 90 in s.archs))  # fmt: skip
    assert re.search(r"\bUTMALDG\b", tma) and re.search(r"\bHGMMA\b", tma)
    assert not re.search(r"\bUTMALDG\b", plain)


def test_a_triton_without_descriptors_keeps_the_default_kernels_and_says_why(monkeypatch):
    """Triton before 3.4 has no ``triton.tools.tensor_descriptor``: the launchers still import (in a fresh process
    where that module cannot be imported), and an opt-in call is an error naming the variable."""
    import os
    import subprocess
    import sys

    code = ("import sys; sys.modules['triton.tools.tensor_descriptor'] = None\n"
            "import jetdet.kernels.attention.launch, jetdet.kernels.conv2d.launch, jetdet.kernels.matmul.launch\n"
            "import jetdet.kernels.attention.specs, jetdet.kernels.conv2d.specs, jetdet.kernels.matmul.specs")
    # without the interpreter, which imports the descriptor module itself in this Triton
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    monkeypatch.setitem(sys.modules, "triton.tools.tensor_descriptor", None)
    monkeypatch.setenv(launch_tma.KERNEL_ENV, "tma")
    q, k, v = _qkv(1, 1, 9, 9, 16, 16, torch.float16)
    with pytest.raises(RuntimeError, match=r"JETDET_ATTENTION_KERNEL=tma needs triton >= 3.4"):
        launch.attention(q, k, v)
    from jetdet.kernels.matmul import launch_tma as mm_tma

    with pytest.raises(RuntimeError, match=r"JETDET_MATMUL_KERNEL=tma needs triton >= 3.4"):
        mm_tma.matmul_tma(q[0, 0].contiguous(), torch.ones(16, 16, dtype=torch.float16, device=q.device))
