"""Fast mode on eps- and v-prediction models sampled by diffusers' DDPM-family schedulers (the SD1.5/SDXL path).

    python bench/diffusers_eps.py                                  # eps, 7 schedulers, 8 seeds x 4 classes
    python bench/diffusers_eps.py --prediction v_prediction --schedulers euler dpmpp_2m
    python bench/diffusers_eps.py --schedulers pndm --quality high
    python bench/diffusers_eps.py --markdown bench/results/diffusers_eps.md   # appends to an existing file

jetdet ships no trained eps model, so the bundled flow DiT is run as one: :class:`jetdet.models.vp.VPModel` (SD1.5's
noise schedule, timesteps 0..999). A diffusers scheduler samples it as a StableDiffusionPipeline's loop does
(``scale_model_input``, one batched CFG call per step, ``step``), 30 steps, CFG 4, 1 thread. Per scheduler:

* ``off``: the model unpatched (the reference; PSNR is against it, per seed);
* ``scheduler=``: ``jetdet.patch(model, mode="fast", scheduler=sched)``, the default quality otherwise: the step
  cache sees the flow model the VP model is equivalent to (:mod:`jetdet.patch.prediction`);
* ``as is``: ``jetdet.patch(model, mode="fast", prediction="flow")``: the output forecast as it is, as jetdet did
  before ``scheduler=`` existed (the control).

Columns: model calls per image (a batched CFG call counts once) and the ratio to ``off``; the same for full-model
equivalents (rows computed / rows of a full call: a call the cache runs on some rows only counts its share); wall
time ratio; PSNR (peak-to-peak 2) mean and min over the images.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SCHEDULERS = ("euler", "euler_karras", "dpmpp_2m", "dpmpp_2m_karras", "ddim", "unipc", "pndm", "heun")
#: run only when named: LMS (4th-order multistep, warned), KDPM2 ancestral (computes every call with scheduler=),
#: DDIM on a zero-terminal-SNR schedule (use --prediction v_prediction), and DEIS, DPM-Solver single-step and KDPM2
#: (the README's last three rows; jetdet.patch warns once for a scheduler outside prediction.MEASURED), and three that
#: add noise at every step (Euler ancestral, DPM++ 2M SDE, DPM++ SDE, DDPM, LCM: jetdet forecasts their denoised
#: image)
MORE = ("lms", "kdpm2_a", "ddim_zsnr", "deis", "dpm_single", "kdpm2", "euler_a", "dpmpp_2m_sde", "dpmpp_sde", "ddpm",
        "lcm")


def make_scheduler(name: str, prediction: str):
    import diffusers

    from jetdet.models.vp import SD_SCHEDULE

    kw = dict(SD_SCHEDULE, prediction_type=prediction)
    table = {
        "euler": lambda: diffusers.EulerDiscreteScheduler(**kw),
        "euler_karras": lambda: diffusers.EulerDiscreteScheduler(**kw, use_karras_sigmas=True),
        "dpmpp_2m": lambda: diffusers.DPMSolverMultistepScheduler(**kw),
        "dpmpp_2m_karras": lambda: diffusers.DPMSolverMultistepScheduler(**kw, use_karras_sigmas=True),
        "ddim": lambda: diffusers.DDIMScheduler(**kw, set_alpha_to_one=False, steps_offset=1, clip_sample=False),
        "unipc": lambda: diffusers.UniPCMultistepScheduler(**kw),
        "pndm": lambda: diffusers.PNDMScheduler(**kw, skip_prk_steps=True, steps_offset=1),
        "heun": lambda: diffusers.HeunDiscreteScheduler(**kw),
        "lms": lambda: diffusers.LMSDiscreteScheduler(**kw),
        "kdpm2_a": lambda: diffusers.KDPM2AncestralDiscreteScheduler(**kw),
        "deis": lambda: diffusers.DEISMultistepScheduler(**kw),
        "dpm_single": lambda: diffusers.DPMSolverSinglestepScheduler(**kw),
        "kdpm2": lambda: diffusers.KDPM2DiscreteScheduler(**kw),
        "euler_a": lambda: diffusers.EulerAncestralDiscreteScheduler(**kw),
        "dpmpp_2m_sde": lambda: diffusers.DPMSolverMultistepScheduler(**kw, algorithm_type="sde-dpmsolver++"),
        "dpmpp_sde": lambda: diffusers.DPMSolverSDEScheduler(**kw),
        "ddpm": lambda: diffusers.DDPMScheduler(**kw),
        "lcm": lambda: diffusers.LCMScheduler(**kw),
        "ddim_zsnr": lambda: diffusers.DDIMScheduler(**kw, rescale_betas_zero_snr=True, timestep_spacing="trailing",
                                                     clip_sample=False),
    }
    if name not in table:
        raise SystemExit(f"--schedulers: unknown {name!r}; expected some of {SCHEDULERS + MORE}")
    return table[name]()


def run(schedulers=SCHEDULERS, prediction="epsilon", seeds=8, steps=30, cfg=4.0, classes=(0, 1, 2, 3),
        quality=None) -> list[dict]:
    import torch

    import jetdet
    from jetdet.models import bundled
    from jetdet.models.evaluate import psnr
    from jetdet.models.vp import VPModel, sample

    torch.set_num_threads(1)
    flow = bundled.load_bundled()
    rows = []
    for name in schedulers:
        model = VPModel(flow, make_scheduler(name, prediction).alphas_cumprod, prediction)
        q = {} if quality is None else {"quality": quality}
        methods = [("off", None), ("scheduler=", {"scheduler": make_scheduler(name, prediction), **q}),
                   ("as is", {"prediction": "flow", **q})]
        res = {m: {"calls": 0, "rows": 0, "secs": 0.0, "psnr": []} for m, _ in methods}
        refs = {}
        with torch.no_grad():
            for seed in range(seeds):  # interleaved, so that machine load hits every method alike
                for m, opts in methods:
                    calls = []  # rows of each call that reached the flow model
                    hook = flow.register_forward_pre_hook(lambda _m, a, calls=calls: calls.append(a[0].shape[0]))
                    handle = jetdet.patch(model, mode="fast", **opts) if opts is not None else None
                    try:
                        t0 = time.perf_counter()
                        img = sample(model, make_scheduler(name, prediction), classes, seed, bundled.NULL_LABEL,
                                     steps, cfg)
                        res[m]["secs"] += time.perf_counter() - t0
                    finally:
                        if handle is not None:
                            handle.remove()
                        hook.remove()
                    res[m]["calls"] += len(calls)
                    res[m]["rows"] += sum(calls)
                    if m == "off":
                        refs[seed] = img
                    res[m]["psnr"] += psnr(img, refs[seed]).tolist()
        off = res["off"]
        for m, _ in methods:
            r = res[m]
            rows.append({"scheduler": name, "prediction": prediction, "quality": quality or "default", "method": m,
                         "calls": r["calls"] / seeds, "fewer_calls": off["calls"] / r["calls"],
                         "fme": off["rows"] / r["rows"],
                         "wall": off["secs"] / r["secs"],
                         "psnr_mean": sum(r["psnr"]) / len(r["psnr"]) if m != "off" else None,
                         "psnr_min": min(r["psnr"]) if m != "off" else None})
            p = "ref" if m == "off" else f"{rows[-1]['psnr_mean']:6.2f} {rows[-1]['psnr_min']:6.2f}"
            print(f"{name:16s} {m:11s} calls {rows[-1]['calls']:5.1f}  {rows[-1]['fewer_calls']:.2f}x  "
                  f"FME {rows[-1]['fme']:.2f}x  wall {rows[-1]['wall']:.2f}x  PSNR mean/min {p}", flush=True)
    return rows


def markdown(rows, argv) -> str:
    lines = [f"`python bench/diffusers_eps.py {' '.join(argv)}`".replace(" `", "`"), "",
             "| scheduler | prediction | quality | method | calls / image | fewer calls | fewer FME | wall | PSNR mean "
             "| PSNR min |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        p = ("ref", "ref") if r["psnr_mean"] is None else (f"{r['psnr_mean']:.2f}", f"{r['psnr_min']:.2f}")
        lines.append(f"| {r['scheduler']} | {r['prediction']} | {r['quality']} | {r['method']} | {r['calls']:.1f} | "
                     f"{r['fewer_calls']:.2f}x | {r['fme']:.2f}x | {r['wall']:.2f}x | {p[0]} | {p[1]} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schedulers", nargs="+", default=list(SCHEDULERS), help=f"some of {SCHEDULERS + MORE}")
    ap.add_argument("--prediction", default="epsilon", choices=("epsilon", "v_prediction", "sample"))
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--quality", default=None, choices=("high", "balanced", "fast"), help="default: jetdet's")
    ap.add_argument("--markdown", default=None, help="also write the table here (appended when it exists)")
    args = ap.parse_args(argv)
    for s in args.schedulers:
        if s not in SCHEDULERS + MORE:
            ap.error(f"--schedulers: unknown {s!r}; expected some of {SCHEDULERS + MORE}")
    if args.seeds < 1 or args.steps < 2:
        ap.error("--seeds: at least 1; --steps: at least 2")
    rows = run(args.schedulers, args.prediction, args.seeds, args.steps, quality=args.quality)
    if args.markdown:
        path = Path(args.markdown)
        text = markdown(rows, sys.argv[1:] if argv is None else argv)
        path.write_text(path.read_text() + "\n" + text if path.exists() else text)
    return rows


if __name__ == "__main__":
    main()
