"""Smoke test of bench/peers.py (jetdet fast mode against diffusers' cache hooks): one seed, one class, 6 steps.

Checks that the side-by-side measurement is sane, not how fast anything is: full compute against itself is
``inf`` dB, jetdet at budget 0 reproduces full compute bit for bit with the same number of forwards, a diffusers
hook really enters the model every evaluation and never computes more than full compute, and every method's
state resets between trajectories. Runs on the bundled weights when they exist, else on a seeded random DiT.
"""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parent.parent


def _load_peers():
    spec = importlib.util.spec_from_file_location("jetdet_bench_peers", ROOT / "bench" / "peers.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def peers():
    return _load_peers()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from jetdet.models import bundled

    if bundled.DIT_FILE.exists():
        return None  # the shipped weights
    # Not trained yet in this checkout: a seeded random DiT whose adaLN-Zero layers are not zero (else v == 0).
    model = bundled.BundledDiT()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    path = tmp_path_factory.mktemp("peers") / "dit.safetensors"
    bundled.save_module(model, path, kind="bundled_dit")
    return str(path)


def test_peers_smoke(peers, weights, tmp_path):
    from diffusers.hooks import FirstBlockCacheConfig

    fbc = peers.Method("FirstBlockCache", "threshold=0.2", lambda c: FirstBlockCacheConfig(threshold=0.2))
    # every skipped row runs partly (the first transformer block), to check the work count of partial rows
    part = peers.Method("jetdet", "partial rows", {"budget": 10.0, "block_reuse": True, "skip_whole": 0.0,
                                                   "block_signal": "off", "drift_gain": 0.0})
    res = peers.run_peers(seeds=[0], classes=[1], steps=8, sampler="euler", budgets=[0.0, 0.2],
                          qualities=["fast"], whole_call_budgets=[0.2], methods=[part, fbc], weights=weights,
                          threads=1)
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == ["full", "jetdet quality=fast", "jetdet budget=0", "jetdet budget=0.2",
                          "jetdet whole-call budget=0.2", "jetdet partial rows", "FirstBlockCache threshold=0.2"]
    assert res["config"]["evaluations_per_sample"] == 8
    for r in rows.values():
        assert r["error"] is None, r
        assert r["samples"] == 1
        assert r["wall_ms"] > 0 and math.isfinite(r["speedup"])
        assert r["reset_max_diff"] == 0.0, f"{r['method']}: state leaked into the next trajectory"

    full = rows["full"]
    assert full["psnr_mean"] == math.inf and full["psnr_min"] == math.inf and full["max_abs"] == 0.0
    # batched CFG: one forward of 2 rows per evaluation, every sublayer computed
    assert (full["fwd"], full["full_fwd"], full["rows"]) == (8, 8, 16)
    assert full["calls"] == pytest.approx(8.0) and full["reduction"] == pytest.approx(1.0)
    assert full["speedup"] == pytest.approx(1.0)

    off = rows["jetdet budget=0"]
    assert off["psnr_mean"] == math.inf and off["max_abs"] == 0.0  # budget 0: the model's own output
    assert (off["fwd"], off["rows"]) == (8, 16) and off["calls"] == pytest.approx(8.0)
    assert off["controller"]["rows_saved"] == 0

    for name in ("jetdet budget=0.2", "jetdet whole-call budget=0.2", "jetdet partial rows"):
        jet = rows[name]
        c = jet["controller"]
        assert 0 < jet["fwd"] <= 8 and 0 < jet["rows"] <= 16 and 0 < jet["calls"] <= 8.0 + 1e-9
        assert c["rows_run"] + c["rows_saved"] == c["rows"] == 16
        assert jet["psnr_mean"] > 0 and jet["max_abs"] <= 2.0
        # the controller's full-model equivalents are the FLOP-weighted work the hooks counted (equal blocks)
        assert c["model_equivalents"] / 2 == pytest.approx(jet["calls"], rel=1e-6), name
    assert rows["jetdet whole-call budget=0.2"]["controller"]["rows_partial"] == 0
    part = rows["jetdet partial rows"]["controller"]
    assert part["rows_partial"] >= 4 and part["blocks"].startswith("used: transformer_blocks")

    hook = rows["FirstBlockCache threshold=0.2"]
    from jetdet.models import bundled

    depth = bundled.read_metadata(weights or bundled.DIT_FILE)["config"]["depth"]
    assert hook["hooked_modules"] == depth  # one hook per transformer block
    assert hook["fwd"] == 8  # a block cache enters the model every evaluation
    assert hook["full_fwd"] <= 8 and 0 < hook["calls"] <= 8.0 + 1e-9
    assert hook["psnr_mean"] > 0 and hook["max_abs"] <= 2.0

    assert [m["peer"] for m in res["matched"]] == ["jetdet whole-call budget=0.2", "FirstBlockCache threshold=0.2"]
    assert "psnr_bar" in res["acceptance"]
    for text in (peers.format_table(res), peers.format_curve(res), peers.format_matched(res),
                 peers.format_acceptance(res), peers.format_readme(res), peers.format_markdown(res, "cmd")):
        assert isinstance(text, str) and text
    pytest.importorskip("matplotlib")
    png = peers.plot(res, tmp_path / "peers.png")
    assert png and (tmp_path / "peers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_peer_configs_build(peers):
    """Every peer row's diffusers config constructs with the installed diffusers (field names still valid)."""
    ctx = peers._Ctx(evals=30)
    ctx.mag_ratios = [1.0] * 30
    methods = peers.peer_methods()
    assert {m.family for m in methods} == set(peers.PEER_FAMILIES)
    for m in methods:
        assert m.build(ctx) is not None, m.name
    with pytest.raises(ValueError, match="unknown"):
        peers.peer_methods(("NoSuchCache",))
