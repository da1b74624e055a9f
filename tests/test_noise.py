"""jetdet.noise: Philox known answers, Triton (interpreter) == torch bit for bit, batch/offset/shape
invariance, statistics, transform accuracy, argument errors, and the static no-MUFU/no-FFMA property."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import jetdet.noise as noise
from jetdet.kernels.noise import constants as K
from jetdet.kernels.noise import launch, reference
from jetdet.kernels.noise import specs as noise_specs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Random123 kat_vectors, philox4x32 10 rounds: counter (4 words), key (2 words) -> output (4 words)
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]

_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# Where the Triton kernels run: the GPU when there is one, else the interpreter on CPU.
KDEV = "cuda" if (torch.cuda.is_available() and not _INTERPRET) else "cpu"
triton_ok = pytest.mark.skipif(KDEV == "cpu" and not _INTERPRET, reason="Triton needs CUDA or TRITON_INTERPRET=1")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a float tensor, so comparisons are bitwise (and -0.0 != 0.0)."""
    if t.dtype == torch.float64:
        return t.view(torch.int64)
    return t.view(_INT_VIEW[t.dtype])


def both_backends(monkeypatch, *args, **kwargs):
    """(torch path on CPU, Triton kernel on KDEV) for the same arguments."""
    monkeypatch.setenv("JETDET_BACKEND", "torch")
    a = noise.randn(*args, **kwargs)
    monkeypatch.setenv("JETDET_BACKEND", "triton")
    b = noise.randn(*args, device=KDEV, **kwargs).cpu()
    monkeypatch.delenv("JETDET_BACKEND")
    return a, b


# ------------------------------------------------------------------------------------------------ Philox


def test_philox_kat_reference():
    for ctr, key, want in KAT:
        got = reference.philox4x32_10(*ctr, *key)
        assert tuple(int(w[0]) for w in got) == want


@triton_ok
def test_philox_kat_triton():
    ctr = torch.tensor([c for c, _, _ in KAT], dtype=torch.int64, device=KDEV)
    key = torch.tensor([k for _, k, _ in KAT], dtype=torch.int64, device=KDEV)
    got = launch.philox4x32_10(ctr, key)
    assert [tuple(r) for r in got.tolist()] == [w for _, _, w in KAT]


def test_philox_reference_broadcasts_and_matches_scalar_calls():
    c0 = np.arange(5, dtype=np.uint32)
    many = reference.philox4x32_10(c0, 7, 2**32 - 1, 3, 0xDEADBEEF, 0x12345678)
    for i in range(5):
        one = reference.philox4x32_10(i, 7, 2**32 - 1, 3, 0xDEADBEEF, 0x12345678)
        assert [int(w[i]) for w in many] == [int(w[0]) for w in one]


# ------------------------------------------------------------------------------- Triton == torch, bitwise


@triton_ok
@pytest.mark.parametrize(
    "shape,seed,item_offset,step",
    [
        ((1, 1), 0, 0, 0),
        ((3, 37), 1, 0, 0),
        ((2, 3, 5, 7), 2**64 - 1, 5, 999),
        ((4, 4, 8, 8), 0xDEADBEEFCAFEF00D, 2**32 - 2, 2**32 - 1),  # item crosses 2^32: carry into c2
        ((2, 1023), 2**63, 2**64 - 2, 12),
        ((5,), 42, 0, 1),  # 1-D: one element per item
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_triton_equals_torch(monkeypatch, shape, seed, item_offset, step, dtype):
    a, b = both_backends(monkeypatch, shape, seed, item_offset=item_offset, step=step, dtype=dtype)
    assert a.shape == b.shape == shape and a.dtype == b.dtype == dtype
    assert torch.equal(bits(a), bits(b))
    assert torch.isfinite(a).all()


@triton_ok
def test_transform_triton_equals_torch_on_chosen_words():
    """Every branch and the extremes: k = 0 (smallest q, largest |z|), the central/tail split, q near 1/2,
    both signs, and a stride through all 2^23 values of k."""
    k = torch.cat(
        [
            torch.arange(0, 2**23, 61, dtype=torch.int64),
            torch.arange(0, 64, dtype=torch.int64),
            torch.arange(2**23 - 64, 2**23, dtype=torch.int64),
            torch.arange(1258291 - 64, 1258291 + 64, dtype=torch.int64),  # q ~ 0.075 (branch switch)
        ]
    )
    low = torch.randint(0, 256, k.shape, dtype=torch.int64)  # bits 0..7 are ignored by the transform
    words = torch.cat([(k << 8) | low, (k << 8) | low | (1 << 31)])
    a = launch.bits_to_normal(words.to(KDEV)).cpu()
    b = reference.bits_to_normal(words)
    assert torch.equal(bits(a), bits(b))


@triton_ok
@pytest.mark.parametrize("block", [32, 256, 2048])
def test_kernel_output_independent_of_block_and_grid(monkeypatch, block):
    want = reference.randn_reference(3, 1027, 77, 10, 5)
    got = launch.philox_randn(3, 1027, 77, item_offset=10, step=5, device=KDEV, block=block).cpu()
    assert torch.equal(bits(got), bits(want))
    monkeypatch.setattr(launch, "MAX_GRID_Y", 2)  # force the strided loop over an item's blocks
    got = launch.philox_randn(3, 1027, 77, item_offset=10, step=5, device=KDEV, block=block).cpu()
    assert torch.equal(bits(got), bits(want))


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_equals_cpu(dtype):
    """The default dispatch: CUDA -> compiled kernel, CPU -> torch path; the same bits."""
    for shape, seed, off, step in [((4, 16, 64, 64), 2**64 - 1, 3, 7), ((3, 1000003), 1, 2**32 - 1, 0)]:
        g = noise.randn(shape, seed, item_offset=off, step=step, dtype=dtype, device="cuda")
        c = noise.randn(shape, seed, item_offset=off, step=step, dtype=dtype)
        assert g.device.type == "cuda" and torch.equal(bits(g.cpu()), bits(c))


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_equals_cpu_h200_case(dtype):
    """The call that crashed on an H200 (seed 1 specialised to a constant): 8x4x128x128, item_offset 5, step 3."""
    g = noise.randn((8, 4, 128, 128), 1, item_offset=5, step=3, dtype=dtype, device="cuda")
    c = noise.randn((8, 4, 128, 128), 1, item_offset=5, step=3, dtype=dtype)
    assert torch.equal(bits(g.cpu()), bits(c))
    one = noise.randn((1, 4, 128, 128), 1, item_offset=5 + 6, step=3, dtype=dtype, device="cuda")
    assert torch.equal(bits(one[0]), bits(g[6]))


@pytest.mark.slow
def test_real_launches_compile_as_the_jit_specialises_them():
    """The launches philox_randn really makes (seed words 1 and 16, item word 1, N = 1, ...), recorded and bound
    by Triton's JIT binder, compile for sm_90 without violations; the data words never become constants."""
    from jetdet import static_report as sr

    with sr.capture_launches([launch.philox_randn_kernel]) as log:
        for n_items, numel, seed, off, step, dtype in [
            (2, 37, 1, 5, 3, torch.float32),  # the H200 case's scalars
            (2, 37, 1, 5, 3, torch.bfloat16),
            (1, 1, 16, 1, 1, torch.float32),  # N == 1, seed 16, item 1, step 1
        ]:
            launch.philox_randn(n_items, numel, seed, item_offset=off, step=step, dtype=dtype, device=KDEV,
                                block=launch.BLOCK)  # the GPU's block, also in the interpreter
    assert len(log) == 3
    specs = {}
    for kernel, args, kwargs in log:
        sig = sr.jit_specialization(kernel, args, kwargs)[0]
        assert all(sig[k] == "i32" for k in ("key0", "key1", "item_lo", "item_hi", "step")), sig
        key = sr.specialization_key(kernel, args, kwargs)
        specs.setdefault(key, sr.launch_spec(kernel, args, kwargs, name=f"noise launch {len(specs)}",
                                             forbid=("no_mufu", "no_fma")))
    rows = sr.report(list(specs.values()), archs=(sr.JIT_ARCH,), jobs=1)
    assert len(rows) == len(specs) >= 2 and sr.violations(rows) == [], sr.violations(rows)
    # negative control: the same seed-1 launch of the kernel without do_not_specialize gets key0 as a constant
    import triton

    kernel, args, kwargs = log[0]
    assert sr.jit_specialization(triton.jit(kernel.fn), args, kwargs)[0]["key0"] == "constexpr"


def test_forced_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("JETDET_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        noise.randn((1, 4), 0)


# ----------------------------------------------------------------------------------------- invariance


def test_item_depends_only_on_seed_item_step():
    full = noise.randn((8, 3, 11), 1234, step=4)
    for i in range(8):
        alone = noise.randn((1, 3, 11), 1234, item_offset=i, step=4)
        assert torch.equal(bits(full[i]), bits(alone[0]))
    # any split of the batch
    parts = [noise.randn((3, 3, 11), 1234, step=4), noise.randn((5, 3, 11), 1234, item_offset=3, step=4)]
    assert torch.equal(bits(torch.cat(parts)), bits(full))
    # an offset batch is a window of a bigger one
    assert torch.equal(bits(noise.randn((4, 3, 11), 1234, item_offset=2, step=4)), bits(full[2:6]))


@triton_ok
def test_item_invariance_holds_on_the_kernel_too(monkeypatch):
    monkeypatch.setenv("JETDET_BACKEND", "triton")
    full = noise.randn((6, 50), 9, step=2, device=KDEV)
    alone = noise.randn((1, 50), 9, item_offset=4, step=2, device=KDEV)
    assert torch.equal(bits(full[4]), bits(alone[0]))


def test_element_depends_only_on_its_flat_index():
    """Element j of an item does not depend on the item's size or shape."""
    big = noise.randn((2, 37), 5).reshape(2, -1)
    assert torch.equal(bits(noise.randn((2, 10), 5)), bits(big[:, :10]))
    assert torch.equal(bits(noise.randn((2, 37), 5)), bits(noise.randn((2, 1, 37), 5).reshape(2, 37)))
    assert torch.equal(bits(noise.randn((2, 6, 6), 5).reshape(2, 36)), bits(big[:, :36]))


def test_negative_control_torch_randn_is_not_batch_invariant():
    """The default generator gives item 3 of a batch different values from the same item alone."""
    torch.manual_seed(1234)
    batch = torch.randn(8, 3, 11)
    torch.manual_seed(1234)
    alone = torch.randn(1, 3, 11)
    assert not torch.equal(batch[3], alone[0])


def test_repeatable_and_independent_of_torch_rng_state():
    a = noise.randn((2, 64), 7)
    torch.manual_seed(999)
    torch.randn(100)
    assert torch.equal(bits(a), bits(noise.randn((2, 64), 7)))


def test_seeds_steps_items_differ():
    base = noise.randn((2, 256), 1, step=0)
    for other in (
        noise.randn((2, 256), 2, step=0),
        noise.randn((2, 256), 1 + 2**32, step=0),  # high key word matters
        noise.randn((2, 256), 1, step=1),
        noise.randn((2, 256), 1, item_offset=2**32, step=0),  # high item word matters
    ):
        assert (base != other).float().mean() > 0.99
    assert (base[0] != base[1]).float().mean() > 0.99
    # streams are uncorrelated
    flat = [base.flatten().double(), noise.randn((2, 256), 1, step=1).flatten().double()]
    assert abs(torch.corrcoef(torch.stack(flat))[0, 1]) < 0.1


# ------------------------------------------------------------------------------------------ dtypes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_are_the_float32_values_rounded(dtype):
    z32 = noise.randn((3, 333), 11, step=3)
    z = noise.randn((3, 333), 11, step=3, dtype=dtype)
    assert z.dtype == dtype and z.device.type == "cpu"
    assert torch.equal(bits(z), bits(z32.to(dtype)))
    if dtype == torch.float64:
        assert torch.equal(z.float(), z32)


# ------------------------------------------------------------------------------------------ statistics


def _ks_statistic(z: torch.Tensor) -> float:
    n = z.numel()
    s, _ = z.double().sort()
    cdf = 0.5 * (1.0 + torch.erf(s / math.sqrt(2.0)))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max((i / n - cdf).max().item(), (cdf - (i - 1) / n).max().item())


def test_ks_helper_rejects_a_non_normal_sample():
    u = (torch.rand(100_000, dtype=torch.float64) - 0.5) * math.sqrt(12.0)  # mean 0, std 1, uniform
    assert _ks_statistic(u) > 0.02


@pytest.mark.parametrize("seed", [0, 2**64 - 1])
def test_normality_1e6(seed):
    # 16 items x 62500: also exercises the item counter
    z = noise.randn((16, 250, 250), seed).flatten().double()
    mean, std = z.mean().item(), z.std().item()
    assert abs(mean) < 0.005, mean
    assert abs(std - 1.0) < 0.005, std
    assert abs((z**3).mean().item()) < 0.02  # skewness
    assert abs((z**4).mean().item() - 3.0) < 0.03  # excess kurtosis
    assert _ks_statistic(z) < 0.003
    zmax = z.abs().max().item()
    assert 4.0 < zmax < 5.5
    # tails: P(|z| > 3) = 0.0026998
    assert abs((z.abs() > 3).double().mean().item() - 0.0026998) < 0.0004
    # neighbouring elements (often the same Philox call) are uncorrelated
    assert abs(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1].item()) < 0.005


def test_transform_accuracy_and_shape():
    k = torch.arange(0, 2**23, 7, dtype=torch.int64)
    k = torch.cat([k, torch.tensor([2**23 - 1])])
    z = reference.bits_to_normal(k << 8)
    zneg = reference.bits_to_normal((k << 8) | (1 << 31))
    q = (2 * k + 1).double() * K.Q_SCALE
    exact = -torch.special.ndtri(q)
    err = (z.double() - exact).abs()
    assert err.max().item() < 2.5e-6
    assert (err / exact.abs()).max().item() < 1e-6
    assert torch.equal(zneg, -z)  # exactly symmetric
    assert (z > 0).all()
    steps = z[1:] - z[:-1]  # decreasing in k up to rounding noise
    assert steps.max().item() < 1e-6
    assert z[0].item() == pytest.approx(5.4199, abs=1e-3)  # the largest |z|: q = 2^-25
    assert 0 < z[-1].item() < 1e-6  # the smallest |z|: q = 1/2 - 2^-25


# ------------------------------------------------------------------------------------------ arguments


def test_zero_size_and_defaults():
    for shape in [(0,), (0, 4), (3, 0), (2, 0, 5)]:
        z = noise.randn(shape, 1)
        assert z.shape == shape and z.numel() == 0 and z.dtype == torch.float32 and z.device.type == "cpu"
    assert noise.randn(torch.Size([2, 3]), 1).shape == (2, 3)
    assert noise.randn([2, 3], 1, device="cpu").shape == (2, 3)
    assert noise.randn((2, 3), np.uint64(2**64 - 1), step=np.int64(3)).shape == (2, 3)


@triton_ok
def test_zero_size_on_the_kernel(monkeypatch):
    monkeypatch.setenv("JETDET_BACKEND", "triton")
    assert noise.randn((0, 4), 1, device=KDEV).shape == (0, 4)
    assert noise.randn((2, 0), 1, dtype=torch.bfloat16, device=KDEV).shape == (2, 0)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(shape=5, seed=0), TypeError, "shape"),
        (dict(shape=(), seed=0), ValueError, "shape"),
        (dict(shape=(2, -1), seed=0), ValueError, "shape"),
        (dict(shape=(2, 1.5), seed=0), ValueError, "shape"),
        (dict(shape=(2, True), seed=0), ValueError, "shape"),
        (dict(shape=(2, 3), seed=-1), ValueError, "seed"),
        (dict(shape=(2, 3), seed=2**64), ValueError, "seed"),
        (dict(shape=(2, 3), seed=1.0), TypeError, "seed"),
        (dict(shape=(2, 3), seed=True), TypeError, "seed"),
        (dict(shape=(2, 3), seed="1"), TypeError, "seed"),
        (dict(shape=(2, 3), seed=0, item_offset=-1), ValueError, "item_offset"),
        (dict(shape=(2, 3), seed=0, item_offset=2**64 - 1), ValueError, "item_offset"),
        (dict(shape=(2, 3), seed=0, item_offset=0.0), TypeError, "item_offset"),
        (dict(shape=(2, 3), seed=0, step=-1), ValueError, "step"),
        (dict(shape=(2, 3), seed=0, step=2**32), ValueError, "step"),
        (dict(shape=(2, 3), seed=0, dtype=torch.int32), TypeError, "dtype"),
        (dict(shape=(2, 3), seed=0, dtype="float32"), TypeError, "dtype"),
        (dict(shape=(2, 3), seed=0, device="nonsense"), ValueError, "device"),
        (dict(shape=(1, 2**31), seed=0), ValueError, "elements per item"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        noise.randn(**kwargs)


# ------------------------------------------------------------------------------- static SASS property


def test_compile_specs_forbid_mufu_and_fma():
    specs = noise_specs.compile_specs()
    assert {s.name for s in specs} == {f"noise.philox_randn[{d}]" for d in ("fp32", "fp16", "bf16")}
    for s in specs:
        assert set(s.forbid) == {"no_mufu", "no_fma"}
        assert s.options["enable_fp_fusion"] is False
        assert s.deterministic
        params = set(s.signature) | set(s.constexprs)
        assert params == {
            "out_ptr", "N", "blocks_per_item", "key0", "key1", "item_lo", "item_hi", "step", "BLOCK",
            "OUT_BF16_BITS",
        }  # fmt: skip


_SASS_SCRIPT = r"""
import collections, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
import jetdet
from jetdet.kernels.noise.specs import compile_specs
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
spec = compile_specs()[0]
for fusion in (False, True):
    opts = dict(spec.options, enable_fp_fusion=fusion)
    k = triton.compile(triton.compiler.ASTSource(spec.fn, spec.signature, spec.constexprs),
                       target=GPUTarget("cuda", 90, 32), options=opts)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    sass = subprocess.run([BIN, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    os.unlink(f.name)
    ops = collections.Counter(m.group(1).split(".")[0] for m in
                              re.finditer(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass))
    print(f"fusion={fusion} MUFU={ops['MUFU']} FFMA={ops['FFMA']} FMUL={ops['FMUL']} IMAD={ops['IMAD']}")
"""


@pytest.mark.slow
def test_sass_has_no_mufu_and_no_ffma():
    """Cross-compile for sm_90 in a subprocess (this process runs the interpreter): 0 MUFU, 0 FFMA with
    fusion off; the negative control with fusion on does contain FFMA."""
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")):
        pytest.skip("triton's bundled cuobjdump is missing")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _SASS_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())
    off = dict(kv.split("=") for kv in lines["fusion=False"].split())
    on = dict(kv.split("=") for kv in lines["fusion=True"].split())
    assert off["MUFU"] == "0" and off["FFMA"] == "0", out.stdout
    assert int(off["FMUL"]) > 0 and int(off["IMAD"]) > 0  # the parse found instructions at all
    assert int(on["FFMA"]) > 0, out.stdout  # negative control: contraction is what enable_fp_fusion stops
