"""Tests of the attention, norm and reduce kernels against their literal fp32 references: in the interpreter on
CPU, or compiled on CUDA tensors when there is a GPU (every test runs with the ``kernel_device`` fixture, which
makes new tensors CUDA tensors there).

Accuracy uses the per-dtype tolerances documented in each kernel's README (``_tolerances.py``); determinism
tests are bitwise (``torch.equal``): a prefix of the batch, or one item at a random slot of a batch, gives
the very same bits as the item alone. Shapes are small and odd on purpose: the interpreter is slow, and
non-power-of-two sizes exercise the masked tails.
"""

from __future__ import annotations

import random

import pytest
import torch
from _invariance import assert_batch_invariant, assert_planted_invariant, random_slots
from _tolerances import KERNEL_ATOL_RTOL

import jetdet  # noqa: F401  (registers jetdet.kernels)
from jetdet import configs
from jetdet.kernels.attention import launch as attn_mod
from jetdet.kernels.attention.launch import attention
from jetdet.kernels.attention.reference import attention_reference
from jetdet.kernels.norms import launch as norms
from jetdet.kernels.norms.launch import group_norm, layer_norm, rms_norm
from jetdet.kernels.norms.reference import group_norm_reference, layer_norm_reference, rms_norm_reference
from jetdet.kernels.reduce import launch as reduce
from jetdet.kernels.reduce.launch import mean_rows, softmax, sum_rows
from jetdet.kernels.reduce.reference import mean_rows_reference, softmax_reference, sum_rows_reference

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

pytestmark = pytest.mark.usefixtures("kernel_device")


def close(out, ref, dtype, kind):
    assert out.dtype == dtype, (out.dtype, dtype)
    atol, rtol = KERNEL_ATOL_RTOL[kind][dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol, equal_nan=True)


def same_nonfinite(out, ref):
    """NaN and +-Inf appear exactly where the reference has them."""
    out = out.float()
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.isposinf(), ref.isposinf())
    assert torch.equal(out.isneginf(), ref.isneginf())


def qkv(b, h, nq, nk, d, dtype, dv=None):
    q = torch.randn(b, h, nq, d).to(dtype)
    k = torch.randn(b, h, nk, d).to(dtype)
    v = torch.randn(b, h, nk, dv or d).to(dtype)
    return q, k, v


# ---------------------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize(
    "b,h,nq,nk,d",
    [(2, 2, 37, 77, 40), (1, 3, 16, 33, 72), (1, 1, 70, 20, 64), (1, 1, 9, 130, 128)],
)
def test_attention_matches_reference(dtype, b, h, nq, nk, d):
    q, k, v = qkv(b, h, nq, nk, d, dtype)
    close(attention(q, k, v), attention_reference(q, k, v), dtype, "attention")


def test_attention_explicit_scale_value_dim_and_strides():
    # v with its own head dim; q/k/v as [B, N, H, D] tensors viewed as [B, H, N, D] (non-contiguous)
    q = torch.randn(2, 21, 3, 40, dtype=F16).transpose(1, 2)
    k = torch.randn(2, 45, 3, 40, dtype=F16).transpose(1, 2)
    v = torch.randn(2, 45, 3, 24, dtype=F16).transpose(1, 2)
    out = attention(q, k, v, scale=0.3)
    assert out.shape == (2, 3, 21, 24)
    close(out, attention_reference(q, k, v, scale=0.3), F16, "attention")


@pytest.mark.parametrize("dtype", [F32, F16])
def test_attention_masks(dtype):
    b, h, nq, nk, d = 2, 2, 19, 37, 40
    q, k, v = qkv(b, h, nq, nk, d, dtype)
    # broadcast [1, 1, Nq, Nk]: random values, scattered -inf, one row fully masked -> NaN as in the reference
    bmask = torch.randn(1, 1, nq, nk)
    bmask[..., ::3] = float("-inf")
    bmask[0, 0, 5, :] = float("-inf")
    # full [B, H, Nq, Nk], -inf on the first 33 keys so the first KV block of some rows is all -inf
    fmask = torch.randn(b, h, nq, nk)
    fmask[1, 0, :, :33] = float("-inf")
    # key padding [B, 1, 1, Nk] and a boolean mask (True = keep)
    pmask = torch.zeros(b, 1, 1, nk)
    pmask[0, ..., 30:] = float("-inf")
    boolmask = torch.rand(nq, nk) > 0.3
    for mask in (bmask, fmask, pmask, boolmask):
        out, ref = attention(q, k, v, mask), attention_reference(q, k, v, mask)
        same_nonfinite(out, ref)
        close(out, ref, dtype, "attention")
    assert attention(q, k, v, bmask)[:, :, 5].isnan().all()


def test_attention_nan_inf_propagate_like_reference():
    q, k, v = qkv(1, 2, 9, 40, 40, F32)
    q[0, 0, 3, 7] = float("nan")  # one query row
    k[0, 1, 38, 0] = float("nan")  # every row of head 1 (it sees key 38)
    v[0, 0, 10, 5] = float("inf")  # column 5 of every row of head 0
    out, ref = attention(q, k, v), attention_reference(q, k, v)
    same_nonfinite(out, ref)
    assert out[0, 1].isnan().all() and out[0, 0, :, 5].isinf().sum() == 8
    close(out, ref, F32, "attention")


def test_attention_empty_sizes():
    q, k, v = qkv(1, 2, 5, 0, 40, F16)
    assert torch.equal(attention(q, k, v), torch.zeros(1, 2, 5, 40, dtype=F16))  # like the reference's matmul
    q, k, v = qkv(1, 2, 0, 7, 40, F16)
    assert attention(q, k, v).shape == (1, 2, 0, 40)
    with pytest.raises(ValueError, match="head dim"):
        attention(*qkv(1, 1, 4, 4, 264, F16))


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_attention_batch_prefix_and_needle_bitwise(dtype):
    h, nq, nk, d = 2, 21, 37, 40
    q, k, v = qkv(8, h, nq, nk, d, dtype)
    mask = torch.randn(8, h, nq, nk)
    mask[..., ::4] = float("-inf")
    assert_batch_invariant(attention, [q, k, v], prefixes=range(1, 9), label="attention")
    assert_batch_invariant(attention, [q, k, v, mask], slots=range(8), label="attention with a per-item mask")
    # needle: one item alone vs at a random slot of a random batch of 2..8
    assert_planted_invariant(
        attention, [q[:1], k[:1], v[:1], mask[:1]],
        lambda bsz: [*qkv(bsz, h, nq, nk, d, dtype), torch.randn(bsz, h, nq, nk)],
        random_slots(random.Random(0), range(2, 9)), label="attention",
    )


# -------------------------------------------------------------------------------------------------- norms


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


# -------------------------------------------------------------------------------------- softmax, sum, mean


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("c", [1, 33, 90, 1300])
def test_softmax_sum_mean_match_reference(dtype, c):
    x = (torch.randn(6, c) * 4).to(dtype)
    close(softmax(x), softmax_reference(x), dtype, "softmax")
    close(sum_rows(x), sum_rows_reference(x), dtype, "sum")
    close(mean_rows(x), mean_rows_reference(x), dtype, "sum")


def test_reduce_strided_and_empty_rows():
    x = torch.randn(100, 7, dtype=F16).t()  # [7, 100], column stride 7
    close(softmax(x), softmax_reference(x), F16, "softmax")
    close(sum_rows(x), sum_rows_reference(x), F16, "sum")
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
        (sum_rows(x), sum_rows_reference(x)),
        (mean_rows(x), mean_rows_reference(x)),
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


# ----------------------------------------------------------------------------------- tables and specs


def test_interpreter_uses_sm80_tables_keyed_by_size():
    cfg = configs.get_config("attention", 40, dtype=F16, device=torch.device("cpu"), default={})
    assert cfg == {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3}
    cfg32 = configs.get_config("attention", 128, dtype=F32, device=torch.device("cpu"), default={})
    assert cfg32["BLOCK_N"] == 16  # the fp32 table (ieee dots need smaller tiles)
    assert configs.get_config("norms", 1300, dtype=F16, device=None, default={})["BLOCK"] == 1024
    assert configs.get_config("reduce", 90, dtype=F16, device=None, default={})["BLOCK"] == 64


@pytest.mark.parametrize("mod", [attn_mod, norms, reduce], ids=["attention", "norms", "reduce"])
def test_compile_specs_cover_every_parameter(mod):
    specs = mod.compile_specs()
    assert len({s.name for s in specs}) == len(specs)
    dtypes = {d for s in specs for d in ("fp32", "fp16", "bf16") if f"{d}," in s.name}
    assert dtypes == {"fp32", "fp16", "bf16"}
    for s in specs:
        names = set(s.signature) | set(s.constexprs)
        assert names == set(s.fn.arg_names), s.name  # what triton.compile(ASTSource(...)) needs
        assert not set(s.signature) & set(s.constexprs)
        assert s.deterministic and {"num_warps"} <= set(s.options)
