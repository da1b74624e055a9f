"""A random sweep of GEMM shapes on the CPU path: row i / group g is bitwise independent of the batch, its
position and the thread count. (An untiled torch.bmm failed 15 of these checks on this machine, and an
mm without N padding 10 of 150 shapes: the sweep is what caught both.)"""

import random

import pytest
import torch
from _invariance import batch_mismatches

from jetdet.kernels.conv2d import torch_path as conv_torch
from jetdet.kernels.matmul import torch_path as mm_torch


def test_mm_sweep(restore_threads):
    rng = random.Random(7)
    bad = []
    for _ in range(40):
        m, k, n = rng.randint(33, 300), rng.randint(1, 300), rng.randint(1, 100)
        a, b = torch.randn(m, k), torch.randn(k, n)
        torch.set_num_threads(2)
        ref = mm_torch.mm_f32(a, b)
        for th in (2, 1):
            torch.set_num_threads(th)
            diff = batch_mismatches(mm_torch.mm_f32, [a], [b], slots=rng.sample(range(m), 3), windows=[(5, 40)],
                                    full=ref)
            bad += [(m, k, n, th, w) for w in diff]
    assert not bad, bad


def test_bmm_sweep(restore_threads):
    rng = random.Random(1)
    bad = []
    for _ in range(40):
        m, k, n = rng.randint(1, 150), rng.randint(1, 200), rng.randint(1, 150)
        a, b = torch.randn(8, m, k), torch.randn(8, k, n)
        torch.set_num_threads(2)
        ref = mm_torch.bmm_f32(a, b)
        for th in (2, 1):
            torch.set_num_threads(th)
            diff = batch_mismatches(mm_torch.bmm_f32, [a, b], slots=rng.sample(range(8), 3), windows=[(2, 7)], full=ref)
            bad += [(m, k, n, th, w) for w in diff]
    assert not bad, bad


def test_conv2d_sweep(restore_threads):
    """One GEMM per item, [O, C*kh*kw] @ [C*kh*kw, Ho*Wo], O padded to 8, Ho*Wo to 16: item b must not care
    about the batch, its slot or the thread count, whatever the shape (odd sizes, strides, 1x1)."""
    rng = random.Random(5)
    bad = []
    for _ in range(40):
        c, o = rng.randint(1, 40), rng.choice([rng.randint(1, 12), rng.randint(1, 70)])  # O is padded to 8
        h, w = rng.randint(3, 19), rng.randint(3, 19)
        k = rng.choice([1, 3, 3, 2])
        stride, pad = rng.choice([1, 2]), rng.choice([0, 1]) if k > 1 else 0
        x, wt, bias = torch.randn(8, c, h, w), torch.randn(o, c, k, k), torch.randn(o)
        torch.set_num_threads(2)
        ref = conv_torch.conv2d(x, wt, bias, (stride, stride), (pad, pad))
        for th in (2, 1):
            torch.set_num_threads(th)
            diff = batch_mismatches(conv_torch.conv2d, [x], [wt, bias, (stride, stride), (pad, pad)],
                                    slots=rng.sample(range(8), 2), windows=[(1, 6)], full=ref)
            bad += [(c, o, h, w, k, stride, pad, th, win) for win in diff]
    assert not bad, bad


def test_bmm_group_loop_gives_the_single_calls_bits(restore_threads, monkeypatch):
    """Large grouped GEMMs (attention's) run one batched call per group instead of one call over every (group,
    tile) with a copy of b per tile. Same problems, so the same bits: both ways over random shapes, and still
    batch invariant over groups and threads when every call takes the loop."""
    rng = random.Random(3)
    for _ in range(25):
        g, m, k, n = rng.randint(2, 6), rng.randint(33, 200), rng.randint(1, 300), rng.randint(1, 160)
        a, b = torch.randn(g, m, k), torch.randn(g, k, n)
        monkeypatch.setattr(mm_torch, "GROUP_LOOP_ELEMS", 1 << 62)
        single = mm_torch.bmm_f32(a, b)
        monkeypatch.setattr(mm_torch, "GROUP_LOOP_ELEMS", 0)
        assert torch.equal(mm_torch.bmm_f32(a, b), single), (g, m, k, n)
        for th in (2, 1):
            torch.set_num_threads(th)
            assert not batch_mismatches(mm_torch.bmm_f32, [a, b], slots=[0, g - 1], windows=[(1, g)], full=single)


def test_mm_with_128_row_tiles_is_batch_invariant(restore_threads, monkeypatch):
    """Large GEMMs put their rows in 128-row tiles first (BIG_TILE), then 32-row tiles and an 8-row tail, so which
    height a row gets depends on M. Rows must not change with that: the threshold lowered so that small shapes take
    all three heights, rows alone and in windows against the whole, at 2 and 1 threads, and against the same GEMM
    in 32-row tiles only. bench/tile_heights.py checks the heights over larger K and N."""
    rng = random.Random(11)
    bad = []
    for _ in range(12):
        m, k, n = rng.randint(256, 700), rng.randint(2, 400), rng.randint(1, 200)
        a, b = torch.randn(m, k), torch.randn(k, n)
        torch.set_num_threads(2)
        monkeypatch.setattr(mm_torch, "BIG_TILE_MIN_KN", 1 << 62)
        small_only = mm_torch.mm_f32(a, b)
        monkeypatch.setattr(mm_torch, "BIG_TILE_MIN_KN", 0)
        ref = mm_torch.mm_f32(a, b)
        assert torch.equal(ref, small_only), (m, k, n)
        for th in (2, 1):
            torch.set_num_threads(th)
            diff = batch_mismatches(mm_torch.mm_f32, [a], [b], slots=rng.sample(range(m), 3),
                                    windows=[(3, 300), (0, 256), (100, m)], full=ref)
            bad += [(m, k, n, th, w) for w in diff]
    assert not bad, bad


#: [K, N] of weights large enough for column chunks (K x N >= BIG_TILE_MIN_KN), chunk widths 512, 320, 576, 336
_CHUNKED = [(1152, 1024), (3072, 640), (1000, 1152), (1300, 1000)]


def test_chunk_heights():
    assert mm_torch.chunk_heights(3) == [8] and mm_torch.chunk_heights(24) == [32]
    assert mm_torch.chunk_heights(64) == [32, 32] and mm_torch.chunk_heights(65) == [128]
    assert mm_torch.chunk_heights(170) == [128, 32, 32] and mm_torch.chunk_heights(200) == [128, 128]


def test_chunk_widths():
    """chunk_cols: a divisor of the padded width, at least MIN_CHUNK_COLS, two chunks or more, nearest CHUNK_COLS;
    0 where no such divisor exists."""
    assert [mm_torch.chunk_cols(n) for n in (3072, 12288, 1152, 640, 1008, 4608)] == [512, 512, 576, 320, 336, 512]
    assert mm_torch.chunk_cols(320) == 0 and mm_torch.chunk_cols(16 * 67) == 0  # too narrow; a prime count of units
    for n in range(16, 20000, 16):
        w = mm_torch.chunk_cols(n)
        assert w == 0 or (n % w == 0 and w % 16 == 0 and w >= mm_torch.MIN_CHUNK_COLS and n // w >= 2), n


def _chunk_mismatches(rng, col_major: bool = False) -> list:
    """Rows of GEMMs against the _CHUNKED weights (bias or none; row-major [K, N], or column-major as F.linear's
    weight.t() where N allows) that differ between column chunks and whole-width problems at 2 and 1 threads, at row
    counts that take every tile height."""
    bad = []
    for (k, n), m in zip(_CHUNKED, (3, 45, 170, 255)):
        a, b, bias = torch.randn(m, k), torch.randn(k, n), torch.randn(n) if m % 2 else None
        if col_major:
            b = b.t().contiguous().t()
        for th in (2, 1):
            torch.set_num_threads(th)
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(mm_torch, "CHUNK_BELOW_ROWS", 0)
                whole = mm_torch.mm_f32(a, b, bias)
            if not torch.equal(mm_torch.mm_f32(a, b, bias), whole):
                bad.append((m, k, n, th))
    return bad


def test_column_chunks_give_the_whole_width_problems_bits(restore_threads, monkeypatch):
    """Small-row GEMMs against large weights run in column chunks (CHUNK_BELOW_ROWS); which calls do depends on M, so
    a row must get the same bits either way (bench/tile_heights.py checks this over more K and N)."""
    calls = []
    chunked = mm_torch._mm_chunked
    monkeypatch.setattr(mm_torch, "_mm_chunked", lambda *a: calls.append(a[3]) or chunked(*a))
    for col_major in (False, True):
        assert not _chunk_mismatches(random.Random(2), col_major), col_major
    assert sorted(set(calls)) == [320, 336, 512, 576]  # every case took the chunks
    assert len(calls) == 4 * 2 * 2  # 4 weights, 2 thread counts, 2 layouts (1000 columns: row-major in both)


def test_negative_control_chunks_written_into_the_strided_output(restore_threads, monkeypatch):
    """The check above can fail: the same chunked problems with torch.bmm writing straight into the output's strided
    view (no scratch output and copy) take another path in torch, whose rows differ here at 2 threads."""

    def strided(a, bp, bias, width, tail_tile):
        m, k = a.shape
        heights = mm_torch.chunk_heights(m, tail_tile)
        a = torch.nn.functional.pad(a, (0, 0, 0, sum(heights) - m))
        c = bp.shape[1] // width
        out = torch.empty(sum(heights), bp.shape[1])
        r0 = 0
        for h in heights:
            mm_torch.gemm(a[r0 : r0 + h].unsqueeze(0).expand(c, h, k), bp.unflatten(1, (c, width)).transpose(0, 1),
                          out[r0 : r0 + h].view(h, c, width).transpose(0, 1),
                          bias.view(c, 1, width) if bias is not None else None)  # fmt: skip
            r0 += h
        return out

    monkeypatch.setattr(mm_torch, "_mm_chunked", strided)
    if not _chunk_mismatches(random.Random(2)) and not _chunk_mismatches(random.Random(2), col_major=True):
        pytest.skip("torch's strided-output bmm gives the batched path's bits on this CPU")


def _col_major_mismatches(rng, shapes: int = 25) -> list:
    """Windows of GEMMs against column-major b (F.linear's weight.t()) whose rows differ from the whole call's, at 2 and
    1 threads (the whole computed at 2): windows of 1 to 33 rows, so every tail and tile height is met."""
    bad = []
    for _ in range(shapes):
        k = rng.choice([rng.randint(2, 64), rng.randint(65, 800), rng.randint(769, 3000), 1152])
        n, m = rng.choice([16, 32, 64, 320, rng.randint(1, 80) * 16]), rng.randint(40, 300)
        a, w, bias = torch.randn(m, k), torch.randn(n, k), torch.randn(n) if rng.random() < 0.5 else None
        assert mm_torch.is_col_major(w.t())
        torch.set_num_threads(2)
        ref = mm_torch.mm_f32(a, w.t(), bias)
        for th in (2, 1):
            torch.set_num_threads(th)
            windows = [(s, s + size) for size in (1, 3, 8, 9, 16, 17, 33) for s in [rng.randrange(m - size)]]
            diff = batch_mismatches(mm_torch.mm_f32, [a], [w.t(), bias], windows=windows, full=ref)
            bad += [(m, k, n, th, win) for win in diff]
    return bad


def test_column_major_weights_are_read_in_place_and_batch_invariant(restore_threads):
    """F.linear's weight.t() (columns contiguous, N a multiple of 16) is the GEMMs' operand as it is: no copy of the
    weight per call (which every ComfyUI weight paid: inference tensors are never cached), tails of 16 rows."""
    w = torch.randn(64, 40)
    bp, tail = mm_torch.rhs(w.t())
    assert bp.data_ptr() == w.data_ptr() and tail == mm_torch.COL_MAJOR_TAIL_TILE == 16
    assert mm_torch.rhs(torch.randn(40, 64))[1] == 8 and mm_torch.rhs(torch.randn(60, 40).t())[1] == 8  # others
    assert not _col_major_mismatches(random.Random(6))


def test_negative_control_column_major_weights_with_8_row_tails(restore_threads, monkeypatch):
    """The sweep above can fail: with 8-row tails (the row-major layout's) column-major rows change with the batch,
    as 4- and 8-row problems over that layout take other bits (bench/tile_heights.py). Skips on a CPU where they
    happen to agree."""
    monkeypatch.setattr(mm_torch, "COL_MAJOR_TAIL_TILE", 8)
    if not _col_major_mismatches(random.Random(6), shapes=8):
        pytest.skip("8-row problems over column-major b give the 16-row problems' bits on this CPU")


def test_a_parameter_and_an_inference_weight_give_the_same_bits():
    """ComfyUI's weights are inference tensors, a PyTorch model's are Parameters (whose fp16 casts are cached): the
    same layout and so the same bits, in fp32 and fp16."""
    for dtype in (torch.float32, torch.float16):
        lin = torch.nn.Linear(300, 96).to(dtype)
        x = torch.randn(70, 300)
        with torch.no_grad():
            as_param = mm_torch.mm_f32(x, lin.weight.t(), lin.bias)
            again = mm_torch.mm_f32(x, lin.weight.t(), lin.bias)  # from the cache
        with torch.inference_mode():
            w, b = lin.weight.clone(), lin.bias.clone()
            assert w.is_inference()
            as_inference = mm_torch.mm_f32(x, w.t(), b)
        assert torch.equal(as_param, as_inference) and torch.equal(again, as_param), dtype


def test_mm_across_the_chunk_threshold_is_batch_invariant(restore_threads):
    """The whole batch (256 rows or more: whole-width 128-row problems) against items and windows of fewer rows
    (column chunks), at 2 and 1 threads."""
    rng = random.Random(4)
    bad = []
    for (k, n), m, col_major in zip(_CHUNKED[:2] * 2, (300, 410) * 2, (False, False, True, True)):
        a, b, bias = torch.randn(m, k), torch.randn(k, n), torch.randn(n)
        b = b.t().contiguous().t() if col_major else b
        torch.set_num_threads(2)
        ref = mm_torch.mm_f32(a, b, bias)
        for th in (2, 1):
            torch.set_num_threads(th)
            diff = batch_mismatches(mm_torch.mm_f32, [a], [b, bias], slots=rng.sample(range(m), 2),
                                    windows=[(0, 24), (37, 133), (5, 260), (m - 255, m)], full=ref)
            bad += [(m, k, n, th, w) for w in diff]
    assert not bad, bad


#: K x N where 256-row problems gave other bits than 8-row ones on this Xeon (bench/tile_heights.py)
_LARGE_K = [(1100, 4368), (1280, 2592), (2585, 3072)]


def _big_tile_mismatches(rng, m=520):
    bad = []
    for k, n in _LARGE_K:
        a, b = torch.randn(m, k), torch.randn(k, n)
        ref = mm_torch.mm_f32(a, b)
        diff = batch_mismatches(mm_torch.mm_f32, [a], [b], slots=rng.sample(range(m), 2), windows=[(7, 270)], full=ref)
        bad += [(k, n, w) for w in diff]
    return bad


def test_mm_with_128_row_tiles_at_large_k(restore_threads):
    """The 128-row tiles at the K and N where MKL's blocking depends on the problem's rows (found at 256 rows): rows
    alone and in windows against the whole, at the shipped threshold (these shapes pass it), 2 and 1 threads."""
    rng = random.Random(5)
    assert all(k * -(-n // 16) * 16 >= mm_torch.BIG_TILE_MIN_KN for k, n in _LARGE_K)
    for th in (2, 1):
        torch.set_num_threads(th)
        assert not _big_tile_mismatches(rng)


def test_negative_control_256_row_tiles_at_large_k(restore_threads, monkeypatch):
    """The test above can fail: with 256-row tiles (which bench/tile_heights.py finds differ from 8-row ones here)
    the same check sees rows change with the batch. Skips on a CPU where 256-row problems happen to agree."""
    monkeypatch.setattr(mm_torch, "BIG_TILE", 256)
    torch.set_num_threads(2)
    if not _big_tile_mismatches(random.Random(5)):
        pytest.skip("256-row problems give the 8-row problems' bits on this CPU")
