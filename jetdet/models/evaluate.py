"""Speed/quality measurement of fast mode on the bundled model (or any :class:`~jetdet.models.bundled.BundledDiT`).

:func:`evaluate_fast_mode` samples every ``(seed, class)`` pair with full compute and with
``jetdet.patch(model, mode="fast", **setting)`` for each setting (each on its own copy of the model, so every
setting keeps its state for the whole run), interleaved (full, setting 1, setting 2, ... for one sample, then
the next sample), and compares each sample with the full-compute sample of the same seed: PSNR, SSIM and max
abs error on the images in ``[-1, 1]`` (PSNR with a peak-to-peak of 2), the bundled classifier's accuracy,
model calls, full-model equivalents and wall time. This is what a user of ``jetdet.patch`` gets: the adapter
finds the model's block list itself.

:func:`cached_model_fn` drives a bare :class:`~jetdet.cache.StepCacheController` with
:class:`~jetdet.patch.call.ModelCall` objects built by hand (whole-call skipping only, no block runner).

From a checkout: ``python -m jetdet.models.evaluate --quality high balanced fast`` prints the table;
``--budgets 0.05 0.1`` measures raw budgets; ``--weights`` another trained DiT.
"""

from __future__ import annotations

import argparse
import ast
import copy
import math
import time

import torch
import torch.nn.functional as F

from ..cache.controller import StepCacheController
from ..patch.call import ModelCall

#: Budgets measured by ``--budgets`` when given without values.
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
    through ``controller`` as a :class:`ModelCall` (cond = the labels; no block runner)."""

    def fn(x, t, y):
        def run(rows):
            if rows is None:
                return model(x, t, y)
            return model(x.index_select(0, rows), t.index_select(0, rows), y.index_select(0, rows))

        return controller(ModelCall(x=x, t=t, run=run, model_id=id(model), cond=y))

    return fn


class _Counting:
    """Counts forwards and rows of a model (wraps its call)."""

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


def setting_name(setting: dict) -> str:
    if not setting:
        return "defaults"
    return " ".join(f"{k}={v}" for k, v in setting.items())


def evaluate_fast_mode(settings=None, budgets=None, seeds=range(8), classes=(0, 1, 2, 3), sampler="euler",
                       steps: int = 30, cfg: float | None = None, batch_cfg: bool = True, options: dict | None = None,
                       model=None, classifier=None, device="cpu", batch_classes: bool = False, warmup: int = 1,
                       progress=None) -> list[dict]:
    """Measure ``jetdet.patch(model, mode="fast", ...)`` against full compute.

    Args:
        settings: a list of option dicts for ``jetdet.patch(mode="fast")`` (``{}`` = the defaults;
            ``{"quality": "fast"}``; ``{"budget": 0.1, "block_reuse": False}``, ...); default ``[{}]``.
        budgets: shorthand, appended as ``{"budget": b}`` settings.
        seeds, classes: every ``(seed, class)`` pair is one sample (``sample(labels=[class], seed=seed)``);
            with ``batch_classes`` one call samples all classes of a seed together (per-row decisions).
        sampler: ``"euler"`` or ``"heun"`` (or a sequence of both: rows for each).
        steps, cfg, batch_cfg: sampler settings (``cfg`` default: the sampler's default, 4).
        options: options added to every setting (``num_steps=steps`` is passed unless given).
        model, classifier: default the bundled ones (:func:`jetdet.models.bundled.load_bundled`).
        warmup: untimed samples of every method first (allocator and thread-pool warm-up).
        progress: optional ``print``-like callable for a line per finished row.

    Returns:
        One dict per (sampler, setting), the full-compute reference first (``setting=None``): ``calls`` (model
        forwards that ran, per sample), ``fme`` (work in full CFG evaluations per sample: block evaluations run /
        blocks per evaluation), ``call_reduction`` / ``fme_reduction`` (full / method), ``wall_s`` (total),
        ``speedup`` (full wall / method wall, measured interleaved), ``psnr_mean``, ``psnr_min``, ``ssim_mean``,
        ``max_abs`` (against full compute of the same seed), ``accuracy`` (classifier, in [0, 1]),
        ``accuracy_full`` and the controller's ``stats``.
    """
    import jetdet

    from . import bundled, sampling

    samplers = [sampler] if isinstance(sampler, str) else list(sampler)
    if model is None:
        model = bundled.load_bundled(device=device)
    if classifier is None:
        classifier = bundled.load_classifier(device=device)
    cfg = sampling.DEFAULT_CFG if cfg is None else cfg
    settings = [dict(s) for s in (settings if settings is not None else ([] if budgets else [{}]))]
    settings += [{"budget": float(b)} for b in (budgets or [])]
    base = dict(options or {})
    base.setdefault("num_steps", steps)
    seeds, classes = list(seeds), list(classes)
    jobs = ([(s, list(classes)) for s in seeds] if batch_classes else [(s, [c]) for s in seeds for c in classes])
    rows = []
    for smp in samplers:
        copies, handles = [], []
        try:
            for st in settings:
                mm = copy.deepcopy(model)
                handles.append(jetdet.patch(mm, mode="fast", **{**base, **st}))
                copies.append(mm)
            counter = _Counting(model)
            fns = [counter] + copies
            for _ in range(warmup):
                for fn in fns:
                    sampling.sample(model, jobs[0][1], steps=steps, cfg=cfg, sampler=smp, seed=jobs[0][0],
                                    batch_cfg=batch_cfg, model_fn=fn)
            counter.calls = counter.rows = 0
            st0 = [h.stats()["cache"] for h in handles]
            walls = [0.0] * len(fns)
            outs: list[list[torch.Tensor]] = [[] for _ in fns]
            labels_all = []
            for seed, labels in jobs:
                labels_all += labels
                for j, fn in enumerate(fns):
                    _sync(device)
                    t0 = time.perf_counter()
                    img = sampling.sample(model, labels, steps=steps, cfg=cfg, sampler=smp, seed=seed,
                                          batch_cfg=batch_cfg, model_fn=fn)
                    _sync(device)
                    walls[j] += time.perf_counter() - t0
                    outs[j].append(img)
            st1 = [h.stats()["cache"] for h in handles]
        finally:
            for h in handles:
                h.remove()
        ref = torch.cat(outs[0])
        y = torch.tensor(labels_all, device=ref.device)
        acc_full = (classifier.predict(ref) == y).double().mean().item()
        n = len(jobs)
        rows_per_eval = len(jobs[0][1]) * (2 if cfg != 1.0 else 1)
        full_calls = counter.calls / n
        full_fme = counter.rows / n / rows_per_eval
        for j in range(len(fns)):
            img = torch.cat(outs[j])
            p = psnr(img, ref)
            finite = p[torch.isfinite(p)]
            if j == 0:
                calls, fme, stats, name = full_calls, full_fme, None, "full"
            else:
                a, b = st0[j - 1], st1[j - 1]
                calls = (b["calls_run"] - a["calls_run"]) / n
                fme = (b["model_equivalents"] - a["model_equivalents"]) / n / rows_per_eval
                stats, name = b, setting_name(settings[j - 1])
            row = {
                "sampler": smp, "setting": None if j == 0 else settings[j - 1], "name": name,
                "samples": len(labels_all), "calls": calls, "fme": fme,
                "call_reduction": full_calls / calls if calls else math.inf,
                "fme_reduction": full_fme / fme if fme else math.inf,
                "wall_s": walls[j], "speedup": walls[0] / walls[j],
                "psnr_mean": p.clamp(max=100.0).mean().item(),
                "psnr_min": finite.min().item() if finite.numel() else math.inf,
                "ssim_mean": ssim(img, ref).mean().item(),
                "max_abs": (img - ref).abs().max().item(),
                "accuracy": (classifier.predict(img) == y).double().mean().item(),
                "accuracy_full": acc_full, "stats": stats,
            }
            rows.append(row)
            if progress is not None:
                progress(format_row(row))
    return rows


def format_row(r: dict) -> str:
    return (f"{r['sampler']:>5} {r['name']:<34} calls {r['calls']:5.1f} ({r['call_reduction']:4.2f}x)  "
            f"FME {r['fme']:5.1f} ({r['fme_reduction']:4.2f}x)  wall {r['wall_s']:6.2f}s ({r['speedup']:4.2f}x)  "
            f"PSNR {r['psnr_mean']:5.1f} dB (min {r['psnr_min']:5.1f})  SSIM {r['ssim_mean']:.4f}  "
            f"acc {100 * r['accuracy']:5.1f}% (full {100 * r['accuracy_full']:5.1f}%)")


def parse_options(pairs) -> dict:
    """``["key=value", ...]`` from the command line -> options; a value is a Python literal where it parses as one,
    else the string."""
    opts = {}
    for kv in pairs:
        k, _, v = kv.partition("=")
        try:
            opts[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            opts[k] = v
    return opts


def main(argv=None) -> list[dict]:

    from . import bundled

    ap = argparse.ArgumentParser(description="Fast-mode speed/quality on the bundled model (or --weights).")
    ap.add_argument("--quality", nargs="*", default=None, help="quality presets to measure (default: all three)")
    ap.add_argument("--budgets", type=float, nargs="*", default=None)
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="option for every setting (value parsed as a Python literal), repeatable")
    ap.add_argument("--seeds", type=int, default=8, help="number of seeds (0 .. n-1)")
    ap.add_argument("--classes", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--sampler", nargs="+", default=["euler"], choices=["euler", "heun"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--cfg", type=float, default=None)
    ap.add_argument("--separate-cfg", action="store_true", help="cond and uncond as two forwards")
    ap.add_argument("--batch-classes", action="store_true", help="all classes of a seed in one batch")
    ap.add_argument("--weights", default=None, help="DiT safetensors (default: the bundled file)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = parse_options(args.option)
    quality = args.quality
    if quality is None and args.budgets is None:
        quality = ["high", "balanced", "fast"]
    settings = [{"quality": q} for q in (quality or [])]
    budgets = list(DEFAULT_BUDGETS) if args.budgets == [] else args.budgets
    model = bundled.load_bundled(path=args.weights)
    return evaluate_fast_mode(settings=settings, budgets=budgets, seeds=range(args.seeds), classes=args.classes,
                              sampler=args.sampler, steps=args.steps, cfg=args.cfg, batch_cfg=not args.separate_cfg,
                              options=opts, model=model, batch_classes=args.batch_classes, progress=print)


if __name__ == "__main__":
    main()
