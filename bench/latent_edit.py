"""Latents edited mid-run against the step cache: what a ``callback_on_step_end`` that flips the latents costs fast
mode, and what ``handle.new_trajectory()`` after the edit gives back.

A diffusers-style loop (tiny random-weight ``UNet2DConditionModel``, Euler 20 steps, CFG 5, one prompt embedding
per row) samples the same noise four ways: off and fast mode (default quality, ``scheduler=`` the loop's
scheduler), each without the edit, with the latents flipped left-right after step 8, and in fast mode with the flip
followed by ``handle.new_trajectory()``. Printed: PSNR of each fast run against the off run with the same edit, and
the calls fast mode saved. Needs diffusers (``pip install '.[diffusers]'``).

    python bench/latent_edit.py [--steps 20] [--edit-at 8]
"""

from __future__ import annotations

import argparse
import sys

import torch

import jetdet
from jetdet.models import vp
from jetdet.verify import psnr_db

SD_SCHEDULE = {**vp.SD_SCHEDULE, "steps_offset": 1}  # SD1.5's, as its pipelines configure Euler


def _unet():
    import diffusers

    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4).eval()


def sample(unet, steps: int, edit_at: int | None, handle=None, restart: bool = False) -> torch.Tensor:
    """The loop a diffusers pipeline runs, with a callback's edit after step ``edit_at``."""
    import diffusers

    g = torch.Generator().manual_seed(1)
    lat = torch.randn(2, 4, 16, 16, generator=g)
    cond = torch.randn(2, 7, 16, generator=g)
    emb = torch.cat([cond, torch.zeros_like(cond)])  # cond rows, then uncond rows
    s = diffusers.EulerDiscreteScheduler(**SD_SCHEDULE)
    s.set_timesteps(steps)
    lat = lat * s.init_noise_sigma
    with torch.no_grad():
        for i, t in enumerate(s.timesteps):
            c, u = unet(s.scale_model_input(torch.cat([lat, lat]), t), t, emb).sample.chunk(2)
            lat = s.step(u + 5.0 * (c - u), t, lat).prev_sample
            if i == edit_at:
                lat = lat.flip(-1)  # the callback's edit: a mirror (a paste or a blend does the same)
                if restart:
                    handle.new_trajectory()
    return lat


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--edit-at", type=int, default=8, help="the step after which the latents are flipped")
    args = ap.parse_args(argv)
    if not 0 <= args.edit_at < args.steps - 1:
        ap.error(f"--edit-at: expected 0 <= step < {args.steps - 1}, got {args.edit_at}")
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("needs diffusers: pip install '.[diffusers]'", file=sys.stderr)
        return 2
    for label, db, saved in measure(args.steps, args.edit_at):
        print(f"{label:<36} fast vs off {db:6.2f} dB   calls saved {saved}/{args.steps}")
    return 0


def measure(steps: int, edit_at: int) -> list[tuple[str, float, int]]:
    """(label, PSNR of fast against off with the same edit, calls saved) for the three runs."""
    import diffusers

    unet = _unet()
    rows = []
    for label, edit, restart in (("no edit", None, False), ("flip, nothing else", edit_at, False),
                                 ("flip, then handle.new_trajectory()", edit_at, True)):
        off = sample(unet, steps, edit)
        with jetdet.patch(unet, mode="fast", scheduler=diffusers.EulerDiscreteScheduler(**SD_SCHEDULE)) as h:
            fast = sample(unet, steps, edit, h, restart)
            saved = h.stats()["cache"]["calls_saved"]
        rows.append((label, psnr_db(fast, off), saved))
    return rows


if __name__ == "__main__":
    sys.exit(main())
