"""Tests of the reduce kernels (``jetdet.kernels.reduce``: softmax, row sum, row mean) against their literal fp32
references: in the interpreter on CPU, or compiled on CUDA tensors when there is a GPU (every test runs with the
``kernel_device`` fixture, which makes new tensors CUDA tensors there).

Accuracy uses the per-dtype tolerances documented in the kernel's README (``_tolerances.py``); determinism
tests are bitwise (``torch.equal``): a prefix of the batch, or one item at a random slot of a batch, gives
the very same bits as the item alone. Shapes are small and odd on purpose: the interpreter is slow, and
non-power-of-two sizes exercise the masked tails.
"""

from __future__ import annotations

import random

import pytest
import torch
from _invariance import assert_batch_invariant, assert_planted_invariant, random_slots
from _kernel_util import check_compile_specs, close, same_nonfinite

import jetdet  # noqa: F401  (registers jetdet.kernels)
from jetdet.kernels.reduce import specs as reduce_specs
from jetdet.kernels.reduce.launch import mean_rows, softmax, sum_rows
from jetdet.kernels.reduce.reference import mean_reference, softmax_reference, sum_reference

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

pytestmark = pytest.mark.usefixtures("kernel_device")


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("c", [1, 33, 90, 1300])
def test_softmax_sum_mean_match_reference(dtype, c):
    x = (torch.randn(6, c) * 4).to(dtype)
    close(softmax(x), softmax_reference(x), dtype, "softmax")
    close(sum_rows(x), sum_reference(x), dtype, "sum")
    close(mean_rows(x), mean_reference(x), dtype, "sum")


def test_reduce_strided_and_empty_rows():
    x = torch.randn(100, 7, dtype=F16).t()  # [7, 100], column stride 7
    close(softmax(x), softmax_reference(x), F16, "softmax")
    close(sum_rows(x), sum_reference(x), F16, "sum")
    e = torch.zeros(3, 0)
    assert torch.equal(sum_rows(e), torch.zeros(3)) and mean_rows(e).isnan().all()  # like torch
    assert softmax(e).shape == (3, 0) and sum_rows(torch.zeros(0, 5)).shape == (0,)


def test_reduce_nonfinite_like_reference():
    x = torch.randn(6, 37)
    x[0, :] = float("-inf")  # softmax of all -inf: NaN
    x[1, ::2] = float("-inf")  # partial -inf: fine
    x[2, 4] = float("nan")
    x[3, 9] = float("inf")
    x[4, 1], x[4, 2] = float("inf"), float("-inf")
    for out, ref in (
        (softmax(x), softmax_reference(x)),
        (sum_rows(x), sum_reference(x)),
        (mean_rows(x), mean_reference(x)),
    ):
        same_nonfinite(out, ref)
    assert softmax(x)[0].isnan().all() and softmax(x)[[1, 5]].isfinite().all()
    close(softmax(x), softmax_reference(x), F32, "softmax")


def test_reduce_prefix_and_needle_bitwise():
    x = torch.randn(8, 1300, dtype=F16)
    for fn in (softmax, sum_rows):
        assert_batch_invariant(fn, [x], prefixes=range(1, 9), label=fn.__name__)
    plants = random_slots(random.Random(2), (2, 5, 8))
    for fn in (softmax, mean_rows):
        assert_planted_invariant(fn, [x[6:7]], lambda bsz: [torch.randn(bsz, 1300, dtype=F16)], plants,
                                 label=fn.__name__)


@pytest.mark.parametrize("mod", [reduce_specs], ids=["reduce"])
def test_compile_specs_cover_every_parameter(mod):
    check_compile_specs(mod)
