"""What deterministic mode costs on CPU at real model widths (the tiny models of ``python -m jetdet.bench`` hide
what grows with width: GEMM size and attention's score matrix).

Three forwards at batch 2, mode off against ``jetdet.mode("deterministic")``, interleaved, median of
``--repeats``:

- two adaLN-Zero DiT blocks (``jetdet.models.toy.DiTStack``) at width 1152, 16 heads (DiT-XL, PixArt), 1024
  tokens;
- the same at width 3072, 24 heads (Flux's width), 1280 tokens (1024 image + 256 text);
- an SD1.5-type self-attention over a 64x64 latent: 4096 tokens, 8 heads of 40, with its q/k/v/out linears;
- the width-3072 DiT blocks at 24 tokens per item, batch 4 (96 rows per GEMM: a tiny test latent, where the
  CPU path's 32-row problems each repacked the whole weight before its GEMMs ran in column chunks);
- the width-1152 and the 24-token width-3072 cases again with the weights as inference tensors, as ComfyUI loads
  every model (made and run under ``torch.inference_mode()``): the CPU path cannot cache a copy of those, and reads
  a large one in place as ``w @ x^T`` (``WEIGHT_MAJOR``).

``--parts`` times the pieces that decide those figures, each with the CPU path's setting on and off (module
attributes of ``jetdet/kernels/*/torch_path.py``) beside torch's own op: a large GEMM in 32- and 128-row tiles
(``BIG_TILE_MIN_KN``), GEMMs of 24, 96 and 200 rows against the same weight in whole-width problems and in column
chunks (``CHUNK_BELOW_ROWS``), GEMMs of 24 to 1024 rows against an inference-tensor weight copied at every call and
read in place (``WEIGHT_MAJOR_MIN_KN``), attention's grouped GEMM with and without its per-group loop
(``GROUP_LOOP_ELEMS``), and attention whole and in chunks (``SCORE_CHUNK_ELEMS``). Same bits either way
(tests/test_cpu_sweep.py, tests/test_cpu_path_details.py), except the weight read in place, a computation of its
own that is batch invariant by itself (tests/test_cpu_sweep.py).

    python bench/cpu_large.py [--repeats 3] [--threads N] [--parts]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from unittest.mock import patch

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, ".")
import jetdet  # noqa: E402
from jetdet.models.toy import DiTStack  # noqa: E402


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


def _ms(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    return statistics.median(samples)


def parts(repeats: int) -> int:
    from jetdet.kernels.attention import torch_path as at
    from jetdet.kernels.matmul import torch_path as mm

    g = torch.Generator().manual_seed(0)
    off = 1 << 62
    print(f"{torch.get_num_threads()} threads, median of {repeats}; ms")
    x = torch.randn(1024, 3072, generator=g)
    w = nn.Parameter(torch.randn(12288, 3072, generator=g) * 3072**-0.5, requires_grad=False)  # its pack is cached
    with patch.object(mm, "BIG_TILE_MIN_KN", off):
        t32 = _ms(lambda: mm.mm_f32(x, w.t()), repeats)
    t128 = _ms(lambda: mm.mm_f32(x, w.t()), repeats)
    print(f"  [1024, 3072] @ [3072, 12288]: F.linear {_ms(lambda: F.linear(x, w), repeats):7.1f}   CPU path, 32-row "
          f"tiles only {t32:7.1f}   with 128-row tiles {t128:7.1f}")
    for rows in (24, 96, 200):
        xs = torch.randn(rows, 3072, generator=g)
        with patch.object(mm, "CHUNK_BELOW_ROWS", 0):
            t_tiles = _ms(lambda xs=xs: mm.mm_f32(xs, w.t()), repeats)
        t_chunks = _ms(lambda xs=xs: mm.mm_f32(xs, w.t()), repeats)
        print(f"  [{rows}, 3072] @ [3072, 12288]: F.linear {_ms(lambda xs=xs: F.linear(xs, w), repeats):7.1f}   "
              f"CPU path, whole-width problems {t_tiles:7.1f}   in column chunks {t_chunks:7.1f}")
    with torch.inference_mode():  # as ComfyUI loads a model: no cached copy of an inference tensor
        wi = torch.randn(12288, 3072, generator=g) * 3072**-0.5
        for rows in (24, 96, 200, 1024):
            xs = torch.randn(rows, 3072, generator=g)
            with patch.object(mm, "WEIGHT_MAJOR_MIN_KN", off):
                t_copy = _ms(lambda xs=xs: mm.mm_f32(xs, wi.t()), repeats)
            t_major = _ms(lambda xs=xs: mm.mm_f32(xs, wi.t()), repeats)
            t_lin = _ms(lambda xs=xs: F.linear(xs, wi), repeats)
            print(f"  [{rows}, 3072] @ [3072, 12288], inference-tensor weight: F.linear {t_lin:7.1f}   CPU path, "
                  f"weight copied per call {t_copy:7.1f}   read in place (w @ x^T) {t_major:7.1f}")
    a, b = torch.randn(24, 1024, 1024, generator=g), torch.randn(24, 1024, 128, generator=g)
    with patch.object(mm, "GROUP_LOOP_ELEMS", off):
        t_copy = _ms(lambda: mm.bmm_f32(a, b), repeats)
    t_loop = _ms(lambda: mm.bmm_f32(a, b), repeats)
    print(f"  [24, 1024, 1024] @ [24, 1024, 128]: torch.bmm {_ms(lambda: torch.bmm(a, b), repeats):7.1f}   CPU path, "
          f"b copied per tile {t_copy:7.1f}   one call per group {t_loop:7.1f}")
    from jetdet.kernels.conv2d import torch_path as cv

    x, w = torch.randn(8, 960, 64, 64, generator=g), torch.randn(320, 960, 3, 3, generator=g) * (960 * 9) ** -0.5
    with torch.inference_mode():  # an SD1.5 up-block conv at a 64x64 latent, batch 8 (4 items with CFG)
        with patch.object(cv, "COLS_GROUP_BYTES", off):
            t_whole = _ms(lambda: cv.conv2d(x, w, None, (1, 1), (1, 1)), repeats)
        t_groups = _ms(lambda: cv.conv2d(x, w, None, (1, 1), (1, 1)), repeats)
        t_conv = _ms(lambda: F.conv2d(x, w, None, 1, 1), repeats)
    cols = 960 * 9 * 64 * 64 * 4 / 2**20  # MB of columns per item
    g_items = cv.item_groups(8, int(cols * 2**20))[0]
    print(f"  conv2d [8, 960, 64, 64] -> 320, 3x3: F.conv2d {t_conv:7.1f}   CPU path, the batch's columns at once "
          f"{t_whole:7.1f} ({8 * cols:.0f} MB)   {g_items} items at a time {t_groups:7.1f} ({g_items * cols:.0f} MB)")
    for shape in ((2, 8, 4096, 40), (1, 24, 1024, 128)):
        qkv = [torch.randn(*shape, generator=g) for _ in range(3)]
        with patch.object(at, "SCORE_CHUNK_ELEMS", off):
            t_whole = _ms(lambda qkv=qkv: at.attention(*qkv), repeats)
        t_chunks = _ms(lambda qkv=qkv: at.attention(*qkv), repeats)
        t_sdpa = _ms(lambda qkv=qkv: F.scaled_dot_product_attention(*qkv), repeats)
        print(f"  attention {list(shape)}: SDPA {t_sdpa:7.1f}   CPU path, whole score matrix {t_whole:7.1f}   in "
              f"chunks {t_chunks:7.1f}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--parts", action="store_true", help="time the CPU path's pieces with each setting on and off")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    cases = [
        ("DiT blocks x2, width 1152, 16 heads, 1024 tokens", DiTStack(1152, 16, 2),
         (torch.randn(2, 1024, 1152, generator=g), torch.randn(2, 1152, generator=g))),
        ("DiT blocks x2, width 3072, 24 heads, 1280 tokens", DiTStack(3072, 24, 2),
         (torch.randn(2, 1280, 3072, generator=g), torch.randn(2, 3072, generator=g))),
        ("SD1.5 self-attention, 4096 tokens, 8 heads of 40", SelfAttention(),
         (torch.randn(2, 4096, 320, generator=g),)),
        ("DiT blocks x2, width 3072, 24 tokens, batch 4", DiTStack(3072, 24, 2),
         (torch.randn(4, 24, 3072, generator=g), torch.randn(4, 3072, generator=g))),
    ]
    with torch.inference_mode():  # the same models with inference-tensor weights, as ComfyUI loads them
        cases += [
            ("  the width-1152 case, inference-tensor weights", DiTStack(1152, 16, 2), cases[0][2]),
            ("  the 24-token case, inference-tensor weights", DiTStack(3072, 24, 2), cases[3][2]),
        ]
    if args.parts:
        return parts(args.repeats)
    print(f"batch 2 unless named, {torch.get_num_threads()} threads, torch {torch.__version__}, median of "
          f"{args.repeats} interleaved runs")
    print(f"{'model':<52} {'off ms':>9} {'det ms':>9} {'det/off':>8}")
    for name, model, inp in cases:
        model.eval()
        times = {"off": [], "det": []}
        inference = next(model.parameters()).is_inference()
        with torch.inference_mode() if inference else torch.no_grad():
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
