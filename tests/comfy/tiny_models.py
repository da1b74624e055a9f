"""Tiny ComfyUI-native models with no downloads, for the node tests and the op audit.

Each builder constructs the model from ComfyUI's own class, writes every tensor of its state dict (ComfyUI's
layers leave memory unwritten) with small random weights so a forward stays finite, and the state dict is loaded
back through ``comfy.sd.load_diffusion_model_state_dict``: ComfyUI's own detection decides the model type,
exactly as for a downloaded checkpoint.
"""

from __future__ import annotations

import torch


def _ops():
    import comfy.ops

    return comfy.ops.disable_weight_init  # leaves weights unwritten: _finish writes every tensor


def _finish(model, seed: int, scale: float = 0.5) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            w = torch.randn(v.shape, generator=g) * (scale / max(1.0, v.shape[-1] ** 0.5) if v.dim() > 1 else 0.02)
            if k.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", "ln_q.weight",
                           "ln_k.weight", "norm_q.weight", "norm_k.weight")) or ".norm" in k and k.endswith(".weight"):
                w = 1.0 + 0.02 * torch.randn(v.shape, generator=g)
            sd[k] = w.to(v.dtype)
        else:
            sd[k] = v.clone()
    return sd


def sd15_state_dict(seed: int = 0) -> dict:
    """An SD1.5 UNet at the smallest size ComfyUI still detects as SD1.5: 320 channels, one level, one res block,
    one transformer block, context 768."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    model = UNetModel(image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[1],
                      channel_mult=[1], num_heads=8, num_head_channels=-1, use_spatial_transformer=True,
                      transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=1,
                      context_dim=768, use_linear_in_transformer=False, adm_in_channels=None,
                      use_temporal_attention=False, dtype=torch.float32, operations=_ops())
    return _finish(model, seed)


def wan21_state_dict(seed: int = 0) -> dict:
    """A Wan 2.1 text-to-video DiT: dim 256 (2 heads of 128), 2 layers, ffn 512."""
    from comfy.ldm.wan.model import WanModel

    model = WanModel(model_type="t2v", patch_size=(1, 2, 2), in_dim=16, dim=256, ffn_dim=512, freq_dim=256,
                     text_dim=4096, out_dim=16, num_heads=2, num_layers=2, dtype=torch.float32, operations=_ops())
    return _finish(model, seed)


def wan22_state_dict(seed: int = 0) -> dict:
    """A Wan 2.2 text/image-to-video DiT (the 5B's layout: 48 latent channels in and out, which ComfyUI detects as
    Wan 2.2 with its per-frame timesteps): dim 256 (2 heads of 128), 2 layers, ffn 512."""
    from comfy.ldm.wan.model import WanModel

    model = WanModel(model_type="t2v", patch_size=(1, 2, 2), in_dim=48, dim=256, ffn_dim=512, freq_dim=256,
                     text_dim=4096, out_dim=48, num_heads=2, num_layers=2, dtype=torch.float32, operations=_ops())
    return _finish(model, seed)


def ltxv_state_dict(seed: int = 0) -> dict:
    """An LTX-Video DiT: 32 heads of 4 (inner dim 128; ComfyUI's detection takes 32 heads), 2 layers, 128 latent
    channels, caption dim 4096. Its blocks' RMS-norm adaptive layer norm is comfy_kitchen's fused ``rms_adaln`` in
    newer ComfyUI (0.33)."""
    from comfy.ldm.lightricks.model import LTXVModel

    model = LTXVModel(in_channels=128, cross_attention_dim=128, attention_head_dim=4, num_attention_heads=32,
                      caption_channels=4096, num_layers=2, dtype=torch.float32, operations=_ops())
    return _finish(model, seed)


def hunyuan_video_state_dict(seed: int = 0) -> dict:
    """A HunyuanVideo DiT: hidden 128 (one head, rotary axes 16/56/56), one double and one single block, text dim 32,
    pooled CLIP 768, guidance embedding. It pools its text tokens with ``sum`` (a reduction inside one item)."""
    import dataclasses

    from comfy.ldm.hunyuan_video.model import HunyuanVideo, HunyuanVideoParams

    # HunyuanVideo 1.5's fields (newer ComfyUI), as its detection sets them for a 1.0 checkpoint
    v15 = {"use_cond_type_embedding": False, "vision_in_dim": None, "meanflow_sum": False}
    fields = {f.name for f in dataclasses.fields(HunyuanVideoParams)}
    model = HunyuanVideo(image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=768,
                         context_in_dim=32, hidden_size=128, mlp_ratio=4.0, num_heads=1, depth=1,
                         depth_single_blocks=1, axes_dim=[16, 56, 56], theta=256, patch_size=[1, 2, 2],
                         qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False, dtype=torch.float32,
                         operations=_ops(), **{k: v for k, v in v15.items() if k in fields})
    return _finish(model, seed)



def flux_state_dict(seed: int = 0) -> dict:
    """A Flux DiT: hidden 128 (one head, rotary axes 16/56/56), one double and one single block, text dim 32, pooled
    dim 32, guidance embedding. Its RoPE goes through comfy_kitchen's ``apply_rope`` in newer ComfyUI (0.33). Load it
    within :func:`small_detection`."""
    import dataclasses

    from comfy.ldm.flux.model import Flux, FluxParams

    newer = {"txt_ids_dims": []} if "txt_ids_dims" in {f.name for f in dataclasses.fields(FluxParams)} else {}
    model = Flux(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32,
                 hidden_size=128, mlp_ratio=4.0, num_heads=1, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56],
                 theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True, dtype=torch.float32,
                 operations=_ops(), **newer)
    return _finish(model, seed)


#: the head layout of the tiny Lumina 2 (ComfyUI's detection knows it for dims 2304 and 3840 only)
LUMINA2_HEADS = dict(n_heads=2, n_kv_heads=2, axes_dims=[16, 24, 24], axes_lens=[300, 512, 512], rope_theta=10000.0,
                     ffn_dim_multiplier=4.0)


def lumina2_state_dict(seed: int = 0) -> dict:
    """A Lumina 2 NextDiT: dim 128 (2 heads of 64, as many key/value heads), one layer and ComfyUI's two refiner
    layers of each kind, caption dim 64. Its q/k norms + RoPE are comfy_kitchen's fused ``rms_rope`` in newer
    ComfyUI (0.33). Load it within :func:`small_detection`."""
    from comfy.ldm.lumina.model import NextDiT

    model = NextDiT(patch_size=2, in_channels=16, dim=128, n_layers=1, qk_norm=True, cap_feat_dim=64,
                    dtype=torch.float32, operations=_ops(), **LUMINA2_HEADS)
    return _finish(model, seed)


def small_detection():
    """ComfyUI's own model detection, with the sizes it assumes filled in from the weights for the tiny models here:
    :data:`LUMINA2_HEADS` for a Lumina 2 of dim 128; a Flux's hidden and text sizes (ComfyUI 0.3.64 takes 3072 and
    4096 for every Flux, newer ComfyUI reads them)."""
    from unittest import mock

    import comfy.model_detection as md

    detect = md.detect_unet_config

    def detect_small(state_dict, key_prefix, *args, **kwargs):
        config = detect(state_dict, key_prefix, *args, **kwargs)
        if config and config.get("image_model") == "lumina2" and config.get("dim") == 128:
            config.update(LUMINA2_HEADS)
        txt_in = state_dict.get(f"{key_prefix}txt_in.weight")
        if config and config.get("image_model") == "flux" and txt_in is not None and txt_in.shape[0] == 128:
            config.update(hidden_size=128, context_in_dim=txt_in.shape[1], num_heads=1)
        return config

    return mock.patch.object(md, "detect_unet_config", detect_small)


def load(state_dict: dict):
    import comfy.sd

    return comfy.sd.load_diffusion_model_state_dict(state_dict)


#: A small SD-type AutoencoderKL (ComfyUI's Encoder/Decoder: 4 latent channels, 8x, group norms, the mid block's
#: attention); ComfyUI's default VAE config is 128-512 channels wide, too slow for the tests.
VAE_CONFIG = {"params": {"embed_dim": 4, "ddconfig": {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}}


def sd_vae(seed: int = 0):
    """A ``comfy.sd.VAE`` built by ComfyUI from a state dict and :data:`VAE_CONFIG`, as VAELoader builds one."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    sd = _finish(AutoencoderKL(**VAE_CONFIG["params"]), seed)
    return comfy.sd.VAE(sd=sd, config=VAE_CONFIG)


def taesd3_files(seed: int = 0) -> dict:
    """``{file name: state dict}`` of a TAESD3 encoder and decoder (16 latent channels), random weights, for
    ComfyUI's VAELoader (``models/vae_approx``, listed as ``taesd3``)."""
    from comfy.taesd.taesd import TAESD

    sd = _finish(TAESD(latent_channels=16), seed)
    return {f"taesd3_{part}.safetensors": {k[len(f"taesd_{part}."):]: v for k, v in sd.items()
                                          if k.startswith(f"taesd_{part}.")} for part in ("encoder", "decoder")}


def _vae_built_small(owner, name: str, build, seed: int):
    """``comfy.sd.VAE(sd=...)`` of the state dict of ``build()``, with ``owner.name`` (the constructor ComfyUI's
    VAE detection calls, at its full size) building ``build()`` instead while the VAE is built: ComfyUI's own
    key-based detection still picks the family and its latent format."""
    from unittest import mock

    import comfy.sd

    sd = _finish(build(), seed)
    with mock.patch.object(owner, name, lambda *a, **k: build()):
        return comfy.sd.VAE(sd=sd)


def hunyuan_video_vae(seed: int = 0):
    """A HunyuanVideo-type video VAE (ComfyUI's AutoencoderKL with 3-D convs, 4x time compression, the mid block's
    attention from 1x1x1 convs), 32-256 channels, 16 latent channels."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    dd = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0, "conv3d": True,
          "time_compress": 4}
    return _vae_built_small(comfy.sd, "AutoencoderKL", lambda: AutoencoderKL(ddconfig=dd, embed_dim=16), seed)


def wan21_vae(seed: int = 0):
    """A Wan 2.1 video VAE (causal 3-D convs, RMS norms by ``F.normalize``), 8-32 channels, 16 latent channels."""
    import comfy.ldm.wan.vae as wan

    cfg = dict(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
               temperal_downsample=[False, True, True], dropout=0.0)
    cls = wan.WanVAE
    return _vae_built_small(wan, "WanVAE", lambda: cls(**cfg), seed)


def oobleck_vae(seed: int = 0):
    """Stable Audio's Oobleck audio VAE (dilated conv1d, conv_transpose1d up to stride 8, snake activations),
    4-64 channels, 64 latent channels, 2048x."""
    import comfy.sd
    from comfy.ldm.audio.autoencoder import AudioOobleckVAE

    cfg = dict(in_channels=2, channels=4, latent_dim=64, c_mults=[1, 2, 4, 8, 16], strides=[2, 4, 4, 8, 8],
               use_snake=True, antialias_activation=False, use_nearest_upsample=False, final_tanh=False)
    return _vae_built_small(comfy.sd, "AudioOobleckVAE", lambda: AudioOobleckVAE(**cfg), seed)


#: the first layer of each video family's timestep MLP (input: 256 sinusoidal features, cos half then sin half)
TIME_IN = ("time_embedding.0.weight", "adaln_single.emb.timestep_embedder.linear_1.weight", "time_in.in_layer.weight")


def smooth_in_time(sd: dict, keep_from: int = 72) -> dict:
    """``sd`` with the weights on the high-frequency features of its timestep embedding zeroed (frequencies
    ``10000 ** (-k / 128)`` for ``k < keep_from``, in both halves). The timestep is ``1000 · sigma``, so a random
    model answers those features with noise from step to step, which a trained model learns not to; without them the
    model's output is a smooth function of time, as the step cache's forecasts assume."""
    sd = dict(sd)
    key = next(k for k in TIME_IN if k in sd)
    w = sd[key].clone()
    half = w.shape[1] // 2
    w[:, :keep_from] = 0
    w[:, half:half + keep_from] = 0
    sd[key] = w
    return sd
