"""Block lists of real architectures: jetdet.patch finds them (diffusers DiT, PixArt, SD3, Flux, Wan, a U-Net; the
bundled plain-torch DiT), runs rows partly through them, and reproduces the model where the body forecast is exact.

The exact case: a timestep evaluated twice at the same latent (as Heun's sampler does at a corrected latent): the
second evaluation runs the head and tail and takes the body's residual from the node cached at that timestep, so
its output must equal the model's own. A row with a new conditioning value in the same call computes its body,
so the body runs on a subset of the rows (argument slicing, tuple outputs, U-Net skip lists). Negative control:
the same check with a cached residual 5 % off fails."""

import pytest
import torch

import jetdet

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional extra (pip install '.[diffusers]')")

B = 2


def _dit():
    from diffusers import DiTTransformer2DModel

    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                              num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                              norm_type="ada_norm_zero", norm_elementwise_affine=False)

    def inputs(g, b, variant):
        return {"hidden_states": torch.randn(b, 4, 8, 8, generator=g),
                "class_labels": torch.tensor([variant % 10] * b)}

    return m, inputs, "timestep", "transformer_blocks", lambda t: 1000 * t


def _pixart():
    from diffusers import PixArtTransformer2DModel

    m = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                 num_layers=3, cross_attention_dim=16, sample_size=8, patch_size=2,
                                 caption_channels=12, attention_bias=True)

    def inputs(g, b, variant):
        return {"hidden_states": torch.randn(b, 4, 8, 8, generator=g),
                "encoder_hidden_states": torch.full((b, 5, 12), float(variant)) + 0.1 * torch.randn(b, 5, 12,
                                                                                                  generator=g),
                "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}

    return m, inputs, "timestep", "transformer_blocks", lambda t: 1000 * t


def _sd3():
    from diffusers import SD3Transformer2DModel

    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                              num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                              pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8)

    def inputs(g, b, variant):
        return {"hidden_states": torch.randn(b, 4, 8, 8, generator=g),
                "encoder_hidden_states": torch.randn(b, 5, 16, generator=g),
                "pooled_projections": torch.full((b, 8), float(variant))}

    return m, inputs, "timestep", "transformer_blocks", lambda t: 1000 * t


def _flux():
    from diffusers import FluxTransformer2DModel

    m = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                               axes_dims_rope=(2, 2, 4))
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"),
                          -1).reshape(-1, 3)

    def inputs(g, b, variant):
        return {"hidden_states": torch.randn(b, 16, 8, generator=g),
                "encoder_hidden_states": torch.randn(b, 5, 16, generator=g),
                "pooled_projections": torch.full((b, 8), float(variant)), "img_ids": img_ids,
                "txt_ids": torch.zeros(5, 3)}

    return m, inputs, "timestep", "transformer_blocks + single_transformer_blocks", lambda t: t


def _wan():
    from diffusers import WanTransformer3DModel

    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                              out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3, rope_max_seq_len=32)

    def inputs(g, b, variant):
        return {"hidden_states": torch.randn(b, 4, 1, 8, 8, generator=g),
                "encoder_hidden_states": torch.full((b, 5, 16), float(variant)) + 0.1 * torch.randn(b, 5, 16,
                                                                                                  generator=g)}

    return m, inputs, "timestep", "blocks", lambda t: 1000 * t


def _unet():
    from diffusers import UNet2DConditionModel

    m = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                             block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                             norm_num_groups=4, attention_head_dim=4)

    def inputs(g, b, variant):
        return {"sample": torch.randn(b, 4, 8, 8, generator=g),
                "encoder_hidden_states": torch.full((b, 5, 16), float(variant)) + 0.1 * torch.randn(b, 5, 16,
                                                                                                  generator=g)}

    return m, inputs, "timestep", "down_blocks + mid_block + up_blocks", lambda t: 1000 * t


def _bundled_plain():
    from jetdet.models.bundled import BundledDiT

    m = BundledDiT({"hidden_size": 16, "depth": 3, "num_heads": 2, "sample_size": 8})
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))

    def inputs(g, b, variant):
        return {"x": torch.randn(b, 3, 8, 8, generator=g), "y": torch.tensor([variant % 10] * b)}

    return m, inputs, "t", "blocks", lambda t: t


MODELS = {"dit": _dit, "pixart": _pixart, "sd3": _sd3, "flux": _flux, "wan": _wan, "unet": _unet,
          "bundled": _bundled_plain}


def _out(o):
    return o if isinstance(o, torch.Tensor) else (o.sample if hasattr(o, "sample") else o[0])


def _run(make, shift_node=False, **extra):
    """Three calls: t1 (computed), t2 (computed), t2 again at the same latent plus one new row (partial + new), and
    the model's own outputs for the same inputs. Returns (patched third output, reference, stats). ``extra``:
    more patch options (the output's parametrization: ``prediction="flow"`` by default)."""
    torch.manual_seed(0)
    model, inputs, t_name, _, tscale = make()
    model = model.eval()
    g = torch.Generator().manual_seed(1)
    a = inputs(g, B, 1)
    new = inputs(g, 1, 7)  # a row with another conditioning value: a new stream, computed in full
    third = {k: (torch.cat([v, new[k]]) if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == B else v)
             for k, v in a.items()}
    opts = dict(budget=1e6, block_reuse=True, skip_whole=0.0, block_signal="off", forecast="none", num_steps=10)
    opts.update(extra or {"prediction": "flow"})
    calls = [(a, 0.9), (a, 0.8), (third, 0.8)]
    with torch.no_grad():
        with jetdet.patch(model, mode="fast", **opts) as h:
            if shift_node:  # negative control: the cached residual is 5 % off
                ctl = h.controller
                real = ctl._update_body

                def update(plan, computed, streams, t_rows):
                    real(plan, computed, streams, t_rows)
                    for i in computed:
                        key = (streams[i].key, "body")
                        ctl.manager.set(key, [v * 1.05 for v in ctl.manager.get(key)])

                ctl._update_body = update
            outs = [_out(model(**kw, **{t_name: torch.full((kw_rows(kw),), tscale(t))})) for kw, t in calls]
            st = h.stats()["cache"]
        ref = _out(model(**third, **{t_name: torch.full((B + 1,), tscale(0.8))}))
    return outs[-1], ref, st


def kw_rows(kw):
    return next(v.shape[0] for v in kw.values() if isinstance(v, torch.Tensor) and v.dim() >= 1)


@pytest.mark.parametrize("name", list(MODELS))
def test_block_list_found_and_partial_rows_exact_at_a_cached_node(name):
    make = MODELS[name]
    out, ref, st = _run(make)
    expect = make()[3]
    assert st["blocks"].startswith(f"used: {expect}:"), st["blocks"]
    assert st["rows_partial"] == B, st  # the repeated rows ran partly; the new row computed its body
    log_ok = st["reasons"].get("new", 0) >= B + 1
    assert log_ok, st["reasons"]
    assert out.shape == ref.shape
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-5, err


def test_unet_as_eps_model_partial_rows_exact_at_a_cached_node():
    """The same through the eps map (scheduler=): rows that ran partly are the model's output as it computed them."""
    diffusers = pytest.importorskip("diffusers")
    out, ref, st = _run(MODELS["unet"], scheduler=diffusers.DDIMScheduler(prediction_type="epsilon"))
    assert st["rows_partial"] == B, st
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-5, err


@pytest.mark.parametrize("name", ["dit", "flux", "unet", "unet-eps"])
def test_partial_rows_negative_control_wrong_node(name):
    extra = {}
    if name == "unet-eps":
        diffusers = pytest.importorskip("diffusers")
        name, extra = "unet", {"scheduler": diffusers.DDIMScheduler(prediction_type="epsilon")}
    out, ref, st = _run(MODELS[name], shift_node=True, **extra)
    assert st["rows_partial"] == B
    err = ((out[:B] - ref[:B]).abs().max() / ref.abs().max()).item()
    assert err > 1e-3, err
    assert torch.allclose(out[B:], ref[B:], rtol=1e-5, atol=1e-5)  # the new row computed its body
