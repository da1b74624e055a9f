"""jetdet's Fast Optimizer against ComfyUI's own EasyCache and LazyCache nodes, in real ComfyUI, in one run.

    python bench/comfy_peers.py --comfyui /path/to/ComfyUI --json bench/results/comfy_peers.json \\
        --md bench/results/comfy_peers.md

The model is jetdet's trained shapes model that ComfyUI loads natively (:mod:`jetdet.comfy.shapes_model`, an
SD3-architecture MMDiT). Every method is what its node returns with the node's defaults apart from the one knob
swept (jetdet's ``budget``; EasyCache's and LazyCache's ``reuse_threshold``), sampled by ComfyUI's own sampler from
the same per-item noise: 4 classes x a batch of 8 items (8 different noises), 30 steps, Euler, "simple" schedule,
CFG 4 with cond and uncond batched (ComfyUI's default when memory allows). Interleaved: for each class, every
method samples the same batch in turn, so host speed drift hits all methods alike. Without torchvision (torch
2.13.0+cpu has none), set ``JETDET_COMFYUI_STUBS=../shared/comfyui/stubs``.

``--sampling eps`` / ``edm`` samples the same model in the sigma space of eps models (SD1.5/SDXL's table, sigma
0.029-14.6) or EDM models (0.002-80) instead of its own flow sigma (:func:`jetdet.comfy.shapes_model.
as_variance_exploding`: the same probability-flow ODE), with ``--scheduler`` (``karras`` is what such models
usually run with).

Measured per method: model forwards (a forward hook on the diffusion model: what really ran, whatever level a
cache skips at), rows computed (jetdet may run a forward on some rows only: ``rows`` / full rows is the
full-model equivalents), wall time, PSNR of the decoded 32 x 32 images against full compute (peak-to-peak 2),
and the bundled classifier's accuracy. At matched PSNR each peer setting is set against the cheapest jetdet
budget that reaches its PSNR.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from jetdet.comfy.runtime import import_comfyui  # noqa: E402
from jetdet.models.evaluate import psnr  # noqa: E402  (per item, peak-to-peak 2, inf where identical)

DEFAULT_BUDGETS = (0.02, 0.05, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5)
DEFAULT_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
PSNR_CAP = 100.0
SAMPLINGS = {"flow": "flow sigma (SD3, shift 3)", "eps": "eps sigma (SD1.5 table, 0.029-14.6)",
             "edm": "EDM sigma (0.002-80)"}


class ForwardCounter:
    """Counts forwards (and batch rows) of the diffusion model itself."""

    def __init__(self, module):
        self.calls = self.rows = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, _module, args):
        self.calls += 1
        self.rows += int(args[0].shape[0]) if args and isinstance(args[0], torch.Tensor) else 0


def build_methods(base, budgets, thresholds) -> list[dict]:
    from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode

    from jetdet.comfy.nodes import JetDetFastOptimizer

    methods = [{"family": "full", "method": "full compute", "model": base}]
    for b in budgets:
        m = JetDetFastOptimizer.execute(base, b, 0.0, 0.0, "order1", 8).args[0]
        methods.append({"family": "jetdet", "method": f"jetdet budget={b:g}", "model": m, "knob": b})
    for name, node in (("EasyCache", EasyCacheNode), ("LazyCache", LazyCacheNode)):
        for t in thresholds:  # the nodes' own defaults: start_percent 0.15, end_percent 0.95
            m = node.execute(base, t, 0.15, 0.95, False)[0]
            methods.append({"family": name, "method": f"{name} reuse_threshold={t:g}", "model": m, "knob": t})
    return methods


def run(items=8, seed=0, classes=(0, 1, 2, 3), steps=30, sampler="euler", scheduler="simple", cfg=4.0,
        budgets=DEFAULT_BUDGETS, thresholds=DEFAULT_THRESHOLDS, weights=None, sampling="flow") -> dict:
    from jetdet.comfy import shapes_model as sm
    from jetdet.comfy.sampling import sample
    from jetdet.models.bundled import load_classifier

    base = sm.load_model(weights)
    if sampling != "flow":  # the same ODE in variance-exploding sigma (eps/EDM models' sigma space)
        base = sm.as_variance_exploding(base, sampling)
    counter = ForwardCounter(base.model.diffusion_model)
    clf = load_classifier()
    methods = build_methods(base, budgets, thresholds)
    for m in methods:
        m.update(images=[], labels=[], times=[], calls=0, rows=0, runs=0)
    warm = {"samples": torch.zeros(1, sm.LATENT_CHANNELS, sm.LATENT_SIZE, sm.LATENT_SIZE)}
    for m in methods:  # warm-up: one short run each (allocations, first-call costs)
        sample(m["model"], 0, 2, cfg, sampler, scheduler, sm.class_conditioning(0), sm.null_conditioning(), warm)
    for c in classes:
        latent = {"samples": torch.zeros(items, sm.LATENT_CHANNELS, sm.LATENT_SIZE, sm.LATENT_SIZE)}
        pos, neg = sm.class_conditioning(c), sm.null_conditioning()
        for m in methods:
            counter.calls = counter.rows = 0
            t0 = time.perf_counter()
            # one batch, as ComfyUI's KSampler runs it: EasyCache and LazyCache couple the items of a batch, which
            # jetdet's deterministic sampler would otherwise sample one at a time (8x the forwards)
            out = sample(m["model"], seed, steps, cfg, sampler, scheduler, pos, neg, latent, 1.0, 0,
                         split_coupled=False)
            m["times"].append(time.perf_counter() - t0)
            m["calls"] += counter.calls
            m["rows"] += counter.rows
            m["runs"] += 1
            m["images"].append(sm.latent_to_image(out))
            m["labels"] += [c] * items
    counter.handle.remove()
    full = methods[0]
    ref = torch.cat(full["images"])
    labels = torch.tensor(full["labels"])
    full_wall = sum(full["times"])
    rows = []
    for m in methods:
        img = torch.cat(m["images"])
        p = psnr(img, ref)
        identical = bool(torch.equal(img, ref))
        wall = sum(m["times"])
        row = {
            "family": m["family"], "method": m["method"], "knob": m.get("knob"),
            "calls": m["calls"] / m["runs"], "fwd": m["rows"] / m["runs"],
            "full_equiv": (m["rows"] / m["runs"]) / (full["rows"] / full["runs"]),
            "wall_ms": 1000 * wall / m["runs"], "speedup": full_wall / wall,
            "reduction": (full["calls"] / full["runs"]) / (m["calls"] / m["runs"]) if m["calls"] else math.inf,
            "psnr_mean": math.inf if identical else p.clamp(max=PSNR_CAP).mean().item(),
            "psnr_min": p.min().item(), "accuracy": (clf.predict(img) == labels).double().mean().item(),
            "identical_to_full": identical,
        }
        if m["family"] != "full" and identical:
            row["note"] = "output bit-identical to full compute"
        rows.append(row)
    return {"config": {"items": items, "seed": seed, "classes": list(classes), "steps": steps, "sampler": sampler,
                       "scheduler": scheduler, "sampling": sampling, "cfg": cfg, "threads": torch.get_num_threads(),
                       "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None},
            "rows": rows, "matched": matched(rows)}


def matched(rows) -> list[dict]:
    """For each peer setting that saves compute: the cheapest jetdet budget (fewest forwards, then rows, then wall)
    whose mean PSNR is at least the peer's."""
    jet = [r for r in rows if r["family"] == "jetdet"]
    full = next(r for r in rows if r["family"] == "full")
    out = []
    for p in rows:
        if p["family"] in ("full", "jetdet"):
            continue
        m = {"peer": p["method"], "peer_psnr": p["psnr_mean"], "peer_calls": p["calls"], "peer_wall_ms": p["wall_ms"],
             "saves_nothing": p["calls"] >= full["calls"] and p["identical_to_full"]}
        cand = [j for j in jet if j["psnr_mean"] >= p["psnr_mean"]]
        if cand:
            j = min(cand, key=lambda r: (r["calls"], r["fwd"], r["wall_ms"]))
            m.update(jetdet=j["method"], jetdet_psnr=j["psnr_mean"], jetdet_calls=j["calls"],
                     jetdet_fwd=j["fwd"], jetdet_wall_ms=j["wall_ms"], fewer_calls=j["calls"] < p["calls"],
                     less_wall=j["wall_ms"] < p["wall_ms"])
        out.append(m)
    return out


def _f(v, fmt="{:.2f}"):
    if v is None:
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return fmt.format(v)


def format_markdown(res: dict, command: str) -> str:
    c = res["config"]
    lines = [f"`{command}`", "",
             f"Per class {c['classes']}: one batch of {c['items']} items (seed {c['seed']}: {c['items']} different "
             f"noises), {c['steps']} steps, {c['sampler']}/{c['scheduler']}, {SAMPLINGS[c.get('sampling', 'flow')]}, "
             f"CFG {c['cfg']} (cond and uncond batched: "
             f"{2 * c['items']} rows per forward), {c['threads']} threads, load average at the end "
             f"{c['load_average']}. Forwards and wall time are per batch run.", "",
             "| method | forwards per run | full-model equivalents | fewer forwards | wall ms per run | speedup | "
             "PSNR mean / min dB | acc % |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['method']} | {r['calls']:.1f} | {r['full_equiv']:.3f} | {_f(r['reduction'])}x | "
                     f"{r['wall_ms']:.0f} | {r['speedup']:.2f}x | {_f(r['psnr_mean'])} / {_f(r['psnr_min'])} | "
                     f"{100 * r['accuracy']:.1f} |" + (f" {r['note']}" if r.get("note") else ""))
    lines += ["", "| peer setting | peer PSNR | peer forwards / wall ms | jetdet match | jetdet PSNR | "
              "jetdet forwards / wall ms | fewer forwards | less wall |", "|---|---:|---:|---|---:|---:|---|---|"]
    for m in res["matched"]:
        if m["saves_nothing"]:
            lines.append(f"| {m['peer']} | {_f(m['peer_psnr'])} | {m['peer_calls']:.1f} / {m['peer_wall_ms']:.0f} | "
                         "(saves nothing: output bit-identical to full compute) | | | | |")
        elif m.get("jetdet"):
            lines.append(f"| {m['peer']} | {_f(m['peer_psnr'])} | {m['peer_calls']:.1f} / {m['peer_wall_ms']:.0f} | "
                         f"{m['jetdet']} | {_f(m['jetdet_psnr'])} | {m['jetdet_calls']:.1f} / "
                         f"{m['jetdet_wall_ms']:.0f} | {'yes' if m['fewer_calls'] else 'no'} | "
                         f"{'yes' if m['less_wall'] else 'no'} |")
        else:
            lines.append(f"| {m['peer']} | {_f(m['peer_psnr'])} | {m['peer_calls']:.1f} / {m['peer_wall_ms']:.0f} | "
                         "no jetdet budget reaches this PSNR | | | | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", default=None, help="ComfyUI checkout (default $COMFYUI_DIR)")
    ap.add_argument("--items", type=int, default=8, help="items per class (one batch; item i = noise i)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--classes", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--scheduler", default="simple")
    ap.add_argument("--cfg", type=float, default=4.0,
                    help="CFG scale (4 is what the model was sampled at; the CFG++ samplers take theirs near 1)")
    ap.add_argument("--sampling", choices=tuple(SAMPLINGS), default="flow",
                    help="flow: the model as trained (SD3 sigma); eps/edm: the same ODE sampled in an eps model's "
                         "(SD1.5 table) or an EDM model's (0.002-80) variance-exploding sigma")
    ap.add_argument("--budgets", type=float, nargs="+", default=list(DEFAULT_BUDGETS))
    ap.add_argument("--thresholds", type=float, nargs="+", default=list(DEFAULT_THRESHOLDS))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--weights", default=None, help="another shapes-model file (default: the shipped one)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args(argv)
    import_comfyui(args.comfyui)
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    if args.threads:
        torch.set_num_threads(args.threads)
    res = run(items=args.items, seed=args.seed, classes=tuple(args.classes), steps=args.steps, sampler=args.sampler,
              scheduler=args.scheduler, cfg=args.cfg, budgets=args.budgets, thresholds=args.thresholds,
              weights=args.weights, sampling=args.sampling)
    command = "python bench/comfy_peers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = format_markdown(res, command.strip())
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    if args.md:
        Path(args.md).write_text(md)
    return res


if __name__ == "__main__":
    main()
