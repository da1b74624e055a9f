"""A random sweep of GEMM shapes on the CPU path: row i / group g is bitwise independent of the batch, its
position and the thread count. (An untiled torch.bmm failed 15 of these checks on this machine, and an
mm without N padding 10 of 150 shapes: the sweep is what caught both.)"""

import random

import torch

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
            for s in rng.sample(range(m), 3):
                if not torch.equal(mm_torch.mm_f32(a[s : s + 1], b)[0], ref[s]):
                    bad.append((m, k, n, th, s))
            if not torch.equal(mm_torch.mm_f32(a[5:40], b), ref[5:40]):
                bad.append((m, k, n, th, "5:40"))
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
            for s in rng.sample(range(8), 3):
                if not torch.equal(mm_torch.bmm_f32(a[s : s + 1], b[s : s + 1])[0], ref[s]):
                    bad.append((m, k, n, th, s))
            if not torch.equal(mm_torch.bmm_f32(a[2:7], b[2:7]), ref[2:7]):
                bad.append((m, k, n, th, "2:7"))
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
            for s in rng.sample(range(8), 2):
                if not torch.equal(conv_torch.conv2d(x[s : s + 1], wt, bias, (stride, stride), (pad, pad))[0], ref[s]):
                    bad.append((c, o, h, w, k, stride, pad, th, s))
            if not torch.equal(conv_torch.conv2d(x[1:6], wt, bias, (stride, stride), (pad, pad)), ref[1:6]):
                bad.append((c, o, h, w, k, stride, pad, th, "1:6"))
    assert not bad, bad
