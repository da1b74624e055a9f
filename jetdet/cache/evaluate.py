"""Speed/quality measurement of the step cache on the bundled model.

:func:`evaluate_fast_mode` samples every ``(seed, class)`` pair with full compute and with a
:class:`~jetdet.cache.StepCacheController` per error budget, interleaved (full, budget 1, budget 2, ... for
one sample, then the next sample), and compares each cached sample with the full-compute sample of the same
seed: PSNR, SSIM and max abs error on the images in ``[-1, 1]`` (PSNR with a peak-to-peak of 2), the
bundled classifier's accuracy, model calls and wall time.

The sampler (:func:`jetdet.models.sampling.sample`) is driven with a ``model_fn`` that builds
:class:`~jetdet.patch.call.ModelCall` objects directly (``cond`` = the labels, so the controller keys each
CFG branch by its label); ``jetdet.patch`` wires the same controller into the model's forward.

From a checkout: ``python -m jetdet.cache.evaluate --budgets 0.02 0.05 0.1 0.2`` prints the table.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from ..patch.call import ModelCall
from .controller import StepCacheController

#: Controller settings the measured defaults were tuned with (see the module's table in the report).
DEFAULT_BUDGETS = (0.02, 0.05, 0.1, 0.2)


def psnr(a: torch.Tensor, b: torch.Tensor, peak_to_peak: float = 2.0) -> torch.Tensor:
    """Per-item PSNR in dB of ``a`` against ``b`` (``inf`` where equal)."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(peak_to_peak ** 2 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, peak_to_peak: float = 2.0) -> torch.Tensor:
    """Per-item SSIM (Gaussian window 11, sigma 1.5, per channel, averaged) of images ``[B, C, H, W]``."""
    a, b = a.double(), b.double()
    c = a.shape[1]
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5 ** 2))
    g = g / g.sum()
    w = (g[:, None] * g[None, :]).expand(c, 1, 11, 11).to(a.device)

    def blur(x):
        return F.conv2d(x, w, groups=c)

    c1, c2 = (0.01 * peak_to_peak) ** 2, (0.03 * peak_to_peak) ** 2
    mu_a, mu_b = blur(a), blur(b)
    saa = blur(a * a) - mu_a ** 2
    sbb = blur(b * b) - mu_b ** 2
    sab = blur(a * b) - mu_a * mu_b
    m = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))
    return m.flatten(1).mean(1)


def cached_model_fn(model, controller: StepCacheController):
    """A ``model_fn(x, t, y)`` for :func:`jetdet.models.sampling.sample` that routes every evaluation
    through ``controller`` as a :class:`ModelCall` (cond = the labels)."""

    def fn(x, t, y):
        def run(rows):
            if rows is None:
                return model(x, t, y)
            return model(x.index_select(0, rows), t.index_select(0, rows), y.index_select(0, rows))

        return controller(ModelCall(x=x, t=t, run=run, model_id=id(model), cond=y))

    return fn


class _Counting:
    def __init__(self, model):
        self.model = model
        self.calls = 0
        self.rows = 0

    def __call__(self, x, t, y):
        self.calls += 1
        self.rows += x.shape[0]
        return self.model(x, t, y)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def evaluate_fast_mode(budgets=DEFAULT_BUDGETS, seeds=range(8), classes=(0, 1, 2, 3), sampler="euler",
                       steps: int = 30, cfg: float | None = None, batch_cfg: bool = True,
                       controller_kwargs: dict | None = None, model=None, classifier=None, device="cpu",
                       batch_classes: bool = False, warmup: int = 1, progress=None) -> list[dict]:
    """Measure the step cache against full compute on the bundled model.

    Args:
        budgets: error budgets to measure (one :class:`StepCacheController` each, ``budget=b``).
        seeds, classes: every ``(seed, class)`` pair is one sample (``sample(labels=[class], seed=seed)``);
            with ``batch_classes`` one call samples all classes of a seed together (items diverge inside
            the batch; per-row decisions).
        sampler: ``"euler"`` or ``"heun"`` (or a sequence of both: rows for each).
        steps, cfg, batch_cfg: sampler settings (``cfg`` default: the sampler's default, 4).
        controller_kwargs: other :class:`StepCacheController` options (``num_steps=steps`` is passed unless
            given).
        model, classifier: default the bundled ones (:func:`jetdet.models.bundled.load_bundled`).
        warmup: untimed full-compute samples first (allocator and thread-pool warm-up).
        progress: optional ``print``-like callable for a line per finished row.

    Returns:
        One dict per (sampler, budget), the full-compute reference first (``budget=None``): ``calls`` and
        ``rows`` (model calls and batch rows evaluated, per sample call), ``call_reduction`` /
        ``row_reduction`` (full / cached), ``wall_s`` (total), ``speedup`` (full wall / cached wall, measured
        interleaved), ``psnr_mean``, ``psnr_min``, ``ssim_mean``, ``max_abs`` (against full compute of the
        same seed), ``accuracy`` (classifier, in [0, 1]) and ``accuracy_full``.
    """
    from ..models import bundled, sampling

    if isinstance(sampler, str):
        samplers = [sampler]
    else:
        samplers = list(sampler)
    if model is None:
        model = bundled.load_bundled(device=device)
    if classifier is None:
        classifier = bundled.load_classifier(device=device)
    cfg = sampling.DEFAULT_CFG if cfg is None else cfg
    kw = dict(controller_kwargs or {})
    kw.setdefault("num_steps", steps)
    budgets = list(budgets)
    seeds, classes = list(seeds), list(classes)
    jobs = ([(s, list(classes)) for s in seeds] if batch_classes else [(s, [c]) for s in seeds for c in classes])
    rows = []
    for smp in samplers:
        counter = _Counting(model)
        ctls = [StepCacheController(budget=b, **kw) for b in budgets]
        fns = [cached_model_fn(counter, c) for c in ctls]
        for _ in range(warmup):  # untimed: allocator, thread pool, first-call op registration
            for fn in [model, *fns]:
                sampling.sample(model, jobs[0][1], steps=steps, cfg=cfg, sampler=smp, seed=jobs[0][0],
                                batch_cfg=batch_cfg, model_fn=fn)
        counter.calls = counter.rows = 0
        walls = [0.0] * (len(budgets) + 1)
        calls = [0] * (len(budgets) + 1)
        nrows = [0] * (len(budgets) + 1)
        outs: list[list[torch.Tensor]] = [[] for _ in range(len(budgets) + 1)]
        labels_all = []
        for seed, labels in jobs:
            labels_all += labels
            for j in range(len(budgets) + 1):
                fn = counter if j == 0 else fns[j - 1]
                c0, r0 = counter.calls, counter.rows
                _sync(device)
                t0 = time.perf_counter()
                img = sampling.sample(model, labels, steps=steps, cfg=cfg, sampler=smp, seed=seed,
                                      batch_cfg=batch_cfg, model_fn=fn)
                _sync(device)
                walls[j] += time.perf_counter() - t0
                calls[j] += counter.calls - c0
                nrows[j] += counter.rows - r0
                outs[j].append(img)
        ref = torch.cat(outs[0])
        y = torch.tensor(labels_all, device=ref.device)
        acc_full = (classifier.predict(ref) == y).double().mean().item()
        n = len(jobs)
        for j in range(len(budgets) + 1):
            img = torch.cat(outs[j])
            p = psnr(img, ref)
            finite = p[torch.isfinite(p)]
            row = {
                "sampler": smp, "budget": None if j == 0 else budgets[j - 1], "samples": len(labels_all),
                "calls": calls[j] / n, "rows": nrows[j] / n,
                "call_reduction": calls[0] / calls[j] if calls[j] else math.inf,
                "row_reduction": nrows[0] / nrows[j] if nrows[j] else math.inf,
                "wall_s": walls[j], "speedup": walls[0] / walls[j],
                "psnr_mean": p.clamp(max=100.0).mean().item(),
                "psnr_min": finite.min().item() if finite.numel() else math.inf,
                "ssim_mean": ssim(img, ref).mean().item(),
                "max_abs": (img - ref).abs().max().item(),
                "accuracy": (classifier.predict(img) == y).double().mean().item(),
                "accuracy_full": acc_full,
            }
            if j > 0:
                st = ctls[j - 1].stats()
                row["syncs_per_call"] = st["syncs"] / max(st["calls"], 1)
                row["partial_calls"] = st["calls_partial"] / n
            rows.append(row)
            if progress is not None:
                progress(format_row(row))
    return rows


def format_row(r: dict) -> str:
    b = "full" if r["budget"] is None else f"{r['budget']:g}"
    return (f"{r['sampler']:>5} budget={b:>6}  calls {r['calls']:5.1f} ({r['call_reduction']:4.2f}x)  "
            f"rows {r['rows']:5.1f} ({r['row_reduction']:4.2f}x)  wall {r['wall_s']:6.2f}s ({r['speedup']:4.2f}x)  "
            f"PSNR {r['psnr_mean']:5.1f} dB (min {r['psnr_min']:5.1f})  SSIM {r['ssim_mean']:.4f}  "
            f"maxabs {r['max_abs']:.3f}  acc {100 * r['accuracy']:5.1f}% (full {100 * r['accuracy_full']:5.1f}%)")


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description="Step-cache speed/quality curve on the bundled model.")
    ap.add_argument("--budgets", type=float, nargs="+", default=list(DEFAULT_BUDGETS))
    ap.add_argument("--seeds", type=int, default=8, help="number of seeds (0 .. n-1)")
    ap.add_argument("--classes", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--sampler", nargs="+", default=["euler", "heun"], choices=["euler", "heun"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--cfg", type=float, default=None)
    ap.add_argument("--separate-cfg", action="store_true", help="cond and uncond as two forwards")
    ap.add_argument("--batch-classes", action="store_true", help="all classes of a seed in one batch")
    ap.add_argument("--forecast", default=None)
    ap.add_argument("--max-skips", type=int, default=None)
    ap.add_argument("--start", type=float, default=None)
    ap.add_argument("--end", type=float, default=None)
    args = ap.parse_args(argv)
    kw = {}
    if args.forecast is not None:
        kw["forecast"] = args.forecast
    if args.max_skips is not None:
        kw["max_consecutive_skips"] = args.max_skips
    if args.start is not None:
        kw["start_percent"] = args.start
    if args.end is not None:
        kw["end_percent"] = args.end
    return evaluate_fast_mode(budgets=args.budgets, seeds=range(args.seeds), classes=args.classes,
                              sampler=args.sampler, steps=args.steps, cfg=args.cfg, batch_cfg=not args.separate_cfg,
                              controller_kwargs=kw, batch_classes=args.batch_classes, progress=print)


if __name__ == "__main__":
    main()
