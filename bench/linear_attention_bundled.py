"""Linear attention (``jetdet.patch(model, mode="fast", linear_attention=...)``) on the softmax-trained bundled DiT:
what the opt-in costs on a model that was not trained for it.

    python bench/linear_attention_bundled.py            # 10 classes x 1 seed, then 4 samples for state reuse
    python bench/linear_attention_bundled.py --steps 6  # a smoke run

Two tables, Euler ``--steps`` steps, batched CFG, budget 0 (no step skipping), one thread:

1. Each feature map against full compute: the relative L2 error of the attention outputs that the patch measures
   itself on its first forward (``stats()["linear_attention"]``), the mean PSNR of the final images against full
   compute of the same (seed, class), and the bundled classifier's accuracy on the requested class.
2. K/V state reuse (``linear_attention_state_refresh=N``, relu): PSNR against linear attention without reuse, the
   reference a user of linear attention compares with, and that reference's PSNR against full compute.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _mean_db(values) -> str:
    finite = [v for v in values if v != float("inf")]
    return f"{statistics.mean(finite):.2f}" if finite else "exact"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--classes", type=int, nargs="+", default=list(range(10)), help="table 1: one sample per class")
    p.add_argument("--reuse-samples", type=int, default=4, help="table 2: seeds 0.. of class 0, 3, 5, 7 in turn")
    p.add_argument("--refresh", type=int, nargs="+", default=[2, 3, 5])
    a = p.parse_args(argv)
    if a.steps < 1 or a.reuse_samples < 1 or any(r < 2 for r in a.refresh):
        p.error("--steps, --reuse-samples: expected positive ints; --refresh: ints >= 2")

    import torch

    import jetdet
    from jetdet.models import bundled
    from jetdet.models.evaluate import psnr
    from jetdet.models.sampling import sample

    torch.set_num_threads(1)
    model = bundled.load_bundled()
    clf = bundled.load_classifier()

    def run(cls: int, seed: int, **opts):
        y = torch.tensor([cls])
        h = jetdet.patch(model, mode="fast", budget=0.0, num_steps=a.steps, **opts) if opts else None
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the patch's one-time "approximate" warning
                img = sample(model, y, steps=a.steps, seed=seed)
            stats = h.stats().get("linear_attention") if h is not None else None
        finally:
            if h is not None:
                h.remove()
        return img, float((clf.predict(img) == y).float().mean()), stats

    rows = {"full compute": {"db": [], "acc": [], "err": []}, "relu": {"db": [], "acc": [], "err": []},
            "elu1": {"db": [], "acc": [], "err": []}}
    for cls in a.classes:
        ref, acc, _ = run(cls, 0)
        rows["full compute"]["acc"].append(acc)
        for fm in ("relu", "elu1"):
            img, acc, st = run(cls, 0, linear_attention=fm)
            rows[fm]["db"].append(psnr(img, ref).mean().item())
            rows[fm]["acc"].append(acc)
            rows[fm]["err"].append(st["rel_err_mean"])
    lines = [f"Bundled DiT, Euler {a.steps} steps, batched CFG, budget 0, {len(a.classes)} samples (seed 0, classes "
             f"{a.classes}), 1 thread.", "",
             "| attention | measured attention rel. error | PSNR dB against full compute | recognised % |",
             "|---|---:|---:|---:|"]
    for name, r in rows.items():
        err = f"{statistics.mean(r['err']):.2f}" if r["err"] else ""
        db = _mean_db(r["db"]) if r["db"] else "ref"
        lines.append(f"| {name} | {err} | {db} | {100 * statistics.mean(r['acc']):.0f} |")

    cycle = [0, 3, 5, 7]
    items = [(cycle[i % len(cycle)], i // len(cycle)) for i in range(a.reuse_samples)]
    base_db, reuse_db = [], {n: [] for n in a.refresh}
    for cls, seed in items:
        ref, _, _ = run(cls, seed)
        lin, _, _ = run(cls, seed, linear_attention="relu")
        base_db.append(psnr(lin, ref).mean().item())
        for n in a.refresh:
            img, _, _ = run(cls, seed, linear_attention="relu", linear_attention_state_refresh=n)
            reuse_db[n].append(psnr(img, lin).mean().item())
    lines += ["", f"K/V state reuse (relu), {len(items)} samples (class, seed) {items}:", "",
              "| state kept for | PSNR dB against linear attention without reuse |", "|---|---:|"]
    lines += [f"| {n} timesteps | {_mean_db(reuse_db[n])} |" for n in a.refresh]
    lines += ["", f"Linear attention without reuse against full compute, same samples: {_mean_db(base_db)} dB"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
