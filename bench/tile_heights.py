"""Row-tile heights and column chunks on the CPU path: does a row's result depend on how many rows its GEMM problem
has, or on whether the problem spans the weight's whole width or one column chunk of it?

The CPU path of deterministic mode runs every GEMM as a batch of identical ``[height, K] @ [K, N]`` problems
(``jetdet/kernels/matmul/torch_path.py``). Which height a row lands in depends on M (full tiles, then a padded
tail), so the path needs a row's bits to be the same at every height it uses (8, 32 and 128). This checks that on
the machine it runs on, over random K and N, at 1, 2 and 4 threads (against the 8-row problems at 1 thread, so a
row that changes with the thread count counts too), for the heights the path uses and a few it does
not (4, 16, 64, 256). GEMMs of fewer than ``CHUNK_BELOW_ROWS`` rows against a large weight run their row tiles in
column chunks (``chunk_cols(N)`` wide), so for every N with such a width it also checks the chunks' rows against the
whole-width problem's at heights 8, 32 and 128. GEMMs against the transpose of a large weight that is not cached
(``x @ w.t()``, WEIGHT_MAJOR: every ComfyUI model's linear) run as ``w @ x^T``, where x's rows are the problems'
columns, so it also checks that their rows are the same at 8, 32 and 128 columns, with one tile per call or many
(the path batches a call's problems over chunks of w's rows or over tiles of x, whichever has more). (``python
bench/cpu_large.py --parts`` times what the taller tiles, the chunks and the weight-major form save.)

    python bench/tile_heights.py [--shapes 60] [--seed 0]

Prints one line per height: shapes whose rows differ from the 8-row problem's (at either thread count), and one
for the column chunks and one for the weight-major form. Exits 1 where a height, chunking or form the path uses
differs.
"""

from __future__ import annotations

import argparse
import random
import sys

import torch

sys.path.insert(0, ".")
from jetdet.kernels.matmul import torch_path as tp  # noqa: E402

HEIGHTS = (4, 8, 16, 32, 64, 128, 256)
USED = (tp.TAIL_TILE, tp.ROW_TILE, tp.BIG_TILE)  # the heights the CPU path uses
THREADS = (1, 2, 4)  # 4: more threads than some calls have problems (oversubscribed on a 2-core machine)
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
    """The CPU path's own column-chunked GEMM, in row tiles of ``height`` only."""
    return tp._mm_chunked(a, b, None, width, [height] * (ROWS // height))


def _weight_major_rows(a: torch.Tensor, w: torch.Tensor, height: int, one_tile: bool) -> torch.Tensor:
    """The CPU path's own weight-major GEMM ``a @ w.t()`` in tiles of ``height`` rows only: all ROWS rows, or the
    first ``height`` rows as a call of one tile."""
    if one_tile:
        return tp._mm_weight_major(a[:height], w, None, [height])
    return tp._mm_weight_major(a, w, None, [height] * (ROWS // height))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    threads = torch.get_num_threads()
    differs = {h: [] for h in HEIGHTS}
    chunk_bad, chunked = [], 0
    wm_bad, wm_shapes, wm_same = [], 0, 0
    try:
        for _ in range(args.shapes):
            k, n = _shape(rng)
            a, b = torch.randn(ROWS, k), torch.randn(k, n)
            width = tp.chunk_cols(n)
            chunked += bool(width)
            w = b.t().contiguous() if n >= 2 * tp.COL_PAD else None
            wm_shapes += w is not None
            torch.set_num_threads(1)
            ref = _rows(a, b, 8)
            wm_ref = _weight_major_rows(a, w, 8, False) if w is not None else None
            wm_same += w is not None and torch.equal(wm_ref, ref)
            for th in THREADS:
                torch.set_num_threads(th)
                for h in HEIGHTS:
                    if not torch.equal(_rows(a, b, h), ref) and (k, n) not in differs[h]:
                        differs[h].append((k, n))
                for h in USED if width else ():
                    if not torch.equal(_chunked_rows(a, b, h, width), ref) and (k, n, h) not in chunk_bad:
                        chunk_bad.append((k, n, h))
                for h in USED if w is not None else ():
                    for one in (False, True):
                        got = _weight_major_rows(a, w, h, one)
                        if not torch.equal(got, wm_ref[: len(got)]) and (k, n, h) not in wm_bad:
                            wm_bad.append((k, n, h))
        torch.set_num_threads(threads)
        ths = "/".join(map(str, THREADS))
        print(f"{args.shapes} random [{ROWS}, K] @ [K, N] (seed {args.seed}), {ths} threads; rows against the 8-row "
              f"problems' at 1 thread (the CPU path uses 8, {tp.ROW_TILE} and {tp.BIG_TILE}):")
        for h, bad in differs.items():
            used = " (used)" if h in USED else ""
            print(f"  height {h:>3}{used:<7} shapes that differ: {len(bad):>3}  {bad[:4]}")
        print(f"  column chunks of chunk_cols(N) (the {chunked} shapes with one), heights {tp.TAIL_TILE}/{tp.ROW_TILE}/"
              f"{tp.BIG_TILE}, against the same reference: shapes that differ: {len(chunk_bad):>3}  "
              f"{chunk_bad[:4]}")
        print(f"  weight-major a @ w.t() (the {wm_shapes} shapes with N >= {2 * tp.COL_PAD}), heights {tp.TAIL_TILE}/"
              f"{tp.ROW_TILE}/{tp.BIG_TILE}, one tile and many, against its own 8-row result at 1 thread: shapes that "
              f"differ: {len(wm_bad):>3}  {wm_bad[:4]}")
        print(f"  (for information, not needed: weight-major rows equal to the row-major 8-row problems' in {wm_same} "
              f"of {wm_shapes} shapes)")
    finally:
        torch.set_num_threads(threads)
    used_bad = [h for h in USED if differs[h]]
    if used_bad:
        print(f"FAIL: rows differ between heights the CPU path uses ({used_bad}): it is not batch invariant here")
    if chunk_bad:
        print("FAIL: rows differ between column chunks and whole-width problems: the CPU path is not batch invariant "
              "here")
    if wm_bad and tp.WEIGHT_MAJOR:
        print("FAIL: weight-major rows differ between tile heights: the CPU path is not batch invariant here "
              "(JETDET_CPU_WEIGHT_MAJOR=0 turns the form off)")
    elif wm_bad:
        print("weight-major rows differ between tile heights here; the CPU path does not use the form on this CPU "
              "(WEIGHT_MAJOR off: not an Intel CPU with MKL, or JETDET_CPU_WEIGHT_MAJOR=0), so this is not a failure")
    elif not tp.WEIGHT_MAJOR:
        print("the weight-major form holds its premise here but is off on this CPU; JETDET_CPU_WEIGHT_MAJOR=1 turns "
              "it on")
    return 1 if used_bad or chunk_bad or (wm_bad and tp.WEIGHT_MAJOR) else 0


if __name__ == "__main__":
    sys.exit(main())
