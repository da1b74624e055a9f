"""ComfyUI's VAE decode and encode against jetdet's Deterministic VAE Decode/Encode: batch invariance and cost.

    JETDET_COMFYUI_STUBS=../shared/comfyui/stubs python bench/comfy_vae.py --comfyui /path/to/ComfyUI

ComfyUI's own SD-type VAE at its default size (``comfy.sd.VAE`` from a state dict: 128-512 channels, the mid
block's attention; 83.7 M parameters, random weights, since no checkpoint is downloaded), a batch of ``--batch``
latents of ``--size`` x ``--size`` (pixels: 8x that). For each of decode and encode, stock and jetdet's node:
how many items equal the item run alone, bit for bit, and the median wall time of the batch call over
``--repeats`` runs, under ``torch.inference_mode()`` as ComfyUI runs its nodes. ``tests/comfy/test_comfy_vae.py``
asserts the invariance on a small VAE; this gives the figures at the real size.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from jetdet.comfy.runtime import import_comfyui  # noqa: E402


def _random_sd_vae(seed: int):
    """ComfyUI's default SD VAE, built as VAELoader builds one from a state dict (random weights: every tensor is
    written, ComfyUI's layers leave memory unwritten)."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    dd = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in AutoencoderKL(embed_dim=4, ddconfig=dd).state_dict().items():
        if v.dim() > 1:
            sd[k] = torch.randn(v.shape, generator=g) / max(1.0, (v[0].numel()) ** 0.5)
        elif k.endswith("weight"):
            sd[k] = 1.0 + 0.02 * torch.randn(v.shape, generator=g)
        else:
            sd[k] = 0.02 * torch.randn(v.shape, generator=g)
    return comfy.sd.VAE(sd=sd)


def _median_s(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _row(name, fn, x, repeats):
    full = fn(x)
    same = sum(torch.equal(fn(x[i:i + 1])[0], full[i]) for i in range(x.shape[0]))
    return name, same, x.shape[0], _median_s(lambda: fn(x), repeats), full


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", required=True, help="a ComfyUI checkout")
    ap.add_argument("--batch", type=int, default=3)
    ap.add_argument("--size", type=int, default=32, help="latent height and width (pixels: 8x)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    import_comfyui(a.comfyui)
    from jetdet.comfy import nodes as N

    with torch.inference_mode():  # as ComfyUI runs every node (execution.py)
        return _run(a, N)


def _run(a, N) -> int:
    vae = _random_sd_vae(0)
    n_params = sum(p.numel() for p in vae.first_stage_model.parameters())
    lat = torch.randn(a.batch, 4, a.size, a.size, generator=torch.Generator().manual_seed(1))
    px = torch.rand(a.batch, a.size * 8, a.size * 8, 3, generator=torch.Generator().manual_seed(2))
    rows = [
        _row("decode, ComfyUI", vae.decode, lat, a.repeats),
        _row("decode, jetdet", lambda x: N.JetDetDeterministicVAEDecode.execute({"samples": x}, vae, True).args[0],
             lat, a.repeats),
        _row("encode, ComfyUI", lambda x: vae.encode(x), px, a.repeats),
        _row("encode, jetdet", lambda x: N.JetDetDeterministicVAEEncode.execute(x, vae, True).args[0]["samples"],
             px, a.repeats),
    ]
    print(f"ComfyUI SD VAE ({n_params / 1e6:.1f} M parameters, random weights), batch {a.batch}, latent "
          f"{a.size}x{a.size} -> {a.size * 8}x{a.size * 8} pixels, {torch.get_num_threads()} thread(s), "
          f"torch {torch.__version__}\n")
    print("| call | items equal to the item alone | batch wall s (median) | max abs diff to ComfyUI's |")
    print("|---|---:|---:|---:|")
    for i, (name, same, n, s, full) in enumerate(rows):
        ref = rows[i - i % 2][4]
        print(f"| {name} | {same}/{n} | {s:.2f} | {(full - ref).abs().max().item():.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
