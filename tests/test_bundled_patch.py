"""jetdet.patch on the bundled trained DiT: the deterministic patch gives per-item bitwise equality at batch 1/4/8
(model calls and whole sampling runs), the fast patch saves calls, and remove() restores the model bit for bit."""

import pytest
import torch

import jetdet
from jetdet.invariance import check_model
from jetdet.models import bundled, sampling


@pytest.fixture
def model():
    if not bundled.DIT_FILE.exists():
        pytest.skip("the bundled weights (jetdet/data/bundled_dit.safetensors) are not there")
    return bundled.load_bundled()


def _inputs(n=8):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(n, 3, 32, 32, generator=g)
    t = torch.rand(n, generator=g)
    y = torch.randint(0, bundled.NUM_CLASSES + 1, (n,), generator=g)  # null label included
    return x, t, y


def test_deterministic_patch_forward_batch_invariant(model):
    inputs = _inputs()
    off, _ = check_model(model, inputs, mode="off", threads=(2, 1), repeats=2)
    assert any(not c.equal for c in off), "negative control: the unpatched bundled DiT was invariant everywhere"
    handle = jetdet.patch(model, mode="deterministic")
    try:
        assert handle.stats()["layers_patched"]["Linear"] > 10
        comps, _ = check_model(model, inputs, mode="off", threads=(2, 1), repeats=2)
        bad = [c.label for c in comps if not c.equal]
        assert not bad, bad
    finally:
        handle.remove()


def test_deterministic_patch_sampling_per_item_bitwise(model):
    """Whole sampling runs (CFG 4, batched cond/uncond): item i of a batch of 8 is bit-identical to the same item
    sampled alone (noise index item_offset + i) and in batches of 4, whichever slot it sits in."""
    labels = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    steps = 4
    with torch.no_grad():
        ref_off = sampling.sample(model, labels, steps=steps, seed=7)
    handle = jetdet.patch(model, mode="deterministic")
    try:
        with torch.no_grad():
            b8 = sampling.sample(model, labels, steps=steps, seed=7)
            b4 = torch.cat([sampling.sample(model, labels[k:k + 4], steps=steps, seed=7, item_offset=k)
                            for k in (0, 4)])
            b1 = torch.cat([sampling.sample(model, labels[k:k + 1], steps=steps, seed=7, item_offset=k)
                            for k in range(8)])
            again = sampling.sample(model, labels, steps=steps, seed=7)
        assert torch.equal(b8, b4) and torch.equal(b8, b1) and torch.equal(b8, again)
        assert jetdet.checksum(b8) == jetdet.checksum(b1)
        # the deterministic path is the same function up to rounding
        assert (b8 - ref_off).abs().max().item() < 1e-3
    finally:
        handle.remove()
    with torch.no_grad():
        assert torch.equal(sampling.sample(model, labels, steps=steps, seed=7), ref_off)


def test_unpatched_sampling_is_not_batch_invariant(model):
    """Negative control for the test above: without the patch, some item differs between batch 8 and alone."""
    labels = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    with torch.no_grad():
        b8 = sampling.sample(model, labels, steps=4, seed=7)
        b1 = torch.cat([sampling.sample(model, labels[k:k + 1], steps=4, seed=7, item_offset=k) for k in range(8)])
    assert not torch.equal(b8, b1)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_fast_patch_on_bundled_model_and_exact_remove(model, sampler):
    """jetdet.patch(mode='fast') on the bundled model, driven by its own sampler: fewer model calls, close to full
    compute, and after remove() the model's output is bit-identical to before."""
    labels = [0, 2]
    x, t, y = _inputs(4)
    with torch.no_grad():
        before = model(x, t, y)
        ref = sampling.sample(model, labels, sampler=sampler, seed=5)
    handle = jetdet.patch(model, mode="fast", budget=0.07, num_steps=30)
    try:
        with torch.no_grad():
            out = sampling.sample(model, labels, sampler=sampler, seed=5)
        st = handle.stats()["cache"]
    finally:
        handle.remove()
    from jetdet.models.evaluate import psnr

    evals = sampling.num_evaluations(30, sampler)
    assert st["calls"] == evals
    assert st["calls_run"] <= 0.6 * evals, st  # 8 seeds x 4 classes: 2.1x (Euler), 3x (Heun) at this budget
    p = psnr(out, ref)
    assert p.min().item() > 25.0 and p.mean().item() > 30.0, p
    with torch.no_grad():
        assert torch.equal(model(x, t, y), before)
