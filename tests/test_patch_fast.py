"""jetdet.patch(mode="fast") wires the step-cache controller into a model's forward: budget 0 is bitwise
the model, a budget saves calls, removal restores the model, bad options leave it untouched."""

import warnings

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


def _partial_call(model, x, t_steps, extra, rows=2, **options):
    """Five calls on every row, then one where row 1 restarts (a new trajectory: it must be computed) while row 0 is
    forecast: the model runs on row 1 alone. Returns that call's output and its timesteps."""
    with torch.no_grad():
        h = jetdet.patch(model, mode="fast", budget=1e3, piggyback=1.0, **options)
        try:
            for i in range(5):
                model(x, t_steps[i].expand(rows).clone(), **extra)
            t = t_steps[5].expand(rows).clone()
            t[1] = t_steps[0]
            out = model(x, t, **extra)
            assert h.stats()["cache"]["rows_run"] < h.stats()["cache"]["rows"]
        finally:
            h.remove()
        return out, t


def test_an_argument_with_its_batch_in_another_dim_is_never_merged_into_fewer_rows():
    """A call computing some rows slices every batch-first argument. Per-layer features stacked in front of the batch
    ([layers, B, D], as HiDream's Llama features) were left whole, so the model merged both rows' features into the
    one row it ran, silently. HiDream's argument is now sliced on its batch dim; one of an unknown name makes such a
    call compute every row (warned once), and the rows asked for equal the model's."""
    class Stacked(torch.nn.Module):
        def forward(self, x, t, feats):  # x [B, D], feats [n, B, D]
            f = feats.permute(1, 0, 2).reshape(x.shape[0], -1, x.shape[1]).mean(1)
            return x * t.view(-1, 1) + f

    g = torch.Generator().manual_seed(0)
    x, feats = torch.randn(2, 8, generator=g), torch.randn(3, 2, 8, generator=g)
    ts = torch.linspace(1, 0, 11)
    with pytest.warns(UserWarning, match="'feats' has shape \\(3, 2, 8\\), whose batch \\(2\\) is not its first dim"):
        out, t = _partial_call(Stacked(), x, ts, {"feats": feats})
    assert torch.equal(out[1], Stacked()(x, t, feats)[1])  # all rows ran: row 1 of the whole batch's output

    class Blocks(torch.nn.Module):  # with a block list, block-level reuse must not plan per row either (a review)
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(6))

        def forward(self, x, t, feats):
            h = x * t.view(-1, 1)
            for b in self.blocks:
                h = h + torch.tanh(b(h) + feats.mean(0))
            return h

    model = Blocks().eval()
    out, t = _partial_call(model, x, ts, {"feats": feats}, block_reuse=True)
    with torch.no_grad():
        assert torch.equal(out[1], model(x, t, feats)[1])


def test_hidream_llama_features_are_sliced_on_their_batch_dim():
    diffusers = pytest.importorskip("diffusers")
    cls = getattr(diffusers, "HiDreamImageTransformer2DModel", None)
    if cls is None:
        pytest.skip("this diffusers has no HiDream transformer")
    torch.manual_seed(0)
    m = cls(patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=4, caption_channels=[8, 4], text_emb_dim=8, num_routed_experts=4,
            num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(32, 32), llama_layers=(0, 1)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    extra = {"encoder_hidden_states_t5": torch.randn(2, 5, 8, generator=g),
             "encoder_hidden_states_llama3": torch.randn(5, 2, 5, 4, generator=g),  # 5 layers, batch on dim 1
             "pooled_embeds": torch.randn(2, 8, generator=g), "return_dict": False}

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # sliced, not the every-row fallback
        out, t = _partial_call(m, x, torch.linspace(1000, 0, 11), extra)
    with torch.no_grad():  # the model on row 1 alone, its llama features sliced by hand
        ref = m(x[1:], t[1:], encoder_hidden_states_t5=extra["encoder_hidden_states_t5"][1:],
                encoder_hidden_states_llama3=extra["encoder_hidden_states_llama3"][:, 1:],
                pooled_embeds=extra["pooled_embeds"][1:], return_dict=False)
    assert torch.equal(out[0][1], ref[0][0])


def test_a_model_on_the_meta_device_passes_through_and_keeps_the_cache():
    """A meta call (shape inference: a model built under ``torch.device("meta")`` or accelerate's
    ``init_empty_weights``) has no values to decide on: it runs as the model, untouched by the step cache, and the
    same patch then caches the model once its weights are loaded. Before, it stopped inside the controller with
    torch's "Cannot copy out of meta tensor; no data!" (a user trial)."""
    torch.manual_seed(0)
    real = TinyDiT().eval()
    with torch.device("meta"):
        meta = TinyDiT().eval()
    x, t, y = make_toy_inputs(3)
    with jetdet.patch(meta, mode="fast", budget=0.5) as h:
        with torch.no_grad():
            out = meta(x.to("meta"), t.to("meta"), y.to("meta"))
        assert out.is_meta and out.shape == x.shape
        assert h.stats()["cache"]["calls"] == 0  # not seen by the cache
        meta.load_state_dict(real.state_dict(), assign=True)
        got = _euler(meta, x, y, steps=20)
        assert h.stats()["cache"]["rows_saved"] > 0
    assert torch.equal(_euler(meta, x, y, steps=20), _euler(real, x, y, steps=20))
    assert not torch.equal(got, _euler(real, x, y, steps=20))
