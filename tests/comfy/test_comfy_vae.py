"""The Deterministic VAE Decode and Encode nodes on ComfyUI's own VAE class: an item's pixels (or latent) equal
those of the item decoded (encoded) alone, bit for bit, whatever the batch size and free memory; the tiled
fallback is refused; nothing of the VAE stays changed. Negative control: ComfyUI's own decode and encode of the
same batch are not batch invariant on this CPU."""

from __future__ import annotations

import pytest
import torch
from _comfy_util import no_free_memory
from _invariance import batch_mismatches
from conftest import require_comfyui

require_comfyui()

import tiny_models as tm  # noqa: E402

from jetdet.comfy import nodes as N  # noqa: E402
from jetdet.comfy import vae as dvae  # noqa: E402
from jetdet.mode import torch_flags  # noqa: E402

BATCH = 5


@pytest.fixture(scope="module")
def vae():
    return tm.sd_vae(0)


@pytest.fixture(scope="module")
def latents():
    return torch.randn(BATCH, 4, 12, 16, generator=torch.Generator().manual_seed(1))


def _decode(vae, x):
    return N.JetDetDeterministicVAEDecode.execute({"samples": x}, vae, True).args[0]


def _encode(vae, px):
    return N.JetDetDeterministicVAEEncode.execute(px, vae, True).args[0]["samples"]


def _state(vae):
    blocks = [(m, vars(m)["optimized_attention"]) for m in vae.first_stage_model.modules()
              if "optimized_attention" in vars(m)]
    return dict(vars(vae)), blocks, torch_flags()


def test_decode_items_equal_the_item_decoded_alone(vae, latents):
    full = _decode(vae, latents)
    assert full.shape == (BATCH, 96, 128, 3) and full.dtype == torch.float32
    for i in range(BATCH):
        assert torch.equal(_decode(vae, latents[i:i + 1])[0], full[i]), f"item {i}"
    assert torch.equal(_decode(vae, latents[2:5]), full[2:5])  # a window: the items' positions move
    assert torch.equal(_decode(vae, latents), full)  # a rerun
    with no_free_memory():  # ComfyUI decodes one item at a time, and its split attention would slice by memory
        assert torch.equal(_decode(vae, latents), full)
    # the same decode as ComfyUI's, up to the rounding of other kernels
    torch.testing.assert_close(full, vae.decode(latents), atol=2e-3, rtol=0)


def test_encode_items_equal_the_image_encoded_alone(vae, latents):
    px = torch.rand(BATCH, 64, 96, 4, generator=torch.Generator().manual_seed(2))  # an alpha channel, dropped
    full = _encode(vae, px)
    assert full.shape == (BATCH, 4, 8, 12)
    for i in range(BATCH):
        assert torch.equal(_encode(vae, px[i:i + 1])[0], full[i]), f"item {i}"
    with no_free_memory():
        assert torch.equal(_encode(vae, px), full)
    torch.testing.assert_close(full, vae.encode(px[..., :3]), atol=2e-3, rtol=0)


def test_negative_control_comfyuis_own_vae_calls_are_not_batch_invariant_here(vae, latents):
    """If ComfyUI's own decode and encode were batch invariant on this CPU, the tests above could not fail for the
    reason they are there (on another CPU they may be: then this skips)."""
    bad_dec = batch_mismatches(vae.decode, [latents], slots=range(BATCH))
    px = torch.rand(BATCH, 64, 96, 3, generator=torch.Generator().manual_seed(2))
    bad_enc = batch_mismatches(vae.encode, [px], slots=range(BATCH))
    if not bad_dec and not bad_enc:
        pytest.skip("ComfyUI's VAE decode and encode happen to be batch invariant on this CPU")
    assert bad_dec or bad_enc


def test_attention_blocks_run_sdpa_and_are_put_back(vae, latents, monkeypatch):
    """The VAE's attention blocks bound the process's VAE attention when they were built (the split attention on
    this CPU, whose slices follow the free memory); during the call they run jetdet's vae_sdpa (ComfyUI's
    pytorch_attention without its out-of-memory retry), with ComfyUI's pixels, and afterwards they hold their own
    binding again."""
    from comfy.ldm.modules.diffusionmodules import model as dm

    before = _state(vae)
    assert before[1] and all(f is not dvae.vae_sdpa for _, f in before[1]), "no split-attention block here"
    calls = []
    orig = dvae.vae_sdpa
    monkeypatch.setattr(dvae, "vae_sdpa", lambda q, k, v: calls.append(q.shape) or orig(q, k, v))
    _decode(vae, latents[:2])
    assert calls, "the attention blocks did not run vae_sdpa"
    assert _state(vae) == before
    q, k, v = torch.randn(3, 2, 8, 64, 5, generator=torch.Generator().manual_seed(0)).unbind(0)
    assert torch.equal(orig(q, k, v), dm.pytorch_attention(q, k, v))  # the same function, less the retry


def test_running_out_of_memory_inside_attention_is_refused_not_sliced(vae, latents, monkeypatch):
    """ComfyUI's pytorch_attention catches an out-of-memory error and retries with slice_attention, whose slices
    follow the free memory: a deterministic decode then silently depended on it (only on a GPU, where that error
    occurs and where the two attentions round differently). Now the error reaches ComfyUI's VAE call, whose tiled
    retry is refused by name. Negative control: with ComfyUI's pytorch_attention bound, the decode returns."""
    import comfy.model_management as mm
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules import model as dm

    def oom(*args, **kwargs):
        raise mm.OOM_EXCEPTION("out of memory (test)")

    monkeypatch.setattr(comfy.ops, "scaled_dot_product_attention", oom)
    with pytest.raises(dvae.TiledFallbackError, match="would retry with tiled decoding"):
        _decode(vae, latents[:2])
    monkeypatch.setattr(dvae, "vae_sdpa", dm.pytorch_attention)  # the old binding: sliced, silently
    assert _decode(vae, latents[:2]).shape[0] == 2


def test_tiled_fallback_is_refused_and_nothing_stays_changed(vae, latents, monkeypatch):
    import comfy.model_management as mm

    def oom(*args, **kwargs):
        raise mm.OOM_EXCEPTION("out of memory (test)")

    before = _state(vae)
    monkeypatch.setattr(vae.first_stage_model, "decode", oom)
    monkeypatch.setattr(vae.first_stage_model, "encode", oom)
    with pytest.raises(dvae.TiledFallbackError, match="would retry with tiled decoding"):
        _decode(vae, latents)
    with pytest.raises(dvae.TiledFallbackError, match="VAE Encode \\(Tiled\\)"):
        _encode(vae, torch.rand(2, 64, 64, 3))
    monkeypatch.undo()
    assert _state(vae) == before
    assert torch.equal(_decode(vae, latents[:1]), _decode(vae, latents[:1]))


def test_another_thread_using_the_vae_meanwhile_keeps_comfyuis_attention_and_tiled_retry(vae, monkeypatch):
    """A deterministic call swaps the VAE's attention blocks and tiled methods on the VAE object itself: another thread
    using the same VAE meanwhile, outside deterministic mode, got jetdet's vae_sdpa and the refusal of ComfyUI's tiled
    retry (a review: 1 vae_sdpa call and a TiledFallbackError there). Now ComfyUI's own on that thread; this thread
    still gets vae_sdpa and the refusal."""
    import threading

    calls = []
    orig = dvae.vae_sdpa
    monkeypatch.setattr(dvae, "vae_sdpa", lambda q, k, v: calls.append(1) or orig(q, k, v))
    monkeypatch.setattr(type(vae), "decode_tiled_", lambda self, *a, **k: "tiled")
    block = next(m for m in vae.first_stage_model.modules() if "optimized_attention" in vars(m))
    q, k, v = torch.randn(3, 1, 8, 4, 4, generator=torch.Generator().manual_seed(0)).unbind(0)
    with torch.no_grad():
        own = block.optimized_attention(q, k, v)
    out = {}

    def other():
        with torch.no_grad():
            out["attention"] = block.optimized_attention(q, k, v)
        try:
            out["tiled"] = vae.decode_tiled_(None)
        except dvae.TiledFallbackError as e:
            out["tiled"] = e

    with dvae._deterministic(vae, "decoding", "VAE Decode (Tiled)", False):
        t = threading.Thread(target=other)
        t.start()
        t.join(60)
        assert calls == [] and out["tiled"] == "tiled" and torch.equal(out["attention"], own)
        with torch.no_grad():
            block.optimized_attention(q, k, v)
        assert calls == [1]
        with pytest.raises(dvae.TiledFallbackError):
            vae.decode_tiled_(None)


def test_two_threads_deterministic_calls_on_one_vae_each_keep_the_swap_to_their_end(vae, monkeypatch):
    """Two deterministic calls on the same VAE from two threads (two prompts), the first returning while the second
    runs: each call put back what it had seen, so the second lost vae_sdpa and the refusal of the tiled retry as the
    first returned (ComfyUI's attention and its tiled decode, silently), and the first's stand-ins stayed on the VAE
    for good (a review: no vae_sdpa call, "tiled", six tiled methods left). Now the swap lasts until the last call
    returns, the refusal names the second's own call, and nothing stays."""
    import threading

    calls = []
    orig = dvae.vae_sdpa
    monkeypatch.setattr(dvae, "vae_sdpa", lambda q, k, v: calls.append(1) or orig(q, k, v))
    monkeypatch.setattr(type(vae), "encode_tiled_", lambda self, *a, **k: "tiled")
    before = _state(vae)
    block = next(m for m in vae.first_stage_model.modules() if "optimized_attention" in vars(m))
    q, k, v = torch.randn(3, 1, 8, 4, 4, generator=torch.Generator().manual_seed(0)).unbind(0)
    a_in, a_out, out = threading.Event(), threading.Event(), {}

    def first():
        with dvae._deterministic(vae, "decoding", "VAE Decode (Tiled)", False):
            a_in.set()
            a_out.wait(60)

    t = threading.Thread(target=first)
    t.start()
    assert a_in.wait(60)
    with dvae._deterministic(vae, "encoding", "VAE Encode (Tiled)", False):
        a_out.set()
        t.join(60)
        with torch.no_grad():
            block.optimized_attention(q, k, v)
        try:
            out["tiled"] = vae.encode_tiled_(None)
        except dvae.TiledFallbackError as e:
            out["tiled"] = str(e)
    assert calls == [1]
    assert "tiled encoding" in out["tiled"] and "VAE Encode (Tiled)" in out["tiled"]
    assert _state(vae) == before


@pytest.mark.parametrize("build,latent,frames", [
    ("hunyuan_video_vae", (3, 16, 2, 4, 4), 5),  # conv3d and the mid block's attention: it crashed before
    ("wan21_vae", (3, 16, 2, 4, 4), 5),          # causal conv3d and F.normalize RMS norms
])
def test_video_vae_decode_items_equal_the_item_decoded_alone(build, latent, frames):
    """ComfyUI's video VAEs through the same node: each item's frames equal those of the item decoded alone, bit
    for bit. HunyuanVideo's VAE raised under the mode before (its attention views the 3-D conv's output, which
    the routed conv3d returned non-contiguous). Negative control: ComfyUI's own decode of the batch."""
    vae = getattr(tm, build)(0)
    z = torch.randn(*latent, generator=torch.Generator().manual_seed(3))
    full = _decode(vae, z)
    assert full.shape == (latent[0] * frames, 32, 32, 3)

    def per_item(decode):  # an item's frames as one row
        return lambda z: decode(z).reshape(z.shape[0], frames, 32, 32, 3)

    items = range(latent[0])
    rows = full.reshape(latent[0], frames, 32, 32, 3)
    assert batch_mismatches(per_item(lambda z: _decode(vae, z)), [z], slots=items, full=rows) == [], build
    torch.testing.assert_close(full, vae.decode(z).reshape(full.shape), atol=1e-3, rtol=0)
    assert batch_mismatches(per_item(vae.decode), [z], slots=items), \
        f"{build}: ComfyUI's own decode was batch invariant here: this test shows nothing"


def test_audio_decode_items_equal_the_item_decoded_alone():
    """Stable Audio's Oobleck VAE (dilated conv1d, conv_transpose1d up to stride 8) through the audio node: each
    item's waveform equals the item decoded alone, bit for bit, and ComfyUI's VAE Decode Audio up to rounding
    (its loudness step written out here: ComfyUI's audio nodes import torchaudio, which this test does not
    need). Negative control: ComfyUI's own decode of the batch."""
    vae = tm.oobleck_vae(0)
    z = torch.randn(3, 64, 4, generator=torch.Generator().manual_seed(4))

    def decode(z):
        return N.JetDetDeterministicVAEDecodeAudio.execute({"samples": z}, vae, True).args[0]

    out = decode(z)
    full = out["waveform"]
    assert out["sample_rate"] == 44100 and full.shape == (3, 2, 8192)
    assert batch_mismatches(lambda z: decode(z)["waveform"], [z], slots=range(3), full=full) == []
    own = vae.decode(z).movedim(-1, 1)
    std = torch.std(own, dim=[1, 2], keepdim=True) * 5.0
    std[std < 1.0] = 1.0
    torch.testing.assert_close(full, own / std, atol=1e-6, rtol=1e-4)
    assert batch_mismatches(lambda z: vae.decode(z), [z], slots=range(3)), \
        "ComfyUI's own audio decode was batch invariant here: this test shows nothing"


def test_audio_decode_says_the_vaes_sample_rate_or_the_latents(monkeypatch):
    """ComfyUI's rule (newer ComfyUI gives 48 kHz and 32 kHz VAEs ``audio_sample_rate_output``; a trial there found
    the node labelling a 48 kHz VAE's audio 44.1 kHz): the LATENT's ``sample_rate``, else the VAE's, else 44.1 kHz
    (ComfyUI 0.3.64's VAEs say none: the test above)."""
    vae = tm.oobleck_vae(0)
    z = torch.randn(1, 64, 4, generator=torch.Generator().manual_seed(4))
    monkeypatch.setattr(vae, "audio_sample_rate_output", 48000, raising=False)
    assert N.JetDetDeterministicVAEDecodeAudio.execute({"samples": z}, vae, True).args[0]["sample_rate"] == 48000
    out = N.JetDetDeterministicVAEDecodeAudio.execute({"samples": z, "sample_rate": 32000}, vae, True).args[0]
    assert out["sample_rate"] == 32000


def test_each_node_refuses_the_other_kind_of_vae(vae):
    audio = tm.oobleck_vae(0)
    with pytest.raises(ValueError, match=r"vae: an audio VAE; .*Decode \(Audio\)"):
        N.JetDetDeterministicVAEDecode.execute({"samples": torch.zeros(1, 64, 4)}, audio, True)
    with pytest.raises(ValueError, match="vae: an audio VAE"):
        N.JetDetDeterministicVAEEncode.execute(torch.zeros(1, 64, 64, 3), audio, True)
    with pytest.raises(ValueError, match="vae: an image or video VAE; .*jetdet Deterministic VAE Decode"):
        N.JetDetDeterministicVAEDecodeAudio.execute({"samples": torch.zeros(1, 4, 8, 8)}, vae, True)
    with pytest.raises(ValueError, match=r"pixels: expected an IMAGE .* got \(1, 3, 2, 32, 32\)"):
        dvae.encode(vae, torch.zeros(1, 3, 2, 32, 32))  # a 5-D video batch: the function checks too


def test_matcher_frames_per_item_for_a_videos_images(comfy_dir):
    """An IMAGE decoded from a video has a row per frame (2 videos of 5 frames: 10 rows). With frames_per_item 5,
    item 1 decoded alone is compared with the batch's rows 5 to 9 (reference image or checksums), and the report
    speaks of items and frames. With the default 1, rows are items, and the mismatch says that the rows match where
    item 1's frames are and names frames_per_item. Negative control: before, item 1 alone with batch_offset 1 was
    compared with rows 1 to 5 ('items 1, 2, 3, 4, 5'), a false MISMATCH with nothing pointing at frames."""
    vae = tm.wan21_vae(0)
    lat = torch.randn(2, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    batch = N.JetDetDeterministicVAEDecode.execute({"samples": lat}, vae, True).args[0]
    one = N.JetDetDeterministicVAEDecode.execute({"samples": lat[1:2]}, vae, True).args[0]
    assert batch.shape[0] == 10 and one.shape[0] == 5 and torch.equal(one, batch[5:])

    def check(x, offset, frames=1, **ref):
        return N.JetDetOutputMatcher.execute(image=x, batch_offset=offset, frames_per_item=frames,
                                             **(ref or {"reference_image": batch})).args

    ok, report = check(one, 1, 5)
    assert ok and report.startswith("MATCH exact"), report
    assert "the input's 5 rows, item 1 of 5 frames (frames_per_item) at batch_offset 1, against reference rows 5 " \
           "to 9 of 10, which hold items 0 to 1, 5 frames each" in report, report
    assert "item 1: match (reference rows 5 to 9)" in report and "reference rows not compared: 0 to 4" in report
    assert check(batch[:5], 0, 5)[0]  # item 0 at batch_offset 0
    ok, report = check(one, 0, 5)  # the wrong id: item 0's frames
    assert not ok and "item 0: MISMATCH (reference rows 0 to 4)" in report, report
    ok, report = check(one, 2, 5)
    assert not ok and "batch_offset 2 makes the input's 5 rows item 2 of 5 frames" in report, report
    assert "hold items 0 to 1, 5 frames each" in report, report
    ok, report = check(batch, 0, 5)  # as many rows: row against row, reported per item
    assert ok and "item 0: match (rows 0 to 4)" in report and "item 1: match (rows 5 to 9)" in report, report
    sums = N.JetDetChecksum.execute(image=batch).args[0]  # labelled by row: 0 to 9
    ok, report = check(one, 1, 5, reference_checksums=sums)
    assert ok and "item 5: match" in report and "item 9: match" in report, report
    # the default: rows are items; the mismatch says where the rows do match, and names frames_per_item
    ok, report = check(one, 1)
    assert not ok and "against reference rows 1, 2, 3, 4, 5 of 10" in report, report
    assert "the input's 5 rows match reference rows 5 to 9: item 1's rows if each item has 5 frames" in report
    assert "set frames_per_item to the frames per video (5 if the input is one video)" in report, report
    ok, report = check(batch[5:7], 1)  # two frames that are not item 1's rows for 2 frames per item: the hint only
    assert not ok and "rows are frames, not items" in report and "match reference rows" not in report, report
    assert "frames_per_item" not in check(torch.rand(4, 8, 8, 3), 1)[1]  # not for a mismatch of another kind
    # what frames_per_item cannot be
    with pytest.raises(ValueError, match=r"^frames_per_item: 2 is for an IMAGE decoded from a video .* a latent's "
                                         r"rows are items"):
        N.JetDetOutputMatcher.execute(latent={"samples": lat}, reference_latent={"samples": lat}, frames_per_item=2)
    with pytest.raises(ValueError, match=r"^frames_per_item: the image's 5 rows are not whole items of 2 frames"):
        check(one, 1, 2)
    ok, report = check(batch[:3], 0, 3)
    assert not ok and "frames_per_item 3: the reference's 10 rows are not whole items of 3 frames" in report, report


def test_a_latent_of_another_model_family_names_samples_and_vae(vae):
    """A 16-channel SD3/shapes latent into a 4-channel SD1.5 VAE (and a 4-channel one into an audio VAE) is an error
    naming the node's inputs, chained from the VAE's own: a user trial got 'weight: expected 16 input channels (dim
    1) to match input, got (4, 4, 1, 1)' from inside the VAE. Negative control: without it the error names
    'weight'."""
    with pytest.raises(ValueError, match=r"^samples: the latent has 16 channels \(shape \(1, 16, 8, 8\)\), but the "
                                         r"vae decodes 4-channel latents") as e:
        N.JetDetDeterministicVAEDecode.execute({"samples": torch.zeros(1, 16, 8, 8)}, vae, True)
    assert e.value.__cause__ is not None and "the VAE's own error" in str(e.value)
    with pytest.raises(ValueError, match=r"^samples: the latent has 4 channels .* the vae decodes 64-channel"):
        N.JetDetDeterministicVAEDecodeAudio.execute({"samples": torch.zeros(1, 4, 8)}, tm.oobleck_vae(0), True)
    with pytest.raises(ValueError, match=r"^samples: the latent has 4 channels .* the vae decodes 16-channel"):
        N.JetDetDeterministicVAEDecode.execute({"samples": torch.zeros(1, 4, 2, 4, 4)}, tm.wan21_vae(0), True)


def test_a_vae_built_from_a_config_decodes_its_own_channel_count(comfy_dir):
    """ComfyUI's ``VAE(sd, config=...)`` (a checkpoint with a yaml) keeps ``latent_channels`` 4 whatever its
    z_channels, and ComfyUI's VAE Decode never reads it: a 16-channel config VAE decodes a 16-channel latent, here
    as there, and a 4-channel latent into it is the error naming samples and the 16 its decoder takes. Negative
    control: the check before decoding on ``latent_channels`` (ea20403) refused the 16-channel latent ('the vae
    decodes 4-channel latents'; review M2)."""
    import comfy.sd
    import nodes
    from comfy.ldm.models.autoencoder import AutoencoderKL

    cfg = {"params": {"embed_dim": 16, "ddconfig": dict(tm.VAE_CONFIG["params"]["ddconfig"], z_channels=16)}}
    v = comfy.sd.VAE(sd=tm._finish(AutoencoderKL(**cfg["params"]), 0), config=cfg)
    assert v.latent_channels == 4
    lat = {"samples": torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))}
    got = N.JetDetDeterministicVAEDecode.execute(lat, v, True).args[0]
    assert dvae.decoder_channels(v) == (16, {4, 16})
    stock = nodes.VAEDecode().decode(v, lat)[0]
    assert got.shape == stock.shape == (2, 64, 64, 3) and (got - stock).abs().max() < 1e-3
    with pytest.raises(ValueError, match=r"^samples: the latent has 8 channels .* the vae decodes 16-channel"):
        N.JetDetDeterministicVAEDecode.execute({"samples": torch.zeros(1, 8, 8, 8)}, v, True)
    # 4 is its latent_channels: the VAE's own error, not a claim that may be wrong
    with pytest.raises((RuntimeError, ValueError)) as e:
        N.JetDetDeterministicVAEDecode.execute({"samples": torch.zeros(1, 4, 8, 8)}, v, True)
    assert not str(e.value).startswith("samples:")


@pytest.mark.parametrize("node,args,match", [
    ("decode", ({"samples": torch.zeros(1, 4, 8, 8)}, None, True), "vae: expected a ComfyUI VAE"),
    ("decode", (torch.zeros(1, 4, 8, 8), "vae", True), "samples: expected a LATENT"),
    ("encode", (torch.zeros(1, 64, 64, 3), object(), True), "vae: expected a ComfyUI VAE"),
    ("encode", (torch.zeros(64, 64, 3), "vae", True), r"pixels: expected an IMAGE .* got \(64, 64, 3\)"),
])
def test_bad_input_names_the_argument(vae, node, args, match):
    cls = N.JetDetDeterministicVAEDecode if node == "decode" else N.JetDetDeterministicVAEEncode
    args = tuple(vae if a == "vae" else a for a in args)
    with pytest.raises((TypeError, ValueError), match=match):
        cls.execute(*args)
