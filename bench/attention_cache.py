"""The attention cache of the fast patch on the bundled model: error, mask density and CPU wall time.

    python bench/attention_cache.py                      # 2 seeds x 4 classes, Euler 30 steps, batched CFG
    python bench/attention_cache.py --seeds 1 --steps 6  # a smoke run

For each setting, ``jetdet.patch(model, mode="fast", budget=b, attention_cache={...})`` samples the same
(seed, class) items as full compute, interleaved, one thread. Reported per setting: mean PSNR of the final
images against full compute, classifier accuracy, the attention calls that refreshed (exact, new masks) and
reused (block-sparse over a cached mask), the mean density of the reused masks (the fraction of attention
work they keep), the measured relative L2 error of the first reused forward's attention outputs, and the
median wall time per sample. ``budget=0`` isolates the attention cache (no step skipping).

The bundled model's masks are built per batch row and merged over the batch, so that one mask serves both
CFG branches and any subset of rows; on this 256-token model attention is spread out and the merged masks
keep most blocks. On CPU the block-sparse op runs its torch path, slower than torch's dense attention.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SETTINGS = [
    {"mass": 1.0, "block_size": 16, "refresh": 3},
    {"mass": 0.99, "block_size": 16, "refresh": 3},
    {"mass": 0.95, "block_size": 16, "refresh": 3},
    {"mass": 0.95, "block_size": 64, "refresh": 3},
    {"mass": 0.9, "block_size": 32, "refresh": 3},
    {"mass": 0.99, "block_size": 16, "refresh": 6},
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--classes", type=int, nargs="+", default=[0, 3, 5, 7])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.0, 0.06])
    p.add_argument("--out", default=None, help="write the markdown table here too")
    a = p.parse_args(argv)
    if a.seeds < 1 or a.steps < 1:
        p.error("--seeds, --steps: expected positive ints")

    import torch

    import jetdet
    from jetdet.models import bundled
    from jetdet.models.evaluate import psnr
    from jetdet.models.sampling import sample

    torch.set_num_threads(1)
    model = bundled.load_bundled()
    clf = bundled.load_classifier()
    items = [(s, c) for s in range(a.seeds) for c in a.classes]
    methods = [("full", None, None)]
    for b in a.budgets:
        if b > 0:
            methods.append((f"budget {b:g}, no attention cache", b, False))
        methods += [(f"budget {b:g}, mass {s['mass']:g}, block {s['block_size']}, refresh {s['refresh']}", b, s)
                    for s in SETTINGS]
    res = {name: {"psnr": [], "acc": [], "ms": [], "stats": []} for name, _, _ in methods}
    refs = {}
    with torch.no_grad():
        for seed, cls in items:
            y = torch.tensor([cls])
            for name, budget, setting in methods:
                h = None
                if budget is not None:
                    opts = {"budget": budget, "num_steps": a.steps}
                    if setting:
                        opts["attention_cache"] = setting
                    h = jetdet.patch(model, mode="fast", **opts)
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    img = sample(model, y, steps=a.steps, seed=seed)
                ms = (time.perf_counter() - t0) * 1e3
                if h is not None:
                    res[name]["stats"].append(h.stats())
                    h.remove()
                if name == "full":
                    refs[(seed, cls)] = img
                r = res[name]
                r["psnr"].append(psnr(img, refs[(seed, cls)]).mean().item())
                r["acc"].append(float((clf.predict(img) == y).float().mean()))
                r["ms"].append(ms)
    lines = [f"Bundled model, Euler {a.steps} steps, batched CFG, {len(items)} samples (seeds x classes "
             f"{a.classes}), 1 thread; PSNR against full compute of the same item.", "",
             "| method | PSNR dB | acc % | model calls run | attn refreshed | attn reused | density reused | "
             "attn rel err | ms / sample |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, _, _ in methods:
        r = res[name]
        ps = [x for x in r["psnr"] if x != float("inf")]
        psnr_s = f"{statistics.mean(ps):.2f}" if ps else "exact"
        calls = ac = None
        if r["stats"]:
            calls = statistics.mean(s["cache"]["calls_run"] for s in r["stats"])
            acs = [s["attention_cache"] for s in r["stats"] if "attention_cache" in s]
            if acs:
                dens = [x["density_reused"] for x in acs if x["density_reused"] is not None]
                errs = [x["rel_err_mean"] for x in acs if x["rel_err_mean"] is not None]
                ac = (statistics.mean(x["refreshed"] for x in acs), statistics.mean(x["reused"] for x in acs),
                      statistics.mean(dens) if dens else None, statistics.mean(errs) if errs else None)
        lines.append(
            f"| {name} | {psnr_s} | {100 * statistics.mean(r['acc']):.0f} | "
            f"{'' if calls is None else f'{calls:.1f}'} | {'' if ac is None else f'{ac[0]:.0f}'} | "
            f"{'' if ac is None else f'{ac[1]:.0f}'} | "
            f"{'' if ac is None or ac[2] is None else f'{ac[2]:.3f}'} | "
            f"{'' if ac is None or ac[3] is None else f'{ac[3]:.4f}'} | {statistics.median(r['ms']):.0f} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
