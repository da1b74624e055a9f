"""jetdet.patch(mode="fast") wires the step-cache controller into a model's forward: budget 0 is bitwise
the model, a budget saves calls, removal restores the model, bad options leave it untouched."""

import pytest
import torch

import jetdet
from jetdet.models import TinyDiT, make_toy_inputs
from jetdet.patch import UnsupportedModelError


def _euler(model, x, y, steps=12):
    ts = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for i in range(steps):
            t = ts[i].expand(x.shape[0])
            x = x + (ts[i + 1] - ts[i]) * model(x, t, y)
    return x


@pytest.fixture(scope="module")
def model():
    return TinyDiT().eval()


def test_budget_zero_is_bitwise_the_model(model):
    x, _, y = make_toy_inputs(3)
    ref = _euler(model, x, y)
    h = jetdet.patch(model, mode="fast", budget=0.0)
    try:
        out = _euler(model, x, y)
        st = h.stats()
    finally:
        h.remove()
    assert torch.equal(out, ref)
    assert st["adapter"] == "torch" and st["latent_arg"] == "x" and st["timestep_arg"] == "t"
    assert st["cache"]["rows_saved"] == 0 and st["cache"]["calls_saved"] == 0


def test_budget_saves_calls_and_stays_close(model):
    x, _, y = make_toy_inputs(3)
    ref = _euler(model, x, y, steps=20)
    with jetdet.patch(model, mode="fast", budget=0.5, start_percent=0.1, end_percent=0.1,
                      max_consecutive_skips=3, num_steps=20) as h:
        out = _euler(model, x, y, steps=20)
        st = h.stats()["cache"]
    assert st["rows_saved"] > 0, st
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 0.2, rel
    assert "forward" not in model.__dict__  # removed on exit
    assert torch.equal(_euler(model, x, y, steps=20), ref)


def test_bad_option_leaves_model_untouched(model):
    with pytest.raises(ValueError, match="budget"):
        jetdet.patch(model, mode="fast", budget=-1)
    with pytest.raises(TypeError):
        jetdet.patch(model, mode="fast", no_such_option=1)
    assert "forward" not in model.__dict__
    assert not jetdet.unpatch(model)


def test_model_without_timestep_is_rejected_with_what_was_found():
    class NoT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x, scale):
            return self.lin(x) * scale

    with pytest.raises(UnsupportedModelError, match=r"found parameters \['x', 'scale'\]"):
        jetdet.patch(NoT(), mode="fast")
    m = NoT()
    h = jetdet.patch(m, mode="fast", timestep_arg="scale", budget=0.0)
    assert torch.equal(m(torch.ones(2, 4), 0.5), h.model.lin(torch.ones(2, 4)) * 0.5)
    h.remove()
    with pytest.raises(ValueError, match="timestep_arg: 'tt' is not a parameter"):
        jetdet.patch(NoT(), mode="fast", timestep_arg="tt")


def test_diffusers_flux_fast_patch_budget_zero_bitwise():
    pytest.importorskip("diffusers")
    from test_patch_diffusers import _flux

    m, fn, (hs, ehs, pooled, t) = _flux()
    with torch.no_grad():
        ref = m(hidden_states=hs, encoder_hidden_states=ehs, pooled_projections=pooled, timestep=t,
                img_ids=torch.zeros(64, 3), txt_ids=torch.zeros(7, 3))
    with jetdet.patch(m, mode="fast", budget=0.0) as h:
        with torch.no_grad():
            out = m(hidden_states=hs, encoder_hidden_states=ehs, pooled_projections=pooled, timestep=t,
                    img_ids=torch.zeros(64, 3), txt_ids=torch.zeros(7, 3))
        assert h.stats()["adapter"] == "diffusers" and h.stats()["latent_arg"] == "hidden_states"
    assert type(out) is type(ref) and torch.equal(out.sample, ref.sample)
