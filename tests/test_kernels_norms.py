"""Tests of the norm kernels (``jetdet.kernels.norms``: layer, RMS and group norm) against their literal fp32
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
from jetdet.kernels.norms import specs as norms_specs
from jetdet.kernels.norms.launch import group_norm, layer_norm, rms_norm
from jetdet.kernels.norms.reference import group_norm_reference, layer_norm_reference, rms_norm_reference

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

pytestmark = pytest.mark.usefixtures("kernel_device")


def _affine(c, dtype, with_weight=True, with_bias=True):
    w = torch.randn(c).to(dtype) if with_weight else None
    b = torch.randn(c).to(dtype) if with_bias else None
    return w, b


# C=90 and C=1300 take two chunks of the table's BLOCK (64, 1024): the chunked path with a tail
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("c", [33, 90, 100, 1300])
def test_layer_and_rms_norm_match_reference(dtype, c):
    x = (torch.randn(5, c) * 3 + 2).to(dtype)
    w, b = _affine(c, dtype)
    close(layer_norm(x, w, b, 1e-5), layer_norm_reference(x, w, b, 1e-5), dtype, "norms")
    close(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6), dtype, "norms")


def test_norms_without_affine_mixed_weight_dtype_and_strides():
    x = torch.randn(100, 6, dtype=F16).t()  # [6, 100], column stride 6
    close(layer_norm(x, None, None, 1e-5), layer_norm_reference(x, eps=1e-5), F16, "norms")
    close(rms_norm(x, None, 1e-6), rms_norm_reference(x, eps=1e-6), F16, "norms")
    w, b = _affine(100, F32)  # fp32 affine params on fp16 activations
    close(layer_norm(x, w, b, 1e-5), layer_norm_reference(x, w, b, 1e-5), F16, "norms")
    w, _ = _affine(100, F32, with_bias=False)
    close(layer_norm(x, w, None, 1e-5), layer_norm_reference(x, w, None, 1e-5), F16, "norms")


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("shape,groups", [((3, 12, 7, 5), 4), ((2, 32, 9, 9), 8), ((2, 6, 11), 3)])
def test_group_norm_matches_reference(dtype, shape, groups):
    x = (torch.randn(shape) * 2 - 1).to(dtype)
    w, b = _affine(shape[1], dtype)
    close(group_norm(x, groups, w, b, 1e-5), group_norm_reference(x, groups, w, b, 1e-5), dtype, "norms")
    close(group_norm(x, groups, None, None, 1e-5), group_norm_reference(x, groups, eps=1e-5), dtype, "norms")
    if dtype == F32:
        torch.testing.assert_close(
            group_norm(x, groups, w, b, 1e-5), torch.nn.functional.group_norm(x, groups, w, b, 1e-5)
        )


def test_norms_prefix_and_needle_bitwise():
    x = torch.randn(8, 77, dtype=F16)
    w, b = _affine(77, F16)
    assert_batch_invariant(lambda x: layer_norm(x, w, b, 1e-5), [x], slots=range(8), label="layer_norm")
    assert_batch_invariant(lambda x: rms_norm(x, w, 1e-6), [x], slots=range(8), label="rms_norm")
    g = torch.randn(8, 12, 7, 5, dtype=F16)
    gw, gb = _affine(12, F16)
    gn = lambda g: group_norm(g, 4, gw, gb, 1e-5)
    assert_batch_invariant(gn, [g], prefixes=range(1, 9), label="group_norm")
    assert_planted_invariant(gn, [g[3:4]], lambda bsz: [torch.randn(bsz, 12, 7, 5, dtype=F16)],
                             random_slots(random.Random(1), (2, 5, 8)), label="group_norm")


def test_norms_nan_inf_propagate_like_reference():
    x = torch.randn(4, 33)
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    w, b = _affine(33, F32)
    for out, ref in (
        (layer_norm(x, w, b, 1e-5), layer_norm_reference(x, w, b, 1e-5)),
        (rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6)),
    ):
        same_nonfinite(out, ref)
        assert out[1].isnan().all() and out[[0, 3]].isfinite().all()
    g = torch.randn(2, 12, 7, 5)
    g[1, 4, 3, 3] = float("nan")  # group 1 of sample 1
    out, ref = group_norm(g, 4, None, None, 1e-5), group_norm_reference(g, 4, eps=1e-5)
    same_nonfinite(out, ref)
    assert out[1, 3:6].isnan().all() and out[0].isfinite().all()


@pytest.mark.parametrize("mod", [norms_specs], ids=["norms"])
def test_compile_specs_cover_every_parameter(mod):
    check_compile_specs(mod)
