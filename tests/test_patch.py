"""jetdet.patch / unpatch on plain torch models: deterministic patch, exact removal, errors."""

import pytest
import torch
import torch.nn as nn

import jetdet
from jetdet.invariance import check_model
from jetdet.models import TinyDiT, TinyUNet, make_toy_inputs
from jetdet.patch import UnsupportedModelError


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {name: dict(m.__dict__) for name, m in model.named_modules()},
        {name: type(m) for name, m in model.named_modules()},
        [(name, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in model.named_modules()],
    )


def _same_snapshot(a, b):
    sd_a, dict_a, types_a, hooks_a = a
    sd_b, dict_b, types_b, hooks_b = b
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert types_a == types_b and hooks_a == hooks_b
    for name in dict_a:
        assert dict_a[name].keys() == dict_b[name].keys(), name
        for k in dict_a[name]:
            assert dict_a[name][k] is dict_b[name][k] or k in ("_parameters", "_buffers", "_modules"), (name, k)


@pytest.mark.parametrize("cls", [TinyUNet, TinyDiT])
def test_deterministic_patch_outside_mode_and_exact_remove(cls):
    model = cls().eval()
    x, t, y = make_toy_inputs(8)
    before = _snapshot(model)
    with torch.no_grad():
        ref = model(x, t, y)
    handle = jetdet.patch(model, mode="deterministic")
    assert jetdet.get_mode() is jetdet.Mode.OFF  # no mode context needed
    comps, _ = check_model(model, (x, t, y), mode="off", threads=(2, 1), repeats=2)
    bad = [c.label for c in comps if not c.equal]
    assert not bad, bad
    st = handle.stats()
    assert st["layers_patched"]["Linear"] > 0
    handle.remove()
    _same_snapshot(before, _snapshot(model))
    with torch.no_grad():
        assert torch.equal(model(x, t, y), ref)  # bit-identical to before patching
    assert not jetdet.unpatch(model)


def test_layers_deterministic_even_called_alone():
    model = TinyDiT().eval()
    jetdet.patch(model, mode="deterministic")
    lin = model.blocks[0].mlp[0]
    x = torch.randn(257, lin.in_features)
    with torch.no_grad():
        assert torch.equal(lin(x)[:1], lin(x[:1]))
    jetdet.unpatch(model)
    with torch.no_grad():
        assert not torch.equal(lin(x)[:1], lin(x[:1]))  # negative control: plain nn.Linear differs at M=257


def test_patch_twice_raises_and_user_forward_restored():
    model = nn.Sequential(nn.Linear(4, 4))
    custom = lambda x: x * 2  # noqa: E731 - a user's own instance forward must survive patch/remove
    model.forward = custom
    h = jetdet.patch(model, mode="deterministic")
    with pytest.raises(RuntimeError, match="already patched by jetdet"):
        jetdet.patch(model, mode="deterministic")
    h.remove()
    assert model.forward is custom
    h.remove()  # idempotent


def test_unsupported_model_lists_what_was_found():
    model = nn.Sequential(nn.ReLU(), nn.Conv1d(2, 2, 3))
    before = _snapshot(model)
    with pytest.raises(UnsupportedModelError, match=r"found: .*Conv1d x1"):
        jetdet.patch(model, mode="deterministic")
    _same_snapshot(before, _snapshot(model))


def test_bad_arguments():
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        jetdet.patch(object())
    with pytest.raises(ValueError, match="mode: expected one of"):
        jetdet.patch(nn.Linear(2, 2), mode="turbo")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['budget'\]"):
        jetdet.patch(nn.Linear(2, 2), mode="deterministic", budget=0.1)


def test_grouped_conv_left_to_router_and_reported():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 1))
    h = jetdet.patch(model, mode="deterministic")
    st = h.stats()
    assert st["layers_patched"] == {"Conv2d": 1}
    assert st["layers_left_to_router"] == {"Conv2d (groups=2)": 1}
    h.remove()


def test_deepcopy_of_a_deterministic_model_runs_its_own_weights():
    """``copy.deepcopy`` of a patched model: the copy's forwards are bound to the copy, so it runs its own weights
    (never the original's) and is deterministic; ``jetdet.patch(copy)`` refuses until ``jetdet.unpatch(copy)`` has
    removed what it inherited, and the original's patch is untouched throughout. Negative control (run by hand):
    with the model's forward a closure over the original's bound forward, as before, the copy with zeroed weights
    gave the original's output."""
    import copy

    model = TinyDiT().eval()
    x, t, y = make_toy_inputs(8)
    handle = jetdet.patch(model, mode="deterministic")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
        mine, ref = twin(x, t, y), model(x, t, y)
        jetdet.unpatch(twin)  # the plain copy, for the reference below
        plain = twin(x, t, y)
    assert not torch.equal(mine, ref)
    torch.testing.assert_close(mine, plain, atol=1e-4, rtol=1e-4)  # the copy's weights, not the original's
    twin = copy.deepcopy(model)
    with pytest.raises(RuntimeError, match=r"copied from a patched model.*jetdet.unpatch"):
        jetdet.patch(twin, mode="deterministic")
    comps, _ = check_model(twin, (x, t, y), max_batch=4, threads=(1,), repeats=2)
    assert all(c.equal for c in comps), [c for c in comps if not c.equal]  # deterministic as copied
    assert jetdet.unpatch(twin) and not jetdet.unpatch(twin)
    assert all("forward" not in m.__dict__ for m in twin.modules())
    jetdet.patch(twin, mode="deterministic").remove()
    assert not handle.removed and "forward" in model.__dict__


def test_deepcopy_of_a_fast_model_runs_without_the_originals_cache():
    import copy

    model = TinyUNet().eval()
    x, t, y = make_toy_inputs(2)
    handle = jetdet.patch(model, mode="fast", budget=0.0)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
        with pytest.warns(UserWarning, match=r"copy \(copy.deepcopy\).*runs without the step cache"):
            out = twin(x, t, y)
    assert out.abs().max() < 1e-6  # its own (zeroed) weights
    assert handle.stats()["cache"]["calls"] == 0  # and not the original's cache
    with torch.no_grad():
        model(x, t, y)
    assert handle.stats()["cache"]["calls"] == 1
    assert jetdet.unpatch(twin)
    jetdet.patch(twin, mode="fast").remove()


def test_overlapping_patches_refused():
    """A submodule of a patched model, a model containing a patched submodule, and a model sharing a layer with a
    patched model are refused: removing two overlapping patches in the wrong order would leave jetdet forwards
    installed for good."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))
    h_sub = jetdet.patch(model[1], mode="deterministic")
    with pytest.raises(RuntimeError, match="its submodule '1' already carries a forward of another jetdet patch"):
        jetdet.patch(model, mode="deterministic")
    h_sub.remove()
    h_all = jetdet.patch(model, mode="deterministic")
    with pytest.raises(RuntimeError, match="submodule of a Sequential already patched"):
        jetdet.patch(model[1], mode="deterministic")
    other = nn.Sequential(model[0], nn.ReLU())  # shares model's first Linear
    with pytest.raises(RuntimeError, match="its submodule '0' already carries a forward of another jetdet patch"):
        jetdet.patch(other, mode="deterministic")
    h_all.remove()
    assert all("forward" not in m.__dict__ for m in model.modules())
    jetdet.patch(other, mode="deterministic").remove()


def test_a_patched_model_dropped_without_remove_is_freed():
    """The registry of patches holds models and handles weakly: a patched model the user lets go of is collected
    (with its handle), and ``unpatch`` of a live one still finds its handle when the user dropped it. Negative
    control (run by hand): with the registry's value the handle itself, the model was never freed."""
    import gc
    import weakref

    model = TinyDiT().eval()
    jetdet.patch(model, mode="deterministic")  # the handle is not kept
    gc.collect()
    assert jetdet.unpatch(model) and "forward" not in model.__dict__
    jetdet.patch(model, mode="fast")
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_a_copy_runs_a_user_forward_made_with_partial_on_itself():
    import copy
    import functools

    model = nn.Sequential(nn.Linear(4, 4))
    model.forward = functools.partial(nn.Sequential.forward, model)
    handle = jetdet.patch(model, mode="deterministic")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
        assert torch.equal(twin(torch.ones(2, 4)), torch.zeros(2, 4))
    assert jetdet.unpatch(twin) and twin.forward.args[0] is twin
    handle.remove()


@pytest.mark.parametrize("mode", ["deterministic", "fast"])
def test_torch_save_of_a_patched_model_loads_unpatched(mode):
    """The README's Limits: ``torch.save`` of a patched model saves it unpatched (the loaded model runs its plain
    forwards; patch it after loading). Deterministic mode's output differs from plain torch here, so a loaded model
    that kept the patch would fail the first check."""
    import io

    torch.manual_seed(0)
    model = TinyDiT().eval()
    x = make_toy_inputs(2)
    with torch.no_grad():
        plain = model(*x)
        with jetdet.patch(model, mode=mode):
            patched = model(*x)
            buf = io.BytesIO()
            torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(*x), plain)
        if mode == "deterministic":
            assert not torch.equal(patched, plain)
            with jetdet.patch(loaded, mode=mode):
                assert torch.equal(loaded(*x), patched)


def test_a_layer_class_of_its_own_named_like_torchs_is_left_to_the_router_and_said_so():
    """ComfyUI's comfy.ops layers are classes named Linear, Conv2d, ... that are not torch's: the patch leaves them
    (their forward casts or patches weights) and the error or the stats say why, where the error listed "Linear x45"
    as found beside "has no supported layer (Linear, ...)" (a model-family sweep)."""
    Linear = type("Linear", (nn.Linear,), {})
    with pytest.raises(UnsupportedModelError, match=r"not taken: Linear \(.*Linear, not torch's: its own forward"):
        jetdet.patch(nn.Sequential(Linear(2, 2), nn.ReLU()), mode="deterministic")
    with jetdet.patch(nn.Sequential(Linear(2, 2), nn.Linear(2, 2)), mode="deterministic") as h:
        st = h.stats()
    assert st["layers_patched"] == {"Linear": 1} and any("not torch's" in k for k in st["layers_left_to_router"])
