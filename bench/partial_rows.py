"""Partial rows against whole-call skipping on the bundled DiT: does running part of the model pay?

    python bench/partial_rows.py                          # Euler and Heun, budgets 0.06 and 0.1, 2 seeds x 4 classes
    python bench/partial_rows.py --seeds 8 --budgets 0.05 0.08 --markdown bench/results/partial_rows.md

Each row is ``jetdet.patch(model, mode="fast", budget=b, **variant)`` on its own copy of the bundled model
(:func:`jetdet.models.evaluate.evaluate_fast_mode`: full compute and every variant interleaved, the classes of a seed
in one batch, 1 thread), against full compute of the same seeds:

* ``whole-call``: ``block_reuse=False`` (what the quality presets do);
* ``blocks``: a row predicted above half the budget runs the first block and the final layer, and the other blocks'
  residual is forecast (``block_reuse=True, skip_whole=0.5, block_signal="off"``);
* ``blocks+veto``: the same for every forecast row, the first-block signal vetoing forecasts
  (``skip_whole=0, block_signal="veto"``);
* ``blocks+decide``: whole-call decisions, and the signal may also forecast the body of rows the time rule
  would run (``skip_whole=1, block_signal="decide"``);
* ``tokens``: whole-call decisions, and inside computed blocks the MLP recomputes only the 16-token tiles whose
  input moved by more than 2 % (``block_reuse=True, skip_whole=1, token_budget=0.02``);
* ``cfg``: whole-call decisions, and a row is served from its CFG partner plus the forecast difference when that
  is predicted within budget (``cfg_reuse=True``).

Columns: FME = full-model equivalents per sample (block evaluations run / blocks per evaluation; token-level savings
are listed separately as the fraction of MLP tokens recomputed), wall speedup, mean / min PSNR.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from jetdet.models.evaluate import evaluate_fast_mode  # noqa: E402

VARIANTS = {
    "whole-call": {"block_reuse": False},
    "blocks": {"block_reuse": True, "skip_whole": 0.5, "block_signal": "off"},
    "blocks+veto": {"block_reuse": True, "skip_whole": 0.0, "block_signal": "veto"},
    "blocks+decide": {"block_reuse": True, "skip_whole": 1.0, "block_signal": "decide"},
    "tokens": {"block_reuse": True, "skip_whole": 1.0, "token_budget": 0.02},
    "cfg": {"block_reuse": False, "cfg_reuse": True},
}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.06, 0.1])
    ap.add_argument("--samplers", nargs="+", default=["euler", "heun"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    settings, names = [], []
    for b in args.budgets:
        for v in args.variants:
            settings.append({"budget": b, **VARIANTS[v]})
            names.append((b, v))
    t0 = time.perf_counter()
    rows = evaluate_fast_mode(settings=settings, seeds=range(args.seeds), sampler=args.samplers, steps=args.steps,
                              batch_classes=True, warmup=1)
    took = time.perf_counter() - t0
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    cmd = "python bench/partial_rows.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"## Partial rows against whole calls: bundled DiT, {args.steps} steps, CFG 4, {args.seeds} seeds x 4 "
             f"classes (classes of a seed in one batch), 1 thread; {took:.0f} s, load average {load} at the end",
             "", f"`{cmd.strip()}`", "",
             "| sampler | budget | variant | FME | FME reduction | wall speedup | PSNR mean / min dB | rows partial / "
             "from CFG partner | MLP tokens recomputed | acc % |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    per = len(settings) + 1
    for k, r in enumerate(rows):
        j = k % per
        if j == 0:
            lines.append(f"| {r['sampler']} | | full compute | {r['fme']:.1f} | 1.00x | 1.00x | inf | | | "
                         f"{100 * r['accuracy']:.1f} |")
            continue
        b, v = names[j - 1]
        st = r["stats"]
        tok = st["tokens"]
        tok_s = f"{tok['tokens_run'] / tok['tokens']:.2f}" if tok["tokens"] else "–"
        lines.append(f"| {r['sampler']} | {b:g} | {v} | {r['fme']:.1f} | {r['fme_reduction']:.2f}x | "
                     f"{r['speedup']:.2f}x | {r['psnr_mean']:.2f} / {r['psnr_min']:.2f} | {st['rows_partial']} / "
                     f"{st['rows_cfg']} | {tok_s} | {100 * r['accuracy']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    return rows


if __name__ == "__main__":
    main()
