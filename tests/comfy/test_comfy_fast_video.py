"""The Fast Optimizer (jetdet's step cache) on small real video models: Wan 2.1 and HunyuanVideo (5-D latents:
batch, channels, frames, height, width), written as safetensors and loaded by ComfyUI's own loader as in
``test_comfy_video_models.py``. Budget 0 is ComfyUI's KSampler bit for bit; the default budget skips model
evaluations (counted at the diffusion model's first layer) and stays close to full compute; the model the user
passed is unchanged; the Wan 2.2 14B two-model handoff (a Fast Optimizer on each model, KSamplerAdvanced start/end
steps) resets its state per model and per run; a call that runs only some rows of a batch is described to the model
(``cond_or_uncond``, ``uuids``, ``sigmas`` in ``transformer_options``) as the rows it gets.

The models here are :func:`tiny_models.smooth_in_time`: random weights answer the high-frequency part of the
sinusoidal timestep embedding with noise that no trained model has (measured: Wan 2.1 random, 10 euler steps, every
forecast predicted 13-89 % off, nothing skipped at budget 0.05); with it zeroed the model is a smooth function of
time, as a trained one is, and the default budget skips. Their error figures are a random model's, not a quality
claim.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import require_comfyui

require_comfyui()
import test_comfy_video_models as tv  # noqa: E402

from jetdet.comfy import wrappers as wr  # noqa: E402
from jetdet.comfy.nodes import JetDetFastOptimizer  # noqa: E402

STEPS = 10


def _load(tmp_path, family: str, seed: int = 0):
    import comfy.sd
    import safetensors.torch
    import tiny_models as tm

    sd = tm.smooth_in_time(tv._state_dict(family, seed))
    path = str(tmp_path / f"{family}_smooth_{seed}.safetensors")
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return comfy.sd.load_diffusion_model(path)


@pytest.fixture(scope="module")
def models(comfy_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("fast_video")
    cache = {}

    def get(family, seed=0):
        if (family, seed) not in cache:
            tv._require(family)
            cache[family, seed] = _load(d, family, seed)
        return cache[family, seed]

    return get


def _fast(model, budget=0.05, **kw):
    opts = dict(budget=budget, start_percent=0.0, end_percent=0.0, forecast="order1", max_consecutive_skips=8)
    opts.update(kw)
    return JetDetFastOptimizer.execute(model, **opts).args[0]


class _Evals:
    """Counts the diffusion model's evaluations at its first layer (under ComfyUI's wrappers, so a call a cache
    serves is not counted) and checks that each call's ``transformer_options`` describe the rows it gets: a row
    ``cond_or_uncond`` calls uncond (1) has the negative's all-zero context, a cond row (0) the prompt's."""

    FIRST = ("patch_embedding", "img_in")

    def __init__(self, model):
        dm = model.model.diffusion_model
        first = next(getattr(dm, n) for n in self.FIRST if hasattr(dm, n))
        self.n = 0
        self.mislabelled = []
        self._hooks = [first.register_forward_pre_hook(self._count),
                       dm.register_forward_pre_hook(self._check, with_kwargs=True)]

    def _count(self, mod, args):
        self.n += 1

    def _check(self, mod, args, kwargs):
        to = kwargs.get("transformer_options") or {}
        x, ctx = args[0], kwargs.get("context", args[2] if len(args) > 2 else None)
        cu = to.get("cond_or_uncond")
        if not cu or ctx is None:
            return
        per = x.shape[0] // len(cu) if x.shape[0] % len(cu) == 0 else 0
        zero = [bool((ctx[r] == 0).all()) for r in range(ctx.shape[0])]
        if not per or any(zero[r] != (cu[r // per] == 1) for r in range(x.shape[0])):
            self.mislabelled.append((x.shape[0], list(cu), zero))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()


def _ks(model, family, batch=1, mask=False, cfg=2.0):
    import nodes

    pos, neg = tv._conds(family)
    return nodes.KSampler().sample(model, 7, STEPS, cfg, "euler", "simple", pos, neg, tv._latent(family, batch, mask),
                                   1.0)[0]["samples"]


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family", ["wan21", "hunyuan_video"])
def test_budget_zero_is_ksampler_bitwise_default_skips_and_the_model_is_unchanged(models, family):
    """Batch 2, CFG 2. Measured (0.3.64 and 0.33, both models): 10 of 10 evaluations at budget 0, 4 of 10 at the
    default 0.05 (12 of 20 rows forecast), relative L2 to full compute 0.002-0.003."""
    model = models(family)
    with _Evals(model) as plain:
        ref = _ks(model, family, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _Evals(model) as zero:
            out0 = _ks(_fast(model, 0.0), family, 2)
        fast = _fast(model)
        with _Evals(model) as ev:
            out = _ks(fast, family, 2)
    assert not [str(w.message) for w in caught if "jetdet" in str(w.message)]
    assert plain.n == zero.n == STEPS and torch.equal(out0, ref)
    s = wr.fast_state(fast).stats()
    assert ev.n == s["calls_run"] < STEPS // 2 + 1 and s["rows_saved"] > 0
    assert torch.isfinite(out).all() and 0 < _rel(out, ref) < 0.02
    assert not torch.equal(out, ref)  # negative control: the bitwise check above can fail
    assert torch.equal(_ks(model, family, 2), ref)  # the model passed in is unchanged


def test_rows_run_alone_are_described_as_those_rows(models):
    """HunyuanVideo, batch 2, CFG 2, image-to-video noise mask (the first frame kept): the step cache runs some
    calls on a subset of the batch. Each such call's ``cond_or_uncond`` must name the rows it gets (ComfyUI's
    SeedVR2 and Trellis2 models and attention patches such as SAG split the batch by it): the old code passed the
    whole batch's (measured: 4 of 9 calls, two uncond rows labelled [uncond, cond])."""
    model = models("hunyuan_video")
    fast = _fast(model)
    with _Evals(model) as ev:
        out = _ks(fast, "hunyuan_video", 2, mask=True)
    s = wr.fast_state(fast).stats()
    assert s["rows_run"] < s["rows"] and ev.n < STEPS  # some calls ran part of the batch
    assert ev.mislabelled == []
    ref = _ks(model, "hunyuan_video", 2, mask=True)
    assert 0 < _rel(out, ref) < 0.02


def test_wan22_two_model_handoff_resets_per_model_and_per_run(models):
    """Wan 2.2 14B's workflow: a high-noise and a low-noise model (two checkpoints of the Wan 2.1 layout), each with
    its own Fast Optimizer, through KSamplerAdvanced steps 0-5 (returning the leftover noise) and 5-10. Budget 0: the
    stock workflow bit for bit; the default: both skip, a second run gives the same bits, one Fast Optimizer model
    used for both stages gives what two fresh ones give."""
    import nodes

    high, low = models("wan21", 0), models("wan21", 1)
    pos, neg = tv._conds("wan21")

    def two(h, lo):
        k = nodes.KSamplerAdvanced()
        lat = k.sample(h, "enable", 7, STEPS, 2.0, "euler", "simple", pos, neg, tv._latent("wan21", 2), 0, 5,
                       "enable")[0]
        return k.sample(lo, "disable", 7, STEPS, 2.0, "euler", "simple", pos, neg, lat, 5, STEPS, "disable")[0][
            "samples"]

    ref = two(high, low)
    assert torch.equal(two(_fast(high, 0.0), _fast(low, 0.0)), ref)
    fh, fl = _fast(high), _fast(low)
    out = two(fh, fl)
    sh, sl = wr.fast_state(fh).stats(), wr.fast_state(fl).stats()
    assert sh["runs"] == sl["runs"] == 1 and sh["calls"] == sl["calls"] == 5
    assert sh["rows_saved"] > 0 and sl["rows_saved"] > 0
    assert 0 < _rel(out, ref) < 0.02
    assert torch.equal(two(fh, fl), out)  # nothing of run 1 leaks into run 2
    same = _fast(high)
    assert torch.equal(two(same, same), two(_fast(high), _fast(high)))
    assert torch.equal(two(high, low), ref)  # the models passed in are unchanged


def test_opt_in_attention_options_on_a_video_model_warn_and_report(models):
    """Wan 2.1: linear attention and the attention cache replace its softmax attention (counted in the stats) and
    say once per run that they approximate it, with the measured error."""
    model = models("wan21")
    for opt, key in ((dict(linear_attention="relu"), "linear_attention"), (dict(attention_cache=True),
                                                                           "attention_cache")):
        fast = _fast(model, **opt)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = _ks(fast, "wan21")
        msgs = [str(w.message) for w in caught if "jetdet" in str(w.message)]
        st = wr.fast_state(fast).stats()[key]
        assert len(msgs) == 1 and "approximat" in msgs[0], msgs
        assert torch.isfinite(out).all() and st["forwards"] > 0
        assert st.get("replaced", st.get("refreshed", 0)) > 0


def test_rows_from_different_items_of_each_chunk_run_as_one_call_per_item_set(comfy_dir):
    """ComfyUI's chunks (one per cond_or_uncond entry) have one size, so rows 0, 1 (cond, items 0 and 1) and 3
    (uncond, item 1) of a [cond; uncond] batch of 2 items cannot be one call: they run as [cond x2] and [uncond x1],
    each described as such (``sigmas``, as ComfyUI passes it, has one entry per item: cut to the call's items), and
    come back in the order asked for."""
    st = wr.FastState(budget=0.05)
    calls = []

    def executor(x, t, c_concat, c_crossattn, control, to, **kw):
        calls.append((x[:, 0, 0].tolist(), list(to["cond_or_uncond"]), list(to["uuids"]), to["sigmas"].tolist(),
                      kw["denoise_mask"][:, 0].tolist()))
        return x * 10

    x = torch.arange(4.0).reshape(4, 1, 1).expand(4, 1, 3).clone()
    to = {"cond_or_uncond": [0, 1], "uuids": ["c", "u"], "sigmas": torch.tensor([0.5, 0.25])}
    t = torch.tensor([0.5, 0.25, 0.5, 0.25])
    args = (None, None, None, to)
    kw = {"denoise_mask": torch.arange(4.0).reshape(4, 1)}
    den = st._call_rows(executor, x, t, args, kw, torch.tensor([3, 0, 1]), 2)
    assert calls == [([0.0, 1.0], [0], ["c"], [0.5, 0.25], [0.0, 1.0]), ([3.0], [1], ["u"], [0.25], [3.0])]
    assert den[:, 0, 0].tolist() == [30.0, 0.0, 10.0]
    calls.clear()  # the same item of both chunks: one call, [cond; uncond]
    den = st._call_rows(executor, x, t, args, kw, torch.tensor([3, 1]), 2)
    assert calls == [([1.0, 3.0], [0, 1], ["c", "u"], [0.25], [1.0, 3.0])]
    assert den[:, 0, 0].tolist() == [30.0, 10.0]
    assert to["cond_or_uncond"] == [0, 1]  # the caller's options are not changed


def test_attention_options_that_replace_nothing_say_so_once(models):
    """HunyuanVideo with a text attention mask (its text encoder gives one for a prompt with padding): every attention
    call carries the mask, which linear attention and the attention cache leave exact, so they replace none of them.
    The old code said nothing (measured: 0 replaced, 24 left exact, no warning); now one warning per Fast Optimizer."""
    model = models("hunyuan_video")
    pos, neg = tv._conds("hunyuan_video")
    mask = torch.ones(1, pos[0][0].shape[1], dtype=torch.long)
    mask[:, -2:] = 0
    pos, neg = ([[c[0][0], dict(c[0][1], attention_mask=mask)]] for c in (pos, neg))
    for opt in (dict(linear_attention="relu"), dict(attention_cache=True)):
        fast = _fast(model, **opt)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):  # CFG 1: ComfyUI 0.3.64's HunyuanVideo fails on a text mask with cond and uncond batched
                import nodes

                nodes.KSampler().sample(fast, 7, 4, 1.0, "euler", "simple", pos, neg, tv._latent("hunyuan_video", 1),
                                        1.0)
        msgs = [str(w.message) for w in caught if "jetdet" in str(w.message)]
        assert len(msgs) == 1 and "replaced none" in msgs[0] and "attn_mask" in msgs[0], (opt, msgs)
