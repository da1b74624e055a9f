"""Whole-model determinism: under jetdet.mode("deterministic") each item's output is bitwise identical at
batch 1..8 and any slot, with 1 and 2 CPU threads, and over 3 repeated runs. Under mode "off" at least one
of these comparisons differs (the negative control)."""

import pytest
import torch
from _tolerances import MODE_VS_OFF

import jetdet
from jetdet.invariance import check_model
from jetdet.models import TinyDiT, TinyUNet, make_toy_inputs

MODELS = {"unet": TinyUNet, "dit": TinyDiT}


@pytest.fixture(scope="module")
def models():
    return {k: cls().eval() for k, cls in MODELS.items()}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_deterministic_mode_bitwise(name, models):
    comps, _ = check_model(models[name], make_toy_inputs(8), "deterministic")
    bad = [c.label for c in comps if not c.equal]
    assert len(comps) >= 20
    assert not bad, f"{name}: deterministic mode differs in {bad}"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_negative_control_mode_off_differs(name, models):
    comps, _ = check_model(models[name], make_toy_inputs(8), "off")
    assert any(not c.equal for c in comps), f"{name}: mode off identical everywhere; the test cannot fail"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_deterministic_close_to_off(name, models):
    x, t, y = make_toy_inputs(4)
    with torch.no_grad():
        ref = models[name](x, t, y)
        with jetdet.mode("deterministic"):
            out = models[name](x, t, y)
    assert (out - ref).abs().max().item() < MODE_VS_OFF * max(1.0, ref.abs().max().item())


def test_model_unchanged_by_mode(models):
    """Deterministic mode routes calls; it must not touch the user's module or its weights."""
    m = models["dit"]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    fwd = type(m).forward
    with torch.no_grad(), jetdet.mode("deterministic"):
        m(*make_toy_inputs(2))
    assert type(m).forward is fwd and "forward" not in m.__dict__
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_grad_mode_forward_works_and_matches_no_grad(models):
    """Users often forget torch.no_grad(): the deterministic forward must still run and give the same bits."""
    m = models["dit"]
    x, t, y = make_toy_inputs(2)
    with jetdet.mode("deterministic"):
        out = m(x, t, y)
        with torch.no_grad():
            ref = m(x, t, y)
    assert torch.equal(out.detach(), ref)
