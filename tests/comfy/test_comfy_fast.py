"""JetDetFastOptimizer / Mode Switch (fast) / Cache Manager in real ComfyUI: budget 0 is the model bit for bit,
state resets per sampling run, cond/uncond layouts form the same streams, the byte budget holds."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import require_comfyui

require_comfyui()
from _comfy_util import empty_latent, no_free_memory, with_call_log

from jetdet.comfy import wrappers as wr
from jetdet.comfy.nodes import JetDetCacheManager, JetDetFastOptimizer, JetDetModeSwitch, psnr_db


def _plain(model, pos, neg, batch=2, sampler="euler", steps=8, seed=3, scheduler="simple"):
    from jetdet.comfy.sampling import sample

    return sample(model, seed, steps, 4.0, sampler, scheduler, pos, neg, empty_latent(batch))


def _fast(model, budget, **kw):
    opts = dict(budget=budget, start_percent=0.0, end_percent=0.0, forecast="order1", max_consecutive_skips=8)
    opts.update(kw)
    return JetDetFastOptimizer.execute(model, **opts).args[0]


def test_budget_zero_is_the_model_bit_for_bit(shapes_patcher, shapes_conds):
    ref = _plain(shapes_patcher, *shapes_conds, sampler="heun", steps=5)
    fast = _fast(shapes_patcher, 0.0)
    assert torch.equal(_plain(fast, *shapes_conds, sampler="heun", steps=5), ref)
    assert wr.fast_state(fast).stats()["calls_saved"] == 0


def test_fast_skips_calls_and_stays_close(shapes_patcher, shapes_conds):
    logged, plain_log = with_call_log(shapes_patcher)
    ref = _plain(logged, *shapes_conds, steps=12)
    fast = _fast(shapes_patcher, 0.1)  # 0.2 with no end guard drifted to 28% on the 92% weights
    logged_fast, fast_log = with_call_log(fast)
    out = _plain(logged_fast, *shapes_conds, steps=12)
    s = wr.fast_state(fast).stats()
    assert len(plain_log.sizes) == 12 and s["calls"] == 12
    assert s["calls_run"] == len(fast_log.sizes) < 12  # skipped calls never reach the model
    assert s["rows_run"] == sum(fast_log.sizes)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.2, (rel, s)


def test_state_resets_for_every_sampling_run(shapes_patcher, shapes_conds):
    fast = _fast(shapes_patcher, 0.2)
    a = _plain(fast, *shapes_conds, steps=10)
    s1 = wr.fast_state(fast).stats()
    b = _plain(fast, *shapes_conds, steps=10)
    s2 = wr.fast_state(fast).stats()
    assert torch.equal(a, b)  # nothing of run 1 leaks into run 2
    assert s2["runs"] == 2 and s2["calls"] == s1["calls"] and s2["calls_run"] == s1["calls_run"]
    # a second-order sampler (two model calls per step, one at a repeated sigma) after a first-order one
    c = _plain(fast, *shapes_conds, sampler="heun", steps=6)
    d = _plain(_fast(shapes_patcher, 0.2), *shapes_conds, sampler="heun", steps=6)
    assert torch.equal(c, d)


def test_separate_cond_uncond_forms_the_same_streams(shapes_patcher, shapes_conds):
    fast = _fast(shapes_patcher, 0.2)
    together = _plain(fast, *shapes_conds, steps=10)
    st = wr.fast_state(fast).stats()
    with no_free_memory():
        apart = _plain(fast, *shapes_conds, steps=10)
    sa = wr.fast_state(fast).stats()
    assert sa["calls"] == 2 * st["calls"]  # cond and uncond as two calls per step
    assert sa["rows_saved"] == st["rows_saved"] > 0  # the same rows skipped at the same steps
    assert ((together - apart).norm() / together.norm()).item() < 1e-3


def test_byte_budget_holds_and_spills(shapes_patcher, shapes_conds):
    fast = _fast(shapes_patcher, 0.2)
    item = 16 * 32 * 32 * 4
    limited = JetDetCacheManager.execute("set_budget", fast, device_budget_mb=3 * item / 2**20, cpu_budget_mb=-1,
                                         disk_budget_mb=0).args[0]
    assert limited is not fast
    out = _plain(limited, *shapes_conds, batch=2, steps=10)
    s = wr.fast_state(limited).stats()
    m = s["manager"]
    assert 0 < s["bytes"]["device"] <= 3 * item and m["spilled_to_cpu"] > 0  # held at the end of the run
    assert torch.isfinite(out).all()
    # the input model's own cache keeps its (unlimited) budget
    assert wr.fast_state(fast).options.get("memory_budget_bytes") is None


def test_cache_manager_stats_and_clear(shapes_patcher, shapes_conds):
    fast = _fast(shapes_patcher, 0.2)
    _plain(fast, *shapes_conds, steps=8)
    report = JetDetCacheManager.execute("stats", fast).args[3]
    assert report.startswith("runs 1 (so far); last run: calls 8,") and "hits" in report and "bytes per tier" in report
    _plain(fast, *shapes_conds, steps=4)  # the counts are the last run's, the runs every run's
    assert JetDetCacheManager.execute("stats", fast).args[3].startswith("runs 2 (so far); last run: calls 4,")
    assert "budget 0.2, forecast_space output, piggyback 0.5" in report  # the options the run used (by sampler)
    # the last run's bytes are labelled as its; what is held now (nothing: a run frees its cache) is said apart
    end = 'bytes per tier at its end {"device": '
    assert end in report and end + "0," not in report
    assert report.endswith('; held now {"device": 0, "cpu": 0, "disk": 0}'), report
    report = JetDetCacheManager.execute("clear", fast).args[3]
    assert report.startswith("cleared") and report.endswith('held now {"device": 0, "cpu": 0, "disk": 0}')
    with pytest.raises(ValueError, match="no jetdet step cache; connect"):
        JetDetCacheManager.execute("stats", shapes_patcher)
    # a model in deterministic mode is named as such (a user trial read only "SD3 has no jetdet step cache")
    with pytest.raises(ValueError, match="no jetdet step cache \\(it is in jetdet's deterministic mode"):
        JetDetCacheManager.execute("stats", wr.with_deterministic(shapes_patcher))
    # only -1 means unlimited: -0.5 is an error naming the input (it was read as unlimited)
    for name in ("device_budget_mb", "cpu_budget_mb", "disk_budget_mb"):
        with pytest.raises(ValueError, match=f"{name}: expected megabytes >= 0, or -1 for unlimited, got -0.5"):
            JetDetCacheManager.execute("set_budget", fast, **{name: -0.5})
    assert JetDetCacheManager.execute("set_budget", fast, device_budget_mb=-1, cpu_budget_mb=-1.0,
                                      disk_budget_mb=-1).args[3].startswith("budgets (bytes, None = unlimited): ")


def test_recall_is_bit_exact_and_detects_a_changed_file(tmp_path):
    lat = {"samples": torch.randn(2, 16, 8, 8)}
    folder = str(tmp_path)
    out = JetDetCacheManager.execute("store", key="run-1.latent", latent=lat, folder=folder).args
    assert torch.equal(out[1]["samples"], lat["samples"])
    back = JetDetCacheManager.execute("recall", key="run-1.latent", folder=folder).args
    assert torch.equal(back[1]["samples"], lat["samples"])
    # the IMAGE output has nothing to give: ComfyUI's ExecutionBlocker with why, never None
    from comfy_execution.graph_utils import ExecutionBlocker

    assert isinstance(back[2], ExecutionBlocker) and isinstance(back[0], ExecutionBlocker)
    assert "IMAGE output is empty: key 'run-1.latent' holds a latent (2, 16, 8, 8)" in back[2].message
    img = torch.rand(1, 8, 8, 3)
    JetDetCacheManager.execute("store", key="pic", image=img, folder=folder)
    assert torch.equal(JetDetCacheManager.execute("recall", key="pic", folder=folder).args[2], img)
    path = tmp_path / "run-1.latent.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="does not match the checksum"):
        JetDetCacheManager.execute("recall", key="run-1.latent", folder=folder)
    with pytest.raises(ValueError, match="key:"):
        JetDetCacheManager.execute("store", key="../escape", latent=lat, folder=folder)
    with pytest.raises(FileNotFoundError, match="nothing stored"):
        JetDetCacheManager.execute("recall", key="never", folder=folder)


def test_mode_switch_modes(shapes_patcher, shapes_conds, caplog):
    """The modes replace each other (a step cache's per-row choices are not batch invariant), and the log says so
    when a node replaces one the model already had; a model with no jetdet mode, or mode off, logs nothing."""
    fast_opts = dict(budget=0.0, start_percent=0.0, end_percent=0.0, forecast="order1", max_consecutive_skips=8)
    with caplog.at_level("WARNING"):
        det = JetDetModeSwitch.execute(shapes_patcher, "deterministic", 0.05, True).args[0]
        assert not caplog.records
        assert wr.is_deterministic(det) and wr.fast_state(det) is None
        fast = JetDetModeSwitch.execute(det, "fast", 0.1, True).args[0]
        assert wr.fast_state(fast) is not None and not wr.is_deterministic(fast)
        assert "already in jetdet's deterministic mode; the output model is in fast mode only" in caplog.text
        assert "no longer batch invariant" in caplog.text
        caplog.clear()
        JetDetFastOptimizer.execute(fast, **fast_opts)
        assert "already in jetdet's fast mode; its fast mode's settings" in caplog.text
        caplog.clear()
        JetDetFastOptimizer.execute(det, **fast_opts)
        assert "Fast Optimizer: the model it was given is already in jetdet's deterministic mode" in caplog.text
        caplog.clear()
        off = JetDetModeSwitch.execute(fast, "off", 0.1, True).args[0]
        assert not caplog.records
    assert wr.jetdet_keys(off) == {}
    assert wr.jetdet_keys(shapes_patcher) == {}


@pytest.mark.filterwarnings("ignore:jetdet fast mode")  # the measured-error notice of the approximations
def test_opt_in_attention_replacements_reach_comfyuis_attention(shapes_patcher, shapes_conds):
    # ComfyUI's CPU attention is its sub-quadratic path, not SDPA: the replacements run the model with ComfyUI's
    # SDPA attention so they see every attention call (the MMDiT has 2 blocks: 2 joint attentions per forward)
    ref = _plain(shapes_patcher, *shapes_conds, steps=4)
    lin = _fast(shapes_patcher, 0.0, linear_attention="relu")
    out = _plain(lin, *shapes_conds, steps=4)
    s = wr.fast_state(lin).stats()["linear_attention"]
    assert s["replaced"] == 2 * 4 and s["checked"] == 2 and s["rel_err_mean"] > 0
    assert not torch.equal(out, ref)  # an approximation: it changes the output
    ac = _fast(shapes_patcher, 0.0, attention_cache=True)
    _plain(ac, *shapes_conds, steps=4)
    s = wr.fast_state(ac).stats()["attention_cache"]
    assert s["forwards"] == 4 and s["refreshed"] + s["reused"] > 0
    with pytest.raises(ValueError, match="choose one"):
        _fast(shapes_patcher, 0.1, linear_attention="relu", attention_cache=True)


def test_a_damaged_store_or_a_file_for_a_folder_is_a_clear_error(tmp_path):
    folder = str(tmp_path)
    JetDetCacheManager.execute("store", key="k", latent={"samples": torch.zeros(1, 4, 4, 4)}, folder=folder)
    (tmp_path / "k.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="key: .*k.safetensors, stored under 'k', is no longer a readable jetdet "
                                         "recall file"):
        JetDetCacheManager.execute("recall", key="k", folder=folder)
    a_file = tmp_path / "hostname"
    a_file.write_text("somehost\n")
    with pytest.raises(ValueError, match=f"folder: {a_file} is a file, not a folder"):
        JetDetCacheManager.execute("store", key="k", latent={"samples": torch.zeros(1)}, folder=str(a_file))
    with pytest.raises(ValueError, match="folder: cannot create the folder"):
        JetDetCacheManager.execute("store", key="k", latent={"samples": torch.zeros(1)},
                                   folder=str(a_file / "below"))


def test_a_tier_with_budget_zero_is_skipped_and_the_stats_say_so(shapes_patcher, shapes_conds):
    fast = _fast(shapes_patcher, 0.2)
    item = 16 * 32 * 32 * 4

    def run(device, cpu, disk):
        m = JetDetCacheManager.execute("set_budget", fast, device_budget_mb=device, cpu_budget_mb=cpu,
                                       disk_budget_mb=disk).args[0]
        _plain(m, *shapes_conds, batch=2, steps=8)
        return wr.fast_state(m).stats()["manager"], JetDetCacheManager.execute("stats", m).args[3]

    # no CPU and no disk tier: what leaves the device is dropped, nothing is written anywhere
    m, report = run(2 * item / 2**20, 0, 0)
    assert m["evicted"] > 0 and m["spilled_to_cpu"] == 0 and m["spilled_to_disk"] == 0, m
    assert "spilled_to_disk 0" in report and f"evicted {m['evicted']}" in report
    # no CPU tier, a disk tier: straight from the device to disk
    m, _ = run(2 * item / 2**20, 0, -1)
    assert m["spilled_to_disk"] > 0 and m["spilled_to_cpu"] == 0 and m["evicted"] == 0, m


def test_skip_layer_guidance_calls_get_streams_of_their_own(shapes_patcher, shapes_conds):
    """Skip Layer Guidance makes an extra cond-branch call per step with blocks replaced: another function of x than
    the sampler's own call. Filed under the cond rows' streams, the forecasts mixed the two and the guidance was
    mostly lost (an acceptance run: 12.7 dB against mode off at budget 0.05; here 19.8 dB, with SLG's effect 4.4 dB).
    Each kind of call now has its own streams (here 63.1 dB, 4 of 40 calls saved)."""
    from comfy_extras.nodes_sd3 import SkipLayerGuidanceSD3

    slg = SkipLayerGuidanceSD3.execute(shapes_patcher, layers="1", scale=3.0, start_percent=0.0,
                                       end_percent=1.0).args[0]
    steps = 20
    ref_plain = _plain(shapes_patcher, *shapes_conds, batch=3, steps=steps)
    ref = _plain(slg, *shapes_conds, batch=3, steps=steps)
    assert psnr_db(ref, ref_plain) < 35  # SLG changes the image: the check below can tell its loss
    fast = _fast(slg, 0.05)
    out = _plain(fast, *shapes_conds, batch=3, steps=steps)
    s = wr.fast_state(fast).stats()
    assert s["calls"] == 2 * steps and s["calls_saved"] > 0, s  # [cond; uncond] batched, and the SLG call
    assert psnr_db(out, ref) > 30, (psnr_db(out, ref), psnr_db(out, ref_plain), s)


def test_two_prompts_on_one_side_run_apart_keep_histories_of_their_own(shapes_patcher, shapes_conds):
    """Conditioning Combine of a 1-token and a 2-token prompt on the positive side: ComfyUI cannot batch them, so
    they reach the model in separate calls, both with cond_or_uncond 0. Each cond (ComfyUI's uuid) now has streams of
    its own. Before, they shared them: the second prompt reached the model once in 20 steps and was served the first
    one's output (a review's find: 26.3 dB against mode off, 40.2 dB against the first prompt alone)."""
    import nodes

    from jetdet.comfy import shapes_model as sm

    a, b7 = sm.class_conditioning(3), sm.class_conditioning(7)
    b = nodes.ConditioningConcat().concat(b7, b7)[0]
    neg = shapes_conds[1]

    def combined(x, y):
        return nodes.ConditioningCombine().combine(x, y)[0]

    ref = _plain(shapes_patcher, combined(a, b), neg, steps=20)
    only_a = _plain(shapes_patcher, combined(a, a), neg, steps=20)
    fast = _fast(shapes_patcher, 0.05)
    logged, log = with_call_log(fast)
    out = _plain(logged, combined(a, b), neg, steps=20)
    s = wr.fast_state(fast).stats()
    assert s["calls"] == 40 and s["calls_saved"] > 0, s  # [uncond; a] and [b] apart, each step
    assert psnr_db(out, ref) > 35 and psnr_db(out, ref) > psnr_db(out, only_a) + 5, (psnr_db(out, ref),
                                                                                     psnr_db(out, only_a), s)


def test_an_area_prompts_calls_on_a_crop_are_skipped_too(shapes_patcher, shapes_conds):
    """ConditioningSetArea: ComfyUI runs the area prompt's rows on a crop of the latent, in calls of their own between
    the full-size ones. Each shape change reset the whole cache, so nothing was ever skipped (a review: 40 of 40
    calls, 39 resets); streams keyed by cond now keep a shape each."""
    import nodes

    from jetdet.comfy import shapes_model as sm

    size = sm.LATENT_SIZE * 8 // 2
    area = nodes.ConditioningSetArea().append(sm.class_conditioning(7), size, size, 0, 0, 1.0)[0]
    pos = nodes.ConditioningCombine().combine(shapes_conds[0], area)[0]
    ref = _plain(shapes_patcher, pos, shapes_conds[1], steps=20)
    fast = _fast(shapes_patcher, 0.05)
    out = _plain(fast, pos, shapes_conds[1], steps=20)
    s = wr.fast_state(fast).stats()
    assert s["calls"] == 40 and s["calls_saved"] > 0 and s["resets"]["shape"] == 0, s
    assert psnr_db(out, ref) > 35, psnr_db(out, ref)


def test_perp_negs_empty_prompt_call_has_a_history_of_its_own(shapes_patcher, shapes_conds):
    """ComfyUI's Perp-Neg node calls the model once more per step for the empty prompt, also as cond_or_uncond 0.
    Sharing the positive rows' streams, it was served their output at the same sigma, Perp-Neg divided 0 by 0 and the
    latent was all NaN (a review's find)."""
    from comfy_extras.nodes_perpneg import PerpNeg

    model = PerpNeg.execute(shapes_patcher, shapes_conds[1], 1.0).args[0]  # the null class as the empty prompt
    ref = _plain(model, *shapes_conds, steps=20)
    out = _plain(_fast(model, 0.05), *shapes_conds, steps=20)
    assert torch.isfinite(out).all()
    assert psnr_db(out, ref) > 30, psnr_db(out, ref)


def test_call_kinds_from_comfyuis_own_patch_helpers(comfy_dir):
    """The kind of a call (its own streams) comes from the names and keys of its block replacements and patches,
    as ComfyUI's helpers set them: PAG's perturbed attn1 and SLG's skipped blocks are kinds of their own, the same
    replacement made with a new function (nodes make one per call) is the same kind."""
    import comfy.model_patcher as mp

    def fn(*a, **k):
        return a

    base = {"transformer_options": {}}
    pag = mp.set_model_options_patch_replace(dict(base), fn, "attn1", "middle", 0)
    pag_again = mp.set_model_options_patch_replace(dict(base), lambda *a, **k: a, "attn1", "middle", 0)
    slg = mp.set_model_options_patch_replace(dict(base), fn, "dit", "double_block", 1)
    slg2 = mp.set_model_options_patch_replace(dict(base), fn, "dit", "double_block", 2)
    kinds = [wr._patch_signature(o["transformer_options"]) for o in (base, pag, pag_again, slg, slg2)]
    assert kinds[1] == kinds[2]
    assert len({kinds[0], kinds[1], kinds[3], kinds[4]}) == 4
    patched = mp.set_model_options_post_cfg_function(dict(pag), fn)  # not a model call's option: same kind
    assert wr._patch_signature(patched["transformer_options"]) == kinds[1]


@pytest.mark.parametrize("sampling", ["eps", "edm"])
def test_variance_exploding_sigma_keeps_the_flow_models_quality(shapes_patcher, shapes_conds, monkeypatch, sampling):
    """eps, v and EDM models (SD1.5, SDXL, SD2, Cosmos...) are sampled in variance-exploding sigma (0.029-14.6 for
    SD1.5's table, 0.002-80 for EDM). The step cache sees them as the flow model each is equivalent to: the trained
    shapes model sampled in those sigmas (the same ODE) keeps the quality it has in its own flow sigma at the same
    budget (karras, 20 steps, budget 0.05: flow sigma 39.8 dB with 12 of 20 calls saved; eps 39.9 dB, 13 saved; EDM
    40.8 dB, 9 saved). Forecasting the noise prediction in sigma, as before, skipped 16 of 20 calls at 29.7 dB (eps)
    and 25.7 dB (EDM): a budget that no longer bounded the error (negative control)."""
    from jetdet.comfy import shapes_model as sm

    ve = sm.as_variance_exploding(shapes_patcher, sampling)
    kw = dict(batch=2, steps=20, scheduler="karras")
    ref = _plain(ve, *shapes_conds, **kw)
    fast = _fast(ve, 0.05)
    out = _plain(fast, *shapes_conds, **kw)
    s = wr.fast_state(fast).stats()
    assert s["calls_saved"] >= 5 and psnr_db(out, ref) > 37, (psnr_db(out, ref), s)
    monkeypatch.setattr(wr, "_variance_exploding", lambda executor: False)  # the noise prediction in sigma
    old = _fast(ve, 0.05)
    out_old = _plain(old, *shapes_conds, **kw)
    assert psnr_db(out_old, ref) < 33, (psnr_db(out_old, ref), wr.fast_state(old).stats())


def test_lcm_sampler_computes_every_call_with_a_warning(shapes_patcher, monkeypatch):
    """lcm replaces the whole latent with the denoised image plus new noise at every step: a call's output is not a
    smooth function of the earlier ones. A break-it run forecast one call at a predicted 3 % error and lost 24 dB
    (eps sigma, 12 karras steps; the negative control below). Fast mode now computes every call with it and says
    so once. On ComfyUI 0.7 and 0.33, whose step noise is not the initial noise again, the error estimate forecasts no
    lcm call by itself: there the control checks that it still does not."""
    from _comfy_util import stock_ksampler

    from jetdet.comfy import shapes_model as sm

    eps = sm.as_variance_exploding(shapes_patcher, "eps")
    conds = sm.class_conditioning(3), sm.null_conditioning()

    def run(model):
        return stock_ksampler(model, *conds, empty_latent(2), "lcm", steps=12, seed=3, scheduler="karras")

    ref = run(eps)
    monkeypatch.setattr(wr, "_warned_renoising", set())
    fast = _fast(eps, 0.05)
    with pytest.warns(UserWarning, match="lcm sampler replaces the whole latent"):
        out = run(fast)
    assert torch.equal(out, ref) and wr.fast_state(fast).stats()["calls_saved"] == 0
    monkeypatch.setattr(wr, "_RENOISING", frozenset())  # negative control: forecast as any other sampler
    old = _fast(eps, 0.05)
    out_old = run(old)
    if _controls().step_noise_repeats_initial_noise():  # ComfyUI 0.3.64
        assert wr.fast_state(old).stats()["calls_saved"] > 0 and psnr_db(out_old, ref) < 30, psnr_db(out_old, ref)
    else:  # fresh step noise: no call smooth enough to forecast, with or without the rule
        assert wr.fast_state(old).stats()["calls_saved"] == 0 and torch.equal(out_old, ref)


@pytest.mark.parametrize("sampling", ["eps", "edm"])
def test_timestep_schedulers_on_the_variance_exploding_shapes_model(shapes_patcher, shapes_conds, sampling):
    """ComfyUI's normal and sgm_uniform schedulers go through the model's timestep() and sigma(): they were
    inconsistent (sigma() was the base table's, timestep() the flow time), giving inf sigmas with EDM and a fast
    mode that raised on the NaN schedule hint."""
    import comfy.samplers

    from jetdet.comfy import shapes_model as sm

    ve = sm.as_variance_exploding(shapes_patcher, sampling)
    ms = ve.get_model_object("model_sampling")
    for sched in ("normal", "sgm_uniform"):
        sig = comfy.samplers.calculate_sigmas(ms, sched, 6)
        assert torch.isfinite(sig).all() and sig[-1] == 0, (sched, sig)
        torch.testing.assert_close(sig[0], ms.sigma_max.to(sig.dtype), rtol=1e-4, atol=0)
        assert torch.isclose(sig[-2], ms.sigma_min.to(sig.dtype), rtol=1e-3) or sched == "sgm_uniform"
    out = _plain(_fast(ve, 0.05), *shapes_conds, batch=2, steps=8, scheduler="normal")
    assert torch.isfinite(out).all()


def test_the_schedule_hint_is_in_the_controllers_time_and_only_a_finite_one(comfy_dir):
    """OUTER_SAMPLE hands the run's sigmas to the controller as its ``timesteps`` hint: in flow time for a model with
    variance-exploding sigma (as apply_model's t), as they are for a flow model, not at all when not finite (an
    error before), and a hint given in the options is taken as is."""
    import comfy.model_sampling as cms

    class Exec:  # what ComfyUI's OUTER_SAMPLE executor gives the wrapper: the guider, its ModelPatcher
        def __init__(self, state, ms):
            self.state, self.seen = state, "not called"
            patcher = type("P", (), {"get_model_object": lambda _self, name: ms})()
            self.class_obj = type("G", (), {"model_patcher": patcher})()

        def __call__(self, *args, **kwargs):
            self.seen = self.state.controller.timesteps

    eps = type("Eps", (cms.ModelSamplingDiscrete, cms.EPS), {})(None)
    flow = type("Flow", (cms.ModelSamplingDiscreteFlow, cms.CONST), {})(None)

    def hint(ms, sigmas, **options):
        state = wr.FastState(budget=0.05, **options)
        ex = Exec(state, ms)
        state.outer_sample(ex, None, None, None, torch.tensor(sigmas, dtype=torch.float64))
        return ex.seen

    assert hint(eps, [14.6, 3.0, 1.0, 0.0]) == pytest.approx([14.6 / 15.6, 0.75, 0.5, 0.0])
    assert hint(flow, [1.0, 0.5, 0.0]) == [1.0, 0.5, 0.0]
    assert hint(eps, [math.inf, 1.0, 0.0]) is None and hint(flow, [1.0, math.nan, 0.0]) is None
    assert hint(eps, [14.6, 1.0, 0.0], timesteps=[0.9, 0.2, 0.0]) == [0.9, 0.2, 0.0]


def _stock(model, sampler, scheduler="simple", steps=20, batch=4):
    from _comfy_util import stock_ksampler

    from jetdet.comfy import shapes_model as sm

    conds = sm.class_conditioning(3), sm.null_conditioning()
    return stock_ksampler(model, *conds, empty_latent(batch), sampler, steps=steps, seed=7, scheduler=scheduler)


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m_sde"])  # dpmpp_sde: in the next test
def test_samplers_that_add_noise_forecast_the_denoised_image(shapes_patcher, monkeypatch, sampler):
    """Ancestral and SDE samplers add noise to the latent at every step, so the velocity the step cache forecast
    carried it, and nothing was skipped at budget 0.1 (negative control below). The Fast Optimizer forecasts their
    denoised image instead (forecast_space "x0", a call's rows decided together): at budget 0.1 on the shapes model
    (flow sigma, 20 steps, batch 4 with CFG) euler_ancestral ran 14 of 20 calls at 34.7 dB, dpmpp_2m_sde 13 of 20
    at 33.8 dB (dpmpp_sde 19 of 39 at 34.5 dB)."""
    ref = _stock(shapes_patcher, sampler)
    fast = _fast(shapes_patcher, 0.1)
    out = _stock(fast, sampler)
    s = wr.fast_state(fast).stats()
    assert s["forecast_space"] == "x0" and s["piggyback"] == 0.0, s
    assert s["fme_ratio"] > 1.35 and psnr_db(out, ref) > 32, (psnr_db(out, ref), s)
    monkeypatch.setattr(wr, "_ADDS_NOISE", frozenset())  # negative control: forecast the velocity
    monkeypatch.setattr(wr, "_named_as_adding_noise", lambda name: False)
    old = _fast(shapes_patcher, 0.1)
    assert torch.equal(_stock(old, sampler), ref)
    assert wr.fast_state(old).stats()["calls_saved"] == 0


def test_rows_of_a_noisy_samplers_call_are_decided_together(shapes_patcher):
    """With the denoised image forecast, forecasting one CFG branch of an item while the other runs puts the item's
    branches out of step, and the guidance scale multiplies the difference: dpmpp_sde in eps sigma (karras, budget
    0.05) lost 9 dB that way (25.7 dB at 1.19x fewer model equivalents; piggyback 0.5, the negative control) and
    keeps 34.7 dB at 1.70x with the call decided as a whole (piggyback 0, the Fast Optimizer's setting for it)."""
    from jetdet.comfy import shapes_model as sm

    eps = sm.as_variance_exploding(shapes_patcher, "eps")
    ref = _stock(eps, "dpmpp_sde", "karras")
    fast = _fast(eps, 0.05)
    out = _stock(fast, "dpmpp_sde", "karras")
    s = wr.fast_state(fast).stats()
    assert s["fme_ratio"] > 1.5 and psnr_db(out, ref) > 32, (psnr_db(out, ref), s)
    apart, _ = wr.with_fast(eps, budget=0.05, piggyback=0.5)  # an explicit option wins over the sampler's default
    out_apart = _stock(apart, "dpmpp_sde", "karras")
    assert wr.fast_state(apart).stats()["piggyback"] == 0.5 and psnr_db(out_apart, ref) < 30, psnr_db(out_apart, ref)


def test_which_samplers_add_noise(comfy_dir):
    """The sampler functions named as adding noise exist in this ComfyUI, and a node's eta of 0 (s_noise of 0 for
    er_sde, which has no eta) makes them deterministic (velocity forecast, as for euler)."""
    import comfy.k_diffusion.sampling as kds
    import comfy.samplers as cs

    missing = sorted(n for n in wr._ADDS_NOISE if not hasattr(kds, n))
    assert not missing, missing
    assert wr._adds_noise(cs.ksampler("euler_ancestral")) and wr._adds_noise(cs.ksampler("dpmpp_2m_sde_gpu"))
    assert not wr._adds_noise(cs.ksampler("euler")) and not wr._adds_noise(cs.ksampler("dpmpp_2m"))
    assert not wr._adds_noise(cs.ksampler("euler_ancestral", {"eta": 0.0}))
    assert wr._adds_noise(cs.ksampler("dpmpp_sde", {"eta": 1.0, "s_noise": 0.0}))  # still jumps to sigma_down
    assert not wr._adds_noise(cs.ksampler("er_sde", {"s_noise": 0.0}))
    assert wr._adds_noise(cs.ksampler("dpmpp_sde", {"eta": 1.0, "s_noise": 1.0}))
    assert not wr._adds_noise(cs.ksampler("dpm_fast")) and not wr._adds_noise(cs.ksampler("dpm_adaptive"))
    assert wr._adds_noise(cs.ksampler("dpm_adaptive", {"eta": 0.5}))

    def sample_exp_heun_2_x0_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0):
        return x  # a newer ComfyUI's sampler, by its name (its eta rules as the known ones')

    assert wr._adds_noise(cs.KSAMPLER(sample_exp_heun_2_x0_sde))
    assert not wr._adds_noise(cs.KSAMPLER(sample_exp_heun_2_x0_sde, extra_options={"eta": 0.0}))
    assert not wr._named_as_adding_noise("sample_euler") and not wr._named_as_adding_noise("sample_lcm")


def _controls():
    """bench/comfy_fast_controls.py as a module (the README's figures for the Fast Optimizer's fixes come from it;
    its hook-LoRA positive is the one these tests use too)."""
    from _bench import load_bench

    return load_bench("comfy_fast_controls")


def _hooked_positive(pos, strength_after: float):
    """The positive with a hook LoRA (ComfyUI's conditioning hooks) whose keyframe sets its strength to
    ``strength_after`` from 50 % of the run: the model's weights for that prompt change mid-run."""
    return _controls()._hooked_positive(pos, strength_after)


def test_a_hook_keyframe_that_changes_the_weights_mid_run_starts_the_cache_over(shapes_patcher, shapes_conds,
                                                                                 monkeypatch):
    """A hook LoRA whose keyframe takes its strength from 1 to 0 halfway changes the model mid-run; forecast across
    the change from the old weights' outputs, a user trial kept 36.0 dB at budget 0.05 (stock KSampler, 8 items, 20
    steps) where the same keyframes without a change kept 44.5. The change now resets the step cache (counted as a
    model change). Here (per-item noise, budget 0.05): 41.5 dB seen, 34.8 dB with the change hidden."""
    pos, neg = _hooked_positive(shapes_conds[0], 0.0), shapes_conds[1]
    ref = _plain(shapes_patcher, pos, neg, batch=8, steps=20)
    fast = _fast(shapes_patcher, 0.05)
    out = _plain(fast, pos, neg, batch=8, steps=20)
    s = wr.fast_state(fast).stats()
    assert s["resets"]["model"] >= 1 and s["calls_saved"] > 0, s
    assert psnr_db(out, ref) > 39.5
    monkeypatch.setattr(wr, "_hook_state", lambda executor: ())  # the negative control: the change is not seen
    assert psnr_db(_plain(fast, pos, neg, batch=8, steps=20), ref) < 37.0


def test_cfg_pp_samplers_compute_every_call_with_a_warning(shapes_patcher, monkeypatch):
    """A CFG++ sampler builds each step from the denoised images themselves, so a forecast's error goes into the
    latent whole: at CFG 1 (what they are made for) dpmpp_2m_cfg_pp at budget 0.05 kept 17.7 dB mean on the bench.
    Fast mode now computes every call with them and says so once; the negative control forecasts as before."""
    from _comfy_util import stock_ksampler

    from jetdet.comfy import shapes_model as sm

    conds = sm.class_conditioning(3), sm.null_conditioning()

    def run(model):
        return stock_ksampler(model, *conds, empty_latent(8), "dpmpp_2m_cfg_pp", steps=30, seed=0, cfg=1.0)

    ref = run(shapes_patcher)
    monkeypatch.setattr(wr, "_warned_renoising", set())
    fast = _fast(shapes_patcher, 0.05)
    with pytest.warns(UserWarning, match=r"dpmpp_2m_cfg_pp sampler \(CFG\+\+\) builds each step"):
        out = run(fast)
    assert torch.equal(out, ref) and wr.fast_state(fast).stats()["calls_saved"] == 0
    monkeypatch.setattr(wr, "_cfg_pp", lambda sampler: False)  # negative control: forecast as any other sampler
    old = _fast(shapes_patcher, 0.05)
    out_old = run(old)
    s = wr.fast_state(old).stats()
    assert s["rows_saved"] > 0 and psnr_db(out_old, ref) < 32, (psnr_db(out_old, ref), s)  # 28.4 dB here


def test_every_cfg_pp_sampler_is_recognised(comfy_dir):
    """The *_cfg_pp samplers, gradient_estimation with cfg_pp, and SamplerEulerCFG++'s "alternative" version, whose
    function is sample_euler_pp (a review found it missed)."""
    import comfy.samplers
    from comfy_extras.nodes_advanced_samplers import SamplerEulerCFGpp

    names = [n for n in comfy.samplers.KSampler.SAMPLERS if n.endswith("_cfg_pp")]
    assert names and all(wr._cfg_pp(comfy.samplers.ksampler(n)) for n in names)
    for version in ("regular", "alternative"):
        assert wr._cfg_pp(SamplerEulerCFGpp.execute(version).args[0]), version
    assert not wr._cfg_pp(comfy.samplers.ksampler("euler")) and not wr._cfg_pp(comfy.samplers.ksampler("lcm"))


def test_a_controlnet_that_stops_acting_mid_run_starts_the_cache_over(shapes_patcher, shapes_conds):
    """A ControlNet with an end_percent below 1 (a common setting) stops acting there and the model's function
    changes, as at a hook keyframe: ComfyUI then passes no control residuals, and the step cache starts over (a
    'model' reset) instead of forecasting across the change. A stand-in control whose residuals add nothing shows the
    reset alone: the output stays the model's, bit for bit, at budget 0."""
    import comfy.controlnet

    class Probe(comfy.controlnet.ControlBase):  # ComfyUI's own range rule; residuals that add nothing
        def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
            if self.timestep_range is not None and (t[0] > self.timestep_range[0] or t[0] < self.timestep_range[1]):
                return None
            return {"input": [], "middle": [], "output": []}

        def copy(self):
            c = Probe()
            self.copy_to(c)
            return c

    pos, neg = shapes_conds
    resets = {}
    for end in (1.0, 0.5):
        probe = Probe().set_cond_hint(torch.zeros(1, 3, 8, 8), 1.0, (0.0, end))
        cpos = [[t, dict(d, control=probe)] for t, d in pos]
        fast = _fast(shapes_patcher, 0.05)
        _plain(fast, cpos, neg, batch=2, steps=12)
        resets[end] = wr.fast_state(fast).stats()["resets"]["model"]
        if end == 0.5:
            zero = _fast(shapes_patcher, 0.0)
            assert torch.equal(_plain(zero, cpos, neg, batch=2, steps=12), _plain(shapes_patcher, cpos, neg, steps=12))
    assert resets == {1.0: 0, 0.5: 1}, resets


def test_fast_controls_bench_runs(comfy_dir, capsys):
    """bench/comfy_fast_controls.py (the README's figures for these fixes against their controls) runs; its
    quickest case, lcm, stands for the rest (each case exits 1 when the fix does not beat its control)."""
    mod = _controls()
    assert mod.main(["--comfyui", comfy_dir, "--cases", "lcm"]) == 0
    out = capsys.readouterr().out
    assert "lcm: eps sigma, budget 0.05: bit-identical to mode off: True" in out and "lcm: ok" in out


def test_a_noisy_samplers_fast_run_that_saved_nothing_says_so(shapes_patcher, caplog):
    """A fast run with an ancestral/SDE sampler that saved no model call logs one line naming why and what to do (a
    user trial: at the default budget euler_ancestral saved nothing, and only the Cache Manager showed it). No line
    for a run that saved calls, for euler, for budget 0 (nothing asked), or in the Benchmark (its table shows the
    calls). Negative control: before, no line at all."""
    import logging

    from jetdet.comfy.nodes import JetDetBenchmark

    def lines(model, sampler, steps=6):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            _stock(model, sampler, steps=steps, batch=1)
        return [r.getMessage() for r in caplog.records if "saved none" in r.getMessage()]

    tiny = _fast(shapes_patcher, 1e-6)  # a budget that skips nothing
    got = lines(tiny, "euler_ancestral")
    assert wr.fast_state(tiny).stats()["calls_saved"] == 0
    assert len(got) == 1 and got[0].startswith("jetdet fast mode: the euler_ancestral run computed all 6 model calls "
                                               "at budget 1e-06 (it saved none; "), got
    assert "Raise the Fast Optimizer's budget" in got[0] and "README, ComfyUI > Limits" in got[0], got
    assert lines(tiny, "euler") == []  # a sampler without step noise: not this line's case
    assert lines(_fast(shapes_patcher, 0.0), "dpmpp_2m_sde") == []
    saving = _fast(shapes_patcher, 0.1)
    assert lines(saving, "euler_ancestral", steps=20) == [] and wr.fast_state(saving).stats()["calls_saved"] > 0
    caplog.clear()
    from jetdet.comfy import shapes_model as sm

    with caplog.at_level(logging.INFO):
        JetDetBenchmark.execute(shapes_patcher, 7, 3, 4.0, "euler_ancestral", "simple", sm.class_conditioning(3),
                                sm.null_conditioning(), empty_latent(1), 1.0, "0.000001")
    assert not [r for r in caplog.records if "saved none" in r.getMessage()]


def test_the_saved_nothing_line_only_where_the_budget_decided_and_once(shapes_patcher, caplog):
    """The 'saved none' line (review L1): not for a run in which no call was eligible to skip (budget 1, start_percent
    0.99: every step inside the always-compute window, so no budget could have saved one); once per Fast Optimizer,
    sampler and budget, not once per sampling run (5 runs, as tiles or passes, one line); and no advice to raise a
    budget already at its maximum. Negative control: before, the first case logged 'Raise the Fast Optimizer's
    budget' and the 5 runs logged 5 lines."""
    import logging

    from jetdet.comfy.nodes import JetDetFastOptimizer

    def fast(budget, start=0.0):
        return JetDetFastOptimizer.execute(shapes_patcher, budget=budget, start_percent=start, end_percent=0.0,
                                           forecast="order1", max_consecutive_skips=8).args[0]

    def lines(model, sampler, runs=1, steps=6):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            for _ in range(runs):
                _stock(model, sampler, steps=steps, batch=1)
        return [r.getMessage() for r in caplog.records if "saved none" in r.getMessage()]

    window = fast(1.0, start=0.99)
    assert lines(window, "euler_ancestral", steps=20) == []
    st = wr.fast_state(window).last_stats
    assert st["calls_saved"] == 0 and not st["reasons"].get("budget"), st["reasons"]
    tiny = fast(1e-6)
    got = lines(tiny, "euler_ancestral", runs=5)
    assert len(got) == 1 and "logged once per Fast Optimizer, sampler and budget" in got[0], got
    assert lines(tiny, "euler_ancestral") == []  # the same state, sampler and budget: said already
    assert len(lines(tiny, "dpmpp_2m_sde")) == 1  # another sampler: its own line
    assert len(lines(fast(1e-6), "euler_ancestral")) == 1  # another Fast Optimizer: its own line
    caplog.clear()
    with caplog.at_level(logging.INFO):
        wr._note_nothing_saved(None, wr.MAX_BUDGET, 6)
        wr._note_nothing_saved(None, 0.5, 6)
    top, mid = (r.getMessage() for r in caplog.records)
    assert "Raise" not in top and "The budget is at its maximum (1): sample with a sampler that adds no noise" in top
    assert "Raise the Fast Optimizer's budget" in mid

