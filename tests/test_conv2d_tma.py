"""The TMA-fed conv2d (kernels/conv2d/kernel_tma.py, opt-in with JETDET_CONV_KERNEL=tma): against the fp32
reference, the same bits as the default kernel when both step through the channels alike, bitwise batch invariant
(prefix and needle), routed only for eligible calls, and on sm_90 made of TMA loads and warpgroup MMAs with no spills
and no atomics (cross-compiled)."""

from __future__ import annotations

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
from jetdet.kernels.conv2d import launch, launch_tma
from jetdet.kernels.conv2d import specs as conv_specs

pytestmark = pytest.mark.skipif(not (ON_GPU or INTERPRETER), reason="needs CUDA or TRITON_INTERPRET=1")
DEV = KERNEL_DEVICE
DTYPES = [torch.float16, torch.bfloat16]
TOL = KERNEL_ATOL_RTOL["matmul"]  # conv2d shares the GEMM's tolerances (kernels/matmul/README.md)
CL = torch.channels_last


@pytest.fixture
def tma(monkeypatch):
    monkeypatch.setenv(launch_tma.KERNEL_ENV, "tma")


def _operands(b, c, h, w, o, k, dtype, channels_last=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g).to(dtype)
    x = x.contiguous(memory_format=CL) if channels_last else x
    wt = (torch.randn(o, c, k, k, generator=g) * (c * k * k) ** -0.5).to(dtype)
    bias = torch.randn(o, generator=g).to(dtype)
    return x.to(DEV), wt.to(DEV), bias.to(DEV)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize(
    "b,c,h,w,o,k,pad,cl",
    [(2, 16, 13, 11, 24, 3, 1, True), (1, 64, 20, 37, 128, 3, 1, False), (3, 8, 9, 9, 8, 1, 0, True),
     (2, 32, 17, 19, 72, 3, 0, True), (1, 16, 5, 40, 16, 5, 2, False), (1, 8, 1, 1, 16, 3, 1, True)],
)  # fmt: skip
def test_matches_fp32_reference(tma, monkeypatch, dtype, b, c, h, w, o, k, pad, cl):
    """3x3, 1x1 and 5x5 filters, with and without padding, images smaller than a tile and not a multiple of it, both
    tiles (O <= 64 and above), NCHW and channels-last input: the output in the default kernel's layout."""
    calls = count_calls(monkeypatch, launch_tma, "conv2d_tma")
    x, wt, bias = _operands(b, c, h, w, o, k, dtype, cl)
    out = launch.conv2d(x, wt, bias, (1, 1), (pad, pad))
    assert calls == [1] and out.dtype == dtype
    monkeypatch.delenv(launch_tma.KERNEL_ENV)
    default = launch.conv2d(x, wt, bias, (1, 1), (pad, pad))
    assert out.shape == default.shape and out.stride() == default.stride()
    atol, rtol = TOL[dtype]
    ref = F.conv2d(x.float(), wt.float(), bias.float(), padding=pad)
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)


@pytest.mark.skipif(ON_GPU, reason="the two kernels' bits are compared in the interpreter, where both run the same "
                    "operations; a GPU compiles them to different instruction schedules")  # fmt: skip
@pytest.mark.parametrize("c,o,k,pad", [(64, 128, 3, 1), (48, 40, 3, 0), (16, 24, 1, 0)])
def test_same_bits_as_the_default_kernel_with_the_same_channel_block(monkeypatch, c, o, k, pad):
    """The default kernel's reduction (tap outer, channel block inner, in order) with other loads and other pixel
    tiles: with the default kernel's channel block its output is bit for bit the default kernel's (so its zero
    padding, taps and partial tiles are that kernel's)."""
    x, wt, bias = _operands(2, c, 19, 21, o, k, torch.float16)
    default = launch.conv2d(x, wt, bias, (1, 1), (pad, pad))
    block_k = launch.config(o, torch.float16, x.device)["BLOCK_K"]
    same_k = {n: {**cfg, "BLOCK_K": block_k} for n, cfg in launch_tma.CONFIGS.items()}
    monkeypatch.setattr(launch_tma, "CONFIGS", same_k)
    monkeypatch.setenv(launch_tma.KERNEL_ENV, "tma")
    calls = count_calls(monkeypatch, launch_tma, "conv2d_tma")
    assert same_bits(launch.conv2d(x, wt, bias, (1, 1), (pad, pad)), default) and calls == [1]
    if c > block_k:  # negative control: with its own channel block (64) the sums are grouped otherwise
        monkeypatch.undo()
        monkeypatch.setenv(launch_tma.KERNEL_ENV, "tma")
        assert not same_bits(launch.conv2d(x, wt, bias, (1, 1), (pad, pad)), default)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_prefix_and_needle_bitwise(tma, dtype):
    x, wt, bias = _operands(5, 32, 19, 21, 72, 3, dtype)
    rng = random.Random(0)
    assert_batch_invariant(lambda x: launch.conv2d(x, wt, bias, (1, 1), (1, 1)), [x], prefixes=(1, 2, 4, 5),
                           slots=[rng.randrange(5) for _ in range(2)])  # fmt: skip


def test_env_switch_routes_eligible_calls_only(monkeypatch):
    calls = count_calls(monkeypatch, launch_tma, "conv2d_tma")
    x, wt, bias = _operands(1, 16, 9, 10, 24, 3, torch.float16)
    default = launch.conv2d(x, wt, bias, (1, 1), (1, 1))
    assert calls == []  # not the default
    monkeypatch.setenv(launch_tma.KERNEL_ENV, " Tma")
    tma = launch.conv2d(x, wt, bias, (1, 1), (1, 1))
    assert calls == [1]
    atol, rtol = TOL[torch.float16]
    torch.testing.assert_close(tma.float(), default.float(), atol=atol, rtol=rtol)
    launch.conv2d(x, wt, bias, (2, 2), (1, 1))  # stride 2: the default kernel
    launch.conv2d(x.float(), wt.float(), bias.float(), (1, 1), (1, 1))  # fp32: the default kernel
    x4, w4, b4 = _operands(1, 4, 9, 10, 24, 3, torch.float16)  # 4 channels = 8-byte pixels: no descriptor
    launch.conv2d(x4, w4, b4, (1, 1), (1, 1))
    assert calls == [1]
    # in deterministic mode, torch's conv2d reaches it too
    monkeypatch.setenv("JETDET_BACKEND", "triton")
    with jetdet.mode("deterministic"):
        routed = F.conv2d(x, wt, bias, padding=1)
    assert calls == [1, 1] and same_bits(routed, tma)
    monkeypatch.setenv(launch_tma.KERNEL_ENV, "cudnn")
    with pytest.raises(ValueError, match="JETDET_CONV_KERNEL='cudnn': expected 'default' or 'tma'"):
        launch.conv2d(x, wt, bias, (1, 1), (1, 1))


@pytest.mark.slow
def test_sm90_sass_is_tma_and_wgmma_without_spills_or_atomics():
    """Every TMA spec on sm_90: HGMMA and UTMALDG in the SASS, no spills, no atomics (the report's rows); negative
    control: the default kernel at a tile of the same size has no UTMALDG."""
    specs = conv_specs.tma_specs()
    rows = sr.report(specs, archs=(90,))
    assert sr.violations(rows) == []
    assert all(r["hgmma"] > 0 and r["atomics"] == 0 and r["stack"] == 0 for r in rows), rows
    with sr.compiling():
        tma = _sass(specs[-1])
        plain = _sass(next(s for s in conv_specs.table_specs()
                           if s.name.startswith("conv2d_bf16_3x3s1p1_cl_128x") and 90 in s.archs))  # fmt: skip
    assert re.search(r"\bUTMALDG\b", tma) and re.search(r"\bHGMMA\b", tma)
    assert not re.search(r"\bUTMALDG\b", plain)
