"""bench/gpu_check.py, the one command a GPU session runs, cannot rot: its dry run (CPU, tiny shapes, the torch
path) goes through every section and writes the JSON and Markdown; an injected fault makes it fail (negative
control); bad arguments are clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.py"
SECTIONS = ("environment", "noise", "ops", "models", "speed", "model_speed", "compiled", "fast_path", "sparse")

pytestmark = pytest.mark.slow


def _run(tmp_path, *args, timeout=1200, interpreter=True, env=None):
    env = dict(os.environ, **(env or {}))
    if interpreter:  # set, not inherited: on a GPU machine this suite runs without it (tests/_devices.py)
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(SCRIPT), "--dry-run", "--out-dir", str(tmp_path), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=str(ROOT))


def _gpu_check():
    """bench/gpu_check.py as a module (it is a script, not in a package)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return gpu_check


def test_dry_run_goes_through_every_section(tmp_path):
    out = _run(tmp_path, "--budget-s", "1000", "--sweep", "--compiled")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_dry-run_cpu.json").read_text())
    for name in SECTIONS:
        sec = res["sections"][name]
        assert "error" not in sec and "skipped" not in sec, (name, sec.get("error") or sec.get("skipped"))
    assert res["failures"] == [] and res["incomplete"] == []
    ops = res["sections"]["ops"]["rows"]
    # the two JETDET_FP32_DOT=tf32x3 cases run in fp32 only, the three TMA ones (linear, attention, conv) in 16 bits
    assert len(ops) == 24 * 3 + 2 + 3 * 2
    assert {(r["op"], r["dtype"]) for r in ops if "tf32x3" in r["op"]} == {("linear_tf32x3", "float32"),
                                                                          ("conv3x3_tf32x3", "float32")}
    for name in ("linear_tma", "attention_tma_d72", "conv3x3_tma"):
        assert {r["dtype"] for r in ops if r["op"] == name} == {"float16", "bfloat16"}, name
    assert all(r["accurate"] and not r["prefix_differs"] and not r["needle_differs"] for r in ops)
    assert {"linear", "conv3x3", "attention_d128_mask", "attention_d72_mask", "attention_d512", "group_norm",
            "group_norm_channels_last", "forecast"} <= {r["op"] for r in ops}
    models = res["sections"]["models"]["rows"]
    assert all(r["equal"] == r["comparisons"] for r in models if r["mode"] == "deterministic")
    assert any(r["equal"] < r["comparisons"] for r in models if r["mode"] == "off")  # the negative control fired
    noise = res["sections"]["noise"]["rows"]
    assert noise and all(r["gpu_equals_cpu"] and r["items_equal_batch"] for r in noise)
    assert {r["dtype"] for r in noise} == {"float32", "float16", "bfloat16"} and 1 in {r["seed"] for r in noise}
    for name in ("speed", "model_speed", "fast_path"):
        assert res["sections"][name]["rows"], name
    assert all("ratio" in r for r in res["sections"]["speed"]["rows"])
    graphs = [r for r in res["sections"]["model_speed"]["rows"] if r["dtype"] == "bf16"]
    assert len(graphs) == 3 and all(r["det_graph_ms"] > 0 and all(r["det_graph_checks"].values()) for r in graphs)
    assert all(r["det_tma_ms"] > 0 and r["det_tma_item_equals_batch"] for r in graphs), graphs
    fp32 = [r for r in res["sections"]["speed"]["rows"] if r["dtype"] == "float32"]
    assert {r["kind"] for r in fp32} == {"linear", "conv"}
    assert all("tf32x3_ratio" in r and r["tf32x3_rel_err"] < 1e-5 for r in fp32), fp32  # the A/B column ran
    attention = [r for r in res["sections"]["speed"]["rows"] if r["kind"] == "attention"]
    assert attention and all("tma_ratio" in r and "jetdet_other_loops_ms" in r for r in attention), attention
    speed = res["sections"]["speed"]["rows"]
    conv16 = [r for r in speed if r["kind"] in ("conv", "conv_cl") and r["dtype"] != "float32"]
    assert conv16 and all("tma_ratio" in r for r in conv16), conv16
    summary = res["sections"]["speed"]["ab_summary"]  # one line per A/B column, for deciding the defaults
    assert [line.split(":")[0] for line in summary] == [
        "A/B TMA GEMM (JETDET_MATMUL_KERNEL=tma)", "A/B TMA attention (JETDET_ATTENTION_KERNEL=tma)",
        "A/B TMA conv (JETDET_CONV_KERNEL=tma)", "A/B attention's other KV-loop structure",
        "A/B fp32 as tf32x3 (JETDET_FP32_DOT=tf32x3)"], summary  # fmt: skip
    assert all("faster than the default on" in line for line in summary), summary
    fast = res["sections"]["fast_path"]["rows"]
    assert [r["setting"] for r in fast] == ["off", "fast default", "fast budget=0.05", "fast budget=0.07",
                                            "fast budget=0.1", "fast budget=0.07 piggyback=0"]
    assert all("syncs" in r and r["calls"] > 0 for r in fast[1:])
    comp = res["sections"]["compiled"]
    assert all(comp["checks"].values()) and comp["det_compiled_ms"] > 0, comp
    assert all(comp["unet"]["checks"].values()) and comp["unet"]["det_compiled_ms"] > 0, comp["unet"]
    unet_graph = next(r for r in graphs if "UNet" in r["model"])  # a model with a 3x3 conv: the weight-change check
    assert unet_graph["det_graph_checks"]["replay == eager after a conv weight changed in place"], unet_graph
    swept = res["sections"]["sweep"]["rows"]
    assert {r["op"] for r in swept} == {"matmul", "attention", "attention_tma", "conv2d", "conv2d_tma"}
    assert all(r["best"] for r in swept), swept
    assert all(isinstance(r["key"], int) for r in swept if r["op"] in ("matmul", "attention", "conv2d")), swept
    assert res["sections"]["environment"]["commit"]  # bench/apply_sweep.py names the run by it
    md = (tmp_path / "gpu_dry-run_cpu.md").read_text()
    for title in ("## Noise", "## Ops", "## Whole-model determinism", "## Speed", "## Whole models, batch 4",
                  "## Deterministic mode under torch.compile", "## Fast path", "## Block-sparse", "## Tile sweep"):
        assert title in md, title
    assert "all checks passed" in md


def test_tma_cases_through_the_triton_host_path(tmp_path):
    """The dry run above takes the torch path on CPU, so the host side of the TMA kernels (descriptors, their
    eligibility, copies of strides a descriptor cannot take) would first run on the GPU. Here the three TMA cases go
    through it, and through the kernels in the interpreter, at the dry run's shapes."""
    out = _run(tmp_path, "--only", "ops", "--ops", "linear_tma,attention_tma_d72,conv3x3_tma",
               env={"JETDET_BACKEND": "triton"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_dry-run_cpu_only-ops_ops-attention_tma_d72-conv3x3_tma-linear_tma.json")
                     .read_text())
    rows = res["sections"]["ops"]["rows"]
    assert len(rows) == 6 and all(r["accurate"] and not r["prefix_differs"] for r in rows), rows


def test_injected_fault_fails_the_run(tmp_path):
    """Negative control: jetdet's outputs perturbed for batches above 1 -> noise and invariance failures, exit 1."""
    out = _run(tmp_path, "--inject-fault", "--only", "noise", "--only", "ops", "--ops", "linear,softmax")
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_dry-run_cpu_only-noise-ops_ops-linear-softmax.json").read_text())
    assert any(f.startswith("noise") and "!= CPU" in f for f in res["failures"]), res["failures"]
    assert any(f.startswith("ops linear") and "not batch invariant" in f for f in res["failures"]), res["failures"]
    md = tmp_path / "gpu_dry-run_cpu_only-noise-ops_ops-linear-softmax.md"
    assert "FAILED" in out.stdout and "**FAILED**" in md.read_text()


def test_bad_arguments_are_clear_errors(tmp_path):
    out = _run(tmp_path, "--budget-s", "0")
    assert out.returncode == 2 and "--budget-s: expected a positive number" in out.stderr
    out = _run(tmp_path, "--only", "nonsense")
    assert out.returncode == 2 and "--only: unknown section 'nonsense'" in out.stderr
    out = _run(tmp_path, "--only", "ops", "--ops", "nonsense")
    assert out.returncode == 2 and "--ops: unknown op(s) ['nonsense']" in out.stderr
    if not torch.cuda.is_available():
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        real = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=300)
        assert real.returncode == 2 and "no CUDA device" in real.stderr


def test_precompile_record_pass(tmp_path):
    """``--precompile`` (the default on a GPU) runs the chosen sections once as a record pass before the first of
    them, silenced and judged by nothing, then the real pass. In a dry run the ops take the torch path, so nothing
    is launched or compiled; what is checked is the plumbing: the record pass ran every chosen section without an
    error, printed nothing of theirs, and every section reports its new kernel variants. (With the interpreter on,
    as in the rest of this file, there is nothing to compile and the record pass is not made.)"""
    args = ("--precompile", "--only", "noise", "--only", "ops", "--ops", "linear,softmax")
    skipped = _run(tmp_path, *args)
    assert skipped.returncode == 0 and "not done: the Triton interpreter is on" in skipped.stdout, skipped.stdout
    out = _run(tmp_path, *args, interpreter=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_dry-run_cpu_only-noise-ops_ops-linear-softmax.json").read_text())
    assert list(res["sections"]) == ["precompile", "noise", "ops"]
    pre = res["sections"]["precompile"]
    assert pre["record_stopped"] == {} and pre["launches"] == 0 and "error" not in pre, pre
    assert all(sec["new_variants"] == 0 for sec in res["sections"].values())
    assert out.stdout.count("GPU == CPU") == len(res["sections"]["noise"]["rows"])  # the record pass printed none
    md = tmp_path / "gpu_dry-run_cpu_only-noise-ops_ops-linear-softmax.md"
    assert "Precompile: 0 launches recorded" in md.read_text()


def test_markdown_reports_an_op_that_raised(tmp_path):
    """An op that raised on the GPU leaves a row with only its name, dtype and error. The Markdown report shows it,
    instead of failing on the missing accuracy keys (and hiding the run's verdict). The dry run cannot raise there."""
    gpu_check = _gpu_check()
    ok = {"op": "linear", "dtype": "float16", "max_err": 1e-4, "tol": 4e-3, "scale": 1.0, "prefix_differs": [],
          "needle_differs": []}
    bad = {"op": "attention_d512", "dtype": "bfloat16", "error": "OutOfResources: shared memory"}
    res = {"sections": {"environment": {"device_name": "X"}, "ops": {"rows": [ok, bad]}}, "when": "now",
           "seconds": 1.0, "argv": [], "failures": [], "incomplete": ["ops attention_d512 bfloat16: OutOfResources"]}
    text = gpu_check.markdown(res)
    assert "| attention_d512 | bfloat16 | | | error: OutOfResources: shared memory |" in text
    assert "| linear | float16 | 1.00e-04 |" in text and "**incomplete**" in text


def test_a_graph_that_reads_a_stale_conv_weight_fails_the_run():
    """The weight-change check of ``_graph_row`` (a captured deterministic forward must follow an in-place change of
    a conv weight) can fail: a "graph" whose replay keeps its first output, as one reading a stale packed copy of
    the weight would, is reported. The dry run's replays recompute, so they cannot show this."""
    gpu_check = _gpu_check()

    class StaleRun:
        dev = torch.device("cpu")
        failures: list = []

        def fail(self, what):
            self.failures.append(what)

        def sync(self):
            pass

        def time_ms(self, fn):
            fn()
            return 1.0

        def graphed(self, fn):
            return (lambda: None), fn()

    model = gpu_check.UNetStage(32, 1).eval()
    x = torch.randn(4, 32, 6, 6)

    def fwd(b=None):
        return model(x if b is None else x[b])

    run = StaleRun()
    row = gpu_check._graph_row(run, "stale", fwd, 1.0, model)
    assert row["det_graph_checks"] == {"replay == eager": True, "item 2 alone": True,
                                       "replay == eager after a conv weight changed in place": False}, row
    assert any("after a conv weight changed in place is false" in f for f in run.failures), run.failures


def test_an_error_in_the_compiled_unet_stage_fails_the_run(monkeypatch):
    """What the compiled UNet stage is there to catch on a GPU (torch.compile's CUDA-graph pool refusing a tensor
    left in it) arrives as an exception: it must fail the run, not only fill in an error field of a section that is
    not a correctness section."""
    import argparse

    gpu_check = _gpu_check()

    def refused(*a, **k):
        raise RuntimeError("These live storage data ptrs are in the cudagraph pool but not accounted for")

    monkeypatch.setattr(gpu_check, "_compiled_unet", refused)
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)  # the DiT part as it is, quickly
    run = gpu_check.Run(argparse.Namespace(quick=True, dry_run=True, budget_s=1000))
    out: dict = {}
    gpu_check.compiled(run, out)
    assert "cudagraph pool" in out["unet"]["error"]
    assert any("compiled deterministic UNet stage: RuntimeError" in f for f in run.failures), run.failures


# ------------------------------------------------------------------ what a device session gets back (in process)


def _strict(text: str):
    """``json.loads`` that refuses the bare ``NaN``/``Infinity``/``-Infinity`` tokens, as jq or JavaScript do."""

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def stubbed(monkeypatch):
    """bench/gpu_check.py with every section replaced by a stub that records that it ran (and puts one non-finite
    value in its results, as an infinite PSNR would), so ``main`` runs in a moment."""
    gpu_check = _gpu_check()
    ran: list[str] = []
    for name in ("environment", "noise", "ops_check", "models_check", "speed", "model_speed", "compiled",
                 "fast_path", "sparse", "sweep"):  # fmt: skip

        def stub(run, out, _name=name):
            ran.append(_name)
            out["psnr_mean_db"] = float("inf")

        monkeypatch.setattr(gpu_check, name, stub)
    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.setattr(gpu_check, "ran", ran, raising=False)
    return gpu_check


def _main(gpu_check, *args):
    return gpu_check.main(["--dry-run", "--no-precompile", "--budget-s", "100000", *args])


def test_json_is_strict_non_finite_floats_become_null(stubbed, tmp_path):
    """An infinite PSNR (fast path identical to full compute) or a NaN error used to reach the file as the bare
    tokens ``Infinity``/``NaN``, which strict JSON readers reject. They are written as null."""
    assert _main(stubbed, "--out-dir", str(tmp_path), "--only", "fast_path") == 0
    (written,) = tmp_path.glob("gpu_*.json")
    res = _strict(written.read_text())
    assert res["sections"]["fast_path"]["psnr_mean_db"] is None
    path = tmp_path / "direct.json"
    stubbed.write_json(str(path), {"a": [float("nan"), 1.5, (float("-inf"), 2)], "b": {"c": float("inf")}})
    assert _strict(path.read_text()) == {"a": [None, 1.5, [None, 2]], "b": {"c": None}}
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []  # no temporary file left


def test_out_dir_defaults_to_the_device_tools_out(stubbed, tmp_path, monkeypatch):
    """The device tool brings back only what is written under $OUT: with $OUT set (and not empty) and no
    ``--out-dir``, the files go there; otherwise to bench/results next to the script. (``__file__`` is pointed into
    tmp_path so that the fallback never writes into the checkout.)"""
    fake_bench = tmp_path / "checkout" / "bench"
    fake_bench.mkdir(parents=True)
    monkeypatch.setattr(stubbed, "__file__", str(fake_bench / "gpu_check.py"))
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("OUT", str(out))
    assert _main(stubbed, "--only", "environment") == 0
    assert not (fake_bench / "results").exists()
    assert sorted(p.suffix for p in out.glob("gpu_dry-run_cpu*")) == [".json", ".md"]
    monkeypatch.setenv("OUT", "")
    assert _main(stubbed, "--only", "environment") == 0
    assert (fake_bench / "results" / "gpu_dry-run_cpu_only-environment.json").is_file()


def test_only_keeps_the_full_runs_files(stubbed, tmp_path, capsys):
    """A run with ``--only`` writes files named after its sections; the full run's files stay as they were."""
    full = tmp_path / "gpu_dry-run_cpu.json"
    full.write_text('{"the full run": true}')
    assert _main(stubbed, "--out-dir", str(tmp_path), "--only", "speed", "--only", "fast_path") == 0
    assert full.read_text() == '{"the full run": true}'
    part = tmp_path / "gpu_dry-run_cpu_only-fast_path-speed.json"
    assert list(_strict(part.read_text())["sections"]) == ["speed", "fast_path"]
    assert str(part) in capsys.readouterr().out  # the paths written are printed
    assert oct(part.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # what open() gives, not a private 0600
    # the same sections in another order, --ops and --quick name their files too
    assert stubbed.out_base("d", "X", ["speed", "fast_path"]) == stubbed.out_base("d", "X", ["fast_path", "speed"])
    named = stubbed.out_base("d", "X", None, "linear,conv3x3", True)
    assert named == os.path.join("d", "gpu_X_ops-conv3x3-linear_quick")
    assert stubbed.out_base("d", "X") == os.path.join("d", "gpu_X")


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_compiled_is_not_in_the_default_run(stubbed, tmp_path):
    """``compiled`` (several cold torch.compile + CUDA-graph compiles) is left out of the default run, which must get
    to fast_path and sparse; ``--compiled`` adds it after sparse, ``--only compiled`` runs it alone."""
    assert _main(stubbed, "--out-dir", str(tmp_path)) == 0
    assert stubbed.ran == ["environment", "noise", "ops_check", "models_check", "speed", "model_speed", "fast_path",
                           "sparse"]  # fmt: skip
    stubbed.ran.clear()
    assert _main(stubbed, "--out-dir", str(tmp_path), "--compiled") == 0
    assert stubbed.ran[-3:] == ["fast_path", "sparse", "compiled"]
    stubbed.ran.clear()
    assert _main(stubbed, "--out-dir", str(tmp_path), "--only", "compiled") == 0
    assert stubbed.ran == ["compiled"]
    assert (tmp_path / "gpu_dry-run_cpu_only-compiled.json").is_file()


def test_results_are_written_after_each_section(stubbed, tmp_path, monkeypatch):
    """A run killed part way (a time limit, an OOM: here an exception no section catches) keeps, as valid JSON,
    every section that finished before it; the interrupted one is marked."""

    class Killed(BaseException):
        pass

    def killed(run, out):
        out["rows"] = ["half"]
        raise Killed("time limit")

    monkeypatch.setattr(stubbed, "speed", killed)
    with pytest.raises(Killed):
        _main(stubbed, "--out-dir", str(tmp_path))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["gpu_dry-run_cpu.json", "gpu_dry-run_cpu.md"], files  # and no temporary file left behind
    res = _strict((tmp_path / "gpu_dry-run_cpu.json").read_text())
    assert list(res["sections"])[:4] == ["environment", "noise", "ops", "models"]
    assert all("seconds" in res["sections"][n] for n in ("environment", "noise", "ops", "models"))
    assert "interrupted" in res["sections"]["speed"] and "fast_path" not in res["sections"]


def test_budget_counts_from_the_process_start(stubbed):
    """The budget clock starts when the module starts, before ``import torch`` (not when the run object is made),
    and its default leaves a minute of the 5 for an item started just before it ran out and for writing files."""
    import argparse
    import time

    assert stubbed.build_parser().parse_args([]).budget_s <= 250
    src = SCRIPT.read_text()
    assert src.index("\n_T0 = time.monotonic()") < src.index("\nimport torch")
    run = stubbed.Run(argparse.Namespace(quick=True, dry_run=True, budget_s=1000))
    assert run.left() <= 1000 - (time.monotonic() - stubbed._T0) + 1e-3
