"""The bundled trained DiT, its classifier, the dataset and the minimal sampler (fast: well under 30 s)."""

import importlib.util

import pytest
import torch

from jetdet.models.bundled import (
    BUNDLED_CLASSES,
    CLASSIFIER_FILE,
    DIT_FILE,
    BundledDiT,
    diffusers_config,
    load_bundled,
    load_classifier,
    read_metadata,
    to_diffusers_state_dict,
)
from jetdet.models.sampling import initial_noise, num_evaluations, sample, timestep_grid
from jetdet.models.shapes import NUM_CLASSES, make_shapes


@pytest.fixture(scope="module")
def model():
    return load_bundled()


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


class Recorder:
    """``model_fn`` that records every call's inputs and forwards to the model."""

    def __init__(self, model):
        self.model = model
        self.calls = []

    def __call__(self, x, t, y):
        self.calls.append((x.clone(), t.clone(), y.clone()))
        return self.model(x, t, y)


def test_weights_load_and_config(model, classifier):
    meta = read_metadata(DIT_FILE)
    assert meta["kind"] == "bundled_dit"
    assert meta["config"] == model.config
    assert read_metadata(CLASSIFIER_FILE)["config"] == classifier.config
    assert DIT_FILE.stat().st_size + CLASSIFIER_FILE.stat().st_size <= 8 * 1024 * 1024
    assert len(BUNDLED_CLASSES) == model.num_classes == NUM_CLASSES
    assert model.null_label == NUM_CLASSES
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # adaLN-Zero layers left zero would mean the model never trained.
    assert model.final_proj.weight.abs().max() > 0


def test_forward_shape(model):
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        v = model(x, torch.tensor([0.0, 0.5, 1.0]), torch.tensor([0, 4, NUM_CLASSES]))
        v_scalar_t = model(x, 0.5, torch.tensor([0, 4, NUM_CLASSES]))
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    assert v_scalar_t.shape == x.shape


def test_timestep_grid():
    t = timestep_grid(30)
    assert t.shape == (31,) and t[0] == 1 and t[-1] == 0 and (t[1:] < t[:-1]).all()
    ts = timestep_grid(10, shift=3.0)
    assert ts[0] == 1 and ts[-1] == 0 and (ts[1:-1] > timestep_grid(10)[1:-1]).all()
    with pytest.raises(ValueError):
        timestep_grid(0)


def test_noise_and_first_input_per_item(model):
    labels = torch.tensor([3, 7, 1])
    batched = initial_noise((3, 3, 32, 32), seed=5)
    for i in range(3):
        assert torch.equal(initial_noise((1, 3, 32, 32), seed=5, item_offset=i)[0], batched[i])
    rec_b, rec_1 = Recorder(model), Recorder(model)
    sample(model, labels, steps=1, seed=5, model_fn=rec_b)
    sample(model, labels[1:2], steps=1, seed=5, item_offset=1, model_fn=rec_1)
    (xb, tb, yb), (x1, t1, y1) = rec_b.calls[0], rec_1.calls[0]
    # [cond; uncond]: item 1 is row 1 of the cond half and row 4 of the uncond half.
    assert torch.equal(x1[0], xb[1]) and torch.equal(x1[1], xb[4])
    assert torch.equal(t1, tb[[1, 4]]) and torch.equal(y1, yb[[1, 4]])
    assert y1.tolist() == [7, NUM_CLASSES]


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("batch_cfg", [True, False])
def test_evaluation_counts(model, sampler, batch_cfg):
    steps = 4
    rec = Recorder(model)
    sample(model, [0, 1], steps=steps, sampler=sampler, batch_cfg=batch_cfg, model_fn=rec)
    evals = num_evaluations(steps, sampler)
    assert evals == (steps if sampler == "euler" else 2 * steps - 1)
    assert len(rec.calls) == evals * (1 if batch_cfg else 2)
    assert sum(c[0].shape[0] for c in rec.calls) == evals * 4  # cond + uncond row per item
    no_cfg = Recorder(model)
    sample(model, [0, 1], steps=steps, sampler=sampler, cfg=1.0, model_fn=no_cfg)
    assert len(no_cfg.calls) == evals and all((c[2] != NUM_CLASSES).all() for c in no_cfg.calls)
    # Heun evaluates at every grid time except 0; Euler at every time except 0, once.
    times = sorted({round(float(c[1][0]), 6) for c in rec.calls}, reverse=True)
    assert times == [round(float(v), 6) for v in timestep_grid(steps)[:-1]]


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_batched_vs_separate_cfg(model, sampler):
    labels = torch.tensor([2, 5, 9])
    a = sample(model, labels, steps=8, sampler=sampler, seed=1, batch_cfg=True)
    b = sample(model, labels, steps=8, sampler=sampler, seed=1, batch_cfg=False)
    # the same arithmetic up to MKL's batch-size-dependent rounding, carried through 8 CFG-4 steps
    assert (a - b).abs().max().item() < 1e-4


def test_samples_are_recognised(model, classifier):
    # 2 samples per class at the default settings (30 Euler steps, CFG 4). The full evaluation, 100 samples with
    # Euler and Heun, is `python bench/train_bundled.py --eval-only`.
    labels = torch.arange(NUM_CLASSES).repeat(2)
    imgs = sample(model, labels, steps=30, seed=0)
    assert imgs.min() >= -1 and imgs.max() <= 1
    acc = (classifier.predict(imgs) == labels).float().mean().item()
    assert acc >= 0.85, acc


def test_classifier_on_clean_data(classifier):
    x, y = make_shapes(200, seed=12345)
    acc = (classifier.predict(x) == y).float().mean().item()
    assert acc >= 0.95, acc


def test_dataset_deterministic_and_ranged():
    a, la = make_shapes(16, seed=3)
    b, lb = make_shapes(16, seed=3)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert a.shape == (16, 3, 32, 32) and a.min() >= -1 and a.max() <= 1
    c, lc = make_shapes(10, seed=3, labels=torch.arange(10))
    assert lc.tolist() == list(range(10))
    with pytest.raises(ValueError):
        make_shapes(2, seed=0, labels=torch.tensor([0, 10]))


def test_random_init_matches_config():
    m = BundledDiT({"hidden_size": 64, "depth": 2, "num_heads": 2})
    assert m.config["hidden_size"] == 64 and len(m.blocks) == 2
    assert m(torch.zeros(1, 3, 32, 32), torch.zeros(1), torch.zeros(1, dtype=torch.long)).abs().max() == 0


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers is not installed (optional)")
def test_diffusers_dit_gives_the_same_output(model):
    from diffusers import DiTTransformer2DModel

    ref = DiTTransformer2DModel(**diffusers_config(model.config)).eval()
    ref.load_state_dict(to_diffusers_state_dict(model.state_dict(), model.config), strict=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32, generator=g)
    t = torch.tensor([0.0, 0.25, 0.8, 1.0])
    y = torch.tensor([0, 5, 9, NUM_CLASSES])
    with torch.no_grad():
        ours = model(x, t, y)
        theirs = ref(x, timestep=t * model.config["time_scale"], class_labels=y).sample
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_save_module_is_byte_stable(tmp_path):
    """Two saves of the same weights and metadata give the same bytes (safetensors writes its metadata in
    hash-map order; save_module sorts it), so a deterministic training run reproduces the shipped file."""
    from jetdet.models.bundled import save_module

    m = BundledDiT({"hidden_size": 32, "depth": 1, "num_heads": 2})
    extra = {"a": 1, "b": {"x": 2}, "c": "three", "d": [4], "e": 5.0, "f": "six"}
    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for p in paths:
        save_module(m, p, kind="bundled_dit", extra=extra)
    assert len({p.read_bytes() for p in paths}) == 1
    again = BundledDiT(read_metadata(paths[0])["config"])
    from safetensors.torch import load_file

    again.load_state_dict(load_file(paths[0]))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), m.state_dict().values()))
