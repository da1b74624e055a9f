"""jetdet.patch on diffusers models (tiny random FluxTransformer2DModel and SD3Transformer2DModel): the
deterministic patch gives per-item bitwise equality at batch 1/4/8; remove() restores them exactly."""

import pytest
import torch
from _invariance import batch_mismatches
from _tolerances import MODE_VS_OFF

import jetdet
from jetdet.invariance import check_model

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional extra (pip install '.[diffusers]')")

B, N_IMG, N_TXT = 8, 64, 7


def _flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    m = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                               attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                               pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)).eval()
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(B, N_IMG, 16, generator=g), torch.randn(B, N_TXT, 32, generator=g),
              torch.randn(B, 16, generator=g), torch.rand(B, generator=g))
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(8.0), torch.arange(8.0), indexing="ij"),
                          -1).reshape(-1, 3)
    txt_ids = torch.zeros(N_TXT, 3)

    def fn(hs, ehs, pooled, t):
        return m(hidden_states=hs, encoder_hidden_states=ehs, pooled_projections=pooled, timestep=t,
                 img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]

    return m, fn, inputs


def _sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    m = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                              num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                              pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16).eval()
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(B, 4, 16, 16, generator=g), torch.randn(B, N_TXT, 32, generator=g),
              torch.randn(B, 16, generator=g), torch.rand(B, generator=g) * 1000)

    def fn(hs, ehs, pooled, t):
        return m(hidden_states=hs, encoder_hidden_states=ehs, pooled_projections=pooled, timestep=t).sample

    return m, fn, inputs


@pytest.mark.parametrize("make", [_flux, _sd3], ids=["flux", "sd3"])
def test_diffusers_deterministic_patch(make):
    model, fn, inputs = make()
    with torch.no_grad():
        ref = fn(*inputs)
    off, _ = check_model(fn, inputs, mode="off", threads=(2, 1), repeats=2)
    assert any(not c.equal for c in off), "negative control: the unpatched model was invariant everywhere"
    handle = jetdet.patch(model, mode="deterministic")
    assert handle.stats()["layers_patched"].get("Linear", 0) > 4
    comps, _ = check_model(fn, inputs, mode="off", threads=(2, 1), repeats=2)
    bad = [c.label for c in comps if not c.equal]
    assert not bad, bad
    with torch.no_grad():
        close = fn(*inputs)
    assert (close - ref).abs().max() < MODE_VS_OFF * max(1.0, ref.abs().max().item())
    handle.remove()
    with torch.no_grad():
        assert torch.equal(fn(*inputs), ref)


def _vae(widths=(32, 64, 128, 128), groups=32):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=widths, down_block_types=("DownEncoderBlock2D",) * len(widths),
                         up_block_types=("UpDecoderBlock2D",) * len(widths), layers_per_block=1, latent_channels=4,
                         norm_num_groups=groups).eval()


def _codec(vae):
    """The VAE's decode and encode as a pipeline calls them: latents -> pixels, pixels -> the latent mean."""
    return (lambda z: vae.decode(z).sample), (lambda x: vae.encode(x).latent_dist.mean)


def test_diffusers_vae_decode_and_encode_are_batch_invariant_patched():
    """A pipeline's images come out of its VAE: ``jetdet.patch(pipe.vae, mode="deterministic")`` makes the decode of
    each latent (and the encode of each image) independent of the batch, the mid block's attention included.
    Negative control: the unpatched VAE's decode and encode of the same batch (0 of 5 items equal on this CPU;
    skipped where torch happens to be invariant)."""
    vae = _vae()
    lat = torch.randn(5, 4, 12, 16, generator=torch.Generator().manual_seed(1))
    px = torch.rand(5, 3, 64, 96, generator=torch.Generator().manual_seed(2)) * 2 - 1
    dec, enc = _codec(vae)

    with torch.no_grad():
        ref_dec, ref_enc = dec(lat), enc(px)
        stock = batch_mismatches(dec, [lat], slots=range(5)) + batch_mismatches(enc, [px], slots=range(5))
        with jetdet.patch(vae, mode="deterministic") as handle:
            assert handle.stats()["layers_patched"].get("Conv2d", 0) > 10
            assert not batch_mismatches(dec, [lat], slots=range(5)), "decode: items alone differ from the batch's rows"
            assert not batch_mismatches(enc, [px], slots=range(5)), "encode: items alone differ from the batch's rows"
            torch.testing.assert_close(dec(lat), ref_dec, atol=1e-4, rtol=0)
            torch.testing.assert_close(enc(px), ref_enc, atol=1e-4, rtol=0)
        assert torch.equal(dec(lat), ref_dec)  # removed: the VAE is as before
    if not stock:
        pytest.skip("the unpatched VAE happened to be batch invariant on this CPU (the negative control)")


class _ModeSpy(torch.overrides.TorchFunctionMode):
    """Records the jetdet mode each functional call of interest ran in."""

    NAMES = ("silu", "scaled_dot_product_attention", "interpolate", "group_norm")

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.NAMES:
            self.calls.append((name, jetdet.get_mode().value))
        return func(*args, **(kwargs or {}))


def test_patched_vae_decode_and_encode_run_their_functional_calls_in_the_mode():
    """A user trial: pipelines call ``vae.decode``/``vae.encode``, never ``vae.forward``, and only the patched
    model's ``forward`` entered the mode, so inside them ``F.silu``, the attention processor's SDPA and
    ``F.interpolate`` ran as torch's: with 16 channels and 7x9 latents 4 of 5 items decoded alone differed from
    their rows in a batch of 5. Every submodule's forward now enters the mode: each such call runs in it (a check
    that holds on any CPU), and the items equal their rows. Negative control: the same VAE unpatched (skipped where
    torch happens to be invariant), and the spy sees the calls outside the mode there."""
    vae = _vae(widths=(16, 16), groups=4)
    lat = torch.randn(5, 4, 7, 9, generator=torch.Generator().manual_seed(1))
    px = torch.rand(5, 3, 14, 18, generator=torch.Generator().manual_seed(2)) * 2 - 1
    dec, enc = _codec(vae)

    with torch.no_grad():
        with _ModeSpy() as spy:
            dec(lat[:1]), enc(px[:1])
        assert {m for _, m in spy.calls} == {"off"}  # the control: torch's own calls, unpatched
        stock = batch_mismatches(dec, [lat], slots=range(5)) + batch_mismatches(enc, [px], slots=range(5))
        with jetdet.patch(vae, mode="deterministic") as handle:
            with _ModeSpy() as spy:
                dec(lat[:1]), enc(px[:1])
            names = {n for n, _ in spy.calls}
            assert names == set(_ModeSpy.NAMES), names
            assert {m for _, m in spy.calls} == {"deterministic"}, [c for c in spy.calls if c[1] != "deterministic"]
            assert not batch_mismatches(dec, [lat], slots=range(5)), "decode: items alone differ from the batch's rows"
            assert not batch_mismatches(enc, [px], slots=range(5)), "encode: items alone differ from the batch's rows"
            assert handle.stats()["modules_entering_mode"] > 20
        assert all("forward" not in m.__dict__ for m in vae.modules())  # removed: nothing of the patch is left
    if not stock:
        pytest.skip("the unpatched VAE happened to be batch invariant on this CPU (the negative control)")


def test_text_encoder_with_projection_is_batch_invariant_patched():
    """SDXL's second text encoder (``CLIPTextModelWithProjection``) gives the pooled ``text_embeds`` the U-Net takes
    as a condition; its last linear runs on one row per prompt, and unpatched its rows depend on how many prompts
    came together (a user trial: an SDXL pipeline with only the U-Net and the VAE patched gave 0 of 4 images equal
    to the image made alone). Patched, each prompt's embeddings equal the prompt's alone. Negative control: the
    unpatched encoder (5 of 5 pooled rows differ on this CPU; skipped where torch happens to be invariant)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=16, eos_token_id=2,
                                      bos_token_id=0, pad_token_id=1, projection_dim=64)
    enc = transformers.CLIPTextModelWithProjection(cfg).eval()
    ids = torch.randint(3, 1000, (5, 16), generator=torch.Generator().manual_seed(1))
    ids[:, -1] = 2

    def pooled(i):
        return enc(input_ids=i).text_embeds

    def hidden(i):
        return enc(input_ids=i).last_hidden_state

    with torch.no_grad():
        ref = pooled(ids)
        stock = batch_mismatches(pooled, [ids], slots=range(5))
        with jetdet.patch(enc, mode="deterministic"):
            assert not batch_mismatches(pooled, [ids], slots=range(5)), "pooled: prompts alone differ from the batch"
            assert not batch_mismatches(hidden, [ids], slots=range(5)), "hidden: prompts alone differ from the batch"
            torch.testing.assert_close(pooled(ids), ref, atol=1e-4, rtol=0)
    if not stock:
        pytest.skip("the unpatched text encoder happened to be batch invariant on this CPU (the negative control)")
