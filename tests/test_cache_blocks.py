"""Partial rows in the step cache: block-level reuse (head + forecast body residual + tail), token-level reuse in
token-wise modules of computed blocks, CFG reuse, the quality presets, full-model-equivalent counting, and the
block lists the patcher finds.

The exactness tests use models whose forecast quantity is a polynomial in t: a forecast of order q is then exact
on degree <= q, so every partial row must equal the model's own output; each has a negative control where the
forecast is wrong (one degree too many, or the residual forecast replaced) and the same check fails."""

import math

import pytest
import torch
import torch.nn as nn

import jetdet
from jetdet.cache import StepCacheController
from jetdet.cache import controller as ctl_mod
from jetdet.patch.call import ModelCall

N, D = 8, 6  # tokens, width
#: "Exact" = within fp32 rounding: extrapolating a quadratic 10+ node spacings ahead multiplies the rounding
#: of the history by its Lagrange weights (measured up to 4e-5 here); the negative controls miss by > 1e-3.
EXACT = 1e-4


class Head(nn.Module):
    """x-dependent: the row's latent enters here (and only here)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, h, t):
        return h + torch.tanh(self.lin(h))


class PolyBlock(nn.Module):
    """Adds a per-token polynomial of degree ``deg`` in t: the body residual is a polynomial in t whatever h is."""

    def __init__(self, deg, g):
        super().__init__()
        self.register_buffer("c", torch.randn(deg + 1, 1, D, generator=g))  # any token count
        self.deg = deg

    def forward(self, h, t):
        p = sum(self.c[k] * t[:, None, None] ** k for k in range(self.deg + 1))
        return h + p


class TokBlock(nn.Module):
    """A token-wise module ``ff`` (linear) applied to a per-token polynomial of t: its input and output are
    polynomials of degree ``deg`` in t."""

    def __init__(self, deg, g):
        super().__init__()
        self.register_buffer("c", torch.randn(deg + 1, N, D, generator=g))
        self.deg = deg
        self.ff = nn.Sequential(nn.Linear(D, D))

    def forward(self, h, t):
        u = sum(self.c[k] * t[:, None, None] ** k for k in range(self.deg + 1))
        return h + self.ff(u.expand(h.shape[0], -1, -1).contiguous())


class ChainModel(nn.Module):
    """``forward(x [B, N, D], t [B]) -> [B, N, D]``: head block, body blocks, linear tail."""

    def __init__(self, deg=1, body=3, kind="poly", seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        blocks = [Head()]
        for _ in range(body):
            blocks.append(PolyBlock(deg, g) if kind == "poly" else TokBlock(deg, g))
        self.blocks = nn.ModuleList(blocks)
        self.out = nn.Linear(D, D)

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        h = x
        for blk in self.blocks:
            h = blk(h, t)
        return self.out(h)


TS = [1.0 - i / 20 for i in range(20)]


def _trajectory(model, x0, ts=TS):
    """Euler-like loop; returns, per call, (output, the model's own output at the same input)."""
    x = x0.clone()
    pairs = []
    with torch.no_grad():
        for i, t in enumerate(ts):
            tt = torch.full((x.shape[0],), t)
            out = model(x, tt)
            pairs.append((out, x.clone(), tt))
            dt = (ts[i + 1] if i + 1 < len(ts) else 0.0) - t
            x = x + 0.3 * dt * out
    return pairs


def _max_rel_err(model, pairs):
    """Largest relative error of the patched outputs against the unpatched model at the same inputs."""
    worst = 0.0
    for out, x, tt in pairs:
        with torch.no_grad():
            ref = model(x, tt)
        worst = max(worst, ((out - ref).abs().max() / ref.abs().max()).item())
    return worst


def _partial_run(model, x0, **options):
    opts = dict(PARTIAL)
    opts.update(options)
    h = jetdet.patch(model, mode="fast", **opts)
    try:
        pairs = _trajectory(model, x0)
        st = h.stats()["cache"]
    finally:
        h.remove()
    return pairs, st


@pytest.mark.parametrize("order,deg", [(0, 0), (1, 1), (1, 0), (2, 2)])
def test_block_reuse_exact_on_polynomial_residuals(order, deg):
    model = ChainModel(deg=deg)
    x0 = torch.randn(3, N, D)
    pairs, st = _partial_run(model, x0, forecast=order)
    assert st["blocks"].startswith("used: blocks"), st["blocks"]
    assert st["rows_partial"] >= 3 * 10, st  # most rows after the warm-up are partial (a compute every 6th call)
    assert st["fme_ratio"] > 1.5, st
    assert _max_rel_err(model, pairs) < EXACT


def test_block_reuse_negative_control_one_degree_too_many():
    model = ChainModel(deg=2)
    x0 = torch.randn(3, N, D)
    pairs, st = _partial_run(model, x0, forecast=1)
    assert st["rows_partial"] > 10
    assert _max_rel_err(model, pairs) > 1e-3


def test_block_reuse_negative_control_wrong_residual_forecast(monkeypatch):
    """The same exactness check fails when the body forecast is not the residual's polynomial (here: the
    forecast of the node values is shifted by a little)."""
    model = ChainModel(deg=1)
    x0 = torch.randn(3, N, D)
    real = ctl_mod.StepCacheController._node_forecast

    def wrong(self, ts, values, t):
        return [v * 1.01 for v in real(self, ts, values, t)]

    monkeypatch.setattr(ctl_mod.StepCacheController, "_node_forecast", wrong)
    pairs, st = _partial_run(model, x0, forecast=1)
    assert st["rows_partial"] > 10
    assert _max_rel_err(model, pairs) > 1e-3


def test_whole_call_skip_with_the_same_options_is_not_exact():
    """What the block path buys on this model: the head (x-dependent) is computed, so the output is exact; a
    whole-call forecast of the same rows is not."""
    model = ChainModel(deg=1)
    x0 = torch.randn(3, N, D)
    pairs, st = _partial_run(model, x0, forecast=1, block_reuse=False)
    assert st["rows_partial"] == 0 and st["rows_saved"] > 10
    assert _max_rel_err(model, pairs) > 1e-3


@pytest.mark.parametrize("order,deg", [(0, 0), (1, 1), (2, 2)])
def test_token_reuse_exact_on_polynomial_features(order, deg):
    model = ChainModel(deg=deg, kind="tok")
    x0 = torch.randn(2, N, D)
    # every row computed in full (tiny budget); token reuse with a tile of 2 tokens
    pairs, st = _partial_run(model, x0, budget=1e-12, forecast=order, token_budget=1e-4, token_tile=2)
    tok = st["tokens"]
    assert all(v == "ok" for v in tok["modules"].values()) and len(tok["modules"]) == 3, tok
    assert tok["tokens_run"] < 0.5 * tok["tokens"], tok  # most tokens reused
    assert _max_rel_err(model, pairs) < EXACT


def test_token_reuse_negative_control():
    """Inputs one degree above the forecast order: with a token budget that lets every tile through, the
    reused tiles are wrong and the check fails; with a tight token budget they are recomputed and it passes."""
    model = ChainModel(deg=2, kind="tok")
    x0 = torch.randn(2, N, D)
    pairs, st = _partial_run(model, x0, budget=1e-12, forecast=1, token_budget=1e9, token_tile=2)
    assert st["tokens"]["tokens_run"] < st["tokens"]["tokens"]
    assert _max_rel_err(model, pairs) > 1e-3
    pairs, st = _partial_run(model, x0, budget=1e-12, forecast=1, token_budget=1e-7, token_tile=2)
    assert _max_rel_err(model, pairs) < EXACT


def test_token_reuse_skips_modules_that_are_not_token_wise():
    class Mixer(nn.Module):  # named like a feed-forward, but mixes tokens
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D, D)

        def forward(self, u):
            return self.lin(u) + u.mean(1, keepdim=True)

    model = ChainModel(deg=1, kind="tok")
    for blk in model.blocks[1:]:
        blk.ff = Mixer()
    x0 = torch.randn(2, N, D)
    pairs, st = _partial_run(model, x0, budget=1e-12, forecast=1, token_budget=1e9, token_tile=2)
    assert st["tokens"]["modules"] and all(v.startswith("not token-wise") for v in st["tokens"]["modules"].values())
    assert _max_rel_err(model, pairs) < EXACT


@pytest.mark.parametrize("options", [{}, {"quality": "high"}, {"quality": "fast"},
                                     {"block_reuse": True, "token_budget": 0.5}, {"cfg_reuse": True},
                                     {"block_reuse": True, "block_signal": "decide", "skip_whole": 0.0},
                                     {"block_reuse": True, "block_signal": "veto", "cfg_reuse": True}])
def test_budget_zero_is_bitwise_the_model_in_every_mode(options):
    model = ChainModel(deg=2, kind="tok")
    x0 = torch.randn(3, N, D)
    ref = [o for o, _, _ in _trajectory(model, x0)]
    h = jetdet.patch(model, mode="fast", budget=0.0, **options)
    try:
        out = [o for o, _, _ in _trajectory(model, x0)]
        st = h.stats()["cache"]
    finally:
        h.remove()
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert st["rows_saved"] == 0 and st["fme_ratio"] == 1.0


PARTIAL = dict(budget=10.0, block_reuse=True, skip_whole=0.0, block_signal="off", max_consecutive_skips=5,
               drift_gain=0.0, piggyback=1.0)


def test_state_resets_between_runs_and_on_shape_change():
    model = ChainModel(deg=1)
    x0 = torch.randn(2, N, D)
    with jetdet.patch(model, mode="fast", **PARTIAL) as h:
        pairs1 = _trajectory(model, x0)
        assert any(s.bts for s in h.controller._streams.values())
        pairs2 = _trajectory(model, x0)  # t goes up: a new trajectory
        st = h.stats()["cache"]
        assert st["resets"]["trajectory"] == 1
        # the second run makes the same decisions and outputs as the first: nothing leaked
        assert all(torch.equal(a[0], b[0]) for a, b in zip(pairs1, pairs2))
        assert st["rows_partial"] > 20
        # a latent with twice the tokens: everything is dropped and the first call computes every row
        n_log = len(h.controller.decision_log)
        _trajectory(model, torch.randn(2, 2 * N, D), ts=TS[5:9])
        st = h.stats()["cache"]
        assert st["resets"]["shape"] == 1
        first = h.controller.decision_log[n_log]
        assert [r["reason"] for r in first["rows"]] == ["new", "new"]
    assert _max_rel_err(model, pairs2) < EXACT


def test_memory_budget_holds_with_partial_rows():
    model = ChainModel(deg=1, kind="tok")
    x0 = torch.randn(4, N, D)
    # one stream's output history + body nodes + token anchors at order 1
    per_stream = 4 * N * D * (2 + 2 * 2 + 3 * 2 * 2)
    budget = 2 * per_stream
    opts = dict(budget=10.0, block_reuse=True, skip_whole=0.0, block_signal="off", max_consecutive_skips=3,
                drift_gain=0.0, memory_budget_bytes=budget, spill=(), token_budget=1e-4, token_tile=2)
    with jetdet.patch(model, mode="fast", **opts) as h:
        pairs = _trajectory(model, x0)
        st = h.stats()["cache"]
    m = st["manager"]
    assert m["peak_device_bytes"] <= budget, m
    assert m["evicted"] > 0
    assert _max_rel_err(model, pairs) < 1e-4  # evicted rows are recomputed, the rest forecast exactly


def test_cfg_reuse_exact_when_the_difference_is_constant():
    """Two rows with the same latent (a CFG pair) whose outputs differ by a constant: with cfg_reuse the second
    row is the first one's output plus the cached difference, exactly."""

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D, D)
            g = torch.Generator().manual_seed(3)
            self.register_buffer("delta", torch.randn(N, D, generator=g))

        def forward(self, x, t, y):
            return torch.sin(self.lin(x) * 3.0 + 5.0 * t[:, None, None]) + y.float()[:, None, None] * self.delta

    model = Pair()
    calls = []
    ctl = StepCacheController(budget=0.01, cfg_reuse=True, block_reuse=False, forecast="none", drift_gain=0.0)
    x = torch.randn(1, N, D)
    y = torch.tensor([1, 0])
    worst = 0.0
    for t in TS:
        xx = torch.cat([x, x])
        tt = torch.full((2,), t)

        def run(rows, xx=xx, tt=tt):
            calls.append(None if rows is None else rows.tolist())
            if rows is None:
                return model(xx, tt, y)
            return model(xx[rows], tt[rows], y[rows])

        out = ctl(ModelCall(x=xx, t=tt, run=run, model_id=1, cond=y))
        ref = model(xx, tt, y)
        worst = max(worst, (out - ref).abs().max().item())
        x = x + (-0.05) * out[:1]
    st = ctl.stats()
    assert st["rows_cfg"] > 10, st
    assert [0] in calls  # the partner row alone ran
    assert worst < 1e-5


def test_cfg_reuse_negative_control_difference_not_constant():
    """The same pair with a difference that changes with t: the back-test sees it and cfg reuse stays off."""

    class Pair(nn.Module):
        def forward(self, x, t, y):
            return torch.sin(x * 3.0 + 5.0 * t[:, None, None]) + (y.float() * torch.sin(40 * t))[:, None, None]

    model = Pair()
    ctl = StepCacheController(budget=0.001, cfg_reuse=True, block_reuse=False, forecast="none", drift_gain=0.0)
    x = torch.randn(1, N, D)
    y = torch.tensor([1, 0])
    for t in TS:
        xx = torch.cat([x, x])
        tt = torch.full((2,), t)
        ctl(ModelCall(x=xx, t=tt, run=lambda rows, xx=xx, tt=tt: model(xx, tt, y) if rows is None else
                      model(xx[rows], tt[rows], y[rows]), model_id=1, cond=y))
        x = x - 0.05 * xx[:1]
    assert ctl.stats()["rows_cfg"] == 0


def test_quality_presets_and_their_errors():
    assert StepCacheController().quality == "balanced"
    b = {q: StepCacheController(quality=q).budget for q in ("high", "balanced", "fast")}
    assert b["high"] < b["balanced"] < b["fast"]
    assert StepCacheController(quality="fast", budget=0.01).budget == 0.01  # a raw option wins
    with pytest.raises(ValueError, match=r"quality: expected one of \('high', 'balanced', 'fast'\), got 'ultra'"):
        StepCacheController(quality="ultra")
    with pytest.raises(ValueError, match="budget: expected a finite number >= 0"):
        StepCacheController(budget=-0.1)
    with pytest.raises(ValueError, match="block_signal: expected one of"):
        StepCacheController(block_signal="maybe")
    with pytest.raises(ValueError, match="token_budget: expected a finite number >= 0"):
        StepCacheController(token_budget=-1)
    with pytest.raises(ValueError, match="skip_whole"):
        StepCacheController(skip_whole=2.0)
    with pytest.raises(ValueError, match="block_reuse: expected True or False"):
        StepCacheController(block_reuse="yes")


def test_patch_block_options_errors_leave_the_model_untouched():
    model = ChainModel()
    with pytest.raises(ValueError, match=r"blocks: ChainModel has no nn.ModuleList named 'layers'; its ModuleLists: "
                                         r"\['blocks'\]"):
        jetdet.patch(model, mode="fast", blocks="layers")
    with pytest.raises(ValueError, match="head_blocks: expected an int >= 1"):
        jetdet.patch(model, mode="fast", head_blocks=0)
    with pytest.raises(ValueError, match="quality"):
        jetdet.patch(model, mode="fast", quality="best")
    assert all("forward" not in m.__dict__ for m in model.modules())
    with jetdet.patch(model, mode="fast", blocks="blocks", block_reuse=True) as h:
        assert all("forward" in b.__dict__ for b in model.blocks)
        with torch.no_grad():
            model(torch.randn(2, N, D), torch.ones(2))
        assert h.stats()["cache"]["blocks"].startswith("used: blocks: 4 blocks")
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_no_block_list_falls_back_to_whole_call_and_says_so():
    from jetdet.models import TinyUNet, make_toy_inputs

    model = TinyUNet().eval()
    x, t, y = make_toy_inputs(2)
    with jetdet.patch(model, mode="fast") as h:
        with torch.no_grad():
            model(x, t, y)
        st = h.stats()["cache"]
    assert st["blocks"].startswith("not used: no recognisable block list"), st["blocks"]
    with jetdet.patch(ChainModel(), mode="fast", blocks=None, block_reuse=True) as h:
        pass
    assert "blocks=None" in h.adapter.blocks_reason
    model = ChainModel()
    with jetdet.patch(model, mode="fast") as h:  # the presets skip whole calls: no hooks on the blocks
        assert all("forward" not in b.__dict__ for b in model.blocks)
        with torch.no_grad():
            model(torch.randn(2, N, D), torch.ones(2))
        assert h.stats()["cache"]["blocks"] == "not used: block_reuse=False: whole-call skipping only"


def test_full_model_equivalents_count_partial_rows_as_work():
    model = ChainModel(deg=1, body=3)  # 4 blocks: a partial row runs 1 of 4
    x0 = torch.randn(2, N, D)
    pairs, st = _partial_run(model, x0, forecast=1)
    expect = st["rows_run"] + st["rows_partial"] * 1 / 4
    assert math.isclose(st["model_equivalents"], expect)
    assert math.isclose(st["fme_ratio"], st["rows"] / expect)
    assert st["row_ratio"] > st["fme_ratio"]  # rows alone would overstate the saving
