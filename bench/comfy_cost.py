"""What deterministic mode costs in ComfyUI on a CPU, against ComfyUI's stock KSampler, at real model widths.

    JETDET_COMFYUI_STUBS=../shared/comfyui/stubs python bench/comfy_cost.py --comfyui /path/to/ComfyUI

Three models built from ComfyUI's own classes with random weights, at real width and few blocks, and loaded the way
ComfyUI's diffusion-model loader loads them (``comfy.sd.load_diffusion_model_state_dict`` under
``torch.inference_mode()``, as ComfyUI runs every node, so every weight is an inference tensor):

* a Flux-architecture DiT: hidden 3072, 24 heads, one double and one single block, guidance embedding; 8 text tokens
  of 4096 and a 64x64-pixel SD3 latent (16 image tokens): 24 tokens per item;
* PixArt Sigma: hidden 1152, 16 heads, 2 blocks; 8 text tokens of 4096, a 576x64-pixel SD latent (144 image
  tokens; PixArt's position embedding needs (height + width) / 2 >= 32 latent pixels);
* an SD1.5 UNet: SD1.5's widths (320/640/1280/1280 channels, 8 heads, context 768) and layout, with one ResBlock per
  level instead of two (579 M parameters instead of 860 M); 77 text tokens and a 256x256-pixel latent (32x32).

For each, in one process and interleaved (the order rotated every round), median of ``--repeats`` after one warm-up,
a batch of 4, euler, 5 steps, CFG 1 (Flux) or 4 (PixArt, SD1.5), under ``torch.inference_mode()``:

* ComfyUI's stock ``KSampler``;
* jetdet's ``JetDetDeterministicSampler``;
* the same with the CPU path's weight-major form off (``WEIGHT_MAJOR_MIN_KN``): each linear call copies its weight
  transposed, which is what it did before that form (the weights cannot be cached: inference tensors).

It also checks the guarantee on the timed outputs: the deterministic batch's item 2 equals item 2 sampled alone
(``batch_offset=2``) bit for bit, with the weight-major form and without.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from jetdet.comfy.runtime import import_comfyui  # noqa: E402

MODELS = {
    "flux": dict(image_model="flux", in_channels=16, patch_size=2, out_channels=16, vec_in_dim=768,
                 context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=1, depth_single_blocks=1,
                 axes_dim=[16, 56, 56], theta=10000, qkv_bias=True, guidance_embed=True),
    "pixart": dict(image_model="pixart_sigma", num_heads=16, patch_size=2, hidden_size=1152, in_channels=4, depth=2,
                   micro_condition=False),
    "sd15": dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                 adm_in_channels=None, in_channels=4, model_channels=320, num_res_blocks=[1, 1, 1, 1],
                 transformer_depth=[1, 1, 1, 0], transformer_depth_output=[1, 1, 1, 1, 1, 1, 0, 0],
                 channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
                 use_linear_in_transformer=False, context_dim=768, num_heads=8, use_temporal_attention=False,
                 use_temporal_resblock=False),
}  # fmt: skip
CFG = {"flux": 1.0, "pixart": 4.0, "sd15": 4.0}
TEXT = {"flux": (8, 4096), "pixart": (8, 4096), "sd15": (77, 768)}  # text tokens, width
LATENT = {"flux": (16, 8, 8), "pixart": (4, 8, 72), "sd15": (4, 32, 32)}


def _random_state_dict(model: torch.nn.Module, seed: int) -> dict:
    """Every floating tensor drawn afresh (ComfyUI builds layers in uninitialised memory): matrices and conv kernels
    scaled by their fan-in (all dimensions but the first: a 3x3 conv's is 9 x its input channels), norm weights near
    1, the rest small."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            out[name] = t.clone()
        elif t.dim() > 1:
            out[name] = torch.randn(t.shape, generator=g) * (0.5 / max(1.0, t[0].numel() ** 0.5))
        elif "norm" in name and name.endswith(("weight", "scale")):
            out[name] = 1.0 + 0.02 * torch.randn(t.shape, generator=g)
        else:
            out[name] = 0.02 * torch.randn(t.shape, generator=g)
    return out


def build(kind: str, seed: int = 1):
    """A ModelPatcher of ``kind``, loaded through ComfyUI's diffusion-model loader under inference mode."""
    import comfy.model_detection
    import comfy.sd

    config = comfy.model_detection.model_config_from_unet_config(dict(MODELS[kind]))
    if config is None:
        raise RuntimeError(f"ComfyUI did not recognise the {kind} configuration")
    sd = _random_state_dict(config.get_model({}, "", device="cpu").diffusion_model, seed)
    with torch.inference_mode():
        patcher = comfy.sd.load_diffusion_model_state_dict(sd)
    if patcher is None:
        raise RuntimeError(f"ComfyUI did not load the {kind} state dict")
    return patcher


def conditioning(kind: str):
    g = torch.Generator().manual_seed(1)
    extra = {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5} if kind == "flux" else {}
    pos = [[torch.randn(1, *TEXT[kind], generator=g), extra]]
    neg = [[torch.zeros(1, *TEXT[kind]), {k: torch.zeros_like(v) if torch.is_tensor(v) else v
                                          for k, v in extra.items()}]]
    return pos, neg


def latent(kind: str, batch: int) -> dict:
    return {"samples": torch.zeros(batch, *LATENT[kind])}


def measure(kind: str, repeats: int) -> tuple[dict, list[bool]]:
    """Median seconds of each way of sampling ``kind``, and whether item 2 alone equals it in the batch (det,
    copy)."""
    import nodes

    from jetdet.comfy.nodes import JetDetDeterministicSampler
    from jetdet.kernels.matmul import torch_path as mm

    model = build(kind)
    pos, neg = conditioning(kind)
    cfg = CFG[kind]

    def stock(batch=4, offset=0):
        return nodes.KSampler().sample(model, 7, 5, cfg, "euler", "simple", pos, neg, latent(kind, batch), 1.0)[0]

    def det(batch=4, offset=0):
        return JetDetDeterministicSampler.execute(model, 7, 5, cfg, "euler", "simple", pos, neg, latent(kind, batch),
                                                  1.0, offset).args[0]  # fmt: skip

    def copy(batch=4, offset=0):
        with mock.patch.object(mm, "WEIGHT_MAJOR_MIN_KN", 1 << 62):
            return det(batch, offset)

    runs = {"stock": stock, "det": det, "copy": copy}
    times = {k: [] for k in runs}
    with torch.inference_mode():
        outs = {k: fn()["samples"] for k, fn in runs.items()}  # also the warm-up
        names = list(runs)
        for r in range(repeats):
            for k in names[r % 3 :] + names[: r % 3]:
                t = time.perf_counter()
                runs[k]()
                times[k].append(time.perf_counter() - t)
        same = [torch.equal(runs[k](1, 2)["samples"][0], outs[k][2]) for k in ("det", "copy")]
    return {k: statistics.median(v) for k, v in times.items()}, same


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = ap.parse_args(argv)
    import_comfyui(args.comfyui)
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    print(f"batch 4, euler, 5 steps, {torch.get_num_threads()} threads, torch {torch.__version__}; seconds per "
          f"sampling run, median of {args.repeats} interleaved after one warm-up")
    print(f"{'model':<8} {'stock s':>8} {'det s':>8} {'det/stock':>10} {'copy s':>8} {'copy/stock':>11}  item 2 alone "
          f"= in the batch (det, copy)")
    failed = False
    for kind in args.models:
        med, same = measure(kind, args.repeats)
        print(f"{kind:<8} {med['stock']:8.2f} {med['det']:8.2f} {med['det'] / med['stock']:9.2f}x {med['copy']:8.2f} "
              f"{med['copy'] / med['stock']:10.2f}x  {same[0]}, {same[1]}", flush=True)
        failed |= not all(same)
    if failed:
        print("FAIL: an item sampled alone differs from the same item in the batch")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
