"""The Fast Optimizer's fixes in real ComfyUI, each against its negative control (the behaviour before the fix).

    JETDET_COMFYUI_STUBS=../shared/comfyui/stubs python bench/comfy_fast_controls.py --comfyui /path/to/ComfyUI

On jetdet's shapes model (an SD3-architecture MMDiT that ComfyUI loads natively), PSNR of the latent against the
same run in mode off (whole batch, peak-to-peak the reference's range: the Benchmark node's figure). Sections
(``--cases``, all by default):

* ``slg``: Skip Layer Guidance (layer 1, scale 3), 20 steps, batch 3, budget 0.05. The extra cond-branch call
  with a block replaced has streams of its own; the control files it under the cond rows' streams.
* ``ve``: the shapes model in eps and EDM sigma (``as_variance_exploding``), karras, 20 steps, batch 2, budget
  0.05. The step cache forecasts the velocity of the equivalent flow model; the control forecasts the noise
  prediction in sigma.
* ``noisy``: euler_ancestral and dpmpp_2m_sde (flow sigma), 20 steps, batch 4 (stock KSampler), budget 0.1. The
  step cache forecasts their denoised image; the control forecasts the velocity, as for a sampler that adds no
  noise.
* ``rows``: dpmpp_sde in eps sigma, karras, 20 steps, batch 4 (stock KSampler), budget 0.05. A call's rows are run
  or forecast together; the control (``piggyback=0.5``) decides each CFG branch apart.
* ``hook``: a hook LoRA on the positive whose keyframe takes its strength from 1 to 0 at 50%, 20 steps, 8 items
  (stock KSampler), budgets 0.02 / 0.05 / 0.1. The change resets the cache; the control hides the change; the
  same keyframes with no change (1 to 1) are the reference point.
* ``cfgpp``: dpmpp_2m_cfg_pp at CFG 1, 30 steps, 8 items (stock KSampler, seed 0), budget 0.05. Fast mode computes
  every call (ComfyUI's output bit for bit); the control forecasts as for any other sampler.
* ``lcm``: the lcm sampler in eps sigma, 12 karras steps, batch 2 (stock KSampler, seed 3), budget 0.05. The same
  rule (every call computed) and the same control. On a ComfyUI whose step noise is not the initial noise again
  (0.7, 0.33) the control forecasts nothing either: it says so, and only the fix is checked.

``tests/comfy/test_comfy_fast.py`` asserts the same comparisons with margins; this prints the figures the README
quotes. Exits 1 when a fix does not beat its control.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from unittest.mock import patch

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from jetdet.comfy.runtime import import_comfyui  # noqa: E402
from jetdet.verify import psnr_db  # noqa: E402

CASES = ("slg", "ve", "noisy", "rows", "hook", "cfgpp", "lcm")


def _latent(n):
    from jetdet.comfy import shapes_model as sm

    return {"samples": torch.zeros(n, sm.LATENT_CHANNELS, sm.LATENT_SIZE, sm.LATENT_SIZE)}


def per_item(model, conds, batch, steps, sampler="euler", scheduler="simple", seed=3):
    """jetdet's sampling helper (per-item noise), as the tests sample."""
    from jetdet.comfy.sampling import sample

    return sample(model, seed, steps, 4.0, sampler, scheduler, *conds, _latent(batch))


def stock(model, conds, batch, steps, sampler="euler", scheduler="simple", seed=7, cfg=4.0):
    import nodes

    return nodes.KSampler().sample(model, seed, steps, cfg, sampler, scheduler, *conds, _latent(batch),
                                   1.0)[0]["samples"]


def fast(model, budget):
    from jetdet.comfy.nodes import JetDetFastOptimizer

    return JetDetFastOptimizer.execute(model, budget=budget, start_percent=0.0, end_percent=0.0, forecast="order1",
                                       max_consecutive_skips=8).args[0]


def calls_run(model):
    from jetdet.comfy import wrappers as wr

    s = wr.fast_state(model).stats()
    return s["calls"] - s["calls_saved"], s["calls"]


def stats(model):
    run, calls = calls_run(model)
    return f"{run} of {calls} calls run"


def case_slg(model, conds):
    from comfy_extras.nodes_sd3 import SkipLayerGuidanceSD3

    from jetdet.comfy import wrappers as wr

    slg = SkipLayerGuidanceSD3.execute(model, layers="1", scale=3.0, start_percent=0.0, end_percent=1.0).args[0]
    kw = dict(batch=3, steps=20)
    ref_plain, ref = per_item(model, conds, **kw), per_item(slg, conds, **kw)
    f = fast(slg, 0.05)
    now = psnr_db(per_item(f, conds, **kw), ref)
    now_s = stats(f)
    with patch.object(wr, "_patch_signature", lambda transformer_options: ()):  # every call kind one stream
        c = fast(slg, 0.05)
        old = psnr_db(per_item(c, conds, **kw), ref)
        old_s = stats(c)
    print(f"slg: SLG's own effect {psnr_db(ref, ref_plain):.1f} dB (SLG against no SLG, mode off)")
    print(f"slg: budget 0.05, SLG calls with streams of their own: {now:.1f} dB ({now_s})")
    print(f"slg: budget 0.05, control, SLG calls in the cond rows' streams: {old:.1f} dB ({old_s})")
    return now > old


def case_ve(model, conds):
    from jetdet.comfy import shapes_model as sm
    from jetdet.comfy import wrappers as wr

    ok = True
    kw = dict(batch=2, steps=20, scheduler="karras")
    flow_ref = per_item(model, conds, **kw)
    f = fast(model, 0.05)
    print(f"ve: flow sigma (the model's own), budget 0.05: {psnr_db(per_item(f, conds, **kw), flow_ref):.1f} dB "
          f"({stats(f)})")
    for sampling in ("eps", "edm"):
        ve = sm.as_variance_exploding(model, sampling)
        ref = per_item(ve, conds, **kw)
        f = fast(ve, 0.05)
        now = psnr_db(per_item(f, conds, **kw), ref)
        now_s = stats(f)
        with patch.object(wr, "_variance_exploding", lambda executor: False):  # forecast the noise prediction in sigma
            c = fast(ve, 0.05)
            old = psnr_db(per_item(c, conds, **kw), ref)
            old_s = stats(c)
        print(f"ve: {sampling} sigma, budget 0.05, flow view: {now:.1f} dB ({now_s})")
        print(f"ve: {sampling} sigma, budget 0.05, control, noise prediction forecast in sigma: {old:.1f} dB "
              f"({old_s})")
        ok = ok and now > old
    return ok


def case_noisy(model, conds):
    from jetdet.comfy import wrappers as wr

    ok = True
    for sampler in ("euler_ancestral", "dpmpp_2m_sde"):
        kw = dict(batch=4, steps=20, sampler=sampler)
        ref = stock(model, conds, **kw)
        f = fast(model, 0.1)
        now = psnr_db(stock(f, conds, **kw), ref)
        now_s, now_n = stats(f), calls_run(f)[0]
        with (patch.object(wr, "_ADDS_NOISE", frozenset()),
              patch.object(wr, "_named_as_adding_noise", lambda name: False)):
            c = fast(model, 0.1)  # the velocity forecast, as for a sampler that adds no noise
            old = psnr_db(stock(c, conds, **kw), ref)
            old_s, old_n = stats(c), calls_run(c)[0]
        print(f"noisy: {sampler}, budget 0.1, denoised image forecast: {now:.1f} dB ({now_s})")
        print(f"noisy: {sampler}, budget 0.1, control, velocity forecast: {old:.1f} dB ({old_s})")
        ok = ok and now_n < old_n  # the fix saves calls where the control saved fewer (none)
    return ok


def case_rows(model, conds):
    from jetdet.comfy import shapes_model as sm
    from jetdet.comfy import wrappers as wr

    eps = sm.as_variance_exploding(model, "eps")
    kw = dict(batch=4, steps=20, sampler="dpmpp_sde", scheduler="karras")
    ref = stock(eps, conds, **kw)
    f = fast(eps, 0.05)
    now = psnr_db(stock(f, conds, **kw), ref)
    s = wr.fast_state(f).stats()
    apart, _ = wr.with_fast(eps, budget=0.05, piggyback=0.5)
    old = psnr_db(stock(apart, conds, **kw), ref)
    sa = wr.fast_state(apart).stats()
    print(f"rows: dpmpp_sde, eps sigma, budget 0.05, a call's rows together: {now:.1f} dB at "
          f"{s['fme_ratio']:.2f}x fewer model equivalents")
    print(f"rows: dpmpp_sde, eps sigma, budget 0.05, control, CFG branches apart (piggyback 0.5): {old:.1f} dB at "
          f"{sa['fme_ratio']:.2f}x; the cost of deciding them apart: {now - old:.1f} dB")
    return now > old


def _hooked_positive(pos, strength_after):
    """The positive with a hook LoRA (random low-rank weights on two joint blocks, seed 0) whose keyframe sets its
    strength to ``strength_after`` from 50% of the run."""
    import comfy.hooks

    g = torch.Generator().manual_seed(0)
    lora = {}
    for b in (0, 1):
        for part, (o, i) in (("x_block.attn.qkv", (384, 128)), ("x_block.attn.proj", (128, 128)),
                             ("context_block.attn.qkv", (384, 128))):
            k = f"diffusion_model.joint_blocks.{b}.{part}"
            lora[k + ".lora_up.weight"] = torch.randn(o, 4, generator=g) * 0.12
            lora[k + ".lora_down.weight"] = torch.randn(4, i, generator=g) * 0.12
            lora[k + ".alpha"] = torch.tensor(4.0)
    hooks = comfy.hooks.create_hook_lora(lora, strength_model=1.0, strength_clip=1.0)
    kf = comfy.hooks.HookKeyframeGroup()
    kf.add(comfy.hooks.HookKeyframe(strength=1.0, start_percent=0.0))
    kf.add(comfy.hooks.HookKeyframe(strength=strength_after, start_percent=0.5))
    hooks = hooks.clone()
    hooks.set_keyframes_on_hooks(hook_kf=kf)
    return comfy.hooks.set_conds_props([pos], 1.0, "default", hooks=hooks)[0]


def case_hook(model, conds, budgets=(0.02, 0.05, 0.1)):
    from jetdet.comfy import wrappers as wr

    ok = True
    rows = {}
    kw = dict(batch=8, steps=20)
    for label, after in (("change", 0.0), ("no change", 1.0)):
        hc = (_hooked_positive(conds[0], after), conds[1])
        ref = stock(model, hc, **kw)
        for b in budgets:
            f = fast(model, b)
            rows[(label, "seen", b)] = psnr_db(stock(f, hc, **kw), ref)
            if label == "change":
                with patch.object(wr, "_hook_state", lambda executor: ()):  # the change is not seen
                    rows[(label, "hidden", b)] = psnr_db(stock(fast(model, b), hc, **kw), ref)
    def line(label, how):
        return " / ".join(f"{rows[(label, how, b)]:.1f}" for b in budgets)

    print(f"hook: budgets {' / '.join(str(b) for b in budgets)}, stock KSampler, 8 items, 20 steps")
    print(f"hook: strength 1 -> 0 at 50%, cache reset at the change: {line('change', 'seen')} dB")
    print(f"hook: strength 1 -> 0 at 50%, control, change hidden: {line('change', 'hidden')} dB")
    print(f"hook: same keyframes, strength 1 -> 1 (no change): {line('no change', 'seen')} dB")
    for b in budgets:
        ok = ok and rows[("change", "seen", b)] > rows[("change", "hidden", b)]
    return ok


def step_noise_repeats_initial_noise() -> bool:
    """Whether this ComfyUI's samplers draw their first step noise equal to the initial noise of the same seed.
    ComfyUI 0.3.64 seeds both with the seed (so lcm's first step adds the initial noise again, and the step cache's
    error estimate finds lcm's calls smooth enough to forecast one); newer ComfyUI (0.7, 0.33) draws the step noise
    from seed + 1 on a CPU, and the error estimate forecasts no lcm call at any budget up to 0.5 (0.33)."""
    import comfy.k_diffusion.sampling as ks
    import comfy.sample

    x = torch.zeros(1, 4, 8, 8)
    return torch.equal(comfy.sample.prepare_noise(x, 3), ks.default_noise_sampler(x, seed=3)(None, None))


def _every_call(label, model, conds, kw, control, vacuous=None):
    """A sampler the Fast Optimizer computes every call with (bit-identical to mode off), against ``control``: a
    context in which it forecasts as for other samplers; prints both, with the PSNR that forecasting cost.
    ``vacuous``: why a control that forecast nothing is expected on this ComfyUI (then only the fix is checked)."""
    import warnings

    ref = stock(model, conds, **kw)
    f = fast(model, 0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the one-time notice that it computes every call
        out = stock(f, conds, **kw)
    now_s = stats(f)
    with control:
        c = fast(model, 0.05)
        old = psnr_db(stock(c, conds, **kw), ref)
        old_s = stats(c)
    print(f"{label}, budget 0.05: bit-identical to mode off: {torch.equal(out, ref)} ({now_s})")
    print(f"{label}, budget 0.05, control, forecast as other samplers: {old:.1f} dB ({old_s})")
    if vacuous and old == math.inf and calls_run(c)[0] == calls_run(c)[1]:
        print(f"{label}: the control forecast no call either: {vacuous}")
        return torch.equal(out, ref)
    return torch.equal(out, ref) and old < math.inf


def case_cfgpp(model, conds):
    from jetdet.comfy import wrappers as wr

    return _every_call("cfgpp: dpmpp_2m_cfg_pp, CFG 1", model, conds,
                       dict(batch=8, steps=30, sampler="dpmpp_2m_cfg_pp", seed=0, cfg=1.0),
                       patch.object(wr, "_cfg_pp", lambda sampler: False))  # forecast as for any other sampler


def case_lcm(model, conds):
    from jetdet.comfy import shapes_model as sm
    from jetdet.comfy import wrappers as wr

    return _every_call("lcm: eps sigma", sm.as_variance_exploding(model, "eps"), conds,
                       dict(batch=2, steps=12, sampler="lcm", scheduler="karras", seed=3),
                       patch.object(wr, "_RENOISING", frozenset()),  # forecast as for any other sampler
                       None if step_noise_repeats_initial_noise() else
                       "this ComfyUI draws lcm's step noise apart from the initial noise, and the error estimate "
                       "finds no call smooth enough to forecast (README: the lcm sampler, fast mode)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", default=None, help="ComfyUI checkout (default: $COMFYUI_DIR)")
    ap.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    args = ap.parse_args(argv)
    import_comfyui(args.comfyui)
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    from jetdet.comfy import shapes_model as sm

    model = sm.load_model()
    conds = (sm.class_conditioning(3), sm.null_conditioning())
    failed = []
    for name in args.cases:
        t0 = time.perf_counter()
        ok = globals()[f"case_{name}"](model, conds)
        print(f"{name}: {'ok' if ok else 'FAILED: the fix does not beat its control'} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if not ok:
            failed.append(name)
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
