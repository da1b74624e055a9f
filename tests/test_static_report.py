"""Static report: every collected kernel spec cross-compiles for sm_80/89/90 with no violations (no atomics in
deterministic kernels, no spills, shared memory within limits, no forbidden instruction classes), the GEMM
uses tensor cores for fp16 and never TF32 for fp32, and deliberately bad kernels are caught (negative
controls). Runs with TRITON_INTERPRET=1 set, like the rest of the suite; results are cached on disk."""

from __future__ import annotations

import dataclasses

import pytest
import triton
import triton.language as tl

from jetdet import static_report as sr
from jetdet.kernels._common import CompileSpec

pytestmark = pytest.mark.slow

ARCHS = (80, 89, 90)


@pytest.fixture(scope="module")
def rows():
    return sr.report(archs=ARCHS)  # all KERNEL_MODULES; a module that fails to give specs is an error row


def test_every_spec_compiles_without_violations(rows):
    names = {r["kernel"] for r in rows}
    assert any(n.startswith("matmul_") for n in names)
    assert any(n.startswith("conv2d_") for n in names)
    bad = sr.violations(rows)
    assert not bad, "\n" + sr.format_table(r for r in rows if sr.row_violations(r)) + "\n" + "\n".join(bad)


def test_matmul_and_conv_cover_all_dtypes_and_archs(rows):
    for op in ("matmul", "conv2d"):
        for dt in ("fp32", "fp16", "bf16"):
            archs = {r["arch"] for r in rows if r["kernel"].startswith(f"{op}_{dt}_")}
            assert archs == set(ARCHS), (op, dt, archs)


def test_gemm_uses_tensor_cores_for_half(rows):
    for r in rows:
        if r["kernel"].startswith(("matmul_fp16_", "matmul_bf16_", "conv2d_fp16_", "conv2d_bf16_")):
            if r["arch"] in (80, 89):
                assert r["hmma"] > 0, r
            else:  # sm_90: warpgroup MMA (or HMMA for tiles wgmma cannot take)
                assert r["hgmma"] + r["hmma"] > 0, r
            assert r["tf32"] == 0, r


def test_fp32_kernels_never_use_tf32(rows):
    """The fp32 GEMM and conv2d run IEEE FFMA dots, no TF32; the opt-in ``JETDET_FP32_DOT=tf32x3`` variants run
    the TF32 tensor cores only (three MMAs per dot, no FFMA fallback)."""
    fp32 = [r for r in rows if r["kernel"].startswith(("matmul_fp32_", "conv2d_fp32_"))]
    split = [r for r in fp32 if "_tf32x3_" in r["kernel"]]
    assert fp32 and split
    for r in fp32:
        if r in split:
            assert r["tf32"] > 0 and r["tf32"] == r["hmma"] + r["hgmma"] and r["ffma"] == 0, r
            assert r["tf32"] % 3 == 0, r  # small*big + big*small + big*big
        else:
            assert r["tf32"] == 0 and r["hmma"] == 0 and r["hgmma"] == 0, r
            assert r["ffma"] > 0, r  # the IEEE dot runs on FFMA
    assert {r["arch"] for r in split} == {80, 89, 90}


def test_table_and_cli(rows, capsys):
    table = sr.format_table(rows[:3])
    assert table.splitlines()[0].split()[:3] == ["kernel", "arch", "regs"]
    assert len(table.splitlines()) == 2 + 3
    argv = ["--module", "jetdet.kernels.matmul.specs", "--only", "matmul_fp16_128x64x32_w4s3", "--arch", "80"]
    assert sr.main(argv) == 0  # cached by the fixture
    out = capsys.readouterr().out
    assert "matmul_fp16_128x64x32_w4s3" in out and "sm_80" in out
    # --quiet (CI's second Triton version): no table for a clean run, the summary names the Triton version
    assert sr.main([*argv, "--quiet"]) == 0
    cap = capsys.readouterr()
    assert cap.out == "" and f"1 kernel/arch pairs, no violations (triton {triton.__version__})" in cap.err
    assert sr.main([*argv, "--arch", "80", "--quiet"]) == 0  # a repeated --arch is one arch, one row
    assert "1 kernel/arch pairs" in capsys.readouterr().err
    # a report that would check nothing is an error, never "0 kernel/arch pairs, no violations"
    for bad, want in (([*argv[:4], "--arch", "100"], "--arch: no kernel is built for compute capability [100]"),
                      ([*argv[:2], "--only", "no_such_kernel"], "--only: no kernel name contains"),
                      ([*argv, "--jobs", "0"], "--jobs: expected a number of processes >= 1")):
        with pytest.raises(SystemExit) as e:
            sr.main(bad)
        assert e.value.code == 2 and want in capsys.readouterr().err, bad


def test_every_kernel_folder_is_collected_and_none_is_skipped(monkeypatch):
    """Every kernel folder with a launch.py has its specs module in KERNEL_MODULES; a module that is missing (a
    renamed folder), has no compile_specs or gives no spec is an error, never silently left out."""
    import os
    import sys
    import types

    import jetdet.kernels

    root = os.path.dirname(os.path.abspath(jetdet.kernels.__file__))
    folders = {d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "launch.py"))}
    assert {f"jetdet.kernels.{d}.specs" for d in folders} == set(sr.KERNEL_MODULES)
    monkeypatch.setitem(sys.modules, "empty_specs", types.SimpleNamespace(compile_specs=list))
    for bad in ("jetdet.kernels.no_such_op.specs", "jetdet.kernels.reduce.launch", "empty_specs"):
        with pytest.raises((ImportError, AttributeError, ValueError)):
            sr.collect_specs([bad], jit=False)
        errors: list = []
        assert sr.collect_specs([bad, "jetdet.kernels.noise.specs"], errors, jit=False)  # the rest still come
        assert [e["kernel"] for e in errors] == [bad] and errors[0]["error"], errors


# ------------------------------------------------------------------------------------- negative controls


@triton.jit
def _twice(x):
    return x * 2.0


@triton.jit
def _bad_atomic_sum(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """A float atomic-add reduction: its result depends on the order programs finish."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.atomic_add(out_ptr, tl.sum(_twice(x), axis=0))


@triton.jit
def _bad_big_tile(a_ptr, b_ptr, c_ptr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """One 256x256 fp32 accumulator over 4 warps: 512 registers per thread, so it must spill."""
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a = tl.load(a_ptr + rm[:, None] * BK + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * BN + rn[None, :])
    acc = tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc)


@triton.jit
def _tf32_and_exp(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
    """fp32 tl.dot with the default precision (TF32 on the GPU) and an exp (MUFU.EX2)."""
    r = tl.arange(0, N)
    a = tl.load(a_ptr + r[:, None] * N + r[None, :])
    b = tl.load(b_ptr + r[:, None] * N + r[None, :])
    tl.store(c_ptr + r[:, None] * N + r[None, :], tl.exp(tl.dot(a, b)))


def _spec(name, fn, signature, constexprs, **kw):
    return CompileSpec(name=name, fn=fn, signature=signature, constexprs=constexprs, **kw)


def test_negative_control_atomics():
    spec = _spec(
        "bad_atomic_sum",
        _bad_atomic_sum,
        {"x_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32"},
        {"BLOCK": 256},
        options={"num_warps": 4},
    )
    rows = sr.report([spec], archs=(80, 90))
    assert all(r["error"] is None and r["atomics"] > 0 for r in rows), rows
    bad = sr.violations(rows)
    assert len(bad) == 2 and all("atomic" in v for v in bad), bad
    # the same kernel is fine where atomics are allowed
    allowed = dataclasses.replace(spec, deterministic=False)
    assert sr.violations(sr.report([allowed], archs=(80,))) == []


def test_negative_control_spills():
    spec = _spec(
        "bad_big_tile",
        _bad_big_tile,
        {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32"},
        {"BM": 256, "BN": 256, "BK": 32},
        options={"num_warps": 4, "num_stages": 1},
    )
    rows = sr.report([spec], archs=(80,))
    assert rows[0]["error"] is None and rows[0]["stack"] > 0, rows
    bad = sr.violations(rows)
    assert any("spills" in v for v in bad), bad


def test_negative_control_forbidden_classes():
    spec = _spec(
        "bad_tf32_exp",
        _tf32_and_exp,
        {"a_ptr": "*fp32", "b_ptr": "*fp32", "c_ptr": "*fp32"},
        {"N": 32},
        options={"num_warps": 4},
        forbid=("no_tf32", "no_mufu"),
    )
    rows = sr.report([spec], archs=(80, 90))
    for r in rows:
        assert r["tf32"] > 0 and r["mufu"] > 0, r
    bad = sr.violations(rows)
    assert sum("TF32" in v for v in bad) == 2 and sum("MUFU" in v for v in bad) == 2, bad
    typo = dataclasses.replace(spec, forbid=("no_fmaa",))
    assert any("unknown forbid class" in v for v in sr.violations(sr.report([typo], archs=(80,))))


def test_conv_reads_channels_last_in_vector_loads_and_the_rule_can_fail():
    """The 16-bit conv specs forbid 8/16-bit global loads (``no_gather``): the channels-last kernel reads a pixel's
    channel block in 16-byte loads. Negative control: the same kernel declared for an NCHW read (channel stride
    not 1: the element-wise gather the kernel replaced) breaks the rule."""
    from jetdet.kernels.conv2d import specs as conv_specs

    spec = next(s for s in conv_specs.compile_specs() if s.name.startswith("conv2d_bf16_3x3s1p1_cl_"))
    assert "no_gather" in spec.forbid
    constexprs = {k: v for k, v in spec.constexprs.items() if k != "stride_xc"}
    nchw = dataclasses.replace(spec, name=spec.name + "_nchw_read", constexprs=constexprs,
                               signature={**spec.signature, "stride_xc": "i32:16"})  # fmt: skip
    rows = sr.report([spec, nchw], archs=(90,))
    assert rows[0]["narrow_loads"] == 0 and not sr.row_violations(rows[0]), rows[0]
    assert rows[1]["narrow_loads"] > 0, rows[1]
    assert any("forbidden by no_gather" in v for v in sr.row_violations(rows[1]))


def test_block_sparse_runs_16_bit_dots_on_a_gpu_and_reads_rows_in_vector_loads():
    """bf16 block-sparse attention compiles to bf16 tensor-core dots for a GPU (HGMMA, no TF32: ``no_tf32``), as fp16
    does, and reads its aligned K/V rows in 16-byte loads (``no_gather``). Negative controls: the interpreter's fp32
    operands (``HALF_DOT`` off) compile to no tensor-core dot at all, and a head dim passed as a runtime value, as
    before 2026-12-05 (here: rows not known to be aligned, ``STRIDE_UNIT`` 1), reads element by element and breaks
    the rule."""
    from jetdet.kernels.block_sparse import specs as bsa_specs

    spec = next(s for s in bsa_specs.compile_specs()
                if s.name.startswith("bsa_fwd_d128_bf16_bs64_") and 90 in s.archs and "unaligned" not in s.name)
    assert {"no_tf32", "no_gather"} <= set(spec.forbid) and spec.constexprs["HALF_DOT"]
    fp32_dots = dataclasses.replace(spec, name=spec.name + "_fp32", constexprs={**spec.constexprs, "HALF_DOT": False})
    unit1 = dataclasses.replace(spec, name=spec.name + "_unit1", constexprs={**spec.constexprs, "STRIDE_UNIT": 1})
    rows = sr.report([spec, fp32_dots, unit1], archs=(90,))
    assert rows[0]["tf32"] == 0 and rows[0]["hgmma"] > 0 and rows[0]["narrow_loads"] == 0, rows[0]
    assert not sr.row_violations(rows[0]), rows[0]
    assert rows[1]["hgmma"] == 0 and rows[1]["hmma"] == 0, rows[1]
    assert rows[2]["narrow_loads"] > 0, rows[2]
    assert any("forbidden by no_gather" in v for v in sr.row_violations(rows[2]))


def test_attention_reads_aligned_rows_in_vector_loads_and_the_rule_can_fail():
    """Attention at head dim 72 (rows of 144 bytes, not a multiple of 16 elements) reads its q/k/v rows in 16-byte
    loads when the launch passes strides in units of 8 elements (``STRIDE_UNIT``), and the aligned 16-bit specs
    forbid element-wise reads. Negative control: the same spec with unit 1, what every head dim 72 launch compiled
    to before, breaks the rule."""
    from jetdet.kernels.attention import specs as attn_specs

    spec = next(s for s in attn_specs.compile_specs()
                if s.name.startswith("attention[bf16,D=72,mask=False,") and "unaligned" not in s.name)
    assert "no_gather" in spec.forbid and spec.constexprs["STRIDE_UNIT"] == 8
    unit1 = dataclasses.replace(spec, name=spec.name + "_unit1", constexprs={**spec.constexprs, "STRIDE_UNIT": 1})
    rows = sr.report([dataclasses.replace(spec, archs=(90,)), dataclasses.replace(unit1, archs=(90,))], archs=(90,))
    assert rows[0]["narrow_loads"] == 0 and not sr.row_violations(rows[0]), rows[0]
    assert rows[1]["narrow_loads"] > 0, rows[1]
    assert any("forbidden by no_gather" in v for v in sr.row_violations(rows[1]))


def test_compile_error_is_a_violation():
    spec = _spec("missing_constexpr", _tf32_and_exp, {"a_ptr": "*fp32", "b_ptr": "*fp32", "c_ptr": "*fp32"}, {})
    rows = sr.report([spec], archs=(80,))
    assert rows[0]["error"] and "N" in rows[0]["error"]
    assert sr.violations(rows) and "ERROR" in sr.format_table(rows)


def test_interpreted_function_is_compiled():
    """Under TRITON_INTERPRET=1 the kernels are InterpretedFunctions; as_jit_function rebuilds a JITFunction
    (callees included) and the cache key follows the source."""
    jit = sr.as_jit_function(_bad_atomic_sum)
    assert isinstance(jit, triton.runtime.jit.JITFunction)
    assert isinstance(jit.fn.__globals__["_twice"], triton.runtime.jit.JITFunction)
    assert sr.as_jit_function(jit) is jit


def test_count_sass():
    sass = """
        /*0060*/                   HFMA2.MMA R2, -RZ, RZ, 0, 0 ;
        /*0070*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0080*/              @!P0 HMMA.1684.F32.TF32 R4, R8, R12, R4 ;
        /*0090*/                   HGMMA.64x64x8.F32.TF32 R24, gdesc[UR4], R24 ;
        /*00a0*/               @P1 REDG.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R5 ;
        /*00b0*/                   ATOMS.ADD RZ, [R3], R4 ;
        /*00c0*/                   MUFU.EX2 R5, R5 ;
        /*00d0*/                   FFMA R1, R2, R3, R4 ;
        /*00e0*/                   REDUX.SUM UR4, R2 ;
        /*00f0*/              @!P2 LDG.E.U16 R6, desc[UR4][R2.64] ;
        /*0100*/                   LDG.E.128 R8, desc[UR4][R2.64] ;
        /*0110*/                   LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64] ;
        /*0120*/               @P0 BRA 0xf0 ;
        /*0130*/                   LDG.E.S8 R6, desc[UR4][R2.64] ;
        /*0140*/                   BRA 0x140;
    """
    c = sr.count_sass(sass)
    # narrow loads: the U16 inside the loop 0xf0..0x120 counts, the S8 after it (an epilogue) does not
    assert c == {"hmma": 2, "hgmma": 1, "tf32": 2, "atomics": 2, "mufu": 1, "ffma": 1, "narrow_loads": 1,
                 "instructions": 15}



def test_sass_loops_counts_each_loop():
    """``bench/sass_loops.py`` finds each loop (a backward branch and its target) and counts its instruction
    classes; a self-branch (the end-of-kernel spin) and loops below ``min_size`` are not listed."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "sass_loops.py"
    spec = importlib.util.spec_from_file_location("sass_loops", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   FMUL R2, R2, R3 ;
        /*0020*/                   FSEL R2, R2, -INF, P0 ;
        /*0030*/                   MUFU.EX2 R5, R5 ;
        /*0040*/              @P0 BRA 0x10 ;
        /*0050*/                   FFMA R1, R2, R3, R4 ;
        /*0060*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0070*/              @P1 BRA 0x50 ;
        /*0080*/                   BRA 0x80;
    """
    got = mod.loops(sass, 1)
    assert got == [
        {"instructions": 4, "mufu": 1, "fsel": 1, "fmul": 1, "ffma": 0, "fadd": 0, "isetp": 0, "mma": 0},
        {"instructions": 3, "mufu": 0, "fsel": 0, "fmul": 0, "ffma": 1, "fadd": 0, "isetp": 0, "mma": 1},
    ]
    assert mod.loops(sass, 4) == got[:1]

def test_interpreter_still_works_after_compiling(rows):
    """Compiling swaps triton.language's interpreted functions for JITFunctions only while it runs."""
    import os

    import torch

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("checks the interpreter")
    from jetdet.kernels.matmul.launch import matmul

    a = torch.randn(5, 20)
    b = torch.randn(20, 3)
    torch.testing.assert_close(matmul(a, b), a @ b, atol=1e-5, rtol=1e-5)
    assert type(tl.cdiv).__name__ == "InterpretedFunction"


# ------------------------------------------------------------------------------------ JIT specialisation


def test_jit_variants_cover_every_kernel_and_class(rows):
    """Every kernel function the report covers is also compiled the way Triton's JIT specialises a launch:
    every int argument 1 (compile-time constants), 0/16 (divisible by 16), and any other value (misaligned
    pointers), on sm_90; the every-spec test above fails on any of their violations."""
    declared: dict[str, set] = {}
    for r in rows:
        if " jit[" not in r["kernel"]:
            declared.setdefault(r["kernel"], set()).add(r["arch"])
    jit_rows = [r for r in rows if " jit[" in r["kernel"]]
    assert jit_rows
    groups: dict[str, set] = {}
    for r in jit_rows:
        base, _, cls = r["kernel"].partition(" jit[")
        assert base in declared, r["kernel"]
        # on sm_90, or an arch of a spec that never runs there (the one-loop 16-bit attention variants)
        assert r["arch"] == sr.JIT_ARCH if sr.JIT_ARCH in declared[base] else r["arch"] in declared[base], r["kernel"]
        groups.setdefault(base, set()).add(cls.rstrip("]"))
    for base, classes in groups.items():
        assert {"ints=1", "ints=17"} <= classes and any("16" in c for c in classes), (base, classes)
    kernels = {s.fn.fn.__qualname__ if hasattr(s.fn, "fn") else s.fn.__qualname__ for s in sr.collect_specs(jit=False)}
    jitted = {
        s.fn.fn.__qualname__ if hasattr(s.fn, "fn") else s.fn.__qualname__
        for s in sr.collect_specs()
        if s.launch is not None
    }
    assert kernels == jitted


def test_declared_specs_are_what_the_jit_binder_makes():
    """The spec language ("i32:16", an int listed as constexpr 1, aligned pointers) means what Triton's own
    binder makes of the corresponding values, for every shipped spec; negative control: a spec declaring an
    int constant other than 1 is not a launch the JIT would compile, and is flagged."""
    with sr.compiling():
        specs = sr.collect_specs(jit=False)
        assert specs
        assert [d for s in specs for d in sr.declared_vs_jit(s)] == []
        noise = next(s for s in specs if s.name.startswith("noise.philox_randn[fp32]"))
        wrong = dataclasses.replace(
            noise, signature={**noise.signature, "N": "constexpr"}, constexprs={**noise.constexprs, "N": 16}
        )
        diffs = sr.declared_vs_jit(wrong)
    assert any("N type: declared 'constexpr', JIT 'i32'" in d for d in diffs), diffs


def test_jit_specialization_follows_triton():
    """Values decide the signature the way Triton 3.9's launcher does: 1 -> constant, 0 and multiples of 16 ->
    divisible by 16, do_not_specialize arguments stay plain i32, pointer alignment decides divisibility."""
    import torch

    from jetdet.kernels.noise.kernel import philox_randn_kernel

    args = dict(N=1, blocks_per_item=32, key0=1, key1=0, item_lo=16, item_hi=17, step=1, BLOCK=256, OUT_BF16_BITS=False)
    sig, consts, attrs, opts = sr.jit_specialization(
        philox_randn_kernel, (), {"out_ptr": sr.Pointer(torch.float32), **args, "num_warps": 4}
    )
    assert sig["N"] == "constexpr" and consts[(1,)] == 1  # N == 1: a constant
    assert sig["blocks_per_item"] == "i32" and attrs[(2,)] == [["tt.divisibility", 16]]
    for name in ("key0", "key1", "item_lo", "item_hi", "step"):  # do_not_specialize: never constants
        assert sig[name] == "i32", name
    assert attrs[(0,)] == [["tt.divisibility", 16]] and opts["num_warps"] == 4
    _, _, attrs, _ = sr.jit_specialization(philox_randn_kernel, (), {"out_ptr": sr.Pointer(torch.float32, 4), **args})
    assert not attrs.get((0,))  # a pointer 4 bytes past an aligned address is not divisible by 16


def test_negative_control_specialised_seed_fails_on_cpu():
    """The H200 failure, reproduced on CPU: the noise kernel without do_not_specialize, launched with a seed
    word of 1, gets a Python int where it calls .to(); the JIT variant fails to compile and is a violation,
    while the declared signature alone (what the report compiled before) compiles fine."""
    from jetdet.kernels.noise import specs as noise_specs

    spec = noise_specs.compile_specs()[0]
    raw = triton.jit(spec.fn.fn)  # the same kernel without do_not_specialize
    bad = dataclasses.replace(spec, name="noise_specialised", fn=raw)
    ones = [v for v in sr.jit_variants([bad]) if v.jit_class == "ints=1"]
    rows = sr.report(ones, archs=(sr.JIT_ARCH,), jobs=1)
    assert len(rows) == 1 and rows[0]["error"], rows
    assert "CompilationError" in rows[0]["error"] and "'int' object has no attribute 'to'" in rows[0]["error"]
    assert any("compile failed" in v for v in sr.violations(rows))
    # with the fix, the same launch compiles (the rows fixture compiled it; this reads the cache)
    fixed = [v for v in sr.jit_variants([spec]) if v.jit_class == "ints=1"]
    assert [r["error"] for r in sr.report(fixed, archs=(sr.JIT_ARCH,), jobs=1)] == [None]


# ------------------------------------------------------------------------------- interpreter independence


def test_compiles_the_same_after_the_interpreter_ran_it(monkeypatch, tmp_path):
    """The static report must not depend on TRITON_INTERPRET or on what the interpreter did before in the
    process. Triton's interpreter leaves triton.language.core patched after running a kernel whose @jit helpers
    it calls (tl.max, tl.sum): compiling such a kernel afterwards failed (cold cache, forked or not). Now the
    row equals the one a fresh process without TRITON_INTERPRET computes; negative control: without undoing
    the interpreter's leftovers the same compile fails."""
    import json
    import os
    import subprocess
    import sys

    import torch

    from jetdet.kernels.reduce import specs as reduce_specs

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("checks a process that runs the interpreter")
    from jetdet.kernels.reduce.launch import softmax

    softmax(torch.randn(3, 100))  # the interpreter runs tl.max / tl.sum
    assert sr._interpreter_leftovers(), "the interpreter left nothing patched: this test no longer tests anything"
    name = "softmax[fp32,BLOCK16,w1]"
    spec = next(s for s in reduce_specs.compile_specs() if s.name == name)
    monkeypatch.setenv("JETDET_STATIC_CACHE", str(tmp_path / "static"))  # cold: jetdet's cache and Triton's
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    rows = sr.report([spec, dataclasses.replace(spec, name="softmax copy")], archs=(90,), jobs=2)  # forked
    assert [r["error"] for r in rows] == [None, None], rows
    assert [r["error"] for r in sr.report([spec], archs=(90,), use_cache=False, jobs=1)] == [None]

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "JETDET_STATIC_CACHE")}
    env["JETDET_STATIC_CACHE"] = "0"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "jetdet.static_report", "--module", "jetdet.kernels.reduce.specs", "--only", name,
           "--arch", "90", "--no-jit", "--json", "--jobs", "1"]  # fmt: skip
    fresh = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    (other,) = [r for r in json.loads(fresh.stdout) if r["kernel"] == name]
    fields = ("regs", "stack", "shared", "hmma", "hgmma", "tf32", "atomics", "mufu", "ffma", "instructions")
    assert {f: rows[0][f] for f in fields} == {f: other[f] for f in fields}

    monkeypatch.setattr(sr, "_interpreter_leftovers", lambda: [])
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton_control"))
    (bad,) = sr.report([spec], archs=(90,), use_cache=False, jobs=1)
    assert bad["error"] and "has no attribute 'dtype'" in bad["error"], bad


# ------------------------------------------------------------------------------------------ FP fusion


_FUSION_SCRIPT = r"""
import sys, warnings
warnings.simplefilter("default")
from jetdet import static_report as sr
from jetdet.kernels.reduce import specs as reduce_specs

spec = next(s for s in reduce_specs.compile_specs() if s.name == "softmax[fp32,BLOCK16,w1]")
jit = [v for v in sr.jit_variants([spec]) if v.jit_class == "ints=1"]
rows = sr.report([spec] + jit, archs=(90,), jobs=2)  # cold: forked workers compile
rows += sr.report([spec], archs=(80,), use_cache=False, jobs=1)  # and this process
assert [r["error"] for r in rows] == [None] * len(rows), rows
print("fusion:", sr.fp_fusion_default())
sys.stderr.write("--- control ---\n"); sys.stderr.flush()
import triton
from triton.backends.compiler import GPUTarget
with sr.compiling():
    jf = sr.as_jit_function(spec.fn)
    sig, consts, attrs = sr._resolve_signature(jf, spec)
    k = triton.compile(triton.compiler.ASTSource(jf, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(spec.options))  # no enable_fp_fusion: Triton's default, with its warning
# the explicit value (jetdet.kernels._common.FP_FUSION) is the one Triton 3.9 picks: the same SASS as the default's
fields = ("regs", "ffma", "mufu", "instructions")
assert {f: sr._measure(k, 90)[f] for f in fields} == {f: rows[0][f] for f in fields}, rows[0]
"""


def test_compiles_never_leave_fp_fusion_to_triton(tmp_path):
    """Triton 3.9 warns once per process ("TRITON_DEFAULT_FP_FUSION is unset ...") when a compile leaves
    enable_fp_fusion to its default; the report's forked workers each printed it. Every compile of the report
    (declared specs and the JIT binder's variants, forked and in-process) now passes it explicitly, with the
    value every launch passes (Triton 3.9's default: the same SASS as a compile that leaves it out), so a cold
    report prints no such warning; negative control: a plain triton.compile of the same kernel without the
    option, in the same process, does warn."""
    import os
    import subprocess
    import sys

    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TRITON_DEFAULT_FP_FUSION", "TRITON_FORCE_DISABLE_FP_FUSION", "PYTHONWARNINGS")
    }
    env["JETDET_STATIC_CACHE"] = str(tmp_path / "static")  # cold: jetdet's cache and Triton's
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run(
        [sys.executable, "-c", _FUSION_SCRIPT], capture_output=True, text=True, env=env, timeout=600, cwd=repo
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "fusion: " in run.stdout
    report_err, _, control_err = run.stderr.partition("--- control ---")
    assert "--- control ---" in run.stderr
    assert "FP_FUSION" not in report_err, report_err[-3000:]
    from triton import _utils

    if not hasattr(_utils, "FP_FUSION_DEFAULT_WARNING"):
        pytest.skip(f"triton {triton.__version__} has no FP-fusion default warning (3.9 added it): no control")
    assert "TRITON_DEFAULT_FP_FUSION is unset" in control_err, control_err[-3000:]


def test_batched_disassembly_reads_what_cuobjdump_reads(tmp_path):
    """The report disassembles its compiles in batches (one nvdisasm run over several kernels' instructions,
    split by address) instead of one cuobjdump -sass per kernel; per kernel the instruction classes are
    cuobjdump's, for several kernels and archs in one batch (kernels whose counts differ, so a wrong split
    fails)."""
    import subprocess

    specs = [
        _spec("a", _bad_atomic_sum, {"x_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32"}, {"BLOCK": 256}),
        _spec("b", _tf32_and_exp, {"a_ptr": "*fp32", "b_ptr": "*fp32", "c_ptr": "*fp32"}, {"N": 32}),
        _spec("c", _bad_atomic_sum, {"x_ptr": "*fp16", "out_ptr": "*fp32", "n": "i32"}, {"BLOCK": 128}),
    ]
    cuobjdump = sr._tool("cuobjdump")
    for arch in (80, 90):
        with sr.compiling():
            kernels = [sr._compile(sr.as_jit_function(s.fn), s, arch) for s in specs]
        cubins = [k.asm["cubin"] for k in kernels]
        expected = []
        for i, cubin in enumerate(cubins):
            path = tmp_path / f"k{arch}_{i}.cubin"
            path.write_bytes(cubin)
            sass = subprocess.run([cuobjdump, "-sass", str(path)], capture_output=True, text=True, check=True).stdout
            expected.append(sr.count_sass(sass))
        assert [sr.count_sass(s) for s in sr._sass_batch(cubins, arch)] == expected
        assert [{k: v for k, v in m.items() if k in expected[0]} for m in sr._measure_many(kernels, arch)] == expected
        # the kernels' counts all differ, so instructions attributed to the wrong kernel would not match
        assert len({tuple(sorted(e.items())) for e in expected}) == len(expected)
        whole = sr.count_sass("\n".join(sr._sass_batch(cubins, arch)))
        assert whole == {k: sum(e[k] for e in expected) for k in whole}  # nothing lost or listed twice


def test_too_old_a_triton_is_said_not_failed(monkeypatch, capsys):
    """The report uses Triton internals that 3.5 added (the JIT binder's ``_pack_args``, ``triton.knobs``); on triton
    3.3/3.4 it failed with an AttributeError and ``python -m jetdet.bench`` printed FAILED, though the kernels run
    there. Now the report says which version it needs (exit 2) and the bench skips that section, saying why."""
    from jetdet import bench

    assert "needs triton >= 3.5 (installed: 3.4.0)" in sr.unsupported("3.4.0")
    assert sr.unsupported("3.3.1") and sr.unsupported("3.5.1") is None and sr.unsupported("3.10.0") is None
    assert sr.unsupported() is None  # this suite's triton runs the report (the tests above need it)
    monkeypatch.setattr(sr, "unsupported", lambda version=None: "the static report needs triton >= 3.5 (x)")
    assert sr.main(["--quiet"]) == 2
    assert "needs triton >= 3.5" in capsys.readouterr().err
    assert bench.static() is True
    assert "skipped: the static report needs triton >= 3.5" in capsys.readouterr().out
