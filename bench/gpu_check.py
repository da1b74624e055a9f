"""Everything a GPU session has to measure, in one command of at most 5 minutes on one H100/H200:

    PYTHONPATH=. python bench/gpu_check.py [--quick] [--budget-s 240] [--sweep] [--compiled] [--out-dir DIR]
                                           [--only SECTION [--only SECTION ...]] [--ops linear,conv3x3,...]
                                           [--no-precompile]

Needs only torch, triton, numpy and safetensors (no diffusers, no network). Sections, in this order:

1. ``environment``: device, capability, driver, torch/triton versions, the launch tables the lookup picks.
   Then ``precompile`` (on a GPU; ``--no-precompile`` skips it, ``--precompile`` runs it in a dry run): the
   sections below run once with nothing computed and every jetdet kernel launch turned into a compile in a thread
   pool (``jetdet.warmup.compile_ahead``), so the kernel variants they need compile side by side instead of one
   at a time at their first launch; each section then reports ``new_variants``, the variants it still had to
   compile (or load) itself.
2. ``noise``: ``jetdet.randn`` on the GPU equals the CPU path bit for bit (fp32/fp16/bf16; seeds 1, 0, 16,
   2^64-1 at 8x4x128x128, item_offset 5, step 3: the H200 crash case), per-item == batch; checksums.
3. ``ops``: every op x dtype (fp32/fp16/bf16) against an fp32 CPU reference, and bitwise batch invariance:
   every prefix 1..8 of a batch of 8 and one item alone against its slot (needle). Negative control: the
   same prefix check on torch's own linear (cuBLAS), which is expected to differ somewhere. ``linear_tf32x3`` and
   ``conv3x3_tf32x3`` check fp32 under ``JETDET_FP32_DOT=tf32x3`` (opt-in) at fp32's tolerance.
4. ``models``: the whole-model determinism report (TinyUNet, TinyDiT, a DiT-B-size TinyDiT; deterministic mode
   and mode "off" as the negative control).
5. ``speed``: jetdet / torch time ratios (``triton.testing.do_bench`` medians) at the shapes of issue 13 and
   at real-model shapes (SD1.5/SDXL UNet convs, Flux/SD3 linears and attention), with the config used; fp16/bf16
   linears also with the persistent TMA GEMM (``JETDET_MATMUL_KERNEL=tma``, opt-in), an A/B in the same run.
   The ``ops`` section checks that kernel too (``linear_tma``). 16-bit attention also with the TMA-fed kernel
   (``JETDET_ATTENTION_KERNEL=tma``, opt-in; checked in ``ops`` as ``attention_tma_d72``), 16-bit convs with
   the TMA-fed conv (``JETDET_CONV_KERNEL=tma``, ``conv3x3_tma``), and all attention
   with the other KV-loop structure than the device runs (``kernels/attention/launch.py: split_tail``: an
   unmasked loop over the whole blocks and the partial block apart, or one masked loop), the same way. fp32
   linears and convs also with ``JETDET_FP32_DOT=tf32x3``: its time, and its and the IEEE kernel's max error
   relative to torch's IEEE result.
6. ``model_speed``: whole models at batch 4: fp32 det vs off (TinyUNet, TinyDiT, DiT-B size) and bf16 off / det
   / per-item loop (DiT stacks of width 1152 and 1024, an SD-like UNet stage); the bf16 ones also with the
   deterministic forward captured in a CUDA graph (``torch.cuda.graph``): replay time, replay == eager bitwise,
   and a graph of one item equal to the batch graph's row; and with the three opt-in TMA kernels on (time, and an
   item alone equal to its row).
7. ``fast_path``: the step cache on the bundled model (Euler 30 steps, 8 classes, batched CFG): wall time,
   model calls, host syncs, PSNR against full compute, with the defaults, at budgets 0.05 / 0.07 / 0.1, and at 0.07
   with ``piggyback=0`` (no row compaction: the whole batch runs whenever the model runs).
8. ``sparse``: block_sparse_attention at densities 0.3-0.9 against jetdet's dense attention and SDPA;
   linear_attention against SDPA.
9. ``compiled`` (not in the default run: ``--compiled`` adds it after ``sparse``, ``--only compiled`` runs it
   alone): the deterministic DiT stack under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs; bitwise item ==
   batch, time against off and compiled off) and a UNet stage compiled with no eager call first. It makes up to six
   cold Inductor + CUDA-graph compiles, which would eat the budget the sections above need.
10. ``sweep`` (``--sweep``, or ``--only sweep``): a small tile sweep for linear / attention / conv per shape
   class, the best fixed config per class, for the next session to put in the tables (with PROVENANCE.json).
   ``bench/apply_sweep.py`` compares each row with the ``speed`` rows of the same JSON, so a sweep run of its own is
   ``--only speed --only sweep``; run ``apply_sweep.py`` on the CPU machine, not in the device session.

Writes ``<out-dir>/gpu_<device>.json`` and ``gpu_<device>.md`` and prints their paths and a summary; with
``--only`` the names carry the sections, sorted (``gpu_<device>_only-speed-sweep.json``), and ``--ops``/``--quick``
add ``_ops-<ops>``/``_quick``, so a partial run does not
overwrite the full run's files. ``--out-dir`` defaults to ``$OUT`` when that environment variable is set and not
empty (the device tool brings back only what is written there), else ``bench/results``. Both files are rewritten
after every section (the JSON atomically), so a run killed by a timeout or an OOM keeps the sections it finished.
Exit status: 1 when any correctness or invariance check failed, 2 when a correctness section did not finish
(error or time budget), else 0. Each section records its own errors and the run goes on. ``--budget-s`` (default
240) is counted from the start of the process (before ``import torch``) and stops starting new work when it is
spent (the sections left are marked skipped); one item started just before that still runs to its end, so the
default leaves a minute of the 5 for that and for writing the files.

``--dry-run`` runs every section on CPU with tiny shapes (the torch path, CPU timers) so the script is tested
without a GPU (``tests/test_gpu_check.py``); ``--inject-fault`` perturbs jetdet's outputs for batches above 1
(a negative control: the run must then fail).
"""

from __future__ import annotations

import time

#: when this module started to run (before ``import torch``): the time budget is counted from here
_T0 = time.monotonic()
_MAINS = 0  # main() calls in this process (the first one's budget counts from _T0)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
import zlib  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from jetdet.render.store import atomic_write  # noqa: E402

# max |out - ref| / max(1, max |ref|) per dtype against the fp32 reference (the README's "Accuracy")
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# op cases that only mean something in some dtypes (every other case runs in DTYPES)
CASE_DTYPES = {"linear_tf32x3": (torch.float32,), "conv3x3_tf32x3": (torch.float32,),
               "attention_tma_d72": (torch.float16, torch.bfloat16), "conv3x3_tma": (torch.float16, torch.bfloat16),
               "linear_tma": (torch.float16, torch.bfloat16)}  # the TMA kernels take 16-bit calls only
# issue 13's targets: jetdet time / torch time at most this
TARGETS = {"linear": 1.10, "linear_m512": 1.25, "linear_fp32": 1.3, "attention": 1.15, "conv": 1.5}
CORRECTNESS_SECTIONS = ("noise", "ops", "models")
#: sections a plain run leaves out: ``compiled`` (``--compiled``) and ``sweep`` (``--sweep``); ``--only`` takes them too
OPTIONAL_SECTIONS = ("compiled", "sweep")
DEFAULT_BUDGET_S = 240.0


def _dn(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ------------------------------------------------------------------------------------------------ the run


class Run:
    """Results, time budget, failures. ``dev`` is the current CUDA device (with its index) on a GPU, "cpu" in a dry
    run. The budget is counted from ``t0`` (``time.monotonic()``; default: when this module started). With ``base``
    (a path without extension) :meth:`save` writes ``base.json`` and ``base.md``; without it, it writes nothing."""

    def __init__(self, args, t0: float | None = None, base: str | None = None):
        self.args = args
        self.quick = args.quick or args.dry_run
        self.dry = args.dry_run
        # with its index: configs.device_identity caches only indexed devices (an index-less one asks the driver)
        self.dev = torch.device("cpu") if args.dry_run else torch.device("cuda", torch.cuda.current_device())
        self.t0 = _T0 if t0 is None else t0
        self.budget = args.budget_s
        self.base = base
        self.failures: list[str] = []
        self.incomplete: list[str] = []
        self.result: dict = {"sections": {}, "failures": self.failures, "incomplete": self.incomplete}

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def save(self) -> tuple[str, str] | None:
        """Write the results so far to ``base.json`` (atomically) and ``base.md``; the paths, or None without a
        ``base``. A Markdown report that fails is replaced by a note pointing at the JSON."""
        if not self.base:
            return None
        res = self.result
        res.setdefault("argv", sys.argv[1:])
        res["seconds"] = time.monotonic() - self.t0
        res["when"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        folder = os.path.dirname(os.path.abspath(self.base))
        os.makedirs(folder, exist_ok=True)
        write_json(self.base + ".json", res)
        try:
            text = markdown(res)
        except Exception as e:  # noqa: BLE001 - the JSON holds the results; the run and its verdict must go on
            text = (f"# bench/gpu_check.py\n\nThe Markdown report failed ({type(e).__name__}: {e}); see "
                    f"{self.base}.json\n")
            print(f"Markdown report failed: {type(e).__name__}: {e}")
        atomic_write(self.base + ".md", text.encode())
        return self.base + ".json", self.base + ".md"

    def fail(self, what: str) -> None:
        self.failures.append(what)
        print(f"  FAIL {what}", flush=True)

    def sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    def time_ms(self, fn) -> float:
        """Median milliseconds of ``fn()``: ``triton.testing.do_bench`` on a GPU, a CPU timer in a dry run."""
        if self.dev.type == "cuda":
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=10 if self.quick else 25, rep=40 if self.quick else 100,
                                                 return_mode="median"))
        fn()
        samples = []
        for _ in range(1 if self.dry else 3):
            t = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t) * 1e3)
        return statistics.median(samples)

    def wall_ms(self, fn, repeats: int = 3) -> float:
        """Median wall milliseconds of ``fn()`` (host included: for whole samplers), synchronised."""
        fn()
        self.sync()
        samples = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            self.sync()
            samples.append((time.perf_counter() - t) * 1e3)
        return statistics.median(samples)

    def graphed(self, fn):
        """``(replay, output)``: ``fn()`` captured in a CUDA graph (after a warm-up call on a side stream, as
        ``torch.cuda.graph`` wants) and the graph's static output, which every replay overwrites. A dry run has no
        graphs: a replay that writes ``fn()``, run in the jetdet mode of the "capture", into the output it returned
        first, as a graph's replay would."""
        if self.dev.type != "cuda":
            import jetdet

            captured_in, static = jetdet.get_mode(), fn()

            def replay():
                with torch.no_grad(), jetdet.mode(captured_in):
                    static.copy_(fn())

            return replay, static
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # no garbage collection while capturing: a collected Triton kernel unloads its module, which is illegal
        # during a capture and invalidates the graph (what triton.testing's cuda_graph_without_gc avoids)
        was_on = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(graph):
                out = fn()
        finally:
            if was_on:
                gc.enable()
        return graph.replay, out

    def section(self, name: str, fn, min_s: float = 5.0) -> None:
        """Run ``fn(out)`` as section ``name`` (not started with less than ``min_s`` of the budget left), record
        its errors, then :meth:`save` what the run has so far."""
        print(f"\n== {name} " + "=" * max(0, 90 - len(name)), flush=True)
        if self.left() < min_s:
            self.result["sections"][name] = {"skipped": f"time budget spent ({self.left():.0f} s left)"}
            print(f"  skipped: time budget spent ({self.left():.0f} s left)")
            if name in CORRECTNESS_SECTIONS:
                self.incomplete.append(f"{name}: skipped (time budget)")
            self._save_after(name)
            return
        t = time.perf_counter()
        out: dict = {}
        self.result["sections"][name] = out
        before = _variants()
        try:
            fn(out)
        except Exception as e:  # noqa: BLE001 - record it, run the other sections
            out["error"] = f"{type(e).__name__}: {e}"
            out["traceback"] = traceback.format_exc(limit=6)
            print(f"  ERROR {type(e).__name__}: {e}", flush=True)
            if name in CORRECTNESS_SECTIONS:
                self.incomplete.append(f"{name}: {type(e).__name__}: {e}")
        except BaseException as e:  # interrupted (SIGTERM from a time limit, Ctrl-C): keep what it had, then stop
            out["interrupted"] = f"{type(e).__name__}: {e}"
            out["seconds"] = round(time.perf_counter() - t, 2)
            self.incomplete.append(f"{name}: interrupted ({type(e).__name__})")
            self._save_after(name)
            raise
        out["seconds"] = round(time.perf_counter() - t, 2)
        out["new_variants"] = _variants() - before
        print(f"  ({out['seconds']:.1f} s, {out['new_variants']} kernel variants compiled or loaded, "
              f"{self.left():.0f} s of the budget left)", flush=True)
        self._save_after(name)

    def _save_after(self, name: str) -> None:
        """:meth:`save` after a section; a failed write is reported and the run goes on (the end writes again)."""
        try:
            self.save()
        except Exception as e:  # noqa: BLE001 - losing one intermediate write must not lose the run
            print(f"  writing the results after {name} failed: {type(e).__name__}: {e}", flush=True)


def _variants() -> int:
    """Compiled jetdet kernel variants in Triton's in-memory caches (0 in the interpreter)."""
    from jetdet import warmup

    return warmup.cached_variants()


class _Record(Run):
    """The record pass of ``precompile``: the same sections with nothing timed or judged, on its own budget."""

    def __init__(self, args, budget: float):
        super().__init__(args, t0=time.monotonic())  # its own budget, from now; no base: it writes nothing
        self.budget = budget

    def fail(self, what: str) -> None:
        pass

    def time_ms(self, fn) -> float:
        fn()
        return 1.0

    def wall_ms(self, fn, repeats: int = 3) -> float:
        fn()
        return 1.0

    def graphed(self, fn):
        return fn, fn()  # nothing is captured while the launches only compile


@contextlib.contextmanager
def _flags(**kw):
    """Set torch.backends flags (``matmul_tf32``, ``cudnn_tf32``) and put them back."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        if "matmul_tf32" in kw:
            torch.backends.cuda.matmul.allow_tf32 = kw["matmul_tf32"]
        if "cudnn_tf32" in kw:
            torch.backends.cudnn.allow_tf32 = kw["cudnn_tf32"]
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# --------------------------------------------------------------------------------------------- environment


def _commit() -> str | None:
    """The jetdet checkout's commit (``git rev-parse --short HEAD``), or None outside a git checkout."""
    import subprocess

    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=os.path.dirname(os.path.abspath(__file__)))  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def environment(run: Run, out: dict) -> None:
    import triton

    import jetdet
    from jetdet import configs

    fp = jetdet.fingerprint()
    out["fingerprint"] = {k: str(v) for k, v in fp.items()}
    out["torch"], out["triton"] = torch.__version__, triton.__version__
    out["commit"] = _commit()
    if run.dev.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name()
        out["capability"] = list(torch.cuda.get_device_capability())
    else:
        out["device_name"] = "dry-run (cpu)"
    tables = {}
    for op, dtype in (("matmul", torch.bfloat16), ("matmul", torch.float32), ("attention", torch.bfloat16),
                      ("conv2d", torch.bfloat16), ("norms", torch.bfloat16)):
        _, path = configs.find_table(op, dtype, run.dev)
        tables[f"{op}/{_dn(dtype)}"] = os.path.basename(path) if path else None
    out["tables"] = tables
    for k in ("device_name", "capability", "torch", "triton", "commit"):
        print(f"  {k:<12} {out.get(k)}")
    for k, v in tables.items():
        print(f"  table {k:<18} {v}")


# ----------------------------------------------------------------------------------------------- precompile

#: the sections the record pass runs (``compiled`` is torch.compile's own compile; ``environment`` launches nothing)
RECORDED = ("noise", "ops", "models", "speed", "model_speed", "fast_path", "sparse", "sweep")


def precompile(run: Run, out: dict, sections) -> None:
    """Run ``sections`` once with every jetdet kernel launch turned into a compile in a thread pool
    (:func:`jetdet.warmup.compile_ahead`): their outputs are uninitialised, their checks and timings are thrown
    away, their prints are silenced. The record pass stops starting sections after 40% of what is left of the
    budget, and the wait for its compiles at 55%: compiles still running then finish beside the sections."""
    from jetdet import warmup

    why = warmup.unavailable()
    if why:  # the record pass would run every launch for real: twice the work for nothing
        out["unavailable"] = why
        print(f"  not done: {why}")
        return
    before = warmup.cached_variants()
    rec = _Record(run.args, budget=0.4 * run.left())
    errors = {}
    # the wait for the compiles ends too: what is still compiling then goes on beside the sections, and a launch
    # that needs such a variant waits for that one only
    with warmup.compile_ahead(deadline=time.perf_counter() + 0.55 * run.left()) as stats:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            for name, fn in sections:
                if rec.left() < 5:
                    errors[name] = "not recorded: record budget spent"
                    continue
                try:
                    fn(rec, {})
                except Exception as e:  # noqa: BLE001 - garbage in, anything out: the real pass will tell
                    errors[name] = f"{type(e).__name__}: {str(e)[:200]}"
    out.update({k: stats[k] for k in ("launches", "compiles", "pending", "seconds")})
    out["variants"] = warmup.cached_variants() - before
    out["record_stopped"] = errors
    print(f"  {stats['launches']} launches recorded, {stats['compiles']} variants compiled ahead "
          f"({out['variants']} in the caches now) in {stats['seconds']:.1f} s"
          + (f"; {stats['pending']} still compiling, beside the sections" if stats["pending"] else ""))
    for name, why in errors.items():
        print(f"  record pass, {name}: {why}")


# ---------------------------------------------------------------------------------------------------- noise


def noise(run: Run, out: dict) -> None:
    import jetdet

    shape = (2, 4, 16, 16) if run.dry else (8, 4, 128, 128)
    seeds = (1, 0) if run.quick else (1, 0, 16, 2**64 - 1)
    rows = []
    for dtype in DTYPES:
        for seed in seeds:
            kw = dict(item_offset=5, step=3, dtype=dtype)
            cpu = jetdet.randn(shape, seed, **kw)
            dev = jetdet.randn(shape, seed, device=run.dev, **kw)
            if run.args.inject_fault and shape[0] > 1:
                dev = dev.clone()
                dev.view(-1)[-1] += 1
            same = torch.equal(dev.cpu().view(torch.int16 if dtype != torch.float32 else torch.int32),
                               cpu.view(torch.int16 if dtype != torch.float32 else torch.int32))
            items = all(
                torch.equal(jetdet.randn((1, *shape[1:]), seed, item_offset=5 + i, step=3, dtype=dtype,
                                         device=run.dev)[0], dev[i])
                for i in (0, shape[0] - 1)
            )
            row = {"dtype": _dn(dtype), "seed": seed, "gpu_equals_cpu": same, "items_equal_batch": items,
                   "sha256_gpu": jetdet.checksum(dev.cpu()), "sha256_cpu": jetdet.checksum(cpu)}
            rows.append(row)
            print(f"  {_dn(dtype):<9} seed {seed:<20} GPU == CPU {same}  item == batch {items}  "
                  f"sha256 {row['sha256_gpu'][:16]}")
            if not same:
                run.fail(f"noise {_dn(dtype)} seed {seed}: device output != CPU output")
            if not items:
                run.fail(f"noise {_dn(dtype)} seed {seed}: an item alone != its slot in the batch")
    out["shape"], out["rows"] = list(shape), rows


# ------------------------------------------------------------------------------------------------------ ops


def _op_cases(dry: bool):
    """name -> (make(batch, gen) -> (items, shared) on CPU in fp32, call(*items, *shared), ref(*...) fp32)."""
    import jetdet
    from jetdet.kernels.block_sparse import reference as bs_ref
    from jetdet.kernels.linear_attention import reference as la_ref

    s = 1 if dry else 2  # size multiplier: tails everywhere, small enough to compile and run quickly
    ops = jetdet.ops

    def r(gen, *shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    def bool_mask(nq, nk, bs, heads=2):
        m = torch.ones(1, heads, -(-nq // bs), -(-nk // bs), dtype=torch.bool)
        m[..., 0, -1] = False
        return m

    cases = {
        "linear": (lambda b, g: ([r(g, b, 13 * s, 96 * s)], [r(g, 80 * s, 96 * s, scale=0.1), r(g, 80 * s)]),
                   lambda x, w, bias: ops.linear(x, w, bias), lambda x, w, bias: F.linear(x, w, bias)),
        "linear_tma": (lambda b, g: ([r(g, b, 13 * s, 96 * s)], [r(g, 80 * s, 96 * s, scale=0.1), r(g, 80 * s)]),
                       _linear_tma, lambda x, w, bias: F.linear(x, w, bias)),
        # JETDET_FP32_DOT=tf32x3 (opt-in): fp32 only (CASE_DTYPES), at fp32's tolerance
        "linear_tf32x3": (lambda b, g: ([r(g, b, 13 * s, 96 * s)], [r(g, 80 * s, 96 * s, scale=0.1), r(g, 80 * s)]),
                          _linear_tf32x3, lambda x, w, bias: F.linear(x, w, bias)),
        "conv3x3_tf32x3": (lambda b, g: ([r(g, b, 16 * s, 13, 11)], [r(g, 24 * s, 16 * s, 3, 3, scale=0.1),
                                                                    r(g, 24 * s)]),
                           _conv_tf32x3, lambda x, w, bias: F.conv2d(x, w, bias, padding=1)),
        "bmm": (lambda b, g: ([r(g, b, 35 * s, 33), r(g, b, 33, 21 * s, scale=0.2)], []),
                lambda a, m: ops.bmm(a, m), lambda a, m: torch.bmm(a, m)),
        "conv3x3": (lambda b, g: ([r(g, b, 16 * s, 13, 11)], [r(g, 24 * s, 16 * s, 3, 3, scale=0.1), r(g, 24 * s)]),
                    lambda x, w, bias: ops.conv2d(x, w, bias, padding=1),
                    lambda x, w, bias: F.conv2d(x, w, bias, padding=1)),
        # JETDET_CONV_KERNEL=tma (opt-in): 16-bit only (CASE_DTYPES); an image of 13 x 11, under one 8 x 16 tile
        "conv3x3_tma": (lambda b, g: ([r(g, b, 16 * s, 13, 11)], [r(g, 24 * s, 16 * s, 3, 3, scale=0.1),
                                                                 r(g, 24 * s)]),
                        _conv_tma, lambda x, w, bias: F.conv2d(x, w, bias, padding=1)),
        "conv3x3_s2": (lambda b, g: ([r(g, b, 8, 13, 11)], [r(g, 12, 8, 3, 3, scale=0.2), None]),
                       lambda x, w, bias: ops.conv2d(x, w, bias, stride=2, padding=1),
                       lambda x, w, bias: F.conv2d(x, w, bias, stride=2, padding=1)),
        "conv1x1": (lambda b, g: ([r(g, b, 19, 9, 7)], [r(g, 11, 19, 1, 1, scale=0.2), r(g, 11)]),
                    lambda x, w, bias: ops.conv2d(x, w, bias), lambda x, w, bias: F.conv2d(x, w, bias)),
        "attention_d64": (lambda b, g: ([r(g, b, 2, 77 * s, 64), r(g, b, 2, 61 * s, 64), r(g, b, 2, 61 * s, 64)], []),
                          lambda q, k, v: ops.attention(q, k, v),
                          lambda q, k, v: F.scaled_dot_product_attention(q, k, v)),
        # JETDET_ATTENTION_KERNEL=tma (opt-in): 16-bit only (CASE_DTYPES); head dim 72 (64 + a 16-wide tail), q as
        # a strided view of a [B, N, H, D] projection
        "attention_tma_d72": (
            lambda b, g: ([r(g, b, 77 * s, 2, 72).transpose(1, 2), r(g, b, 2, 61 * s, 72), r(g, b, 2, 61 * s, 72)], []),
            _attention_tma, lambda q, k, v: F.scaled_dot_product_attention(q, k, v)),
        "attention_d128_mask": (
            lambda b, g: ([r(g, b, 2, 33, 128), r(g, b, 2, 45, 128), r(g, b, 2, 45, 128)],
                          [torch.rand(1, 1, 33, 45, generator=g) > 0.3]),
            lambda q, k, v, m: ops.attention(q, k, v, attn_mask=_with_diagonal(m)),
            lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=_with_diagonal(m))),
        # head dim 72 (64 + a 16-wide tail) read in 16-byte loads (STRIDE_UNIT 8), with a mask
        "attention_d72_mask": (
            lambda b, g: ([r(g, b, 2, 33, 72), r(g, b, 2, 45, 72), r(g, b, 2, 45, 72)],
                          [torch.rand(1, 1, 33, 45, generator=g) > 0.3]),
            lambda q, k, v, m: ops.attention(q, k, v, attn_mask=_with_diagonal(m)),
            lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=_with_diagonal(m))),
        # one head over 512 channels, the mid-block attention of SD/SDXL/Flux VAEs: past the kernel's head dims, so
        # jetdet's GEMM and row softmax in fp32 (attention/launch.py: attention_wide)
        "attention_d512": (
            lambda b, g: ([r(g, b, 1, 40 * s, 512), r(g, b, 1, 40 * s, 512), r(g, b, 1, 40 * s, 512)], []),
            lambda q, k, v: ops.attention(q, k, v), lambda q, k, v: F.scaled_dot_product_attention(q, k, v)),
        "layer_norm": (lambda b, g: ([r(g, b, 7, 320, scale=3)], [r(g, 320), r(g, 320)]),
                       lambda x, w, bias: ops.layer_norm(x, (320,), w, bias, 1e-5),
                       lambda x, w, bias: F.layer_norm(x, (320,), w, bias, 1e-5)),
        "rms_norm": (lambda b, g: ([r(g, b, 7, 129, scale=2)], [r(g, 129)]),
                     lambda x, w: ops.rms_norm(x, (129,), w, 1e-6), lambda x, w: F.rms_norm(x, (129,), w, 1e-6)),
        "group_norm": (lambda b, g: ([r(g, b, 64, 9, 7, scale=2)], [r(g, 64), r(g, 64)]),
                       lambda x, w, bias: ops.group_norm(x, 32, w, bias, 1e-5),
                       lambda x, w, bias: F.group_norm(x, 32, w, bias, 1e-5)),
        "group_norm_channels_last": (
            lambda b, g: ([r(g, b, 64, 9, 7, scale=2)], [r(g, 64), r(g, 64)]),
            lambda x, w, bias: ops.group_norm(x.contiguous(memory_format=torch.channels_last), 32, w, bias, 1e-5),
            lambda x, w, bias: F.group_norm(x, 32, w, bias, 1e-5)),
        "softmax": (lambda b, g: ([r(g, b, 9, 333, scale=4)], []),
                    lambda x: ops.softmax(x, -1), lambda x: torch.softmax(x, -1)),
        "sum": (lambda b, g: ([r(g, b, 5, 333)], []), lambda x: ops.sum(x, dim=-1), lambda x: x.sum(-1)),
        "mean": (lambda b, g: ([r(g, b, 5, 333)], []), lambda x: ops.mean(x, dim=-1, keepdim=True),
                 lambda x: x.mean(-1, keepdim=True)),
        # the convolution forms deterministic mode rebuilds from conv2d calls (jetdet/conv_forms.py): torch's own
        # call in the mode against the same call on the fp32 reference
        "mode_conv1d_dilated": _in_mode(lambda b, g: ([r(g, b, 16, 57 * s)], [r(g, 24, 16, 7, scale=0.1), r(g, 24)]),
                                        lambda x, w, bias: F.conv1d(x, w, bias, padding=9, dilation=3)),
        "mode_conv_transpose2d": _in_mode(lambda b, g: ([r(g, b, 16, 9, 7)], [r(g, 16, 12, 4, 4, scale=0.1), r(g, 12)]),
                                          lambda x, w, bias: F.conv_transpose2d(x, w, bias, stride=2, padding=1)),
        "mode_conv_grouped": _in_mode(lambda b, g: ([r(g, b, 32, 9, 7)], [r(g, 32, 8, 3, 3, scale=0.1), r(g, 32)]),
                                      lambda x, w, bias: F.conv2d(x, w, bias, padding=1, groups=4)),
        "mode_conv_depthwise": _in_mode(lambda b, g: ([r(g, b, 32, 9, 7)], [r(g, 32, 1, 7, 7, scale=0.1), r(g, 32)]),
                                        lambda x, w, bias: F.conv2d(x, w, bias, padding=3, groups=32)),
        "linear_attention": (
            lambda b, g: ([r(g, b, 2, 70, 32), r(g, b, 2, 50, 32), r(g, b, 2, 50, 48)], []),
            lambda q, k, v: ops.linear_attention(q, k, v, "relu"),
            lambda q, k, v: la_ref.linear_attention_reference(q, k, v, "relu")),
        "block_sparse_attention": (
            lambda b, g: ([r(g, b, 2, 100, 32), r(g, b, 2, 130, 32), r(g, b, 2, 130, 32)], [bool_mask(100, 130, 32)]),
            lambda q, k, v, m: ops.block_sparse_attention(q, k, v, m, block_size=32),
            lambda q, k, v, m: bs_ref.block_sparse_attention_reference(q, k, v, m, 32)),
        "forecast": (
            lambda b, g: ([r(g, b, 4, 9, 9), r(g, b, 4, 9, 9), r(g, b, 4, 9, 9)], []),
            lambda h0, h1, h2: ops.forecast([h0, h1, h2], [0.9, 0.7, 0.5], 0.3, order=2),
            lambda h0, h1, h2: _forecast_ref([h0, h1, h2], [0.9, 0.7, 0.5], 0.3)),
        "relative_change": (
            lambda b, g: ([r(g, b, 4, 17, 15), r(g, b, 4, 17, 15)], []),
            lambda a, c: ops.relative_change(a, c),
            lambda a, c: ((a - c).abs().flatten(1).sum(1) / c.abs().flatten(1).sum(1))),
    }
    return cases


@contextlib.contextmanager
def _env(name: str, value: str):
    """``$name=value`` inside, restored."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def _tma_kernel(kind: str = "linear"):
    """The opt-in TMA-fed kernel of the speed kind ``kind`` inside (``kernels._common.kernel_choice``: the persistent
    TMA GEMM for eligible fp16/bf16 linears, the attention for eligible unmasked 16-bit calls, the conv for eligible
    stride-1 16-bit calls), restored."""
    from jetdet.kernels.attention.launch_tma import KERNEL_ENV as attention
    from jetdet.kernels.conv2d.launch_tma import KERNEL_ENV as conv
    from jetdet.kernels.matmul.launch import KERNEL_ENV as linear

    return _env({"linear": linear, "attention": attention, "conv": conv, "conv_cl": conv}[kind], "tma")


def _conv_tma(x, w, bias):
    import jetdet

    with _tma_kernel("conv"):
        return jetdet.ops.conv2d(x, w, bias, padding=1)


def _attention_tma(q, k, v):
    import jetdet

    with _tma_kernel("attention"):
        return jetdet.ops.attention(q, k, v)


def _tf32x3():
    """``JETDET_FP32_DOT=tf32x3`` inside (fp32 GEMM and conv2d on the tensor cores, split precision), restored."""
    from jetdet.kernels._common import FP32_DOT_ENV

    return _env(FP32_DOT_ENV, "tf32x3")


@contextlib.contextmanager
def _attention_loops(split: bool):
    """Dense attention with ``SPLIT_TAIL`` forced to ``split`` (16-bit dots only) inside, restored: the A/B of the
    unmasked whole-block loop against one masked loop (``kernels/attention/launch.py: split_tail``)."""
    from jetdet.kernels.attention import launch

    saved = launch.split_tail
    launch.split_tail = lambda dot_fp32, arch: split and not dot_fp32
    try:
        yield
    finally:
        launch.split_tail = saved


def _linear_tma(x, w, bias):
    import jetdet

    with _tma_kernel():
        return jetdet.ops.linear(x, w, bias)


def _linear_tf32x3(x, w, bias):
    import jetdet

    with _tf32x3():
        return jetdet.ops.linear(x, w, bias)


def _conv_tf32x3(x, w, bias):
    import jetdet

    with _tf32x3():
        return jetdet.ops.conv2d(x, w, bias, padding=1)


def _in_mode(make, fn):
    """An op case for a form the router rebuilds: ``fn`` (a plain torch call) in ``jetdet.mode("deterministic")``
    is the call checked, ``fn`` itself on the fp32 inputs the reference."""
    def call(*a):
        import jetdet

        with jetdet.mode("deterministic"):
            return fn(*a)

    return make, call, fn


def _with_diagonal(m):
    """A bool mask with its diagonal kept, so no query row is fully masked."""
    return m | torch.eye(m.shape[-2], m.shape[-1], dtype=torch.bool, device=m.device)


def _forecast_ref(hist, ts, t):
    from jetdet.kernels.forecast import reference

    return reference.forecast_reference(hist, ts, t, order=2).float()


def _move(ts, dev, dtype=None):
    out = []
    for t in ts:
        if isinstance(t, torch.Tensor):
            t = t.to(dev)
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
        out.append(t)
    return out


def _perturb(run: Run, out):
    """``--inject-fault``: change jetdet's output for batches above 1 (the checks must catch it)."""
    if run.args.inject_fault and isinstance(out, torch.Tensor) and out.dim() and out.shape[0] > 1:
        out = out.clone()
        out.view(-1)[-1] += 1
    return out


def ops_check(run: Run, out: dict) -> None:
    cases = _op_cases(run.dry)
    if run.args.ops:
        cases = {k: v for k, v in cases.items() if k in run.args.ops.split(",")}
    rows = []
    for name, (make, call, ref) in cases.items():
        for dtype in CASE_DTYPES.get(name, DTYPES):
            if run.left() < 5:
                run.incomplete.append(f"ops: {name} {_dn(dtype)} and later: time budget")
                out["rows"] = rows
                return
            try:
                row = _op_row(run, name, make, call, ref, dtype)
            except Exception as e:  # noqa: BLE001 - record it, check the other ops
                row = {"op": name, "dtype": _dn(dtype), "error": f"{type(e).__name__}: {e}"}
                run.incomplete.append(f"ops {name} {_dn(dtype)}: {row['error']}")
                print(f"  {name:<24} {_dn(dtype):<9} ERROR {row['error']}")
            rows.append(row)
    out["rows"] = rows
    _torch_control(run, out)


def _op_row(run: Run, name, make, call, ref, dtype) -> dict:
    """Accuracy of ``name`` in ``dtype`` against the fp32 reference, and bitwise prefix / needle invariance."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    items32, shared32 = make(8, g)
    # the inputs rounded to dtype first, so the fp32 reference sees exactly what the op sees
    items = _move(items32, "cpu", dtype)
    shared = _move(shared32, "cpu", dtype)
    exp = ref(*[t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                for t in [x[:3] for x in items] + shared])
    d_items, d_shared = _move(items, run.dev), _move(shared, run.dev)
    got = _perturb(run, call(*[x[:3] for x in d_items], *d_shared))
    err = (got.float().cpu() - exp).abs().max().item() if exp.numel() else 0.0
    scale = max(1.0, exp.abs().max().item()) if exp.numel() else 1.0
    tol = TOLERANCE[dtype]
    ok_acc = err <= tol * scale and got.dtype == (dtype if name != "relative_change" else torch.float32)
    full = _perturb(run, call(*d_items, *d_shared))
    rng = random.Random(name)
    prefix_bad, needle_bad = [], []
    for b in range(1, 9):
        part = _perturb(run, call(*[x[:b] for x in d_items], *d_shared))
        if not torch.equal(part, full[:b]):
            prefix_bad.append(b)
        s = rng.randrange(b)
        one = call(*[x[s: s + 1] for x in d_items], *d_shared)
        if not torch.equal(one[0], part[s]):
            needle_bad.append(f"{s}/{b}")
    row = {"op": name, "dtype": _dn(dtype), "max_err": err, "scale": scale, "tol": tol, "accurate": ok_acc,
           "prefix_differs": prefix_bad, "needle_differs": needle_bad}
    inv = "bitwise" if not prefix_bad and not needle_bad else f"DIFFERS prefix {prefix_bad} needle {needle_bad}"
    print(f"  {name:<24} {_dn(dtype):<9} err {err:9.2e} / tol {tol * scale:8.1e} "
          f"{'ok' if ok_acc else 'FAIL'}  batch 1..8 {inv}")
    if not ok_acc:
        run.fail(f"ops {name} {_dn(dtype)}: max err {err:.3g} > {tol * scale:.3g}")
    if prefix_bad or needle_bad:
        run.fail(f"ops {name} {_dn(dtype)}: not batch invariant (prefix {prefix_bad}, needle {needle_bad})")
    return row


def _torch_control(run: Run, out: dict) -> None:
    """Negative control: torch's own GEMM, row 0 of ``x[:m] @ w.T`` for growing m against m = 1."""
    ctrl = {}
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(256 if run.dry else 2048, 1024 if not run.dry else 64, generator=g).to(run.dev, dtype)
        w = torch.randn(1024 if not run.dry else 48, x.shape[1], generator=g).to(run.dev, dtype)
        ms = [m for m in (1, 2, 8, 32, 128, 512, 2048) if m <= x.shape[0]]
        row0 = F.linear(x[:1], w)[0]
        ctrl[_dn(dtype)] = {"m": ms, "row0_equal": [bool(torch.equal(F.linear(x[:m], w)[0], row0)) for m in ms]}
        print(f"  negative control: torch F.linear {_dn(dtype)} row 0 at M={ms} equals M=1: "
              f"{ctrl[_dn(dtype)]['row0_equal']}")
    _std_control(run, ctrl)
    out["torch_control"] = ctrl


def _std_control(run: Run, ctrl: dict) -> None:
    """Per-item ``torch.std`` over (C, H, W), as ComfyUI's RescaleCFG takes it, item 0 at batch B against B = 1:
    torch's own (whether its reduction depends on the batch here is what this measures; on the CPU it did not) and
    in deterministic mode (routed to jetdet's row reductions: must be equal at every B)."""
    import jetdet

    g = torch.Generator().manual_seed(1)
    x = torch.randn(8 if run.dry else 64, 4, 16 if run.dry else 128, 16 if run.dry else 128, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(run.dev, dtype)
        bs = [b for b in (1, 2, 8, 32, 64) if b <= xd.shape[0]]

        def std(t):
            return torch.std(t, dim=(1, 2, 3), keepdim=True)

        row0 = std(xd[:1])[0]
        torch_eq = [bool(torch.equal(std(xd[:b])[0], row0)) for b in bs]
        with jetdet.mode("deterministic"):
            row0 = std(xd[:1])[0]
            jet_eq = [bool(torch.equal(std(xd[:b])[0], row0)) for b in bs]
        ctrl[f"std {_dn(dtype)}"] = {"batch": bs, "torch_row0_equal": torch_eq, "jetdet_row0_equal": jet_eq}
        print(f"  std over (C, H, W) {_dn(dtype)}, item 0 at B={bs} equals B=1: torch {torch_eq}, "
              f"deterministic mode {jet_eq}")
        if not all(jet_eq):
            run.fail(f"ops: torch.std in deterministic mode {_dn(dtype)} depends on the batch: {jet_eq}")


# ---------------------------------------------------------------------------------------------- models


def _dit_b(dry: bool):
    from jetdet.models import TinyDiT

    if dry:
        return TinyDiT(d=64, depth=2, heads=4, size=16), 16
    return TinyDiT(d=768, depth=12, heads=12, size=64, patch=2), 64  # DiT-B width/depth, 1024 tokens


def models_check(run: Run, out: dict) -> None:
    from jetdet.invariance import check_model
    from jetdet.models import TinyDiT, TinyUNet, make_toy_inputs

    rows = []
    dit_b, size_b = _dit_b(run.dry)
    max_batch = 4 if run.quick else 8
    for name, model, size in (("TinyUNet", TinyUNet(), 16), ("TinyDiT", TinyDiT(), 16), ("DiT-B size", dit_b, size_b)):
        model = model.eval().to(run.dev)
        inputs = _move(make_toy_inputs(8, size=size), run.dev)
        for mode in ("deterministic", "off"):
            if run.left() < 5:
                run.incomplete.append(f"models: {name} {mode}: time budget")
                out["rows"] = rows
                return
            fwd = model
            if run.args.inject_fault and mode == "deterministic":
                def fwd(*a, _m=model):  # noqa: E306
                    return _perturb(run, _m(*a))
            comps, digest = check_model(fwd, inputs, mode, max_batch=max_batch, threads=(1,), repeats=2)
            bad = [c for c in comps if not c.equal]
            rows.append({"model": name, "mode": mode, "equal": len(comps) - len(bad), "comparisons": len(comps),
                         "max_diff": max((c.max_abs_diff for c in bad), default=0.0), "sha256": digest,
                         "differs": [c.label for c in bad[:5]]})
            verdict = "PASS" if not bad else "DIFFERS"
            print(f"  {name:<11} mode={mode:<13} {len(comps) - len(bad):>2}/{len(comps)} bitwise equal [{verdict}]")
            if mode == "deterministic" and bad:
                run.fail(f"models {name}: deterministic mode not bitwise ({bad[0].label})")
    out["rows"] = rows


# ----------------------------------------------------------------------------------------------- speed


def _speed_shapes(dry: bool, quick: bool):
    """(label, kind, dtype, args) with kind in linear/attention/conv/group_norm/layer_norm/softmax."""
    bf = torch.bfloat16
    if dry:
        return [("linear 64x96->80", "linear", bf, (64, 96, 80)),
                ("attention D64 B1 H2 N128", "attention", bf, (1, 2, 128, 64)),
                ("attention D72 B1 H2 N128", "attention", bf, (1, 2, 128, 72)),
                ("conv3x3 B1 C16 16x16->16", "conv", bf, (1, 16, 16, 16)),
                ("conv3x3 channels-last B1 C16 16x16->16", "conv_cl", bf, (1, 16, 16, 16)),
                ("group_norm 2x32x8x8", "group_norm", bf, (2, 32, 8, 8)),
                ("layer_norm 2x64x96", "layer_norm", bf, (2, 64, 96)),
                ("softmax 2x64x96", "softmax", bf, (2, 64, 96)),
                ("linear fp32 64x96->80", "linear", torch.float32, (64, 96, 80)),
                ("conv3x3 fp32 B1 C16 16x16->16", "conv", torch.float32, (1, 16, 16, 16)),
                ("depthwise 7x7 channels-last B1 C16 16x16", "depthwise_cl", bf, (1, 16, 16, 7))]
    issue = [
        ("linear 8192x3072->3072", "linear", bf, (8192, 3072, 3072)),
        ("linear 8192x3072->12288", "linear", bf, (8192, 3072, 12288)),
        ("linear 512x3072->18432", "linear", bf, (512, 3072, 18432)),
        ("linear 4096x1152->4608", "linear", bf, (4096, 1152, 4608)),
        ("linear fp32 IEEE 8192x3072->3072", "linear", torch.float32, (8192, 3072, 3072)),
        ("attention D128 B2 H24 N4096", "attention", bf, (2, 24, 4096, 128)),
        ("attention D64 B2 H24 N4096", "attention", bf, (2, 24, 4096, 64)),
        ("attention D64 B1 H16 N16384", "attention", bf, (1, 16, 16384, 64)),
        # head dim 72 (DiT-XL/2, PixArt): 7.5x cuDNN flash in the H200 run, before the head-dim split and stride unit
        ("attention D72 B2 H16 N4096", "attention", bf, (2, 16, 4096, 72)),
        ("conv3x3 B1 C512 128x128->512", "conv", bf, (1, 512, 128, 512)),
        ("conv3x3 B4 C320 64x64->320", "conv", bf, (4, 320, 64, 320)),
        ("conv3x3 B4 C640 32x32->640", "conv", bf, (4, 640, 32, 640)),
        # fp32 (VAEs run in it): cuDNN with TF32 off against the IEEE kernel, and JETDET_FP32_DOT=tf32x3 beside
        ("conv3x3 fp32 IEEE B4 C320 64x64->320", "conv", torch.float32, (4, 320, 64, 320)),
        # the same, channels-last on both sides (the kernel's own layout; NCHW input pays a copy to it)
        ("conv3x3 channels-last B1 C512 128x128->512", "conv_cl", bf, (1, 512, 128, 512)),
        ("conv3x3 channels-last B4 C320 64x64->320", "conv_cl", bf, (4, 320, 64, 320)),
        ("conv3x3 channels-last B4 C640 32x32->640", "conv_cl", bf, (4, 640, 32, 640)),
        ("group_norm 4x512x128x128", "group_norm", bf, (4, 512, 128, 128)),
        # depthwise (ConvNeXt-type blocks, Stable Cascade, ACE-Step): jetdet's own kernel, never timed on a GPU
        ("depthwise 7x7 channels-last B4 C512 64x64", "depthwise_cl", bf, (4, 512, 64, 7)),
        ("depthwise 3x3 B4 C512 64x64", "depthwise", bf, (4, 512, 64, 3)),
        ("layer_norm 4x4096x3072", "layer_norm", bf, (4, 4096, 3072)),
        ("softmax 4x4096x3072", "softmax", bf, (4, 4096, 3072)),
    ]
    if quick:
        return issue
    real = [
        # SD1.5 (512x512: 64x64 latent, CFG batch 2) and SDXL (1024x1024: 128x128 latent) UNet 3x3 convs
        ("SD1.5 conv 320 @64x64 B2", "conv", bf, (2, 320, 64, 320)),
        ("SD1.5 conv 640 @32x32 B2", "conv", bf, (2, 640, 32, 640)),
        ("SD1.5 conv 1280 @16x16 B2", "conv", bf, (2, 1280, 16, 1280)),
        ("SDXL conv 320 @128x128 B2", "conv", bf, (2, 320, 128, 320)),
        ("SDXL conv 640 @64x64 B2", "conv", bf, (2, 640, 64, 640)),
        ("SDXL conv 1280 @32x32 B2", "conv", bf, (2, 1280, 32, 1280)),
        # Flux (width 3072, 4096 image + 512 text tokens) and SD3-medium (width 1536, ~4429 tokens) linears
        ("Flux qkv 4608x3072->9216", "linear", bf, (4608, 3072, 9216)),
        ("Flux single fused 4608x3072->21504", "linear", bf, (4608, 3072, 21504)),
        ("Flux mlp down 4096x12288->3072", "linear", bf, (4096, 12288, 3072)),
        ("SD3 qkv 4429x1536->4608", "linear", bf, (4429, 1536, 4608)),
        ("SD3 mlp up 4429x1536->6144", "linear", bf, (4429, 1536, 6144)),
        # attention of real models
        ("Flux attention D128 B1 H24 N4608", "attention", bf, (1, 24, 4608, 128)),
        ("SD3 attention D64 B2 H24 N4429", "attention", bf, (2, 24, 4429, 64)),
        ("SDXL attention D64 B2 H10 N4096", "attention", bf, (2, 10, 4096, 64)),
        ("SD1.5 attention D40 B2 H8 N4096", "attention", bf, (2, 8, 4096, 40)),
    ]
    return issue + real


def _speed_pair(kind, dtype, a, dev):
    """(torch_fn, jetdet_fn, config key, op name for configs)."""
    import jetdet

    g = torch.Generator(device=dev).manual_seed(0)

    def rn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=dev) * scale).to(dtype)

    if kind == "linear":
        m, k, n = a
        x, w, b = rn(m, k), rn(n, k, scale=k**-0.5), rn(n)
        return (lambda: F.linear(x, w, b)), (lambda: jetdet.ops.linear(x, w, b)), n, "matmul"
    if kind == "attention":
        bb, h, n, d = a
        q, k, v = rn(bb, h, n, d), rn(bb, h, n, d), rn(bb, h, n, d)
        return (lambda: F.scaled_dot_product_attention(q, k, v)), (lambda: jetdet.ops.attention(q, k, v)), d, \
            "attention"
    if kind in ("conv", "conv_cl"):
        bb, c, hw, o = a
        x, b = rn(bb, c, hw, hw), rn(o)
        if kind == "conv_cl":
            x = x.contiguous(memory_format=torch.channels_last)
        # a Parameter, as in a model: jetdet packs its weight once per Parameter, not per call
        w = nn.Parameter(rn(o, c, 3, 3, scale=(9 * c) ** -0.5), requires_grad=False)
        return (lambda: F.conv2d(x, w, b, padding=1)), (lambda: jetdet.ops.conv2d(x, w, b, padding=1)), o, "conv2d"
    if kind in ("depthwise", "depthwise_cl"):
        bb, c, hw, k = a
        x, b, w = rn(bb, c, hw, hw), rn(c), rn(c, 1, k, k, scale=1 / k)
        if kind == "depthwise_cl":
            x = x.contiguous(memory_format=torch.channels_last)
        return ((lambda: F.conv2d(x, w, b, padding=k // 2, groups=c)),
                (lambda: jetdet.ops.depthwise_conv2d(x, w, b, 1, k // 2)), None, None)
    if kind == "group_norm":
        x = rn(*a)
        wt, b = rn(a[1]), rn(a[1])
        return (lambda: F.group_norm(x, 32, wt, b)), (lambda: jetdet.ops.group_norm(x, 32, wt, b)), None, None
    if kind == "layer_norm":
        x = rn(*a)
        wt, b = rn(a[-1]), rn(a[-1])
        return ((lambda: F.layer_norm(x, (a[-1],), wt, b)), (lambda: jetdet.ops.layer_norm(x, (a[-1],), wt, b)),
                None, None)
    if kind == "softmax":
        x = rn(*a)
        return (lambda: torch.softmax(x, -1)), (lambda: jetdet.ops.softmax(x, -1)), None, None
    raise ValueError(kind)


def _target(kind, dtype, a):
    if kind == "linear":
        if dtype == torch.float32:
            return TARGETS["linear_fp32"]
        return TARGETS["linear_m512"] if a[0] <= 512 else TARGETS["linear"]
    if dtype == torch.float32:
        return None  # the conv target is for 16-bit
    return {"attention": TARGETS["attention"], "conv": TARGETS["conv"], "conv_cl": TARGETS["conv"]}.get(kind)


#: the speed section's A/B columns: (label, time key, which rows)
AB_COLUMNS = (
    ("TMA GEMM (JETDET_MATMUL_KERNEL=tma)", "jetdet_tma_ms", ("linear",)),
    ("TMA attention (JETDET_ATTENTION_KERNEL=tma)", "jetdet_tma_ms", ("attention",)),
    ("TMA conv (JETDET_CONV_KERNEL=tma)", "jetdet_tma_ms", ("conv", "conv_cl")),
    ("attention's other KV-loop structure", "jetdet_other_loops_ms", ("attention",)),
    ("fp32 as tf32x3 (JETDET_FP32_DOT=tf32x3)", "jetdet_tf32x3_ms", ("linear", "conv", "conv_cl")),
)


def ab_summary(rows: list[dict]) -> list[str]:
    """One line per A/B column of the speed rows: on how many shapes the alternative beat jetdet's default, and the
    median of alternative / default time, for deciding whether an opt-in kernel becomes the default."""
    out = []
    for label, key, kinds in AB_COLUMNS:
        ratios = sorted(r[key] / r["jetdet_ms"] for r in rows if r.get("kind") in kinds and key in r and r["jetdet_ms"])
        if ratios:
            faster = sum(x < 1 for x in ratios)
            out.append(f"A/B {label}: faster than the default on {faster} of {len(ratios)} shapes; alternative / "
                       f"default time: median {statistics.median(ratios):.2f}x, {ratios[0]:.2f}-{ratios[-1]:.2f}x")
    return out


def speed(run: Run, out: dict) -> None:
    from jetdet import configs

    rows = []
    for label, kind, dtype, a in _speed_shapes(run.dry, run.quick):
        if run.left() < 10:
            out["stopped"] = f"time budget, before {label}"
            break
        try:
            with _flags(matmul_tf32=False, cudnn_tf32=False):  # fp32 is IEEE on both sides
                torch_fn, jet_fn, key, op = _speed_pair(kind, dtype, a, run.dev)
                t_torch = run.time_ms(torch_fn)
                t_jet = run.time_ms(jet_fn)
        except Exception as e:  # noqa: BLE001
            rows.append({"label": label, "error": f"{type(e).__name__}: {e}"})
            print(f"  {label:<40} ERROR {type(e).__name__}: {e}")
            continue
        ab_cols = {}  # the A/B timings in the same run: the TMA GEMM, attention's other loops
        if kind == "linear" and dtype != torch.float32 and run.left() > 20:
            try:
                with _tma_kernel():
                    ab_cols["jetdet_tma_ms"] = run.time_ms(jet_fn)
                ab_cols["tma_ratio"] = ab_cols["jetdet_tma_ms"] / t_torch
            except Exception as e:  # noqa: BLE001
                ab_cols["tma_error"] = f"{type(e).__name__}: {e}"
        if kind in ("linear", "conv", "conv_cl") and dtype == torch.float32 and run.left() > 20:
            try:  # the split-precision tensor-core dot, timed, and its distance from torch's IEEE result
                with _tf32x3():
                    ab_cols["jetdet_tf32x3_ms"] = run.time_ms(jet_fn)
                    y = jet_fn()
                with _flags(matmul_tf32=False, cudnn_tf32=False):
                    ref = torch_fn()
                ab_cols["tf32x3_ratio"] = ab_cols["jetdet_tf32x3_ms"] / t_torch
                scale = ref.abs().max().item() or 1.0
                ab_cols["tf32x3_rel_err"] = (y - ref).abs().max().item() / scale
                ab_cols["ieee_rel_err"] = (jet_fn() - ref).abs().max().item() / scale
            except Exception as e:  # noqa: BLE001
                ab_cols["tf32x3_error"] = f"{type(e).__name__}: {e}"
        if kind in ("attention", "conv", "conv_cl") and dtype != torch.float32 and run.left() > 20:
            try:  # the TMA-fed kernel (opt-in), timed in the same process
                with _tma_kernel(kind):
                    ab_cols["jetdet_tma_ms"] = run.time_ms(jet_fn)
                ab_cols["tma_ratio"] = ab_cols["jetdet_tma_ms"] / t_torch
            except Exception as e:  # noqa: BLE001
                ab_cols["tma_error"] = f"{type(e).__name__}: {e}"
        if kind == "attention" and run.left() > 20:
            from jetdet.kernels.attention.launch import _arch, split_tail

            try:
                # the other loop structure than this device runs (launch.split_tail), timed in the same process
                other = not split_tail(False, _arch(run.dev))
                with _attention_loops(other):
                    ab_cols["jetdet_other_loops_ms"] = run.time_ms(jet_fn)
                ab_cols["other_loops"] = "split" if other else "one masked loop"
            except Exception as e:  # noqa: BLE001
                ab_cols["other_loops_error"] = f"{type(e).__name__}: {e}"
        cfg, table = None, None
        if op is not None:
            cfg = configs.get_config(op, key, dtype=dtype, device=run.dev, default={})
            _, path = configs.find_table(op, dtype, run.dev)
            table = os.path.basename(path) if path else "built-in default"
        target = _target(kind, dtype, a)
        ratio = t_jet / t_torch
        row = {"label": label, "kind": kind, "dtype": _dn(dtype), "shape": list(a), "torch_ms": t_torch,
               "jetdet_ms": t_jet, "ratio": ratio, "target": target,
               "meets_target": None if target is None else ratio <= target, "config": cfg, "table": table, **ab_cols}
        rows.append(row)
        tgt = "" if target is None else f" (target {target:.2f}: {'met' if ratio <= target else 'not met'})"
        ab = ""
        if "tma_ratio" in ab_cols:
            ab = f"  TMA kernel {ab_cols['jetdet_tma_ms']:8.3f} ms {ab_cols['tma_ratio']:5.2f}x"
        if "jetdet_other_loops_ms" in ab_cols:
            ab += f"  {ab_cols['other_loops']}: {ab_cols['jetdet_other_loops_ms']:8.3f} ms"
        if "tf32x3_ratio" in ab_cols:
            ab = (f"  tf32x3 {ab_cols['jetdet_tf32x3_ms']:8.3f} ms {ab_cols['tf32x3_ratio']:5.2f}x, max rel err "
                  f"{ab_cols['tf32x3_rel_err']:.1e} (IEEE {ab_cols['ieee_rel_err']:.1e})")
        print(f"  {label:<40} torch {t_torch:8.3f} ms  jetdet {t_jet:8.3f} ms  {ratio:5.2f}x{tgt}{ab}")
    out["rows"] = rows
    out["ab_summary"] = ab_summary(rows)
    for line in out["ab_summary"]:
        print(f"  {line}")


# ----------------------------------------------------------------------------------------- model speed


class UNetStage(nn.Module):
    """An SD-like UNet stage: ResBlocks of GroupNorm(32) + SiLU + 3x3 conv, twice, with a skip."""

    def __init__(self, ch=320, blocks=4):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleList([nn.GroupNorm(32, ch), nn.Conv2d(ch, ch, 3, padding=1), nn.GroupNorm(32, ch),
                           nn.Conv2d(ch, ch, 3, padding=1)]) for _ in range(blocks)
        )

    def forward(self, x):
        for n1, c1, n2, c2 in self.blocks:
            x = x + c2(F.silu(n2(c1(F.silu(n1(x))))))
        return x


def model_speed(run: Run, out: dict) -> None:
    import jetdet
    from jetdet.models import TinyDiT, TinyUNet, make_toy_inputs
    from jetdet.models.toy import DiTStack

    rows = []
    torch.manual_seed(0)
    dit_b, size_b = _dit_b(run.dry)
    fp32_models = [("TinyUNet", TinyUNet(), 16), ("TinyDiT", TinyDiT(), 16), ("DiT-B size", dit_b, size_b)]
    tok = 64 if run.dry else 1024
    bf16_models = [
        ("DiT stack w1152 h16 d8 N1024" if not run.dry else "DiT stack (tiny)",
         DiTStack(64, 4, 2) if run.dry else DiTStack(1152, 16, 8), "dit", 64 if run.dry else 1152),
        ("DiT stack w1024 h16 d8 N1024 (head dim 64)" if not run.dry else "DiT stack 2 (tiny)",
         DiTStack(64, 2, 2) if run.dry else DiTStack(1024, 16, 8), "dit", 64 if run.dry else 1024),
        ("SD-like UNet stage 4 ResBlocks 320ch 64x64" if not run.dry else "UNet stage (tiny)",
         UNetStage(32, 2) if run.dry else UNetStage(320, 4), "unet", 32 if run.dry else 320),
    ]
    plans = [(n, m, "fp32", make_toy_inputs(4, size=s)) for n, m, s in fp32_models]
    for name, model, kind, width in bf16_models:
        g = torch.Generator().manual_seed(0)
        if kind == "dit":
            inp = [torch.randn(4, tok, width, generator=g), torch.randn(4, width, generator=g)]
        else:
            hw = 8 if run.dry else 64
            inp = [torch.randn(4, width, hw, hw, generator=g)]
        plans.append((name, model, "bf16", inp))
    for name, model, prec, inputs in plans:
        if run.left() < 15:
            out["stopped"] = f"time budget, before {name}"
            break
        dtype = torch.bfloat16 if prec == "bf16" else torch.float32
        model = model.eval().to(run.dev, dtype)
        inp = [t.to(run.dev, dtype) if t.is_floating_point() else t.to(run.dev) for t in inputs]

        def fwd(b=None, _m=model, _i=inp):
            return _m(*(_i if b is None else [t[b] for t in _i]))

        with torch.no_grad():
            t_off = run.time_ms(fwd)
            with jetdet.mode("deterministic"):
                t_det = run.time_ms(fwd)
            t_loop = run.time_ms(lambda: [fwd(slice(i, i + 1)) for i in range(4)])
        row = {"model": name, "dtype": prec, "batch": 4, "off_ms": t_off, "det_ms": t_det, "loop_ms": t_loop,
               "det_over_off": t_det / t_off, "det_over_loop": t_det / t_loop}
        if prec == "bf16":
            row.update(_graph_row(run, name, fwd, t_off, model))
            row.update(_tma_row(run, name, fwd, t_off))
        rows.append(row)
        graph = (f"  det CUDA graph {row['det_graph_ms']:8.3f} ms ({row['det_graph_over_off']:5.2f}x off)"
                 if "det_graph_ms" in row else f"  {row['det_graph_error']}" if "det_graph_error" in row else "")
        if "det_tma_ms" in row:
            graph += f"  det with the TMA kernels {row['det_tma_ms']:8.3f} ms ({row['det_tma_over_off']:5.2f}x off)"
        print(f"  {name:<44} {prec}  off {t_off:8.3f} ms  det {t_det:8.3f} ms  4 x b1 {t_loop:8.3f} ms  "
              f"det/off {t_det / t_off:5.2f}x  det/loop {t_det / t_loop:5.2f}x{graph}")
    out["rows"] = rows


def _tma_row(run: Run, name: str, fwd, t_off: float) -> dict:
    """The deterministic forward with all three opt-in TMA kernels on (GEMM, attention, conv: what a user gets from
    the switches together): its time, and item 2 alone against the batch's item 2, bitwise. An error is recorded."""
    import jetdet

    try:
        with contextlib.ExitStack() as stack, torch.no_grad():
            for kind in ("linear", "attention", "conv"):
                stack.enter_context(_tma_kernel(kind))
            stack.enter_context(jetdet.mode("deterministic"))
            t = run.time_ms(fwd)
            same = torch.equal(fwd(slice(2, 3))[0], fwd()[2])
    except Exception as e:  # noqa: BLE001 - a failing kernel is a finding; the other models still run
        return {"det_tma_error": f"{type(e).__name__}: {str(e)[:200]}"}
    if not same:
        run.fail(f"model_speed {name}: with the TMA kernels, item 2 alone differs from the batch's item 2")
    return {"det_tma_ms": t, "det_tma_over_off": t / t_off, "det_tma_item_equals_batch": same}


def _last_spatial_conv(model: nn.Module) -> nn.Conv2d | None:
    """The model's last conv with a filter wider than 1x1 (one whose weight the conv kernel reads from a packed copy).
    The last: in a ResBlock its output reaches the residual sum with no norm after it, so a change of its weight is
    not normalised away."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    return convs[-1] if convs else None


@contextlib.contextmanager
def _conv_weight_scaled(conv: nn.Conv2d, factor: float = 1.5):
    """``conv``'s weight multiplied by ``factor`` in place (as applying a LoRA changes it) inside the block, put back
    bit for bit afterwards, also on an error."""
    saved = conv.weight.detach().clone()
    with torch.no_grad():
        conv.weight.mul_(factor)
    try:
        yield
    finally:
        with torch.no_grad():
            conv.weight.copy_(saved)


def _graph_row(run: Run, name: str, fwd, t_off: float, model: nn.Module | None = None) -> dict:
    """The deterministic forward captured in a CUDA graph (what takes away eager mode's per-call host cost without
    a compiler; ``tests/test_capture_safe.py`` checks on CPU that the routed path can be captured): replay time,
    and bitwise checks: the replay equals the eager deterministic forward, and a graph of item 2 alone equals the
    batch graph's item 2. For a model with a 3x3 conv, also: after an in-place change of its last such conv's
    weight (:func:`_conv_weight_scaled`, what applying a LoRA does) the replay equals the eager forward again, so
    the graph does not read a stale packed copy of the weight (``tests/test_pack_graphs.py``). An error (a capture
    that fails) is recorded, and the
    section goes on."""
    import jetdet

    conv = _last_spatial_conv(model) if model is not None else None
    try:
        with torch.no_grad(), jetdet.mode("deterministic"):
            eager = fwd().clone()
            replay, batch_out = run.graphed(fwd)
            replay_one, one_out = run.graphed(lambda: fwd(slice(2, 3)))
    except Exception as e:  # noqa: BLE001 - a capture that fails is a finding; the other models still run
        return {"det_graph_error": f"CUDA graph capture failed: {type(e).__name__}: {e}"}
    try:
        replay()
        replay_one()
        run.sync()
        checks = {"replay == eager": torch.equal(batch_out, eager), "item 2 alone": torch.equal(one_out,
                                                                                                batch_out[2:3])}
        if conv is not None:
            with _conv_weight_scaled(conv), torch.no_grad(), jetdet.mode("deterministic"):
                replay()
                changed = fwd().clone()
                run.sync()
                checks["replay == eager after a conv weight changed in place"] = torch.equal(batch_out, changed)
            replay()  # the static output back to the unchanged weight's, for the timing below
        for what, ok in checks.items():
            if not ok:
                run.fail(f"model_speed {name}: deterministic forward in a CUDA graph: {what} is false")
        t = run.time_ms(replay)
    except Exception as e:  # noqa: BLE001 - a replay that fails is a finding; the other models still run
        return {"det_graph_error": f"CUDA graph replay failed: {type(e).__name__}: {e}"}
    return {"det_graph_ms": t, "det_graph_over_off": t / t_off, "det_graph_checks": checks}


# ------------------------------------------------------------------------------------------- compiled


def compiled(run: Run, out: dict) -> None:
    """The deterministic DiT stack under ``torch.compile`` (``mode="reduce-overhead"``: CUDA graphs on a GPU), the
    answer to the per-call host cost that eager deterministic mode pays (issue 13): bitwise batch invariance
    (item 0 alone and item 2 alone against the batch of 4, a rerun) and wall time per forward against eager off,
    compiled off and eager deterministic. Each batch size is its own compile (static shapes, as CUDA graphs need),
    so the checks use batch 4 and batch 1 only."""
    import jetdet
    from jetdet.models.toy import DiTStack

    torch.manual_seed(0)
    width, heads, depth, tok = (64, 2, 2, 64) if run.dry else (1024, 16, 8, 1024)
    dtype = torch.float32 if run.dry else torch.bfloat16
    cmode = "default" if run.dry else "reduce-overhead"
    name = f"DiT stack w{width} h{heads} d{depth} N{tok} {_dn(dtype)}, torch.compile(mode={cmode!r})"
    print(f"  {name}")
    model = DiTStack(width, heads, depth).eval().to(run.dev, dtype)
    g = torch.Generator().manual_seed(0)
    inp = [torch.randn(4, tok, width, generator=g).to(run.dev, dtype),
           torch.randn(4, width, generator=g).to(run.dev, dtype)]
    def first_call(fn):
        """``(output copy, seconds)`` of the first call of a compiled model: the compile, then one run. CUDA-graph
        outputs are overwritten by the next replay, so the output is copied."""
        t = time.perf_counter()
        y = fn(*inp).clone()
        run.sync()
        return y, time.perf_counter() - t

    torch._dynamo.reset()
    off_c = torch.compile(model, mode=cmode, fullgraph=True)
    compile_s = {"off": first_call(off_c)[1]}
    t_off_c = run.time_ms(lambda: off_c(*inp))
    t_off = run.time_ms(lambda: model(*inp))
    with jetdet.patch(model, mode="deterministic"):
        t_det = run.time_ms(lambda: model(*inp))
        torch._dynamo.reset()
        det_c = torch.compile(model, mode=cmode, fullgraph=True)
        full, compile_s["deterministic"] = first_call(det_c)
        again = det_c(*inp).clone()
        t_det_c = run.time_ms(lambda: det_c(*inp))
        one = [det_c(*[x[i : i + 1] for x in inp]).clone() for i in (0, 2)]
    checks = {"rerun": torch.equal(again, full), "item 0 alone": torch.equal(one[0], full[0:1]),
              "item 2 alone": torch.equal(one[1], full[2:3])}
    for what, ok in checks.items():
        if not ok:
            run.fail(f"compiled deterministic DiT stack: {what} differs from the batch of 4")
    out.update({"model": name, "off_ms": t_off, "off_compiled_ms": t_off_c, "det_ms": t_det,
                "det_compiled_ms": t_det_c, "det_compiled_over_off": t_det_c / t_off,
                "det_compiled_over_off_compiled": t_det_c / t_off_c, "checks": checks,
                "compile_s": {k: round(v, 1) for k, v in compile_s.items()}})
    print(f"  off {t_off:8.3f} ms  off compiled {t_off_c:8.3f} ms  det {t_det:8.3f} ms  det compiled "
          f"{t_det_c:8.3f} ms  det compiled / off {t_det_c / t_off:5.2f}x  / off compiled "
          f"{t_det_c / t_off_c:5.2f}x  bitwise: {', '.join(f'{k} {v}' for k, v in checks.items())}  "
          f"compile s: {out['compile_s']}")
    if run.left() < 40:
        out["unet"] = {"skipped": f"time budget ({run.left():.0f} s left)"}
        print(f"  UNet stage skipped: time budget ({run.left():.0f} s left)")
        return
    try:
        out["unet"] = _compiled_unet(run, cmode, first_call=first_call)
    except Exception as e:  # noqa: BLE001 - the finding this part exists for (a refused graph pool) is an error
        out["unet"] = {"error": f"{type(e).__name__}: {str(e)[:300]}", "traceback": traceback.format_exc(limit=6)}
        run.fail(f"compiled deterministic UNet stage: {type(e).__name__}: {str(e)[:200]}")
        print(f"  UNet stage ERROR {type(e).__name__}: {e}", flush=True)


def _compiled_unet(run: Run, cmode: str, first_call) -> dict:
    """A UNet stage (3x3 convs) compiled in deterministic mode with **no eager call before it**, so the conv
    weights' packed copies are first made inside the compiled function's first call, which CUDA-graph trees run
    with the thread's allocations routed into their pool and then check that pool (``tests/test_pack_graphs.py``:
    the copy is made on a thread of its own). Checks: a rerun and item 2 alone against the batch of 4, bitwise;
    after an in-place change of a conv weight the compiled output follows it (not bitwise: Inductor fuses the
    elementwise ops between the convs, so compiled and eager may differ by rounding; a stale copy would leave the
    output as before the change, so the compiled output must be at least 10x closer to the eager output after the
    change than the output before the change is). An error fails the run."""
    import jetdet

    ch, hw, blocks = (32, 8, 1) if run.dry else (320, 64, 2)
    dtype = torch.float32 if run.dry else torch.bfloat16
    name = f"UNet stage {blocks} ResBlocks {ch}ch {hw}x{hw} {_dn(dtype)}, torch.compile(mode={cmode!r})"
    print(f"  {name}")
    torch.manual_seed(1)
    model = UNetStage(ch, blocks).eval().to(run.dev, dtype)
    x = torch.randn(4, ch, hw, hw, generator=torch.Generator().manual_seed(1)).to(run.dev, dtype)
    res: dict = {"model": name}
    with torch.no_grad():
        with jetdet.patch(model, mode="deterministic"):
            torch._dynamo.reset()
            det_c = torch.compile(model, mode=cmode, fullgraph=True)
            full, res["compile_s"] = first_call(lambda *_: det_c(x))
            again = det_c(x).clone()
            one = det_c(x[2:3]).clone()
            eager = model(x).clone()
            with _conv_weight_scaled(_last_spatial_conv(model)):
                changed = det_c(x).clone()
                eager_changed = model(x).clone()
            t_det_c = run.time_ms(lambda: det_c(x))
        t_off = run.time_ms(lambda: model(x))

    def rel(a, b):
        return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()

    err_before, err_after, stale = rel(full, eager), rel(changed, eager_changed), rel(full, eager_changed)
    checks = {"rerun": torch.equal(again, full), "item 2 alone": torch.equal(one, full[2:3]),
              "follows an in-place weight change": err_after <= 0.1 * stale}
    for what, ok in checks.items():
        if not ok:
            run.fail(f"compiled deterministic UNet stage: {what} is false (max rel. difference to eager: "
                     f"{err_before:.2e} before the change, {err_after:.2e} after it; a stale output: {stale:.2e})")
    res.update({"off_ms": t_off, "det_compiled_ms": t_det_c, "det_compiled_over_off": t_det_c / t_off,
                "checks": checks, "rel_diff_to_eager": [err_before, err_after], "stale_rel_diff": stale})
    print(f"  off {t_off:8.3f} ms  det compiled {t_det_c:8.3f} ms  det compiled / off {t_det_c / t_off:5.2f}x  "
          f"checks: {', '.join(f'{k} {v}' for k, v in checks.items())}  compile s: {res['compile_s']:.1f}")
    if not run.dry and run.left() > 60:
        res["negative_control"] = _pack_on_calling_thread(model, x)
        print(f"  negative control, weight copies made on the calling thread as before: {res['negative_control']}")
    return res


def _pack_on_calling_thread(model: nn.Module, x: torch.Tensor) -> str:
    """The negative control of the compiled UNet stage: the same model compiled again with the conv weights' copies
    made on the calling thread and cached, as before (``cached_pack`` without its GPU branch). torch's CUDA-graph
    trees are expected to refuse the copy left in their pool; a run where they do not says the premise of the fix
    does not hold on this torch (recorded, not a failure)."""
    import jetdet
    from jetdet.kernels.matmul import torch_path as tp

    saved = tp._graph_aware
    tp._graph_aware = lambda b: False
    tp.clear_weight_cache()
    try:
        with torch.no_grad(), jetdet.patch(model, mode="deterministic"):
            torch._dynamo.reset()
            c = torch.compile(model, mode="reduce-overhead", fullgraph=True)
            for _ in range(3):  # warm-up, recording, replay
                c(x)
            torch.cuda.synchronize()
        return "not refused (the premise of the fix did not show on this torch)"
    except Exception as e:  # noqa: BLE001 - the refusal is the expected outcome; anything else is reported as such
        first = str(e).splitlines()[0][:160] if str(e) else ""
        if "cudagraph pool" in str(e):
            return f"refused as expected: {type(e).__name__}: {first}"
        return f"error (not the pool refusal): {type(e).__name__}: {first}"
    finally:
        tp._graph_aware = saved
        tp.clear_weight_cache()
        torch._dynamo.reset()


# ------------------------------------------------------------------------------------------- fast path


def fast_path(run: Run, out: dict) -> None:
    import jetdet
    from jetdet.models import load_bundled
    from jetdet.models.evaluate import psnr
    from jetdet.models.sampling import sample

    steps = 3 if run.dry else 30
    labels = list(range(2 if run.dry else 8))
    dit = load_bundled(device=run.dev)

    def full():
        return sample(dit, labels, steps=steps, seed=1)

    ref = full()
    repeats = 1 if run.dry else 2 if run.quick else 3
    t_off = run.wall_ms(full, repeats=repeats)
    rows = [{"setting": "off", "wall_ms": t_off, "calls": steps, "calls_run": steps}]
    print(f"  off            wall {t_off:8.1f} ms  calls {steps}")
    # the defaults (what a user gets untuned), three budgets, and at 0.07 the whole batch run whenever the model runs
    # (piggyback=0: no row compaction, so a call that runs costs one full batch, and the rows it did not need get
    # fresh outputs): the A/B of "row compaction only when it pays"
    settings = [("default", {}), *((f"budget={b}", {"budget": b}) for b in (0.05, 0.07, 0.1)),
                ("budget=0.07 piggyback=0", {"budget": 0.07, "piggyback": 0.0})]
    for name, kw in settings:
        if run.left() < 10:
            out["stopped"] = f"time budget, before {name}"
            break
        stats = {}

        def cached(_kw=kw, _s=stats):
            with jetdet.patch(dit, mode="fast", num_steps=steps, **_kw) as h:
                img = sample(dit, labels, steps=steps, seed=1)
                _s.update(h.stats()["cache"])
            return img

        img = cached()
        q = psnr(img.float().cpu(), ref.float().cpu())
        t = run.wall_ms(cached, repeats=repeats)
        call_ratio = stats["calls"] / max(stats["calls_run"], 1)
        # the controller's own host time and the wait at its sync, per call (the last timed sample's)
        host = stats["host_ms"] / max(stats["calls"], 1)
        wait = stats["sync_wait_ms"] / max(stats["calls"], 1)
        rows.append({"setting": f"fast {name}", "wall_ms": t, "calls": stats["calls"],
                     "calls_run": stats["calls_run"], "calls_saved": stats["calls_saved"], "syncs": stats["syncs"],
                     "calls_partial": stats["calls_partial"], "host_ms_per_call": host,
                     "sync_wait_ms_per_call": wait, "call_ratio": call_ratio, "wall_ratio": t_off / t,
                     "psnr_mean_db": float(q[torch.isfinite(q)].mean()) if torch.isfinite(q).any() else math.inf})
        print(f"  fast {name:<24} wall {t:8.1f} ms  calls run {stats['calls_run']}/{stats['calls']} "
              f"({stats['calls_partial']} partial)  syncs {stats['syncs']}  controller host {host:6.3f} ms/call  "
              f"sync wait {wait:6.3f} ms/call  wall ratio {t_off / t:4.2f}x (call ratio {call_ratio:4.2f}x)  "
              f"PSNR {rows[-1]['psnr_mean_db']:5.2f} dB")
    out["rows"] = rows


# ---------------------------------------------------------------------------------------------- sparse


def sparse(run: Run, out: dict) -> None:
    import jetdet
    from jetdet.ops import fast

    dt = torch.bfloat16
    b, h, n, d, bs = (1, 2, 256, 32, 64) if run.dry else (2, 24, 4096, 64, 64)
    g = torch.Generator(device=run.dev).manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=g, device=run.dev).to(dt) for _ in range(3))
    t_sdpa = run.time_ms(lambda: F.scaled_dot_product_attention(q, k, v))
    t_dense = run.time_ms(lambda: jetdet.ops.attention(q, k, v))
    rows = []
    nb = -(-n // bs)
    for density in (0.3, 0.5, 0.7, 0.9):
        if run.left() < 10:
            out["stopped"] = f"time budget, before density {density}"
            break
        keep = max(1, round(density * nb))
        mask = torch.zeros(1, h, nb, nb, dtype=torch.bool, device=run.dev)
        for i in range(nb):
            mask[:, :, i, [(i + j) % nb for j in range(keep)]] = True
        bm = fast.block_mask_from_bool(mask, bs)
        t = run.time_ms(lambda _bm=bm: jetdet.ops.block_sparse_attention(q, k, v, _bm, block_size=bs))
        rows.append({"density": keep / nb, "block_sparse_ms": t, "dense_jetdet_ms": t_dense, "sdpa_ms": t_sdpa,
                     "over_dense": t / t_dense})
        print(f"  block_sparse density {keep / nb:4.2f}: {t:8.3f} ms  dense jetdet {t_dense:8.3f} ms  "
              f"SDPA {t_sdpa:8.3f} ms  sparse/dense {t / t_dense:5.2f}x")
    out["block_sparse"] = rows
    la = []
    for nn_ in ((256,) if run.dry else (4096, 16384)):
        if run.left() < 10:
            break
        hh = 2 if run.dry else (24 if nn_ == 4096 else 16)
        bb = 1 if nn_ != 4096 or run.dry else 2
        q2, k2, v2 = (torch.randn(bb, hh, nn_, d, generator=g, device=run.dev).to(dt) for _ in range(3))
        t_la = run.time_ms(lambda a=(q2, k2, v2): jetdet.ops.linear_attention(*a))
        t_sd = run.time_ms(lambda a=(q2, k2, v2): F.scaled_dot_product_attention(*a))
        la.append({"shape": [bb, hh, nn_, d], "linear_attention_ms": t_la, "sdpa_ms": t_sd})
        print(f"  linear_attention B{bb} H{hh} N{nn_} D{d}: {t_la:8.3f} ms  SDPA {t_sd:8.3f} ms")
    out["linear_attention"] = la
    out["sana"] = _sana_rows(run, g)


def _sana_processor_core(q, k, v, heads):
    """What diffusers' SanaLinearAttnProcessor2_0 computes between its projections and ``to_out`` (diffusers 0.42;
    written out here: the GPU machine has no diffusers): ``[B, N, C]`` q, k, v to ``[B, N, C]``."""
    q = F.relu(q.transpose(1, 2).unflatten(1, (heads, -1))).float()
    k = F.relu(k.transpose(1, 2).unflatten(1, (heads, -1)).transpose(2, 3)).float()
    v = F.pad(v.transpose(1, 2).unflatten(1, (heads, -1)).float(), (0, 0, 0, 1), mode="constant", value=1.0)
    h = torch.matmul(torch.matmul(v, k), q)
    return (h[:, :, :-1] / (h[:, :, -1:] + 1e-15)).flatten(1, 2).transpose(1, 2).to(q.dtype)


def _sana_rows(run: Run, g) -> list[dict]:
    """``sana_linear_attention=True``'s attention (``jetdet.patch.sana.attend``: fp32 ``jetdet.ops.linear_attention``,
    eps 1e-15) against the processor's torch ops, bf16 projections in, at SANA 1600M's heads (70 of 32) and the token
    counts of 1024 / 2048 px images (DC-AE f32: 1024, 4096 tokens): the figure that decides whether the route could be
    on by default."""
    from jetdet.patch.sana import attend

    rows = []
    for n in ((64,) if run.dry else (1024, 4096)):
        if run.left() < 10:
            break
        b, heads, d = (1, 2, 32) if run.dry else (2, 70, 32)
        q, k, v = (torch.randn(b, n, heads * d, generator=g, device=run.dev).to(torch.bfloat16) for _ in range(3))

        def route(q=q, k=k, v=v, heads=heads):
            return attend(q, k, v, heads, torch.float32)

        ref = _sana_processor_core(q, k, v, heads)
        err = float((route() - ref).norm() / ref.norm())
        t_p = run.time_ms(lambda a=(q, k, v, heads): _sana_processor_core(*a))
        t_j = run.time_ms(route)
        rows.append({"shape": [b, heads, n, d], "processor_ms": t_p, "jetdet_ms": t_j, "rel_err": err})
        print(f"  SANA linear attention B{b} H{heads} N{n} D{d}: jetdet {t_j:8.3f} ms  diffusers' processor ops "
              f"{t_p:8.3f} ms  ({t_p / t_j:4.2f}x)  rel err {err:.1e}")
    return rows


# ----------------------------------------------------------------------------------------------- sweep


SWEEP = {
    "matmul": [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s)
               for bm, bn, bk, w, s in ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4),
                                        (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (256, 128, 64, 8, 3))],
    "attention": [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
                  for bm, bn, w, s in ((64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 2),
                                       (128, 128, 8, 2))],
    "conv2d": [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s)
               for bm, bn, bk, w, s in ((128, 64, 64, 4, 4), (128, 128, 64, 8, 3), (128, 128, 32, 8, 4),
                                        (64, 128, 64, 4, 4), (128, 256, 64, 8, 3))],
}


#: tiles of the TMA-fed kernels (``kernels/attention/launch_tma.py`` and ``kernels/conv2d/launch_tma.py``:
#: ``CONFIGS``, one per head-dim or output-channel class)
SWEEP_TMA = {
    "attention": [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
                  for bm, bn, w, s in ((128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3),
                                       (128, 128, 8, 2), (128, 32, 4, 4))],
    "conv": [dict(BLOCK_H=bh, BLOCK_W=bw, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s)
             for bh, bw, bn, bk, w, s in ((8, 16, 128, 64, 8, 3), (8, 16, 64, 64, 4, 4), (16, 16, 128, 64, 8, 3),
                                          (8, 16, 256, 64, 8, 3), (8, 8, 128, 64, 4, 4), (8, 16, 128, 32, 8, 4))],
}  # fmt: skip


def _time_tiles(run: Run, kind: str, dtype, a, cands, use) -> tuple[list[dict], dict | None, int | None]:
    """``(timings, best, table key)``: jetdet's time at shape ``a`` with each tile of ``cands`` in place (``use(cfg)``,
    a context), the fastest, and the table key the shape looks up. Tiles that fail to compile or run are recorded."""
    timings, key = [], None
    for cfg in cands[:2] if run.dry else cands:
        if run.left() < 10:
            break
        try:
            with use(cfg), _flags(matmul_tf32=False, cudnn_tf32=False):
                _, jet_fn, key, _ = _speed_pair(kind, dtype, a, run.dev)
                timings.append({"config": cfg, "ms": run.time_ms(jet_fn)})
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
            timings.append({"config": cfg, "error": f"{type(e).__name__}: {str(e)[:200]}"})
    ok = [t for t in timings if "ms" in t]
    return timings, (min(ok, key=lambda t: t["ms"]) if ok else None), key


@contextlib.contextmanager
def _table_tile(op: str, device_name: str, cfg: dict):
    """``cfg`` as the only entry of a temporary launch table of ``op`` for this device, inside."""
    import tempfile

    from jetdet import configs

    with tempfile.TemporaryDirectory(prefix="jetdet-sweep-") as tmp:
        os.makedirs(os.path.join(tmp, op))
        with open(os.path.join(tmp, op, f"device_name={device_name}.json"), "w") as f:
            json.dump({"1": cfg}, f)
        with configs.tables_from(tmp):
            yield


@contextlib.contextmanager
def _tma_tile(kind: str, cfg: dict):
    """The TMA-fed kernel of ``kind`` on, with ``cfg`` as its tile for every class (``launch_tma.CONFIGS``), inside."""
    if kind == "attention":
        from jetdet.kernels.attention import launch_tma
    else:
        from jetdet.kernels.conv2d import launch_tma
    saved = launch_tma.CONFIGS
    launch_tma.CONFIGS = dict.fromkeys(saved, cfg)
    try:
        with _tma_kernel(kind):
            yield
    finally:
        launch_tma.CONFIGS = saved


def sweep(run: Run, out: dict) -> None:
    """Each candidate config is put in a temporary table for this device (``$JETDET_CONFIG_DIR``), the op is
    timed, and the best fixed config per shape is kept. Configs that fail to compile or run are recorded."""
    name = "interpreter" if run.dev.type != "cuda" else torch.cuda.get_device_name(run.dev).replace(" ", "_")
    shapes = [s for s in _speed_shapes(run.dry, True) if s[1] in ("linear", "attention", "conv")]
    results = []
    for label, kind, dtype, a in shapes:
        op = {"linear": "matmul", "attention": "attention", "conv": "conv2d"}[kind]
        cands = SWEEP[op] if dtype != torch.float32 else [
            dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3),
            # the H200 table's entry since the 4-warp tile above spilled under triton 3.6: time both
            dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3),
            dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=8, num_stages=3),
            dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)]
        timings, best, key = _time_tiles(run, kind, dtype, a, cands, lambda cfg, op=op: _table_tile(op, name, cfg))
        # key: the table key the shape looks up (N, head dim, output channels); bench/apply_sweep.py files the best
        # config under it
        results.append({"label": label, "op": op, "dtype": _dn(dtype), "key": key, "timings": timings, "best": best})
        if best:
            print(f"  {label:<40} best {best['ms']:8.3f} ms with {best['config']}")
        if kind in ("attention", "conv") and dtype != torch.float32:
            # the TMA-fed kernels' tiles (their launch_tma.CONFIGS, code rather than a table)
            timings, best, key = _time_tiles(run, kind, dtype, a, SWEEP_TMA[kind],
                                             lambda cfg, kind=kind: _tma_tile(kind, cfg))  # fmt: skip
            results.append({"label": label, "op": f"{op}_tma", "dtype": _dn(dtype), "key": key, "timings": timings,
                            "best": best})  # fmt: skip
            if best:
                print(f"  {label + ' (TMA kernel)':<40} best {best['ms']:8.3f} ms with {best['config']}")
    out["rows"] = results


# ------------------------------------------------------------------------------------------------ output


def _finite(obj):
    """``obj`` with every non-finite float (inf, -inf, nan) replaced by None, tuples as lists (what JSON has)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str, res: dict) -> None:
    """Write ``res`` to ``path`` as strict JSON, atomically (``jetdet.render.store.atomic_write``: a temporary file
    in the same folder, fsynced and renamed, so a reader or a run killed while writing sees the old file or the new
    one, never half of one, with the permissions ``open()`` gives). Non-finite floats (an infinite
    PSNR when the outputs are identical, a NaN error from a kernel that wrote NaN) are written as ``null``: bare
    ``Infinity``/``NaN`` tokens are not JSON and strict readers (jq, JavaScript) reject the whole file. The dump uses
    ``allow_nan=False``, so a non-finite value that escaped the conversion fails loudly instead. Values JSON has no
    type for (a dtype, a device) are written as their ``str``."""
    atomic_write(path, json.dumps(_finite(res), indent=1, default=str, allow_nan=False).encode())


def default_out_dir(environ=None) -> str:
    """``$OUT`` when it is set and not empty (the device tool brings back only the files written under it), else
    ``bench/results`` next to this script."""
    environ = os.environ if environ is None else environ
    return environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def out_base(out_dir: str, device: str, only=None, ops=None, quick=False) -> str:
    """``<out_dir>/gpu_<device>``, with ``_only-<sections>`` (sorted) after it when ``--only`` chose sections,
    ``_ops-<ops>`` (sorted) for ``--ops`` and ``_quick`` for ``--quick``, so that a partial run does not overwrite
    the full run's files."""
    name = f"gpu_{device}"
    if only:
        name += "_only-" + "-".join(sorted(set(only)))
    if ops:
        name += "_ops-" + "-".join(sorted(set(ops.split(","))))
    if quick:
        name += "_quick"
    return os.path.join(out_dir, name)


def markdown(res: dict) -> str:
    s = res["sections"]
    env = s.get("environment", {})
    lines = [f"# bench/gpu_check.py on {env.get('device_name')}", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}, {res['when']}, {res['seconds']:.0f} s, "
             f"arguments `{' '.join(res['argv'])}`", "",
             f"**{'FAILED' if res['failures'] else 'incomplete' if res['incomplete'] else 'all checks passed'}**"
             + (": " + "; ".join(res["failures"] + res["incomplete"]) if res["failures"] or res["incomplete"] else ""),
             ""]
    if env.get("tables"):
        lines += ["Launch tables picked: " + ", ".join(f"{k} -> `{v}`" for k, v in env["tables"].items()), ""]
    pre = s.get("precompile")
    if pre and ("launches" in pre or "unavailable" in pre):
        done = (f"not done: {pre['unavailable']}" if "unavailable" in pre else
                f"{pre['launches']} launches recorded, {pre['compiles']} kernel variants compiled ahead in "
                f"{pre['seconds']:.1f} s")
        later = {k: v["new_variants"] for k, v in s.items() if isinstance(v, dict) and v.get("new_variants")
                 and k != "precompile"}
        lines += [f"Precompile: {done}. Variants compiled or loaded later, per section: "
                  + (", ".join(f"{k} {v}" for k, v in later.items()) or "none"), ""]
    if s.get("noise", {}).get("rows"):
        lines += ["## Noise: GPU == CPU", "", "| dtype | seed | GPU == CPU | item == batch | sha256 (first 16) |",
                  "|---|---:|---|---|---|"]
        lines += [f"| {r['dtype']} | {r['seed']} | {r['gpu_equals_cpu']} | {r['items_equal_batch']} | "
                  f"{r['sha256_gpu'][:16]} |" for r in s["noise"]["rows"]]
        lines.append("")
    if s.get("ops", {}).get("rows"):
        lines += ["## Ops: accuracy against fp32 and batch invariance (batch 1..8, needle)", "",
                  "| op | dtype | max err | tolerance | invariant |", "|---|---|---:|---:|---|"]
        for r in s["ops"]["rows"]:
            if "error" in r:
                lines.append(f"| {r['op']} | {r['dtype']} | | | error: {r['error'][:80]} |")
                continue
            inv = "bitwise" if not r["prefix_differs"] and not r["needle_differs"] else "**differs**"
            lines.append(f"| {r['op']} | {r['dtype']} | {r['max_err']:.2e} | {r['tol'] * r['scale']:.1e} | {inv} |")
        lines.append("")
    if s.get("models", {}).get("rows"):
        lines += ["## Whole-model determinism", "", "| model | mode | bitwise equal | max diff |",
                  "|---|---|---:|---:|"]
        lines += [f"| {r['model']} | {r['mode']} | {r['equal']}/{r['comparisons']} | {r['max_diff']:.2e} |"
                  for r in s["models"]["rows"]]
        lines.append("")
    if s.get("speed", {}).get("rows"):
        lines += ["## Speed: jetdet / torch (do_bench medians)", "",
                  "| shape | dtype | torch ms | jetdet ms | ratio | target | config (table) | A/B in the same run |",
                  "|---|---|---:|---:|---:|---|---|---:|"]
        for r in s["speed"]["rows"]:
            if "error" in r:
                lines.append(f"| {r['label']} | | | | error: {r['error'][:60]} | | | |")
                continue
            tgt = "" if r["target"] is None else f"{r['target']:.2f} {'met' if r['meets_target'] else 'not met'}"
            cfg = "" if not r["config"] else ",".join(str(v) for v in r["config"].values()) + f" ({r['table']})"
            ab = f"TMA kernel {r['tma_ratio']:.2f}x" if "tma_ratio" in r else r.get("tma_error", "")[:40]
            if "jetdet_other_loops_ms" in r:
                other = f"{r['other_loops']}: {r['jetdet_other_loops_ms'] / r['torch_ms']:.2f}x"
                ab = f"{ab}; {other}" if ab else other
            if "tf32x3_ratio" in r:
                ab = f"tf32x3 {r['tf32x3_ratio']:.2f}x, err {r['tf32x3_rel_err']:.1e} (IEEE {r['ieee_rel_err']:.1e})"
            ab = ab or r.get("other_loops_error", "")[:40] or r.get("tf32x3_error", "")[:40]
            lines.append(f"| {r['label']} | {r['dtype']} | {r['torch_ms']:.3f} | {r['jetdet_ms']:.3f} | "
                         f"{r['ratio']:.2f} | {tgt} | {cfg} | {ab} |")
        lines.append("")
    if s.get("speed", {}).get("ab_summary"):
        lines += [f"- {line}" for line in s["speed"]["ab_summary"]] + [""]
    if s.get("model_speed", {}).get("rows"):
        lines += ["## Whole models, batch 4", "",
                  "| model | dtype | off ms | det ms | 4 x b1 ms | det/off | det/loop | graph ms | graph/off | "
                  "det, TMA kernels ms | its /off |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['model']} | {r['dtype']} | {r['off_ms']:.3f} | {r['det_ms']:.3f} | {r['loop_ms']:.3f} | "
                  f"{r['det_over_off']:.2f} | {r['det_over_loop']:.2f} | "
                  + (f"{r['det_graph_ms']:.3f} | {r['det_graph_over_off']:.2f} |" if "det_graph_ms" in r else
                     f"{r.get('det_graph_error', '')[:60]} | |")
                  + (f" {r['det_tma_ms']:.3f} | {r['det_tma_over_off']:.2f} |" if "det_tma_ms" in r else
                     f" {r.get('det_tma_error', '')[:60]} | |") for r in s["model_speed"]["rows"]]
        lines.append("")
    c = s.get("compiled", {})
    if c.get("det_compiled_ms") is not None:
        lines += ["## Deterministic mode under torch.compile", "", f"{c['model']}, batch 4", "",
                  "| off ms | off compiled ms | det ms | det compiled ms | det compiled / off | / off compiled | "
                  "bitwise (rerun, item 0, item 2) |", "|---:|---:|---:|---:|---:|---:|---|",
                  f"| {c['off_ms']:.3f} | {c['off_compiled_ms']:.3f} | {c['det_ms']:.3f} | {c['det_compiled_ms']:.3f} "
                  f"| {c['det_compiled_over_off']:.2f} | {c['det_compiled_over_off_compiled']:.2f} | "
                  f"{', '.join(str(v) for v in c['checks'].values())} |", ""]
    u = c.get("unet", {})
    if u.get("det_compiled_ms") is not None:
        lines += [f"{u['model']}, batch 4, compiled with no eager deterministic call before it: off {u['off_ms']:.3f} "
                  f"ms, det compiled {u['det_compiled_ms']:.3f} ms ({u['det_compiled_over_off']:.2f}x); "
                  + ", ".join(f"{k}: {v}" for k, v in u["checks"].items())
                  + (f"; negative control (copies on the calling thread): {u['negative_control']}"
                     if "negative_control" in u else ""), ""]
    elif u:
        lines += [f"UNet stage under torch.compile: {u.get('skipped') or u.get('error')}", ""]
    if s.get("fast_path", {}).get("rows"):
        lines += ["## Fast path on the bundled model", "",
                  "| setting | wall ms | calls run / calls | syncs | controller host ms/call | sync wait ms/call | "
                  "wall ratio | call ratio | PSNR dB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in s["fast_path"]["rows"]:
            per_call = [f"{r[k]:.3f}" if k in r else "" for k in ("host_ms_per_call", "sync_wait_ms_per_call")]
            lines.append(f"| {r['setting']} | {r['wall_ms']:.1f} | {r.get('calls_run')} / {r.get('calls')} | "
                         f"{r.get('syncs', '')} | {' | '.join(per_call)} | {r.get('wall_ratio', 1.0):.2f} | "
                         f"{r.get('call_ratio', 1.0):.2f} | {r.get('psnr_mean_db', '')} |")
        lines.append("")
    if s.get("sparse", {}).get("block_sparse"):
        lines += ["## Block-sparse and linear attention", "", "| op | ms | dense jetdet ms | SDPA ms |",
                  "|---|---:|---:|---:|"]
        lines += [f"| block_sparse density {r['density']:.2f} | {r['block_sparse_ms']:.3f} | "
                  f"{r['dense_jetdet_ms']:.3f} | {r['sdpa_ms']:.3f} |" for r in s["sparse"]["block_sparse"]]
        lines += [f"| linear_attention {r['shape']} | {r['linear_attention_ms']:.3f} | | {r['sdpa_ms']:.3f} |"
                  for r in s["sparse"].get("linear_attention", [])]
        lines += [f"| SANA linear attention {r['shape']} (dense column: diffusers' processor ops; rel err "
                  f"{r['rel_err']:.1e}) | {r['jetdet_ms']:.3f} | {r['processor_ms']:.3f} | |"
                  for r in s["sparse"].get("sana", [])]
        lines.append("")
    if s.get("sweep", {}).get("rows"):
        lines += ["## Tile sweep (best fixed config per shape)", "", "| shape | op | dtype | best ms | config |",
                  "|---|---|---|---:|---|"]
        for r in s["sweep"]["rows"]:
            b = r["best"]
            lines.append(f"| {r['label']} | {r['op']} | {r['dtype']} | {b['ms']:.3f} | {b['config']} |" if b else
                         f"| {r['label']} | {r['op']} | {r['dtype']} | | none ran |")
        lines.append("")
    errs = [(k, v["error"]) for k, v in s.items() if isinstance(v, dict) and v.get("error")]
    skipped = [(k, v["skipped"]) for k, v in s.items() if isinstance(v, dict) and v.get("skipped")]
    if errs or skipped:
        lines += ["## Errors and skipped sections", ""] + [f"- {k}: {v}" for k, v in errs + skipped] + [""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/gpu_check.py", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer seeds, shapes and repeats")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help="stop starting new work this many seconds after the process started "
                        f"(default {DEFAULT_BUDGET_S:.0f})")
    p.add_argument("--sweep", action="store_true", help="also sweep a few tiles per shape class (last)")
    p.add_argument("--compiled", action="store_true",
                   help="also run the torch.compile section (several cold compiles; after sparse)")
    pre = p.add_mutually_exclusive_group()
    pre.add_argument("--precompile", dest="precompile", action="store_true", default=None,
                     help="compile the kernel variants ahead in a thread pool (default on a GPU)")
    pre.add_argument("--no-precompile", dest="precompile", action="store_false",
                     help="compile each variant at its first launch")
    p.add_argument("--out-dir", default=None,
                   help="where the JSON and Markdown go (default: $OUT when set and not empty, else bench/results)")
    p.add_argument("--only", action="append", help="run only these sections (repeatable)")
    p.add_argument("--ops", default=None, help="ops section: only these ops (comma-separated names)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, torch path: tests the script itself")
    p.add_argument("--inject-fault", action="store_true", help="negative control: perturb jetdet's outputs")
    return p


def planned_sections(args) -> list:
    """``(name, function)`` of every section this run may run, in order (before ``--only`` picks): the default
    ones, then ``compiled`` and ``sweep`` when their flag is given or ``--only`` names them."""
    sections = [("environment", environment), ("noise", noise), ("ops", ops_check), ("models", models_check),
                ("speed", speed), ("model_speed", model_speed), ("fast_path", fast_path), ("sparse", sparse)]
    only = args.only or ()
    if args.compiled or "compiled" in only:
        sections.append(("compiled", compiled))
    if args.sweep or "sweep" in only:
        sections.append(("sweep", sweep))
    return sections


def _exit_on_sigterm():
    """Make SIGTERM (what ``timeout`` sends first) raise SystemExit, so that the section it interrupts is recorded
    as interrupted and the results are written once more. Returns a function that puts the old handler back (it
    does nothing where handlers cannot be set: not the main thread)."""

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    try:
        old = signal.signal(signal.SIGTERM, stop)
    except ValueError:
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.budget_s <= 0:
        p.error("--budget-s: expected a positive number of seconds")
    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU, or pass --dry-run to exercise the script on CPU")
    sections = planned_sections(args)
    names = [n for n, _ in sections] + [n for n in OPTIONAL_SECTIONS if n not in dict(sections)]
    for name in args.only or ():
        if name not in names:
            p.error(f"--only: unknown section {name!r} (expected one of {', '.join(names)})")
    if args.ops:
        known = list(_op_cases(args.dry_run))
        unknown = sorted(set(args.ops.split(",")) - set(known))
        if unknown:
            p.error(f"--ops: unknown op(s) {unknown} (expected some of {', '.join(known)})")
    if args.precompile is None:
        args.precompile = not args.dry_run
    dev = "dry-run_cpu" if args.dry_run else torch.cuda.get_device_name().replace(" ", "_")
    base = out_base(args.out_dir or default_out_dir(), dev, args.only, args.ops, args.quick and not args.dry_run)
    global _MAINS
    _MAINS += 1  # the budget counts from the process start for the first run, from its own start for a later one
    run = Run(args, base=base, t0=None if _MAINS == 1 else time.monotonic())
    run.result["argv"] = list(argv if argv is not None else sys.argv[1:])
    print(f"results: {base}.json and {base}.md, rewritten after each section "
          f"({run.left():.0f} s of the {args.budget_s:.0f} s budget left)", flush=True)
    saved_threads = torch.get_num_threads()
    restore_sigterm = _exit_on_sigterm()
    try:
        with torch.no_grad():
            todo = [(n, f) for n, f in sections if n in RECORDED and (not args.only or n in args.only)]
            for name, fn in sections:
                if args.only and name not in args.only:
                    continue
                if args.precompile and todo and name == todo[0][0]:  # before the first section it records
                    run.section("precompile", lambda out, _t=todo: precompile(run, out, _t))
                # compiled: up to six cold torch.compile + CUDA-graph compiles; not worth starting with a minute left
                run.section(name, lambda out, _fn=fn: _fn(run, out), min_s=60.0 if name == "compiled" else 5.0)
        json_path, md_path = run.save()
    finally:
        torch.set_num_threads(saved_threads)
        restore_sigterm()
    print(f"\nwrote {json_path} and {md_path} ({run.result['seconds']:.0f} s since the process started)")
    if run.failures:
        print(f"FAILED: {len(run.failures)} check(s):\n  " + "\n  ".join(run.failures))
        return 1
    if run.incomplete:
        print("INCOMPLETE (a correctness section did not finish):\n  " + "\n  ".join(run.incomplete))
        return 2
    print("all correctness and invariance checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
