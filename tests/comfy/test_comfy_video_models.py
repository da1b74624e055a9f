"""Small real video models end to end through the Deterministic Sampler: LTX-Video (its blocks' RMS-norm adaptive
layer norm is comfy_kitchen's fused ``rms_adaln`` in ComfyUI 0.33), Wan 2.1, Wan 2.2 (the 5B's 48-channel layout,
with its per-frame timesteps) and HunyuanVideo, each written as a safetensors file that ComfyUI's own loader
(``load_diffusion_model``) detects and loads, plain or with nvfp4 layers. Each item of a batch of 3 video latents
against the same item sampled alone (``batch_offset``), by its own SHA-256; ComfyUI's KSampler on the same model is
the control (its items differ alone and in a batch on this CPU). Also: an image-to-video style noise mask (the first
frame kept: per-token or per-frame timesteps) and Wan 2.2 14B's two-stage handoff (a high-noise and a low-noise model
through the Deterministic Sampler (Advanced)).

Measured (this CPU, fp32): 3 of 3 items equal in every case on ComfyUI 0.33, 0.7.0 and 0.3.64, no jetdet warning;
the KSampler control 0 of 3. The nvfp4 cases skip where ComfyUI has no ``mixed_precision_ops`` (0.3.64, CI's).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import warnings

import pytest
import torch
from _comfy_util import counting_kitchen_calls
from conftest import require_comfyui

require_comfyui()

BATCH = 3

# family: (latent channels, (text tokens, text dim))
FAMILIES = {
    "ltxv": (128, (8, 4096)),
    "wan21": (16, (8, 4096)),
    "wan22": (48, (8, 4096)),
    "hunyuan_video": (16, (8, 32)),
}


def _state_dict(family: str, seed: int = 0) -> dict:
    import tiny_models as tm

    return {
        "ltxv": tm.ltxv_state_dict,
        "wan21": tm.wan21_state_dict,
        "wan22": tm.wan22_state_dict,
        "hunyuan_video": tm.hunyuan_video_state_dict,
    }[family](seed)


def _load(tmp_path, family: str, fmt: str = "fp32", seed: int = 0):
    """The tiny model as a safetensors file, loaded by ComfyUI's ``load_diffusion_model`` (the "Load Diffusion Model"
    node's call). nvfp4: the blocks' linears quantized as in the Flux/Lumina 2 tests, with LTX-Video's cross-attention
    width in the file's config (ComfyUI's detection reads it from the packed weight's shape, half of it for nvfp4;
    KSampler fails on such a file too)."""
    import comfy.sd
    import safetensors.torch

    sd, meta = _state_dict(family, seed), None
    if fmt != "fp32":
        import comfy.ops
        import test_comfy_quantized_models as tq

        if not hasattr(comfy.ops, "mixed_precision_ops"):
            pytest.skip("this ComfyUI has no mixed_precision_ops (newer than 0.3.64)")
        sd, meta = tq._quantized(sd, fmt)
        if family == "ltxv":
            meta["config"] = json.dumps({"transformer": {"cross_attention_dim": 128}})
    path = str(tmp_path / f"{family}_{fmt}_{seed}.safetensors")
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata=meta)
    model = comfy.sd.load_diffusion_model(path)
    if fmt != "fp32":
        assert any(getattr(m, "quant_format", None) == fmt for m in model.model.diffusion_model.modules())
    return model


def _conds(family: str):
    tokens, dim = FAMILIES[family][1]
    g = torch.Generator().manual_seed(3)
    c = torch.randn(1, tokens, dim, generator=g) * (0.5 if family == "hunyuan_video" else 0.1)
    if family == "hunyuan_video":
        return (
            [[c, {"pooled_output": torch.randn(1, 768, generator=g) * 0.1}]],
            [[torch.zeros_like(c), {"pooled_output": torch.zeros(1, 768)}]],
        )
    # LTX-Video's text encoder gives the tokens' attention mask (integers); its model requires one
    extra = {"attention_mask": torch.ones(1, tokens, dtype=torch.long)} if family == "ltxv" else {}
    return [[c, dict(extra)]], [[torch.zeros_like(c), dict(extra)]]


def _latent(family: str, batch: int, mask: bool = False, index: int | None = None) -> dict:
    """``batch`` video latents of 2 frames of 4x4; ``mask``: the first frame kept (image-to-video's noise mask);
    ``index``: the item's own noise as in the batch (ComfyUI's ``batch_index``)."""
    shape = (batch, FAMILIES[family][0], 2, 4, 4)
    lat = {"samples": torch.zeros(shape)}
    if mask:
        m = torch.ones(batch, 1, *shape[2:])
        m[:, :, 0] = 0
        lat["noise_mask"] = m
    if index is not None:
        lat["batch_index"] = [index]
    return lat


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().contiguous().numpy().tobytes()).hexdigest()


@contextlib.contextmanager
def _no_jetdet_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    assert not [str(w.message) for w in caught if "jetdet" in str(w.message)]


def _det(model, family, batch, offset=0, mask=False):
    from jetdet.comfy.nodes import JetDetDeterministicSampler

    pos, neg = _conds(family)
    return JetDetDeterministicSampler.execute(
        model, 7, 2, 2.0, "euler", "simple", pos, neg, _latent(family, batch, mask), 1.0, offset
    ).args[0]["samples"]


def _stock(model, family, batch, index=None):
    import nodes

    pos, neg = _conds(family)
    lat = _latent(family, batch, index=index)
    return nodes.KSampler().sample(model, 7, 2, 2.0, "euler", "simple", pos, neg, lat, 1.0)[0]["samples"]


def _items(full, alone) -> list[bool]:
    return [_sha(full[i]) == _sha(alone(i)[0]) for i in range(BATCH)]


def _fused_rms_adaln() -> bool:
    """Whether this ComfyUI's LTX-Video calls comfy_kitchen's ``rms_adaln`` (0.33; not 0.7.0 or 0.3.64)."""
    import comfy.ldm.lightricks.model as ltx

    return "ck.rms_adaln(" in inspect.getsource(ltx)


def _require(family: str):
    import importlib

    module = {"ltxv": "comfy.ldm.lightricks.model", "hunyuan_video": "comfy.ldm.hunyuan_video.model"}.get(
        family, "comfy.ldm.wan.model"
    )
    try:
        importlib.import_module(module)
    except ImportError:
        pytest.skip(f"this ComfyUI has no {family}")


@pytest.mark.parametrize("fmt", ["fp32", "nvfp4"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_video_models_give_each_item_alone_and_in_a_batch(comfy_dir, tmp_path, family, fmt):
    """3 of 3 items equal alone and in the batch, no jetdet warning; LTX-Video's fused ``rms_adaln`` (0.33) is
    computed by jetdet's handler. ComfyUI's KSampler: not all equal (the control)."""
    _require(family)
    model = _load(tmp_path, family, fmt)
    counts = {}
    fused = family == "ltxv" and _fused_rms_adaln()
    with counting_kitchen_calls("rms_adaln", counts) if fused else contextlib.nullcontext(), _no_jetdet_warning():
        full = _det(model, family, BATCH)
        items = _items(full, lambda i: _det(model, family, 1, offset=i))
    assert torch.isfinite(full).all() and full.abs().max() > 0
    assert items == [True] * BATCH
    if fused:
        assert counts.get("rms_adaln", 0) > 0
    stock = _items(_stock(model, family, BATCH), lambda i: _stock(model, family, 1, index=i))
    assert stock != [True] * BATCH  # the control


@pytest.mark.parametrize("family", ["ltxv", "wan22"])
def test_image_to_video_noise_mask_gives_each_item_alone_and_in_a_batch(comfy_dir, tmp_path, family):
    """The first frame kept by a noise mask, as LTX-Video's and Wan 2.2's image-to-video nodes set it: the models then
    take per-token (LTX-Video) or per-frame (Wan 2.2) timesteps from the mask. 3 of 3 items equal."""
    _require(family)
    model = _load(tmp_path, family)
    with _no_jetdet_warning():
        full = _det(model, family, BATCH, mask=True)
        items = _items(full, lambda i: _det(model, family, 1, offset=i, mask=True))
    assert items == [True] * BATCH
    assert torch.isfinite(full).all() and not torch.equal(full[0, :, 1], full[1, :, 1])  # each item's own frame


def test_wan22_two_stage_handoff_gives_each_item_alone_and_in_a_batch(comfy_dir, tmp_path):
    """Wan 2.2 14B's workflow: a high-noise model runs steps 0-2 and returns its leftover noise, a low-noise model
    (another checkpoint of the same layout) finishes steps 2-4 without adding noise, both through the Deterministic
    Sampler (Advanced) with the same ``batch_offset``. 3 of 3 items equal; ComfyUI's KSamplerAdvanced: not all."""
    import nodes

    from jetdet.comfy.nodes import JetDetDeterministicSamplerAdvanced as Adv

    high, low = _load(tmp_path, "wan21", seed=0), _load(tmp_path, "wan21", seed=1)
    pos, neg = _conds("wan21")

    def det(batch, offset=0):
        lat = _latent("wan21", batch)
        lat = Adv.execute(high, "enable", 7, 4, 2.0, "euler", "simple", pos, neg, lat, 0, 2, "enable", offset).args[0]
        return Adv.execute(low, "disable", 7, 4, 2.0, "euler", "simple", pos, neg, lat, 2, 4, "disable", offset).args[
            0
        ]["samples"]

    def stock(batch, index=None):
        k = nodes.KSamplerAdvanced()
        lat = k.sample(
            high, "enable", 7, 4, 2.0, "euler", "simple", pos, neg, _latent("wan21", batch, index=index), 0, 2, "enable"
        )[0]
        return k.sample(low, "disable", 7, 4, 2.0, "euler", "simple", pos, neg, lat, 2, 4, "disable")[0]["samples"]

    with _no_jetdet_warning():
        full = det(BATCH)
        items = _items(full, lambda i: det(1, offset=i))
    assert torch.isfinite(full).all()
    assert items == [True] * BATCH
    assert _items(stock(BATCH), lambda i: stock(1, index=i)) != [True] * BATCH  # the control
