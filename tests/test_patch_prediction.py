"""``jetdet.patch(mode="fast", scheduler=...)`` on eps/v/sample (VP) models: the step cache sees the flow model a VP
model is equivalent to (jetdet/patch/prediction.py).

The reference is independent: :class:`jetdet.models.vp.VPModel` builds a VP model from the bundled flow model with
its own derivation (from alpha_bar, in float64), so the map's flow view of it must be the flow model itself."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import jetdet
from jetdet.models import bundled
from jetdet.models.evaluate import psnr
from jetdet.models.vp import VPModel, sd_alphas_cumprod
from jetdet.models.vp import sample as vp_sample
from jetdet.patch import prediction as pm

PREDICTIONS = ("epsilon", "v_prediction", "sample")


class _Sched:
    """The two things jetdet reads of a diffusers scheduler."""

    def __init__(self, prediction, ac=None):
        self.config = {"prediction_type": prediction}
        self.alphas_cumprod = sd_alphas_cumprod().float() if ac is None else ac


@pytest.fixture(scope="module")
def flow():
    return bundled.load_bundled()


def _inputs(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 3, 32, 32, generator=g), torch.tensor([999.0, 641.5, 260.0, 3.0][:b]),
            torch.tensor([0, 1, 2, bundled.NULL_LABEL][:b]))


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_the_flow_view_of_a_vp_model_is_the_flow_model(flow, prediction):
    """x, t and the output seen by the controller are the flow model's latent, time and velocity."""
    vp = VPModel(flow, prediction=prediction)
    x, t, y = _inputs()
    param = pm.from_options(_Sched(prediction))
    xf, tf, run, finish = param.wrap(x, t, lambda rows: vp(x, t, y))
    ab = sd_alphas_cumprod()[t.long()]  # integer timesteps except 641.5, checked through VPModel below
    ab = torch.where(t == t.round(), ab, vp.alpha_bar(t))
    a, s = ab.sqrt(), (1 - ab).sqrt()
    want_t = (s / (a + s)).float()
    want_x = (x.double() / (a + s).reshape(-1, 1, 1, 1)).float()
    torch.testing.assert_close(tf, want_t, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(xf, want_x, rtol=1e-5, atol=1e-6)
    v = run(None)
    torch.testing.assert_close(v, flow(want_x, want_t, y), rtol=2e-4, atol=2e-4)
    assert finish(v) is not None and torch.equal(finish(v), vp(x, t, y))  # all rows ran: the model's own output


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_forecast_rows_go_back_through_the_inverse_and_run_rows_are_the_models(flow, prediction):
    vp = VPModel(flow, prediction=prediction)
    x, t, y = _inputs()
    ref = vp(x, t, y)
    param = pm.from_options(_Sched(prediction))
    xf, tf, run, finish = param.wrap(x, t, lambda rows: vp(x[rows], t[rows], y[rows]))
    rows = torch.tensor([1, 3])
    v_rows = run(rows)
    v_all = flow(xf, tf, y)  # the exact velocity stands in for a forecast of rows 0 and 2
    v_all[rows] = v_rows
    out = finish(v_all)
    assert torch.equal(out[rows], vp(x[rows], t[rows], y[rows]))
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)


def test_forecast_only_call_keeps_the_models_dtype(flow):
    vp = VPModel(copy.deepcopy(flow)).to(torch.float64)  # a copy: the fixture is shared
    x, t, y = _inputs()
    x = x.double()
    param = pm.from_options(_Sched("epsilon"))
    _, tf, run, _ = param.wrap(x, t, lambda rows: vp(x, t, y))
    run(None)  # a call that ran: the dtype is seen
    xf2, tf2, _, finish2 = param.wrap(x, t, lambda rows: pytest.fail("no row should run"))
    assert finish2(torch.zeros_like(xf2)).dtype == torch.float64


def test_budget_zero_is_the_model_bit_for_bit(flow):
    vp = VPModel(flow)
    x, t, y = _inputs()
    ref = vp(x, t, y)
    with jetdet.patch(vp, mode="fast", budget=0.0, scheduler=_Sched("epsilon")) as h:
        assert torch.equal(vp(x, t, y), ref)
        assert h.stats()["prediction"].startswith("epsilon")


def _sample(model, scheduler, seed, steps=20, cfg=4.0, labels=(0, 1, 2, 3)):
    with torch.no_grad():
        return vp_sample(model, scheduler, labels, seed, bundled.NULL_LABEL, steps, cfg)


def _fast(flow, pred, make_sched, **opts):
    vp = VPModel(flow, make_sched().alphas_cumprod, pred)
    ref = _sample(vp, make_sched(), 0)
    rows = []
    hook = flow.register_forward_pre_hook(lambda _m, a: rows.append(a[0].shape[0]))
    try:
        with jetdet.patch(vp, mode="fast", **opts) as h:
            out = _sample(vp, make_sched(), 0)
            log = [(e["run"], e["forecast"], [r["decision"] for r in e["rows"]]) for e in h.controller.decision_log]
    finally:
        hook.remove()
    return float(psnr(out, ref).mean()), sum(rows), log


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m"])
def test_eps_model_in_diffusers_keeps_the_quality_of_the_default_budget(flow, scheduler):
    """Default quality, 20 steps, CFG 4, one seed x 4 classes, the scheduler's own loop. Measured (rows computed of
    160): with scheduler= euler 35.98 dB (112), dpm++ 2m 41.48 dB (126); forecast as is (the control, jetdet before
    scheduler=): 25.18 dB (56) and 23.20 dB (61)."""
    diffusers = pytest.importorskip("diffusers")
    from jetdet.models.vp import SD_SCHEDULE

    cls = {"euler": diffusers.EulerDiscreteScheduler, "dpmpp_2m": diffusers.DPMSolverMultistepScheduler}[scheduler]

    def make():
        return cls(**SD_SCHEDULE, prediction_type="epsilon")

    full = 20 * 8
    mapped, rows_m, _ = _fast(flow, "epsilon", make, scheduler=make())
    as_is, rows_a, _ = _fast(flow, "epsilon", make, prediction="flow")
    assert rows_m < 0.8 * full, rows_m  # it does skip
    assert mapped > 33.0, mapped
    assert as_is < 30.0, as_is  # the control: what the same budget gave before


def test_eps_and_v_models_of_one_flow_model_get_the_same_decisions(flow):
    """The same flow model as an eps and as a v model: the controller sees the same flow model in both, so it makes
    the same decisions (bit-identical inputs are not expected, only the same runs and skips)."""
    diffusers = pytest.importorskip("diffusers")
    from jetdet.models.vp import SD_SCHEDULE

    runs = {}
    for pred in ("epsilon", "v_prediction"):
        def make(pred=pred):
            return diffusers.EulerDiscreteScheduler(**SD_SCHEDULE, prediction_type=pred)

        runs[pred] = _fast(flow, pred, make, scheduler=make())
    (p_e, r_e, log_e), (p_v, r_v, log_v) = runs["epsilon"], runs["v_prediction"]
    assert r_e == r_v and log_e == log_v
    assert abs(p_e - p_v) < 0.5


def test_timesteps_hint_is_mapped(flow):
    diffusers = pytest.importorskip("diffusers")
    from jetdet.models.vp import SD_SCHEDULE

    sched = diffusers.EulerDiscreteScheduler(**SD_SCHEDULE)
    sched.set_timesteps(20)
    vp = VPModel(flow, sched.alphas_cumprod)
    with jetdet.patch(vp, mode="fast", scheduler=sched, timesteps=sched.timesteps, start_percent=0.2) as h:
        hint = h.controller.timesteps
        assert len(hint) == 20 and all(0 < v < 1 for v in hint) and hint == sorted(hint, reverse=True)
        sig = ((1 - sched.alphas_cumprod[999]) / sched.alphas_cumprod[999]).sqrt().item()
        assert hint[0] == pytest.approx(sig / (1 + sig), rel=1e-5)


def test_flow_schedulers_and_prediction_flow_leave_the_output_as_is():
    diffusers = pytest.importorskip("diffusers")
    assert pm.from_options(diffusers.FlowMatchEulerDiscreteScheduler()) is None
    assert pm.from_options(None, "flow") is None
    assert pm.from_options(_Sched("epsilon"), "flow") is None
    assert pm.from_options(diffusers.DDIMScheduler(prediction_type="v_prediction")).prediction == "v_prediction"
    assert pm.from_options(_Sched("epsilon"), "sample").prediction == "sample"  # prediction= wins
    svd = diffusers.EulerDiscreteScheduler(prediction_type="v_prediction", timestep_type="continuous")
    p = pm.from_options(svd)
    assert p.continuous and float(p.sigma(0.25 * torch.tensor([2.0]).log())) == pytest.approx(2.0)  # t = log(s) / 4


def test_bad_options_name_the_argument():
    with pytest.raises(ValueError, match="prediction"):
        pm.from_options(None, "eps")
    with pytest.raises(ValueError, match="scheduler"):
        pm.from_options(None, "epsilon")
    with pytest.raises(TypeError, match="alphas_cumprod"):
        pm.from_options(object(), "epsilon")
    with pytest.raises(ValueError, match="prediction type"):
        pm.from_options(_Sched("mystery"))
    with pytest.raises(ValueError, match="alphas_cumprod"):
        pm.from_options(_Sched("epsilon", torch.tensor([1.0, 0.5])))
    model = VPModel(bundled.BundledDiT())
    with pytest.raises(ValueError, match="prediction"):
        jetdet.patch(model, mode="fast", prediction="noise")
    assert jetdet.patch(model, mode="fast", scheduler=_Sched("epsilon")).remove() is None  # nothing left behind
    assert "forward" not in model.__dict__


def test_a_diffusers_unet_without_scheduler_warns_once():
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 8), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))
    from jetdet.patch import _warned_unmapped

    _warned_unmapped.discard("UNet2DModel")
    with pytest.warns(UserWarning, match="scheduler=pipe.scheduler"):
        jetdet.patch(unet, mode="fast").remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jetdet.patch(unet, mode="fast").remove()  # once per class
        _warned_unmapped.discard("UNet2DModel")
        jetdet.patch(unet, mode="fast", scheduler=diffusers.DDPMScheduler()).remove()  # told: no warning
        jetdet.patch(unet, mode="fast", prediction="flow").remove()


def test_a_pipeline_is_refused_with_the_call_that_works():
    class Pipe:  # what jetdet reads of a diffusers pipeline
        def __init__(self):
            self.unet = VPModel(bundled.BundledDiT())
            self.scheduler = _Sched("epsilon")

    with pytest.raises(TypeError, match=r"jetdet.patch\(pipe.unet, mode='fast', scheduler=pipe\)"):
        jetdet.patch(Pipe(), mode="fast")
    # in deterministic mode every module that sees the batch, or the whole call in the mode (README "Prompts too");
    # before, deterministic mode was told the fast-mode call (a user trial)
    det = Pipe()
    det.vae, det.text_encoder, det.tokenizer = torch.nn.Conv2d(1, 1, 1), torch.nn.Linear(1, 1), object()
    want = (r"patch each module that sees the batch: pipe.text_encoder, pipe.unet, pipe.vae "
            r"\(jetdet.patch\(pipe.unet, mode='deterministic'\), ...\), or run the call in "
            r"`with jetdet.mode\('deterministic'\):`")
    with pytest.raises(TypeError, match=want) as e:
        jetdet.patch(det, mode="deterministic")
    assert "fast" not in str(e.value)
    # the scheduler argument given something else than a scheduler; a compiled model in fast mode (a user trial's
    # misleading messages: "str says neither a prediction type...", and latent_arg= for the compiled module's
    # forward(*args)); deterministic mode patches a compiled module as before (tests/test_compile.py)
    pipe, model = Pipe(), VPModel(bundled.BundledDiT())
    with pytest.raises(TypeError, match=r"scheduler: expected the scheduler object .* got str 'euler'"):
        jetdet.patch(model, mode="fast", scheduler="euler")
    pipe.scheduler = None
    with pytest.raises(TypeError, match=r"scheduler: got a Pipe whose .scheduler is NoneType, not a diffusers sch"):
        jetdet.patch(model, mode="fast", scheduler=pipe)
    pipe.scheduler = _Sched("epsilon")
    compiled = torch.compile(model)
    with pytest.raises(TypeError, match=r"torch.compile'd module \(wrapping VPModel\).*Patch the model itself"):
        jetdet.patch(compiled, mode="fast")
    assert jetdet.patch(model, mode="fast", scheduler=pipe.scheduler).remove() is None  # nothing was left patched


def test_pndm_warns_once():
    diffusers = pytest.importorskip("diffusers")
    from jetdet.patch import _warned_unmapped

    model = VPModel(bundled.BundledDiT())
    for cls in (diffusers.PNDMScheduler, diffusers.LMSDiscreteScheduler):
        _warned_unmapped.discard(cls.__name__)
        with pytest.warns(UserWarning, match=cls.__name__):
            jetdet.patch(model, mode="fast", scheduler=cls()).remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jetdet.patch(model, mode="fast", scheduler=diffusers.PNDMScheduler()).remove()
        jetdet.patch(model, mode="fast", scheduler=diffusers.DDIMScheduler()).remove()


def test_an_unmeasured_scheduler_warns_once():
    """A diffusers scheduler fast mode has not been measured with (the README's table lists those it has) gets one
    warning naming it; measured ones and the warned multistep ones get no second warning."""
    diffusers = pytest.importorskip("diffusers")
    from jetdet.patch import _warned_unmapped
    from jetdet.patch.prediction import MEASURED

    model = VPModel(bundled.BundledDiT())
    _warned_unmapped.discard("FlowMatchHeunDiscreteScheduler:unmeasured")
    with pytest.warns(UserWarning, match="not been measured with FlowMatchHeunDiscreteScheduler"):
        jetdet.patch(model, mode="fast", scheduler=diffusers.FlowMatchHeunDiscreteScheduler()).remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        jetdet.patch(model, mode="fast", scheduler=diffusers.FlowMatchHeunDiscreteScheduler()).remove()  # once
        for name in ("DEISMultistepScheduler", "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler"):
            assert name in MEASURED
            jetdet.patch(model, mode="fast", scheduler=getattr(diffusers, name)()).remove()
    # (KDPM2's constructor alone emits ~4,000 numpy DeprecationWarnings in diffusers: checked by name only)
    assert "KDPM2DiscreteScheduler" in MEASURED


def test_kdpm2_ancestral_computes_every_call(flow):
    """KDPM2 ancestral calls the model at 749.2504 and then 749.25 with new noise between: a forecast there cost 17 dB
    at any budget (break-it run), so with it fast mode runs every call, and says so once."""
    diffusers = pytest.importorskip("diffusers")
    from jetdet.models.vp import SD_SCHEDULE
    from jetdet.patch import _warned_unmapped

    _warned_unmapped.discard("KDPM2AncestralDiscreteScheduler:renoise")

    def make():
        return diffusers.KDPM2AncestralDiscreteScheduler(**SD_SCHEDULE)

    with pytest.warns(UserWarning, match="computes every call"):
        p, rows, _ = _fast(flow, "epsilon", make, scheduler=make())
    assert p == float("inf") and rows == 8 * 39, (p, rows)


def test_a_scheduler_that_adds_noise_gets_the_denoised_image_forecast(flow):
    """Ancestral and SDE schedulers add new noise to the latent every step, which a forecast of the output cannot
    follow: with ``scheduler=`` such a scheduler gets ``forecast_space="x0"`` (the denoised image, the controller's
    route for ComfyUI's noisy samplers), and skips calls within the budget. Measured (DPM++ SDE, 30 steps, 59 calls,
    one seed x 4 classes, budget 0.1): 47 calls at 42.99 dB; forecasting the output (the control, jetdet before) 59,
    every call. At the default budget both compute every call on this model."""
    diffusers = pytest.importorskip("diffusers")
    from jetdet.models.vp import SD_SCHEDULE

    def make():
        return diffusers.DPMSolverSDEScheduler(**SD_SCHEDULE)

    vp = VPModel(flow, make().alphas_cumprod, "epsilon")
    ref = _sample(vp, make(), 0, steps=30)
    got = {}
    for space in ("x0", "output"):
        opts = {} if space == "x0" else {"forecast_space": "output"}
        with jetdet.patch(vp, mode="fast", scheduler=make(), budget=0.1, **opts) as h:
            out = _sample(vp, make(), 0, steps=30)
            got[space] = (float(psnr(out, ref).mean()), h.stats()["cache"])
    p, st = got["x0"]
    assert st["forecast_space"] == "x0" and st["piggyback"] == 0.0
    assert st["calls_run"] <= 52 and p > 38.0, (p, st["calls_run"])
    assert got["output"][1]["calls_run"] == 59 and got["output"][1]["forecast_space"] == "output"
    # an SDE algorithm of DPM-Solver is recognised too
    with jetdet.patch(vp, mode="fast", scheduler=diffusers.DPMSolverMultistepScheduler(
            **SD_SCHEDULE, algorithm_type="sde-dpmsolver++")) as h:
        assert h.controller.forecast_space == "x0"
    with jetdet.patch(vp, mode="fast", scheduler=diffusers.DPMSolverMultistepScheduler(**SD_SCHEDULE)) as h:
        assert h.controller.forecast_space == "output"
    # DDPM's parallel-sampling twin (its step is DDPM's, new noise every step; a user trial: it was not on the list)
    with jetdet.patch(vp, mode="fast", scheduler=diffusers.DDPMParallelScheduler(**SD_SCHEDULE)) as h:
        assert h.controller.forecast_space == "x0"


def test_where_the_denoised_image_forecast_cannot_be_used_it_says_why():
    """The denoised-image forecast needs flow time (a VP model mapped through ``scheduler=``) and an output shaped
    like the latent: an inpainting U-Net (9 channels in, 4 out), a learned variance (4 in, 8 out) and a model
    forecast as it is (``prediction="flow"``) keep forecasting the output, with one warning naming the reason."""
    diffusers = pytest.importorskip("diffusers")
    from jetdet.models.vp import SD_SCHEDULE
    from jetdet.patch import _warned_unmapped

    cases = [(_unet_channels(9, 4), {}, "its output has 4 channels and the latent 9"),
             (_unet_channels(4, 8), {}, "its output has 8 channels and the latent 4"),
             (VPModel(bundled.BundledDiT()), {"prediction": "flow"}, "the model is forecast as it is")]
    for model, opts, why in cases:
        _warned_unmapped.discard("EulerAncestralDiscreteScheduler:noisy")
        with pytest.warns(UserWarning, match=why):
            h = jetdet.patch(model, mode="fast", scheduler=diffusers.EulerAncestralDiscreteScheduler(**SD_SCHEDULE),
                             **opts)
        assert h.controller.forecast_space == "output"
        h.remove()
    with warnings.catch_warnings():  # asked for: no warning, the option wins
        warnings.simplefilter("error", UserWarning)
        _warned_unmapped.discard("EulerAncestralDiscreteScheduler:noisy")
        h = jetdet.patch(_unet_channels(4, 4), mode="fast", forecast_space="x0",
                         scheduler=diffusers.EulerAncestralDiscreteScheduler(**SD_SCHEDULE))
        assert h.controller.forecast_space == "x0"
        h.remove()


@pytest.mark.parametrize("name", ["LCMScheduler", "TCDScheduler"])
def test_consistency_schedulers_compute_every_call(name):
    """LCM and TCD replace the latent with the denoised estimate plus new noise at every step: forecasting an output
    there cost 13.8 dB mean (6.0 min) after a single forecast call (bench/diffusers_eps.py --schedulers lcm, as
    is), so fast mode runs them at budget 0, and says so once."""
    diffusers = pytest.importorskip("diffusers")
    from jetdet.models.vp import SD_SCHEDULE
    from jetdet.patch import _warned_unmapped

    _warned_unmapped.discard(f"{name}:renoise")
    for opts in ({}, {"prediction": "flow"}):
        with pytest.warns(UserWarning, match="fast mode computes every call with it"):
            h = jetdet.patch(VPModel(bundled.BundledDiT()), mode="fast",
                             scheduler=getattr(diffusers, name)(**SD_SCHEDULE), **opts)
        assert h.controller.budget == 0.0
        h.remove()
        _warned_unmapped.discard(f"{name}:renoise")


def test_the_flow_matching_lcm_scheduler_computes_every_call():
    """FlowMatchLCMScheduler (LCM for flow models) replaces the latent with the denoised estimate plus new noise at
    every step, as LCM does: fast mode runs it at budget 0, and says so once (a user trial: it had only the
    "not measured" warning and kept the budget)."""
    diffusers = pytest.importorskip("diffusers")
    from jetdet.patch import _warned_unmapped

    _warned_unmapped.discard("FlowMatchLCMScheduler:renoise")
    with pytest.warns(UserWarning, match="fast mode computes every call with it"):
        h = jetdet.patch(bundled.BundledDiT(), mode="fast", scheduler=diffusers.FlowMatchLCMScheduler())
    assert h.controller.budget == 0.0
    h.remove()


class _LoopPipe:
    """What a diffusers pipeline does with its scheduler, for :func:`test_a_pipeline_as_scheduler_follows_a_swap`:
    ``set_timesteps`` at the start of every run, then ``scale_model_input`` / one batched CFG call / ``step`` per
    step, over the schedule's steps ``start:stop`` (img2img starts later, an interrupted run stops early)."""

    def __init__(self, unet, scheduler):
        self.unet, self.scheduler = unet, scheduler

    def __call__(self, lat, steps=20, start=0, stop=None, labels=(0, 1, 2, 3)):
        s = self.scheduler
        s.set_timesteps(steps)
        y = torch.tensor(list(labels) + [bundled.NULL_LABEL] * len(labels))
        if start:
            s.set_begin_index(start)
        with torch.no_grad():
            for t in s.timesteps[start:stop]:
                out = self.unet(s.scale_model_input(torch.cat([lat, lat]), t), t, y)
                c, u = out.chunk(2)
                lat = s.step(u + 4.0 * (c - u), t, lat).prev_sample
        return lat


def test_a_pipeline_as_scheduler_follows_a_swap(flow):
    """``scheduler=pipe`` follows ``pipe.scheduler``: after ``pipe.scheduler = X.from_config(...)`` (a web app that
    picks the scheduler per request), the new one's runs are seen, so an img2img run after an interrupted txt2img
    starts afresh (equal to a fresh patch's). With ``scheduler=pipe.scheduler`` (the control) the old scheduler is
    never set again, and the img2img run was forecast from the stopped run's history (a user trial: 23.75 off where
    the result's largest value was 4.83). A new scheduler with another output map or noise rule is warned about and
    the model then runs every call as it is."""
    diffusers = pytest.importorskip("diffusers")
    from jetdet.models.vp import SD_SCHEDULE

    vp = VPModel(flow, sd_alphas_cumprod(), "epsilon")
    g = torch.Generator().manual_seed(3)
    noise, fresh = torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)

    def euler():
        return diffusers.EulerDiscreteScheduler(**SD_SCHEDULE)

    def img2img(pipe):  # starts at step 10 of 20, from a latent unrelated to the stopped run's
        return pipe(fresh * pipe.scheduler.sigmas[10], start=10)

    def scenario(follow: bool, new):
        pipe = _LoopPipe(vp, euler())
        with jetdet.patch(vp, mode="fast", scheduler=pipe if follow else pipe.scheduler, budget=0.2) as h:
            pipe(noise * pipe.scheduler.init_noise_sigma, stop=10)  # stopped after 10 of 20 steps
            pipe.scheduler = new.from_config(pipe.scheduler.config)
            return img2img(pipe), h.stats()["cache"]

    pipe = _LoopPipe(vp, euler())
    with jetdet.patch(vp, mode="fast", scheduler=pipe, budget=0.2):
        want = img2img(pipe)  # a fresh patch's img2img
    got, st = scenario(True, diffusers.EulerDiscreteScheduler)
    assert torch.equal(got, want) and st["calls_saved"] > 0, st
    stale, _ = scenario(False, diffusers.EulerDiscreteScheduler)
    assert not torch.equal(stale, want)  # the control: the swap unseen
    pipe = _LoopPipe(vp, euler())
    with jetdet.patch(vp, mode="fast", scheduler=pipe, budget=0.2) as h:
        pipe(noise * pipe.scheduler.init_noise_sigma, stop=10)
        pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
        with pytest.warns(UserWarning, match=r"scheduler is now a EulerAncestralDiscreteScheduler.*every call") as w:
            img2img(pipe)
        mine = [x for x in w if "pipe.scheduler is now" in str(x.message)]
        assert mine[0].filename == __file__  # it points at the caller, not into torch
        assert h.stats()["cache"]["calls"] == 10  # the 10 stopped-run calls only: the img2img calls bypassed it
        assert h.stats()["calls_bypassed"] == 10  # and stats say so (a walkthrough read the old run's 11 saved alone)
        pipe.scheduler = euler()  # back to one like the patch's (a web app picking per request): cached again
        assert torch.equal(img2img(pipe), want) and h.stats()["cache"]["calls"] == 20  # through the cache again


@pytest.mark.parametrize("first,then", [("EulerDiscreteScheduler", "DPMSolverMultistepScheduler"),
                                        ("PNDMScheduler", "EulerDiscreteScheduler"),
                                        ("DDIMScheduler", "UniPCMultistepScheduler")])
def test_a_swap_between_schedulers_with_the_same_rules_keeps_the_cache(flow, first, then):
    """The commonest swaps (SD1.5's default PNDM to Euler, Euler to DPM++ 2M) are between schedulers with the same
    output map and noise rule. Only Euler's config names ``timestep_type`` ("discrete", its default), so a user
    trial saw such a swap warned as "another output map or noise" and the model then run every call (0 saved).
    A scheduler that does not name it uses discrete timesteps too: the patch follows the swap, without a warning."""
    import warnings

    diffusers = pytest.importorskip("diffusers")
    from jetdet.models.vp import SD_SCHEDULE

    vp = VPModel(flow, sd_alphas_cumprod(), "epsilon")
    noise = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    pipe = _LoopPipe(vp, getattr(diffusers, first)(**SD_SCHEDULE))
    with jetdet.patch(vp, mode="fast", scheduler=pipe, budget=0.2) as h:
        pipe.scheduler = getattr(diffusers, then).from_config(pipe.scheduler.config)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            pipe(noise * pipe.scheduler.init_noise_sigma)
        assert not [x for x in w if "scheduler is now" in str(x.message)], [str(x.message) for x in w]
        st = h.stats()["cache"]
        assert st["calls"] == 20 and st["calls_saved"] > 0, st



@pytest.mark.parametrize("then,says", [("PNDMScheduler", "4th-order multistep formula"),
                                       ("DDIMParallelScheduler", "not been measured with DDIMParallelScheduler")])
def test_a_swap_to_a_scheduler_patching_warns_about_warns_too(flow, then, says):
    """``scheduler=pipe`` follows a swap to a scheduler with the same rules, so it caches with it: a scheduler that
    ``jetdet.patch`` warns about (PNDM's multistep formula amplifies a forecast's error; an unmeasured one) gets the
    same warning, once, when the pipeline first samples with it. Before, only a patch made with it warned, and a swap
    from Euler to PNDM cached silently (a user trial)."""
    diffusers = pytest.importorskip("diffusers")
    from jetdet.models.vp import SD_SCHEDULE
    from jetdet.patch import _warned_unmapped

    vp = VPModel(flow, sd_alphas_cumprod(), "epsilon")
    noise = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    pipe = _LoopPipe(vp, diffusers.EulerDiscreteScheduler(**SD_SCHEDULE))
    _warned_unmapped.difference_update({then, then + ":unmeasured"})
    with jetdet.patch(vp, mode="fast", scheduler=pipe, budget=0.2) as h:
        pipe.scheduler = getattr(diffusers, then).from_config(pipe.scheduler.config)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            pipe(noise * pipe.scheduler.init_noise_sigma)
        mine = [x for x in w if says in str(x.message)]
        assert len(mine) == 1 and mine[0].filename == __file__, [str(x.message) for x in w]
        assert h.stats()["cache"]["calls_saved"] > 0  # still cached: the same rules
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            pipe.scheduler = getattr(diffusers, then).from_config(pipe.scheduler.config)
            pipe(noise * pipe.scheduler.init_noise_sigma)
        assert not [x for x in w if says in str(x.message)]  # once

def _unet_channels(cin, cout):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=cin, out_channels=cout, layers_per_block=1,
                                 block_out_channels=(8, 8), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()


@pytest.mark.parametrize("cin,cout", [(9, 4), (8, 4), (4, 8)], ids=["inpaint", "pix2pix", "learned-variance"])
def test_output_channels_other_than_the_latents(cin, cout):
    """An inpainting/pix2pix U-Net takes extra channels beside the noisy latent and a learned-variance model returns
    twice the channels: the map acts on the first min(C_in, C_out) channels (the rest of the output passes as it is);
    budget 0 is the model bit for bit, and a forecast row goes back to the model's output (the exact flow velocity
    standing in for the forecast)."""
    diffusers = pytest.importorskip("diffusers")
    unet = _unet_channels(cin, cout)
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(3, cin, 8, 8, generator=g), torch.tensor([900.0, 400.0, 30.0])
    with torch.no_grad():
        ref = unet(x, t).sample
        with jetdet.patch(unet, mode="fast", budget=0.0, scheduler=diffusers.DDIMScheduler()):
            assert torch.equal(unet(x, t).sample, ref)
        param = pm.from_options(diffusers.DDIMScheduler())
        _, _, run, finish = param.wrap(x, t, lambda rows: unet(x if rows is None else x[rows], t if rows is None
                                                                else t[rows]).sample)
        v = run(None)
        assert v.shape == ref.shape
        _, _, run2, finish2 = param.wrap(x, t, lambda rows: pytest.fail("no row runs"))
        torch.testing.assert_close(finish2(v), ref, rtol=1e-4, atol=1e-4)
        c = min(cin, cout)
        assert torch.equal(finish2(v)[:, c:], ref[:, c:])  # the variance half passes as it is


def test_zero_terminal_snr_schedules_are_mapped(flow):
    """rescale_betas_zero_snr=True leaves alphas_cumprod[-1] = 0 in DDIM (sigma = inf, flow time 1); a v model
    samples there, budget 0 bit for bit, and the default budget keeps the image."""
    diffusers = pytest.importorskip("diffusers")
    from jetdet.models.vp import SD_SCHEDULE

    def make():
        return diffusers.DDIMScheduler(**SD_SCHEDULE, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                       timestep_spacing="trailing", clip_sample=False)

    assert float(make().alphas_cumprod[-1]) == 0.0
    param = pm.from_options(make())
    assert param.flow_time(999) == 1.0 and param.flow_time(0) < 0.05
    p0, rows0, _ = _fast(flow, "v_prediction", make, scheduler=make(), budget=0.0)
    assert p0 == float("inf") and rows0 == 160
    p, rows, _ = _fast(flow, "v_prediction", make, scheduler=make())
    assert rows < 160 and p > 33.0, (p, rows)


def test_schedulers_jetdet_cannot_map_are_named():
    diffusers = pytest.importorskip("diffusers")
    with pytest.raises(TypeError, match="EDM"):
        pm.from_options(diffusers.EDMEulerScheduler())
    with pytest.raises(TypeError, match="prediction='flow'"):
        pm.from_options(diffusers.IPNDMScheduler())
    assert pm.from_options(diffusers.IPNDMScheduler(), "flow") is None
    # the class instead of the object (a user trial: the old message blamed a missing prediction type)
    with pytest.raises(TypeError, match=r"scheduler: got the class EulerDiscreteScheduler; pass the scheduler object"):
        pm.from_options(diffusers.EulerDiscreteScheduler)


def _sdxl_unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8).eval()


def test_sdxl_added_cond_kwargs_are_sliced_with_the_rows():
    """SDXL's U-Net takes per-row text_embeds and time_ids in a dict (added_cond_kwargs): a call the cache runs on
    some rows only must pass those rows of it (it failed with a shape error before the adapter sliced dicts)."""
    diffusers = pytest.importorskip("diffusers")
    unet = _sdxl_unet()
    g = torch.Generator().manual_seed(1)
    b = 4
    x, ehs = torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 5, 16, generator=g)
    added = {"text_embeds": torch.randn(b, 16, generator=g), "time_ids": torch.randn(b, 6, generator=g)}
    kept = {k: v.clone() for k, v in added.items()}
    with torch.no_grad():
        full = unet(x, 500, encoder_hidden_states=ehs, added_cond_kwargs=added).sample
        with jetdet.patch(unet, mode="fast", scheduler=diffusers.EulerDiscreteScheduler()) as h:
            call, finish = h.adapter.bind((x, torch.tensor(500)),
                                          {"encoder_hidden_states": ehs, "added_cond_kwargs": added})
            part = call.run(torch.tensor([0, 2]))
            whole = call.run(None)
    assert all(torch.equal(added[k], kept[k]) for k in kept) and set(added) == set(kept)  # the user's dict as it was
    assert part.shape == (2, 4, 8, 8)
    torch.testing.assert_close(part, whole[[0, 2]], rtol=1e-5, atol=1e-5)  # rows 0 and 2 of the whole call
    assert torch.equal(finish(whole), full)  # the whole call ran last: the model's own output


def test_sdxl_unet_samples_with_cfg_and_partial_calls():
    diffusers = pytest.importorskip("diffusers")
    from jetdet.models.vp import SD_SCHEDULE

    unet = _sdxl_unet()
    g = torch.Generator().manual_seed(3)
    b = 2
    ehs = torch.cat([torch.randn(b, 5, 16, generator=g), torch.zeros(b, 5, 16)])  # cond rows, then uncond
    added = {"text_embeds": torch.cat([torch.randn(b, 16, generator=g), torch.zeros(b, 16)]),
             "time_ids": torch.randn(1, 6, generator=g).expand(2 * b, 6)}
    sched = diffusers.EulerDiscreteScheduler(**SD_SCHEDULE)

    def sample():
        sched.set_timesteps(20)
        lat = torch.randn(b, 4, 8, 8, generator=torch.Generator().manual_seed(4)) * sched.init_noise_sigma
        with torch.no_grad():
            for t in sched.timesteps:
                o = unet(sched.scale_model_input(torch.cat([lat, lat]), t), t, encoder_hidden_states=ehs,
                         added_cond_kwargs=added).sample
                lat = sched.step(o[b:] + 5.0 * (o[:b] - o[b:]), t, lat).prev_sample
        return lat

    ref = sample()
    with jetdet.patch(unet, mode="fast", scheduler=sched, budget=0.2, piggyback=1.0) as h:
        out = sample()
        st = h.stats()["cache"]
    assert st["calls_partial"] > 0, st  # some calls ran some rows only
    assert torch.isfinite(out).all() and out.shape == ref.shape


def test_a_real_stable_diffusion_pipeline_runs_with_its_scheduler():
    """diffusers' own StableDiffusionPipeline loop (tiny random U-Net, VAE and CLIP text encoder; prompt embeddings
    given, so no tokenizer): budget 0 gives the pipeline's latents bit for bit, the default budget saves calls, and
    the pipeline itself is refused with the call that works."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    from jetdet.models.vp import SD_SCHEDULE

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                                  latent_channels=4, norm_num_groups=4, sample_size=32)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, eos_token_id=2, bos_token_id=1, pad_token_id=1))
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=None, unet=unet,
        scheduler=diffusers.DPMSolverMultistepScheduler(**SD_SCHEDULE, steps_offset=1), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(5)
    embeds = {"prompt_embeds": torch.randn(2, 7, 16, generator=g), "negative_prompt_embeds": torch.zeros(2, 7, 16)}

    def latents():
        return pipe(**embeds, num_inference_steps=20, guidance_scale=5.0, generator=torch.Generator().manual_seed(1),
                    output_type="latent", height=32, width=32).images

    ref = latents()
    with pytest.raises(TypeError, match=r"pipe.unet, mode='fast', scheduler=pipe\)"):
        jetdet.patch(pipe, mode="fast")
    with jetdet.patch(pipe.unet, mode="fast", scheduler=pipe.scheduler, budget=0.0):
        assert torch.equal(latents(), ref)
    with jetdet.patch(pipe.unet, mode="fast", scheduler=pipe.scheduler) as h:
        out = latents()
        st = h.stats()
    assert st["prediction"].startswith("epsilon") and st["cache"]["calls_saved"] > 0, st
    assert out.shape == ref.shape and torch.isfinite(out).all()
    with jetdet.patch(pipe.unet, mode="fast", scheduler=pipe):  # the pipeline: its scheduler followed, same result
        assert torch.equal(latents(), out)
    assert "forward" not in pipe.unet.__dict__  # removed
