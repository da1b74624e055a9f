"""What deterministic mode costs on CPU at real model widths (the tiny models of ``python -m jetdet.bench`` hide
what grows with width: GEMM size and attention's score matrix).

Three forwards at batch 2, mode off against ``jetdet.mode("deterministic")``, interleaved, median of
``--repeats``:

- two adaLN-Zero DiT blocks (``jetdet.models.toy.TinyDiTBlock``) at width 1152, 16 heads (DiT-XL, PixArt), 1024
  tokens;
- the same at width 3072, 24 heads (Flux's width), 1280 tokens (1024 image + 256 text);
- an SD1.5-type self-attention over a 64x64 latent: 4096 tokens, 8 heads of 40, with its q/k/v/out linears.

    python bench/cpu_large.py [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, ".")
import jetdet  # noqa: E402
from jetdet.models.toy import TinyDiTBlock  # noqa: E402


class DiT(nn.Module):
    def __init__(self, width, heads, depth=2):
        super().__init__()
        self.blocks = nn.ModuleList(TinyDiTBlock(width, heads) for _ in range(depth))

    def forward(self, x, c):
        for blk in self.blocks:
            x = blk(x, c)
        return x


class SelfAttention(nn.Module):
    """An SD1.5 UNet transformer block's self-attention (to_q/k/v/out, 8 heads)."""

    def __init__(self, width=320, heads=8):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(width, width, bias=i == 3) for i in range(4))

    def forward(self, x):
        b, n, d = x.shape

        def split(t):
            return t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

        o = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.out(o.transpose(1, 2).reshape(b, n, d))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    cases = [
        ("DiT blocks x2, width 1152, 16 heads, 1024 tokens", DiT(1152, 16),
         (torch.randn(2, 1024, 1152, generator=g), torch.randn(2, 1152, generator=g))),
        ("DiT blocks x2, width 3072, 24 heads, 1280 tokens", DiT(3072, 24),
         (torch.randn(2, 1280, 3072, generator=g), torch.randn(2, 3072, generator=g))),
        ("SD1.5 self-attention, 4096 tokens, 8 heads of 40", SelfAttention(),
         (torch.randn(2, 4096, 320, generator=g),)),
    ]
    print(f"batch 2, {torch.get_num_threads()} threads, torch {torch.__version__}, median of {args.repeats} "
          "interleaved runs")
    print(f"{'model':<52} {'off ms':>9} {'det ms':>9} {'det/off':>8}")
    for name, model, inp in cases:
        model.eval()
        times = {"off": [], "det": []}
        with torch.no_grad():
            model(*inp)
            with jetdet.mode("deterministic"):
                model(*inp)
            for _ in range(args.repeats):
                for key in ("off", "det"):
                    t = time.perf_counter()
                    if key == "det":
                        with jetdet.mode("deterministic"):
                            model(*inp)
                    else:
                        model(*inp)
                    times[key].append((time.perf_counter() - t) * 1e3)
        off, det = statistics.median(times["off"]), statistics.median(times["det"])
        print(f"{name:<52} {off:9.0f} {det:9.0f} {det / off:7.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
