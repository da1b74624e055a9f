"""Whole-model determinism: under jetdet.mode("deterministic") each item's output is bitwise identical at
batch 1..8 and any slot, with 1 and 2 CPU threads, and over repeated runs. Under mode "off" at least one of
these comparisons differs (the negative control)."""

import random

import pytest
import torch

import jetdet
from jetdet.models import TinyDiT, TinyUNet, make_toy_inputs

MODELS = {"unet": TinyUNet, "dit": TinyDiT}


@pytest.fixture(scope="module")
def models():
    return {k: cls().eval() for k, cls in MODELS.items()}


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _runs(model, mode):
    """Every comparison the guarantee covers: returns a list of (label, equal?)."""
    x, t, y = make_toy_inputs(8)
    rng = random.Random(0)
    results = []
    with torch.no_grad(), jetdet.mode(mode):
        torch.set_num_threads(2)
        ref = model(x, t, y)
        for _ in range(2):  # 3 runs in total
            results.append(("repeat", torch.equal(model(x, t, y), ref)))
        for b in range(1, 9):
            out = model(x[:b], t[:b], y[:b])
            results.append((f"prefix {b}", torch.equal(out, ref[:b])))
            s = rng.randrange(b)
            one = model(x[s : s + 1], t[s : s + 1], y[s : s + 1])
            results.append((f"slot {s} of {b}", torch.equal(one[0], out[s])))
        # the same item at every slot of a batch of 8 built from copies of other items
        perm = list(range(8))
        rng.shuffle(perm)
        out = model(x[perm], t[perm], y[perm])
        results.append(("shuffled", torch.equal(out, ref[perm])))
        torch.set_num_threads(1)
        results.append(("1 thread vs 2", torch.equal(model(x, t, y), ref)))
        results.append(("1 thread, batch 1", torch.equal(model(x[3:4], t[3:4], y[3:4])[0], ref[3])))
    return results


@pytest.mark.parametrize("name", sorted(MODELS))
def test_deterministic_mode_bitwise(name, models, restore_threads):
    results = _runs(models[name], "deterministic")
    bad = [label for label, ok in results if not ok]
    assert not bad, f"{name}: deterministic mode differs in {bad}"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_negative_control_mode_off_differs(name, models, restore_threads):
    results = _runs(models[name], "off")
    bad = [label for label, ok in results if not ok]
    assert bad, f"{name}: mode off gave identical results everywhere; the test could not fail"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_deterministic_close_to_off(name, models):
    x, t, y = make_toy_inputs(4)
    with torch.no_grad():
        ref = models[name](x, t, y)
        with jetdet.mode("deterministic"):
            out = models[name](x, t, y)
    assert (out - ref).abs().max().item() < 1e-4 * max(1.0, ref.abs().max().item())
