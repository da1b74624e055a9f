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
