"""Batch-invariant GEMM kernels (``jetdet.kernels.matmul``: matmul, bmm; Triton interpreter on CPU) against their
fp32 references: accuracy with tails, strided operands, bias, and bitwise prefix / needle invariance over the
batch; the shipped tile tables."""

from __future__ import annotations

import random

import pytest
import torch
from _invariance import assert_batch_invariant, assert_planted_invariant
from _kernel_util import DEV, DTYPES, check_shipped_tables, close_gemm, needs_kernels, rand

from jetdet.kernels.matmul import launch as mm_launch
from jetdet.kernels.matmul.reference import bmm_reference, mm_reference

pytestmark = needs_kernels


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize(
    "m,k,n,bias",
    [(257, 129, 65, True), (1, 16, 7, False), (33, 70, 130, True), (5, 300, 3, False)],
)
def test_matmul_accuracy(dtype, m, k, n, bias):
    a = rand(m, k, dtype=dtype)
    w = rand(n, k, dtype=dtype, scale=k**-0.5)  # nn.Linear layout: b = w.t() is strided
    b_ = rand(n, dtype=dtype) if bias else None
    out = mm_launch.matmul(a, w.t(), b_)
    close_gemm(out, mm_reference(a, w.t(), b_), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_matmul_any_strides(dtype):
    m, k, n = 37, 45, 29
    a = rand(m, k, dtype=dtype)
    b = rand(k, n, dtype=dtype, scale=k**-0.5)
    bias = rand(n, dtype=dtype)
    ref = mm_reference(a, b, bias)
    close_gemm(mm_launch.matmul(a, b, bias), ref, dtype)  # both contiguous
    close_gemm(mm_launch.matmul(a.t().contiguous().t(), b.t().contiguous().t(), bias), ref, dtype)  # column-major
    big = rand(m, 2 * k, dtype=dtype)
    big[:, ::2] = a
    close_gemm(mm_launch.matmul(big[:, ::2], b, bias), ref, dtype)  # stride_ak == 2


def test_matmul_empty_k():
    a = torch.zeros(3, 0, device=DEV)
    b = torch.zeros(0, 4, device=DEV)
    bias = torch.arange(4.0, device=DEV)
    assert torch.equal(mm_launch.matmul(a, b, bias), bias.expand(3, 4))
    assert torch.equal(mm_launch.matmul(a, b), torch.zeros(3, 4, device=DEV))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_matmul_prefix_and_needle(dtype):
    """Row i never depends on the other rows: prefix ``op(x[:j]) == op(x)[:j]`` and needle
    ``op(x)[i] == op(x[i:i+1])`` bitwise, for M = 1..8 and a row past the first tile."""
    k, n = 75, 41
    w = rand(n, k, dtype=dtype, scale=k**-0.5)
    bias = rand(n, dtype=dtype)
    x = rand(8, k, dtype=dtype)
    mm = lambda x: mm_launch.matmul(x, w.t(), bias)
    rng = random.Random(0)
    assert_batch_invariant(mm, [x], prefixes=range(1, 9), slots=[rng.randrange(j) for j in range(1, 9)])
    # a row that lands in a later M tile (and a different position inside it) of a bigger matrix
    assert_planted_invariant(mm, [x[3:4]], lambda n: [rand(n, k, dtype=dtype)], [(200, 151)])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_bmm_accuracy_and_needle(dtype):
    nb, m, k, n = 5, 19, 33, 23
    a = rand(nb, m, k, dtype=dtype)
    b = rand(nb, n, k, dtype=dtype, scale=k**-0.5).transpose(1, 2)  # strided b
    out = mm_launch.bmm(a, b)
    close_gemm(out, bmm_reference(a, b), dtype)
    rng = random.Random(1)
    assert_batch_invariant(mm_launch.bmm, [a, b], prefixes=range(1, 6), slots=[rng.randrange(n) for n in range(1, 6)],
                           full=out)


# ------------------------------------------------------------------------------------------------ tables


@pytest.mark.parametrize("op", ["matmul"])
def test_shipped_tables(op):
    check_shipped_tables(op)
