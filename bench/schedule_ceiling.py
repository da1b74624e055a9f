"""How far can skipping model evaluations go on the bundled model, whatever decides the skips?

The step cache (``jetdet.cache.StepCacheController``) picks per row and per step which evaluations to skip and
forecasts their outputs. This script takes the decision rule out of the picture: it samples with *fixed*
schedules (the same set of computed steps for every sample, everything else forecast from the computed
outputs) and reports mean PSNR against full compute of the same seed, as ``jetdet.models.evaluate`` does. So it
answers "what is the best quality any schedule of N computes reaches with these forecasts", and shows which
steps cannot be skipped at all.

Three parts:

1. **One skipped step.** Every step but step ``i`` is computed; step ``i`` reuses the previous output.
2. **Fixed schedules of ``--calls`` computes.** Steps 0 and 1 are always computed (a first-order forecast needs
   two points); the other ``n = calls - 2`` computes sit at ``2 + round((last - 2) * (j / (n - 1)) ** p)``,
   ``j = 0 .. n - 1``, a family from evenly spread (``p = 1``) to dense at the start (``p > 1``), for each ``p``
   in ``--powers`` and each last computed evaluation ``last`` in ``--lasts`` (fractions of the final index).
   Each schedule is run with four forecasts of the skipped outputs, all polynomial in the timestep through the
   last computed points:
   ``reuse`` (order 0), ``order1``, ``order2`` (the controller's three), and ``order1-noise``: order 1 applied to
   the noise the velocity implies, ``x + (1 - t) v``, turned back with the current latent.
3. ``--greedy``: backward elimination from full compute down to ``--calls`` computes (each round drops the step
   whose removal costs least) with the ``--greedy-forecast``; slow (``sum(k)`` sampling runs), so it is off by
   default and meant for few seeds.

Sampling is the bundled model's Euler (or Heun: ``--sampler heun``, where a skipped evaluation is any of the
``2 * steps - 1``) at CFG 4 with batched CFG, all samples in one batch. Full compute is the reference.

    python bench/schedule_ceiling.py --markdown bench/results/schedule_ceiling.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jetdet import ops  # noqa: E402
from jetdet.models import bundled, sampling  # noqa: E402
from jetdet.models.evaluate import psnr  # noqa: E402

FORECASTS = ("reuse", "order1", "order2", "order1-noise")


class Sampler:
    """All samples in one batch; ``run(computed, forecast)`` samples with the evaluations whose index is in
    ``computed`` run and the others forecast."""

    def __init__(self, seeds, classes, steps, cfg, sampler):
        self.model = bundled.load_bundled()
        self.labels = torch.tensor([c for _ in seeds for c in classes])
        self.noise = torch.cat([sampling.initial_noise((1, 3, 32, 32), s) for s in seeds for _ in classes])
        self.null = torch.full_like(self.labels, bundled.NULL_LABEL)
        self.ts = sampling.timestep_grid(steps).tolist()
        self.steps, self.cfg, self.sampler = steps, cfg, sampler
        self.evals = sampling.num_evaluations(steps, sampler)
        self.model_calls = 0

    def _eval(self, x, t):
        n = x.shape[0]
        tt = torch.full((2 * n,), t)
        self.model_calls += 1
        v = self.model(torch.cat([x, x]), tt, torch.cat([self.labels, self.null]))
        return v[:n], v[n:]

    def _velocity(self, e, x, t, computed, forecast, hist):
        """Velocities (cond, uncond) of evaluation e at (x, t): computed, or forecast from hist."""
        noise_space = forecast == "order1-noise"
        if e in computed:
            vc, vu = self._eval(x, t)
            val = torch.stack([vc, vu])
            if noise_space:
                val = x + (1.0 - t) * val
            hist[:] = [h for h in hist if abs(h[0] - t) > 1e-9] + [(t, val)]
            del hist[:-3]
            return vc, vu
        order = {"reuse": 0, "order1": 1, "order2": 2, "order1-noise": 1}[forecast]
        nodes = hist[-(min(order, len(hist) - 1) + 1):]
        # the polynomial through the chosen nodes: the forecast op the step cache uses
        if len(nodes) == 1:
            val = nodes[0][1]
        else:
            val = ops.forecast([v for _, v in nodes], [tj for tj, _ in nodes], t, order="lagrange")
        if noise_space:
            val = (val - x) / (1.0 - t)
        return val[0], val[1]

    @torch.no_grad()
    def run(self, computed, forecast="order1"):
        computed = set(computed)
        x = self.noise.clone()
        hist: list = []
        e = 0
        for i in range(self.steps):
            t, tn = self.ts[i], self.ts[i + 1]
            vc, vu = self._velocity(e, x, t, computed, forecast, hist)
            e += 1
            d = vu + self.cfg * (vc - vu)
            x_next = x + (tn - t) * d
            if self.sampler == "heun" and tn > 0:
                vc2, vu2 = self._velocity(e, x_next, tn, computed, forecast, hist)
                e += 1
                d2 = vu2 + self.cfg * (vc2 - vu2)
                x_next = x + (tn - t) * 0.5 * (d + d2)
            x = x_next
        return x.clamp(-1.0, 1.0)


def power_schedule(evals: int, calls: int, p: float, last: int | None = None) -> list[int]:
    n = calls - 2
    if n <= 0:
        return list(range(min(calls, evals)))
    last = evals - 1 if last is None else last
    rest = {2 + round((last - 2) * (j / max(n - 1, 1)) ** p) for j in range(n)}
    return sorted({0, 1} | rest)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--classes", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--cfg", type=float, default=sampling.DEFAULT_CFG)
    ap.add_argument("--sampler", choices=sampling.SAMPLERS, default="euler")
    ap.add_argument("--calls", type=int, default=10, help="computed evaluations per sample in parts 2 and 3")
    ap.add_argument("--powers", type=float, nargs="+", default=[1.0, 1.25, 1.5, 1.75, 2.0])
    ap.add_argument("--lasts", type=float, nargs="+", default=[1.0, 0.85],
                    help="last computed evaluation, as a fraction of the final index")
    ap.add_argument("--skip-one", type=int, default=12, help="part 1 for the first N evaluations (0: off)")
    ap.add_argument("--greedy", action="store_true")
    ap.add_argument("--greedy-forecast", choices=FORECASTS, default="order1-noise")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--markdown", default=None, help="also write the report to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    lines: list[str] = []

    def out(s=""):
        print(s, flush=True)
        lines.append(s)

    t_start = time.perf_counter()
    smp = Sampler(range(args.seeds), args.classes, args.steps, args.cfg, args.sampler)
    n = len(smp.labels)
    full = list(range(smp.evals))
    ref = smp.run(full)

    def score(computed, forecast):
        p = psnr(smp.run(computed, forecast), ref).clamp(max=100.0)
        return p.mean().item(), p.min().item()

    cmd = "python bench/schedule_ceiling.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out(f"## Fixed skip schedules: {args.sampler}, {args.steps} steps ({smp.evals} evaluations), CFG {args.cfg:g}, "
        f"{args.seeds} seeds x {len(args.classes)} classes = {n} samples; torch {torch.__version__}")
    out()
    out(f"`{cmd.strip()}`")
    out()
    out("Mean (min) PSNR in dB against full compute of the same seed; 100 = identical.")
    if args.skip_one:
        out()
        out("### 1. One evaluation skipped (the previous output reused)")
        out()
        out("| skipped evaluation | t | PSNR mean | PSNR min |")
        out("|---:|---:|---:|---:|")
        ts_eval = []
        for i in range(args.steps):
            ts_eval.append(smp.ts[i])
            if args.sampler == "heun" and smp.ts[i + 1] > 0:
                ts_eval.append(smp.ts[i + 1])
        for e in range(1, min(args.skip_one + 1, smp.evals)):
            m, lo = score([k for k in full if k != e], "reuse")
            out(f"| {e} | {ts_eval[e]:.3f} | {m:.2f} | {lo:.2f} |")
    out()
    out(f"### 2. Fixed schedules of {args.calls} computed evaluations ({smp.evals / args.calls:.2f}x fewer)")
    out()
    out("| p | last | computed evaluations | " + " | ".join(FORECASTS) + " |")
    out("|---:|---:|---|" + "---:|" * len(FORECASTS))
    best = (-1.0, None, None)
    for p, frac in [(p, f) for f in args.lasts for p in args.powers]:
        last = round(frac * (smp.evals - 1))
        sched = power_schedule(smp.evals, args.calls, p, last)
        if len(sched) != args.calls:
            continue
        cells = []
        for fc in FORECASTS:
            m, lo = score(sched, fc)
            cells.append(f"{m:.2f} ({lo:.1f})")
            if m > best[0]:
                best = (m, fc, sched)
        out(f"| {p:g} | {last} | {sched} | " + " | ".join(cells) + " |")
    out()
    out(f"Best: {best[0]:.2f} dB with {best[1]} at {best[2]}.")
    if args.greedy:
        out()
        out(f"### 3. Greedy backward elimination ({args.greedy_forecast})")
        out()
        out("| computed | PSNR mean | schedule |")
        out("|---:|---:|---|")
        sched = list(full)
        while len(sched) > args.calls:
            cand = None
            for r in sched[2:]:
                trial = [k for k in sched if k != r]
                m, _ = score(trial, args.greedy_forecast)
                if cand is None or m > cand[0]:
                    cand = (m, trial)
            sched = cand[1]
            out(f"| {len(sched)} | {cand[0]:.2f} | {sched} |")
    out()
    out(f"{smp.model_calls} batched model calls, {time.perf_counter() - t_start:.0f} s.")
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
