"""Row-tile heights and column chunks on the CPU path: does a row's result depend on how many rows its GEMM problem
has, or on whether the problem spans the weight's whole width or one column chunk of it?

The CPU path of deterministic mode runs every GEMM as a batch of identical ``[height, K] @ [K, N]`` problems
(``jetdet/kernels/matmul/torch_path.py``). Which height a row lands in depends on M (full tiles, then a padded
tail), so the path needs a row's bits to be the same at every height it uses. It reads the right-hand side in one of
two layouts: row-major (a padded copy; heights 8, 32, 128) or column-major (``F.linear``'s ``weight.t()``, read in
place; heights 16, 32, 128). This checks, per layout, on the machine it runs on, over random K and N, at 1 and 2
threads, every height the path uses and a few it does not (4, 8/16, 64, 256) against the 32-row problems. GEMMs of
fewer than ``CHUNK_BELOW_ROWS`` rows against a large weight run their row tiles in column chunks (``chunk_cols(N)``
wide), so for every N with such a width it also checks the chunks' rows at the layout's heights. (``python
bench/cpu_large.py --parts`` times what the taller tiles, the chunks and the in-place reads save.)

    python bench/tile_heights.py [--shapes 60] [--seed 0]

Prints, per layout, one line per height (shapes whose rows differ from the 32-row problems', at either thread count)
and one for the column chunks. Exits 1 where a height or chunking the path uses differs.
"""

from __future__ import annotations

import argparse
import random
import sys

import torch

sys.path.insert(0, ".")
from jetdet.kernels.matmul import torch_path as tp  # noqa: E402

HEIGHTS = (4, 8, 16, 32, 64, 128, 256)
#: the layouts of the right-hand side and the heights the path uses with each
LAYOUTS = {"row-major": (tp.TAIL_TILE, tp.ROW_TILE, tp.BIG_TILE),
           "column-major": (tp.COL_MAJOR_TAIL_TILE, tp.ROW_TILE, tp.BIG_TILE)}
ROWS = 256


def _shape(rng: random.Random) -> tuple[int, int]:
    k = rng.choice([rng.randint(1, 64), rng.randint(65, 800), rng.randint(769, 5000), rng.randint(5000, 12288),
                    1100, 1152, 1280, 1428, 3072, 4096, 5120])  # fmt: skip
    n = rng.choice([16, 64, 128, 320, 640, 1152, 1280, 3072, 4608, rng.randint(1, 400) * 16])
    if k * n > 40_000_000:
        n = max(16, 40_000_000 // k // 16 * 16)
    return k, n


def _rows(a: torch.Tensor, b: torch.Tensor, height: int) -> torch.Tensor:
    t = ROWS // height
    out = torch.empty(t, height, b.shape[1])
    tp.gemm(a.view(t, height, a.shape[1]), b.expand(t, *b.shape), out)
    return out.view(ROWS, -1)


def _chunked_rows(a: torch.Tensor, b: torch.Tensor, height: int, width: int) -> torch.Tensor:
    k, n = b.shape
    c = n // width
    out = torch.empty(ROWS, n)
    for r0 in range(0, ROWS, height):
        part = torch.empty(c, height, width)
        tp.gemm(a[r0 : r0 + height].unsqueeze(0).expand(c, height, k), b.unflatten(1, (c, width)).transpose(0, 1), part)
        out[r0 : r0 + height].view(height, c, width).copy_(part.transpose(0, 1))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    threads = torch.get_num_threads()
    differs = {(lay, h): [] for lay in LAYOUTS for h in HEIGHTS}
    chunk_bad = {lay: [] for lay in LAYOUTS}
    chunked = 0
    try:
        for _ in range(args.shapes):
            k, n = _shape(rng)
            a, b = torch.randn(ROWS, k), torch.randn(k, n)
            width = tp.chunk_cols(n)
            chunked += bool(width)
            for lay, used in LAYOUTS.items():
                bl = b if lay == "row-major" else b.t().contiguous().t()
                for th in (1, 2):
                    torch.set_num_threads(th)
                    ref = _rows(a, bl, tp.ROW_TILE)
                    for h in HEIGHTS:
                        if not torch.equal(_rows(a, bl, h), ref) and (k, n) not in differs[lay, h]:
                            differs[lay, h].append((k, n))
                    for h in used if width else ():
                        if not torch.equal(_chunked_rows(a, bl, h, width), ref) and (k, n, h) not in chunk_bad[lay]:
                            chunk_bad[lay].append((k, n, h))
        torch.set_num_threads(threads)
        print(f"{args.shapes} random [{ROWS}, K] @ [K, N] (seed {args.seed}), 1 and 2 threads; rows against the 32-row "
              "problems', per layout of the right-hand side:")
        for lay, used in LAYOUTS.items():
            print(f"  {lay} (the CPU path uses heights {', '.join(map(str, used))}):")
            for h in HEIGHTS:
                bad = differs[lay, h]
                mark = " (used)" if h in used else ""
                print(f"    height {h:>3}{mark:<7} shapes that differ: {len(bad):>3}  {bad[:4]}")
            print(f"    column chunks of chunk_cols(N) (the {chunked} shapes with one) at the used heights: shapes "
                  f"that differ: {len(chunk_bad[lay]):>3}  {chunk_bad[lay][:4]}")
    finally:
        torch.set_num_threads(threads)
    fail = False
    for lay, used in LAYOUTS.items():
        used_bad = [h for h in used if differs[lay, h]]
        if used_bad:
            print(f"FAIL ({lay}): rows differ between heights the CPU path uses ({used_bad}): it is not batch "
                  "invariant here")
        if chunk_bad[lay]:
            print(f"FAIL ({lay}): rows differ between column chunks and whole-width problems: the CPU path is not "
                  "batch invariant here")
        fail = fail or bool(used_bad or chunk_bad[lay])
    return 1 if fail else 0


if __name__ == "__main__":
    sys.exit(main())
