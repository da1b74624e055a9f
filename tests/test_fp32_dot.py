"""``JETDET_FP32_DOT=tf32x3`` (``kernels/_common.py``): fp32 GEMM and conv2d on the tensor cores with Triton's
split-precision dot, opt-in.

What a CPU can check: the setting is read and validated, it reaches the launch (the precision and the fixed tile
of the device's arch), 16-bit launches keep theirs, and the kernels at that tile are accurate and batch invariant.
The interpreter ignores a dot's precision, so on CPU these runs compute the IEEE products at the tf32x3 tile; with
CUDA present (``tests/_devices.py``) the same tests run the tensor-core dot itself, at fp32's tolerance.
``bench/fp32_dot_accuracy.py`` emulates the split on CPU; its test is here too.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from _invariance import assert_batch_invariant
from _kernel_util import DEV, close_gemm, needs_kernels, rand

from jetdet import configs
from jetdet import static_report as sr
from jetdet.kernels._common import FP32_DOT_ENV, fp32_dot, tf32x3_config
from jetdet.kernels.conv2d import launch as conv_launch
from jetdet.kernels.conv2d.reference import conv2d_reference
from jetdet.kernels.matmul import launch as mm_launch
from jetdet.kernels.matmul.reference import mm_reference

ROOT = Path(__file__).resolve().parents[1]


def _linear(x, w, bias):
    return mm_launch.matmul(x, w.t(), bias)


def _conv(x, w, bias):
    return conv_launch.conv2d(x, w, bias, (1, 1), (1, 1))


# op -> (make(dtype) -> (items, shared), call, fp32 reference); odd sizes so that every tile has tails
CASES = {
    "matmul": (lambda dt: ([rand(131, 200, dtype=dt)], [rand(70, 200, dtype=dt, scale=200**-0.5), rand(70, dtype=dt)]),
               _linear, lambda x, w, bias: mm_reference(x, w.t(), bias)),
    "conv2d": (lambda dt: ([rand(3, 20, 9, 11, dtype=dt)], [rand(24, 20, 3, 3, dtype=dt, scale=180**-0.5),
                                                         rand(24, dtype=dt)]),
               _conv, lambda x, w, bias: conv2d_reference(x, w, bias, (1, 1), (1, 1))),
}


@pytest.fixture
def tf32x3(monkeypatch):
    monkeypatch.setenv(FP32_DOT_ENV, "tf32x3")


def test_setting_values(monkeypatch):
    monkeypatch.delenv(FP32_DOT_ENV, raising=False)
    assert fp32_dot() == "ieee"
    for value, want in (("", "ieee"), ("ieee", "ieee"), (" TF32x3 ", "tf32x3")):
        monkeypatch.setenv(FP32_DOT_ENV, value)
        assert fp32_dot() == want, value


@needs_kernels
@pytest.mark.parametrize("op", sorted(CASES))
def test_bad_setting_raises_from_the_launch(monkeypatch, op):
    """A value that is not a choice fails the call, naming the variable and the choices (no silent IEEE)."""
    monkeypatch.setenv(FP32_DOT_ENV, "tf32")
    make, call, _ = CASES[op]
    items, shared = make(torch.float32)
    with pytest.raises(ValueError, match=r"JETDET_FP32_DOT='tf32': expected 'ieee' or 'tf32x3'"):
        call(*[t.to(DEV) for t in items], *[t.to(DEV) for t in shared])


def _launch_kwargs(op, dtype):
    make, call, _ = CASES[op]
    items, shared = make(dtype)
    with sr.capture_launches() as log:
        call(*[t.to(DEV) for t in items], *[t.to(DEV) for t in shared])
    kernel = {"matmul": mm_launch.matmul_kernel, "conv2d": conv_launch.conv2d_kernel}[op]
    mine = [kw for k, _, kw in log if k is kernel]
    assert len(mine) == 1, [getattr(k, "fn", k).__name__ for k, _, _ in log]
    return mine[0]


@needs_kernels
@pytest.mark.parametrize("op", sorted(CASES))
def test_setting_reaches_the_launch(monkeypatch, op):
    """fp32 under tf32x3: ``F32_DOT="tf32x3"`` at the arch's fixed tile. Unset: the IEEE dot at the table's tile.
    16-bit: unchanged by the setting (their dots are the tensor cores' own)."""
    arch = configs.device_identity(torch.device(DEV))[1]
    tile = tf32x3_config(arch)
    table = {"matmul": mm_launch.config, "conv2d": conv_launch.config}[op]

    monkeypatch.delenv(FP32_DOT_ENV, raising=False)
    ieee = _launch_kwargs(op, torch.float32)
    bf16 = _launch_kwargs(op, torch.bfloat16)
    assert ieee["F32_DOT"] == "ieee" and bf16["F32_DOT"] == "ieee"
    n = CASES[op][0](torch.float32)[1][0].shape[0]
    assert ieee["BLOCK_N"] == table(n, torch.float32, torch.device(DEV))["BLOCK_N"]

    monkeypatch.setenv(FP32_DOT_ENV, "tf32x3")
    got = _launch_kwargs(op, torch.float32)
    assert got["F32_DOT"] == "tf32x3"
    assert {k: got[k] for k in tile} == tile
    assert _launch_kwargs(op, torch.bfloat16) == bf16


@needs_kernels
@pytest.mark.parametrize("op", sorted(CASES))
def test_accurate_and_batch_invariant(tf32x3, op):
    """fp32 under tf32x3 against the fp32 reference at fp32's tolerance, and bitwise: every prefix, two slots."""
    make, call, ref = CASES[op]
    items, shared = make(torch.float32)
    items, shared = [t.to(DEV) for t in items], [t.to(DEV) for t in shared]
    out = call(*items, *shared)
    close_gemm(out, ref(*[t.cpu() for t in items], *[t.cpu() for t in shared]).to(out.device), torch.float32)
    n = items[0].shape[0]
    prefixes = range(1, n + 1) if n <= 8 else (1, 2, 7, 64, n)
    assert_batch_invariant(call, items, shared, prefixes=prefixes, slots=(0, n - 1), full=out, label=op)


def _accuracy_module():
    spec = importlib.util.spec_from_file_location("fp32_dot_accuracy", ROOT / "bench" / "fp32_dot_accuracy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_emulation_splits_as_documented():
    """The bench's emulation: big + small gives x back exactly where small fits in TF32; big is TF32 rounded to
    nearest with ties away from zero (``cvt.rna.tf32.f32``); the dropped term is the only difference from the
    exact product of fp32 values, so the emulated dot is far closer to the fp64 result than one TF32 dot."""
    acc = _accuracy_module()
    x = torch.tensor([1.0 + 2**-11, 1.0 + 2**-10 + 2**-11, -(1.0 + 2**-11), 1.0 + 2**-20, 3.0], dtype=torch.float32)
    big = acc.tf32_rna(x)
    # 2**-11 is half a TF32 ulp at 1.0: ties go away from zero; 1 + 2**-20 rounds to 1
    assert big.tolist() == [1.0 + 2**-10, 1.0 + 2**-9, -(1.0 + 2**-10), 1.0, 3.0]
    assert torch.equal(big + acc.tf32_trunc(x - big), x)
    rows = acc.measure([(64, 512, 48)], seed=0)
    (r,) = rows
    assert r["tf32x3"] < 4 * r["ieee"] and r["tf32"] > 100 * r["tf32x3"], r
