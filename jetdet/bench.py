"""``python -m jetdet.bench``: the main job. Prints, for this machine:

1. the environment fingerprint;
2. the determinism report: whole-model bitwise checks under deterministic mode, with mode "off" as the
   negative control, and the per-item noise check;
3. CPU wall times at batch 4 (median of interleaved runs): deterministic, off, and 4 separate batch-1 runs
   (what existing "deterministic" node packs do), plus the router's per-call overhead;
4. the static kernel report: Triton kernels cross-compiled (no GPU needed), with registers, spills, shared
   memory, tensor-core and atomic instruction counts. By default a representative subset for sm_90 (every
   kernel function, dtype and flag combination once, plus the noise kernel's JIT-specialisation rows), well
   under a minute with empty caches; --full-static compiles every kernel at every shipped config for
   sm_80/89/90 (about 2,150 compiles: several minutes with empty caches, seconds once cached);
5. fast mode on the bundled model: ``jetdet.patch(model, mode="fast")`` at the default quality and at
   ``quality="fast"`` against full compute (model calls, full-model equivalents, wall time, PSNR, class
   accuracy), and a PNG of PSNR against wall speedup (its path is printed; needs matplotlib).

Every number printed here is measured by this command; the README quotes its output.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch


def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 100 - len(title)))


def environment() -> None:
    import jetdet

    _section("environment")
    for k, v in jetdet.fingerprint().items():
        print(f"  {k:<22} {v}")


def determinism(quick: bool = False) -> bool:
    import jetdet
    from jetdet.invariance import check_model
    from jetdet.models import TinyDiT, TinyUNet, make_toy_inputs

    _section("determinism report (whole models, CPU)")
    ok_all = True
    max_batch = 4 if quick else 8
    for name, cls in (("TinyUNet", TinyUNet), ("TinyDiT", TinyDiT)):
        model = cls().eval()
        inputs = make_toy_inputs(8)
        for mode in ("deterministic", "off"):
            comps, digest = check_model(model, inputs, mode, max_batch=max_batch)
            bad = [c for c in comps if not c.equal]
            worst = max((c.max_abs_diff for c in bad), default=0.0)
            verdict = "PASS" if not bad else "DIFFERS"
            print(f"  {name:<9} mode={mode:<13} {len(comps) - len(bad):>2}/{len(comps)} comparisons bitwise "
                  f"equal  [{verdict}]  max diff {worst:.2e}  sha256(batch {max_batch}) {digest[:16]}")
            for c in bad[:3]:
                print(f"      differs: {c.label} (max |diff| {c.max_abs_diff:.2e})")
            if mode == "deterministic" and bad:
                ok_all = False
            if mode == "off" and not bad:
                print("      note: mode off happened to be invariant here; the negative control did not fire")
    # per-item noise
    full = jetdet.randn((8, 4, 16, 16), seed=2026, step=3)
    alone = torch.cat([jetdet.randn((1, 4, 16, 16), seed=2026, item_offset=i, step=3) for i in range(8)])
    same = torch.equal(full, alone)
    ok_all &= same
    print(f"  noise     jetdet.randn batch 8 == 8 single items at item_offset=i: {same}  "
          f"sha256 {jetdet.checksum(full)[:16]}  mean {full.mean():+.4f} std {full.std():.4f}")
    return ok_all


def _median_ms(samples):
    return statistics.median(samples) * 1e3


def speed(repeats: int = 15) -> None:
    import torch.nn.functional as F

    import jetdet
    from jetdet.models import TinyDiT, TinyUNet, make_toy_inputs

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    _section(f"CPU wall time at batch 4 ({torch.get_num_threads()} threads, median of {repeats} interleaved runs, "
             f"load average {load:.1f})")
    print(f"  {'model':<9} {'deterministic b4':>17} {'off b4':>9} {'4 x b1 (off)':>13} {'det/off':>8} "
          f"{'det/loop':>9}")
    for name, cls in (("TinyUNet", TinyUNet), ("TinyDiT", TinyDiT)):
        model = cls().eval()
        x, t, y = make_toy_inputs(4)
        runs = {"det": [], "off": [], "loop": []}
        with torch.no_grad():
            for _ in range(2):  # warm-up
                model(x, t, y)
                with jetdet.mode("deterministic"):
                    model(x, t, y)
            for _ in range(repeats):
                with jetdet.mode("deterministic"):
                    t0 = time.perf_counter()
                    model(x, t, y)
                    runs["det"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                model(x, t, y)
                runs["off"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                for i in range(4):
                    model(x[i : i + 1], t[i : i + 1], y[i : i + 1])
                runs["loop"].append(time.perf_counter() - t0)
        d, o, lp = (_median_ms(runs[k]) for k in ("det", "off", "loop"))
        print(f"  {name:<9} {d:>14.2f} ms {o:>6.2f} ms {lp:>10.2f} ms {d / o:>7.2f}x {d / lp:>8.2f}x")
    # router overhead on a tiny op, where it dominates
    a, w = torch.randn(4, 8), torch.randn(16, 8)

    def per_call(fn, n=3000):
        fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n * 1e6

    plain = per_call(lambda: F.linear(a, w))
    direct = per_call(lambda: jetdet.ops.linear(a, w))
    with jetdet.mode("deterministic"):
        routed = per_call(lambda: F.linear(a, w))
        passthrough = per_call(lambda: a + a)
    print(f"  per call, 4x8 @ 8x16: F.linear {plain:.1f} us, jetdet.ops.linear {direct:.1f} us, F.linear routed "
          f"in deterministic mode {routed:.1f} us; an unrouted op (add) under the router {passthrough:.1f} us")


def fast_mode(seeds: int = 8, plot: str | None = "jetdet_fast_mode.png", steps: int = 30) -> list[dict]:
    """Fast mode on the bundled model: what ``jetdet.patch(model, mode="fast")`` gives without tuning, and the
    faster preset, against full compute of the same seeds (Euler, 30 steps, CFG 4, the 4 classes of a seed in
    one batch, 1 thread, interleaved). Returns the measured rows (full compute first)."""
    from jetdet.models import bundled
    from jetdet.models.evaluate import evaluate_fast_mode

    if not bundled.DIT_FILE.exists() or not bundled.CLASSIFIER_FILE.exists():
        print("  fast mode: the bundled model files are missing (python bench/train_bundled.py writes them)")
        return []

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        rows = evaluate_fast_mode(settings=[{}, {"quality": "fast"}], seeds=range(seeds), batch_classes=True,
                                  steps=steps)
    finally:
        torch.set_num_threads(saved)
    took = time.perf_counter() - t0
    _section(f"fast mode on the bundled DiT ({seeds} seeds x 4 classes, Euler {steps} steps, CFG 4, 1 thread, "
             f"load average {load:.1f}, {took:.0f} s)")
    names = {None: "full compute", "defaults": 'jetdet.patch(model, mode="fast")', "quality=fast": 'quality="fast"'}
    short = {"defaults": "default (quality=balanced)", "quality=fast": "quality=fast"}
    print(f"  {'':<34} {'calls':>6} {'FME':>6} {'FME x':>6} {'wall s':>7} {'speedup':>8} {'PSNR dB':>8} "
          f"{'min dB':>7} {'acc %':>6}")
    for r in rows:
        name = names.get(r["name"] if r["setting"] is not None else None, r["name"])
        print(f"  {name:<34} {r['calls']:>6.1f} {r['fme']:>6.1f} {r['fme_reduction']:>5.2f}x {r['wall_s']:>7.2f} "
              f"{r['speedup']:>7.2f}x {_db(r, 'psnr_mean'):>8} {_db(r, 'psnr_min'):>7} {100 * r['accuracy']:>6.1f}")
    d = rows[1]["stats"]
    print(f"  calls: model forwards per sample (cond + uncond batched); FME: full-model equivalents per sample "
          f"(block evaluations run / blocks per evaluation; {d['blocks']}); PSNR against full compute of the "
          f"same seed; acc: the bundled classifier on the requested class")
    if plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("  plot: matplotlib is not installed (pip install 'jetdet[bench]'); no PNG written")
            return rows
        fig, ax = plt.subplots(figsize=(6, 4.2))
        pts = [(r["speedup"], min(r["psnr_mean"], 100.0)) for r in rows[1:]]
        for r, (x, y) in zip(rows[1:], pts):
            ax.scatter([x], [y], s=40)
            ax.annotate(f"{short.get(r['name'], r['name'])}\n{r['fme_reduction']:.2f}x fewer FME, {x:.2f}x wall",
                        (x, y), textcoords="offset points", xytext=(-10, -26), fontsize=8)
        ax.set_xlabel("wall-clock speedup over full compute (x)")
        ax.set_ylabel("mean PSNR against full compute (dB)")
        ax.set_title(f"jetdet fast mode, bundled DiT (Euler {steps} steps, CFG 4, {seeds} seeds x 4 classes)",
                     fontsize=9)
        ax.set_xlim(1.0, max(x for x, _ in pts) * 1.25 + 0.1)
        ax.set_ylim(min(y for _, y in pts) - 4.0, max(y for _, y in pts) + 2.0)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        plt.close(fig)
        print(f"  plot: {os.path.abspath(plot)}")
    return rows


FULL_TABLE_MODULES = ("jetdet.kernels.matmul.specs", "jetdet.kernels.attention.specs")
#: Modules whose JIT-specialisation rows the default (quick) static report compiles: the noise kernel, where a
#: launch-time specialisation once failed on an H200 while the declared signature compiled.
QUICK_JIT_MODULES = ("jetdet.kernels.noise.specs",)


def _module_label(module: str) -> str:
    return module.split(".")[-2]  # jetdet.kernels.<folder>.specs


def static(full: bool = False) -> bool:
    """The static kernel report. By default a representative subset, compiled for sm_90 only
    (:func:`jetdet.static_report.quick_specs`: every kernel function, dtype and flag combination once, at its
    first shipped config, plus the noise kernel's JIT-specialisation rows): well under a minute with empty
    caches. ``full``: every kernel at every shipped config for sm_80/89/90 plus every JIT-specialisation row
    (about 2,150 compiles; minutes with empty caches, seconds once cached; what ``tests/test_static_report.py``
    checks). A table for matmul and attention, one summary line per kernel module (``python -m
    jetdet.static_report`` prints every row); compile progress goes to stderr."""
    try:
        from jetdet import static_report
    except ImportError as e:  # pragma: no cover
        print(f"  static report unavailable: {e}")
        return True
    why = static_report.unsupported()
    if why:  # a dev tool: the rest of the bench runs, and says what it skipped
        _section("static kernel report")
        print(f"  skipped: {why}")
        return True
    archs = static_report.DEFAULT_ARCHS if full else (static_report.JIT_ARCH,)
    if full:
        _section("static kernel report, full (cross-compiled for sm_80/89/90, no GPU needed)")
    else:
        _section(f"static kernel report, a representative subset (cross-compiled for sm_{archs[0]}, no GPU needed)")
    ok = True
    chosen: list[tuple[str, list, list, int]] = []  # (module, specs to compile, module error rows, all pairs)
    for module in static_report.KERNEL_MODULES:
        errors: list = []
        try:
            specs = static_report.collect_specs([module], errors=errors)
        except Exception as e:  # noqa: BLE001 - report the reason, keep the rest of the bench
            print(f"  {module}: static report failed: {type(e).__name__}: {e}")
            ok = False
            continue
        total = len(static_report.pairs(specs))
        if not full:
            specs = static_report.quick_specs(specs, archs[0], jit=module in QUICK_JIT_MODULES)
        chosen.append((module, specs, errors, total))
    try:
        rows = static_report.report(
            [s for _, specs, _, _ in chosen for s in specs], archs=archs, progress=static_report.Progress()
        )
    except Exception as e:  # noqa: BLE001
        print(f"  static report failed: {type(e).__name__}: {e}")
        return False
    at = 0
    for module, specs, errors, total in chosen:
        n = len(static_report.pairs(specs, archs))
        mod_rows = errors + rows[at : at + n]
        at += n
        bad = static_report.violations(mod_rows)
        ok &= not bad
        name = _module_label(module)
        if module in FULL_TABLE_MODULES:
            print(f"\n  {name}:")
            print("\n".join("  " + line for line in static_report.format_table(mod_rows).splitlines()))
        good = [r for r in mod_rows if not r.get("error")]
        mx = lambda k, good=good: max((r.get(k) or 0 for r in good), default=0)  # noqa: E731
        tot = lambda k, good=good: sum(r.get(k) or 0 for r in good)  # noqa: E731
        count = f"{len(mod_rows):>4}" if full else f"{len(mod_rows):>3} of {total:>3}"
        print(f"  {name:<17} {count} kernel/arch pairs  max regs {mx('regs'):>3}  max smem {mx('shared'):>6}  "
              f"spill bytes {tot('stack'):>3}  atomics {tot('atomics'):>2}  mma {tot('hmma') + tot('hgmma'):>5}"
              f"  mufu {tot('mufu'):>4}  ffma {tot('ffma'):>6}"
              f"  violations {len(bad)}")
        for v in bad:
            print(f"    {v}")
    assert at == len(rows), (at, len(rows))  # report() returns one row per pair, in pairs() order
    if not full:
        print("  (a subset: every kernel function, dtype and flag combination at its first shipped config on "
              f"sm_{archs[0]}; python -m jetdet.bench --full-static, or tests/test_static_report.py, checks all "
              f"{sum(t for *_, t in chosen)} pairs)")
    return ok


def _db(row: dict, key: str) -> str:
    """A PSNR for the table: ``ref`` for full compute, the reference itself (``evaluate`` clamps its infinite PSNR
    to 100), ``>= 100`` for another setting at the clamp."""
    if row["setting"] is None:
        return "ref"
    return ">= 100" if row[key] >= 100.0 else f"{row[key]:.2f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m jetdet.bench", description=__doc__.replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="fewer comparisons and repeats (smoke test)")
    p.add_argument("--skip-static", action="store_true", help="skip the cross-compiled kernel report")
    p.add_argument("--full-static", action="store_true",
                   help="the full static report: every kernel config for sm_80/89/90 and every JIT-specialisation "
                        "row (about 2,150 compiles; minutes with empty caches) instead of the sm_90 subset")
    p.add_argument("--repeats", type=int, default=15, help="timed runs per configuration (default 15)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the timings (default: torch's default; the determinism report always "
                        "compares 2 threads against 1)")
    p.add_argument("--only", choices=("determinism", "speed", "static", "fast"), default=None,
                   help="run one section (after the environment)")
    p.add_argument("--seeds", type=int, default=4,
                   help="fast-mode section: seeds (x 4 classes) per setting (default 4, about 1 minute on 2 CPU "
                        "cores; 8 halves the noise of the figures and doubles the time)")
    p.add_argument("--plot", default="jetdet_fast_mode.png",
                   help="PNG of the fast-mode section's PSNR against speedup ('' for none)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats: expected a positive int")
    if args.threads is not None and args.threads < 1:
        p.error("--threads: expected a positive int")
    if args.seeds < 1:
        p.error("--seeds: expected a positive int")
    if args.skip_static and args.only == "static":
        p.error("--skip-static: contradicts --only static")
    if args.full_static and (args.skip_static or args.only not in (None, "static")):
        p.error("--full-static: the static section does not run with "
                + ("--skip-static" if args.skip_static else f"--only {args.only}"))
    if args.plot and args.only in (None, "fast"):  # checked now, not after the fast section's minute of sampling
        folder = os.path.dirname(os.path.abspath(args.plot))
        if not args.plot.lower().endswith(".png"):
            p.error(f"--plot: expected a .png file name ('' for none), got {args.plot!r}")
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            p.error(f"--plot: cannot write into the folder {folder!r} (missing or not writable)")
        if os.path.isdir(args.plot):
            p.error(f"--plot: {args.plot!r} is a folder; expected a .png file name")
        existed = os.path.exists(args.plot)
        try:  # what the end of the run will do, tried now (os.access says yes to root, and to /proc)
            with open(args.plot, "ab"):
                pass
        except OSError as e:
            p.error(f"--plot: cannot write {args.plot!r}: {e.strerror or e}")
        if not existed:
            os.unlink(args.plot)
    started = time.perf_counter()
    environment()
    ok = True
    sections = {}

    def timed(name, fn, *a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            sections[name] = time.perf_counter() - t0

    if args.only in (None, "determinism"):
        ok &= timed("determinism", determinism, quick=args.quick)
    if args.only in (None, "speed"):
        saved = torch.get_num_threads()
        try:
            if args.threads is not None:
                torch.set_num_threads(args.threads)
            timed("speed", speed, repeats=3 if args.quick else args.repeats)
        finally:
            torch.set_num_threads(saved)
    if args.only in (None, "static") and not args.skip_static:
        ok &= timed("static", static, full=args.full_static)
    if args.only in (None, "fast"):
        timed("fast", fast_mode, seeds=min(2, args.seeds) if args.quick else args.seeds, plot=args.plot or None)
    took = ", ".join(f"{k} {v:.0f} s" for k, v in sections.items())
    print(f"\njetdet.bench: {'OK' if ok else 'FAILED'} in {time.perf_counter() - started:.0f} s ({took}; "
          "imports and start-up not counted)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
