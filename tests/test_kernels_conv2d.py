"""Batch-invariant conv2d kernel (``jetdet.kernels.conv2d``; Triton interpreter on CPU) against its fp32
reference: accuracy with tails, strides, padding, strided input, bias, and bitwise prefix / needle invariance
over the batch; the shipped tile tables."""

from __future__ import annotations

import random

import pytest
import torch
from _invariance import assert_batch_invariant, assert_planted_invariant, random_slots
from _kernel_util import DEV, DTYPES, check_shipped_tables, close_gemm, needs_kernels, rand

from jetdet.kernels.conv2d import launch as conv_launch
from jetdet.kernels.conv2d.reference import conv2d_reference

pytestmark = needs_kernels

CONV_CASES = [
    # C, O, H, W, kh, kw, stride, padding, bias
    (3, 7, 9, 9, 3, 3, (1, 1), (1, 1), True),
    (5, 33, 13, 13, 3, 3, (2, 2), (1, 1), False),
    (19, 7, 9, 9, 1, 1, (1, 1), (0, 0), True),
    (5, 33, 13, 13, 1, 1, (2, 2), (0, 0), True),
    (19, 33, 13, 9, 3, 3, (1, 1), (0, 0), True),
    (5, 7, 11, 10, 1, 3, (1, 2), (0, 1), False),
]


def _conv_id(c):
    pair = lambda v: str(v[0]) if v[0] == v[1] else f"{v[0]}x{v[1]}"
    return "C{}O{}H{}W{}k{}x{}".format(*c[:6]) + f"s{pair(c[6])}p{pair(c[7])}" + ("b" if c[8] else "")


# bf16 runs the fp16 kernel with bf16 operands (and fp32 math in the interpreter): two cases suffice
CONV_PARAMS = [
    pytest.param(dt, case, id=f"{_conv_id(case)}-{str(dt).replace('torch.', '')}")
    for case in CONV_CASES
    for dt in DTYPES
    if dt != torch.bfloat16 or case in CONV_CASES[:2]
]


@pytest.mark.parametrize("dtype,case", CONV_PARAMS)
def test_conv2d_accuracy(dtype, case):
    c, o, h, w_, kh, kw, stride, padding, has_bias = case
    x = rand(2, c, h, w_, dtype=dtype)
    w = rand(o, c, kh, kw, dtype=dtype, scale=(c * kh * kw) ** -0.5)
    bias = rand(o, dtype=dtype) if has_bias else None
    out = conv_launch.conv2d(x, w, bias, stride, padding)
    close_gemm(out, conv2d_reference(x, w, bias, stride, padding), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_conv2d_strided_input(dtype):
    """channels_last input and a non-contiguous slice give the same numbers as the contiguous input."""
    x = rand(2, 6, 9, 9, dtype=dtype)
    w = rand(7, 6, 3, 3, dtype=dtype, scale=(6 * 9) ** -0.5)
    bias = rand(7, dtype=dtype)
    ref = conv2d_reference(x, w, bias, (1, 1), (1, 1))
    close_gemm(conv_launch.conv2d(x.to(memory_format=torch.channels_last), w, bias, (1, 1), (1, 1)), ref, dtype)
    wide = rand(2, 6, 9, 18, dtype=dtype)
    wide[..., ::2] = x
    close_gemm(conv_launch.conv2d(wide[..., ::2], w, bias, (1, 1), (1, 1)), ref, dtype)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["float32", "float16", "bfloat16"]
)
@pytest.mark.parametrize("k,stride,padding", [(3, (1, 1), (1, 1)), (1, (2, 2), (0, 0))], ids=["3x3s1p1", "1x1s2p0"])
def test_conv2d_needle(dtype, k, stride, padding):
    """One image alone == the same image at a random slot of a batch of 1..8, bitwise; and prefixes."""
    c, o, h = 5, 7, 7
    w = rand(o, c, k, k, dtype=dtype, scale=(c * k * k) ** -0.5)
    bias = rand(o, dtype=dtype)
    conv = lambda x: conv_launch.conv2d(x, w, bias, stride, padding)
    hay = lambda n: [rand(n, c, h, h, dtype=dtype)]
    assert_planted_invariant(conv, hay(1), hay, random_slots(random.Random(2), range(1, 9)))
    assert_batch_invariant(conv, hay(8), prefixes=(1, 3, 5))  # prefix: the first j images of a batch alone


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["float32", "float16", "bfloat16"]
)
def test_conv2d_layouts_give_the_same_bits(dtype):
    """The kernel reads channels-last: NCHW input is copied to channels-last first, so both layouts give the
    same bits. The output is channels-last for channels-last input and NCHW otherwise, as torch's conv."""
    x = rand(3, 20, 7, 9, dtype=dtype)
    w = rand(24, 20, 3, 3, dtype=dtype, scale=(20 * 9) ** -0.5)
    bias = rand(24, dtype=dtype)
    nchw = conv_launch.conv2d(x, w, bias, (1, 1), (1, 1))
    cl = conv_launch.conv2d(x.to(memory_format=torch.channels_last), w, bias, (1, 1), (1, 1))
    assert nchw.is_contiguous()
    assert cl.is_contiguous(memory_format=torch.channels_last) and not cl.is_contiguous()
    assert torch.equal(nchw, cl)
    close_gemm(cl, conv2d_reference(x, w, bias, (1, 1), (1, 1)), dtype)
    # channels-last batch: one image alone == the same image in the batch, bitwise
    xs = x.to(memory_format=torch.channels_last)
    for i in range(3):
        alone = conv_launch.conv2d(xs[i : i + 1], w, bias, (1, 1), (1, 1))
        assert torch.equal(alone, cl[i : i + 1]), i


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("k,stride,padding", [(3, (1, 1), (1, 1)), (3, (2, 2), (1, 1)), (5, (2, 1), (2, 0))],
                         ids=["3x3s1p1", "3x3s2p1", "5x5s2x1p2x0"])
def test_items_past_32_bit_offsets_run_in_bands_with_the_same_bits(monkeypatch, dtype, k, stride, padding):
    """An item whose input or output passes 2**31 elements (a VAE decoder's full-resolution conv at 4K) runs in
    bands of output rows; before, the launcher asserted. Forced here on small images by lowering the limit: every
    band size (1 output row, several, a partial last band) gives the bits of one launch, NCHW and channels-last.
    Negative control (by hand): without the band's own top padding (``ph + top - r * sh``) the bits differ."""
    c, o, h, w_ = 6, 8, 11, 9
    x = rand(2, c, h, w_, dtype=dtype)
    w = rand(o, c, k, k, dtype=dtype, scale=(c * k * k) ** -0.5)
    bias = rand(o, dtype=dtype)
    whole = conv_launch.conv2d(x, w, bias, stride, padding)
    oh, ow = whole.shape[2:]
    launches = []
    orig = conv_launch._launch

    def spy(xb, *a, **kw):
        span = sum((n - 1) * abs(st) for n, st in zip(xb.shape[1:], xb.stride()[1:]))
        assert span < conv_launch._I32, (span, conv_launch._I32)  # the band's own 32-bit offsets
        launches.append(a[2].shape[2])
        return orig(xb, *a, **kw)

    monkeypatch.setattr(conv_launch, "_launch", spy)
    wide_cl = rand(2, 2 * c, h, w_, dtype=dtype).to(memory_format=torch.channels_last)
    wide_cl[:, :c] = x  # a channel slice of a channels-last tensor: each row steps over 2 * c channels
    for rows_per_band in (1, 2, 4):  # 4: a partial last band for the stride-1 case (11 rows)
        in_rows = (rows_per_band - 1) * stride[0] + k
        if in_rows >= h:
            continue  # the whole image would fit
        for xin in (x, x.to(memory_format=torch.channels_last), wide_cl[:, :c]):
            # the limit a band of that many output rows fits: the span of its input rows (by the strides the kernel
            # reads: NCHW input is copied to channels-last first) and its output elements
            xs = xin if xin.stride(1) == 1 else xin.contiguous(memory_format=torch.channels_last)
            span = (c - 1) * xs.stride(1) + (w_ - 1) * xs.stride(3) + (in_rows - 1) * xs.stride(2)
            monkeypatch.setattr(conv_launch, "_I32", max(rows_per_band * ow * o, span + 1))
            launches.clear()
            got = conv_launch.conv2d(xin, w, bias, stride, padding)
            assert len(launches) > 1 and sum(launches) == oh, launches  # bands that cover the image once
            assert got.is_contiguous(memory_format=conv_launch.out_memory_format(xin))
            assert torch.equal(got, whole), rows_per_band
    monkeypatch.setattr(conv_launch, "_I32", w_ * c)  # not even one output row's input fits
    with pytest.raises(ValueError, match="passes 2\\*\\*31 elements"):
        conv_launch.conv2d(x, w, bias, stride, padding)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_conv2d_op_fake_follows_the_layout(backend):
    """The registered op's fake gives the real output's strides for NCHW and channels-last input (torch.compile
    trusts them), on the Triton path and the torch path."""
    from jetdet.ops import registry

    op = registry.get("conv2d").overload
    x = rand(2, 6, 5, 5, dtype=torch.float32)
    w = rand(8, 6, 3, 3, dtype=torch.float32)
    for xin in (x, x.to(memory_format=torch.channels_last)):
        torch.library.opcheck(op, (xin, w, None, [1, 1], [1, 1]), test_utils=("test_faketensor",))
        want = torch.channels_last if xin is not x else torch.contiguous_format
        assert op(xin, w, None, [1, 1], [1, 1]).is_contiguous(memory_format=want)


def test_conv2d_zero_channels():
    x = torch.zeros(2, 0, 5, 5, device=DEV)
    w = torch.zeros(3, 0, 3, 3, device=DEV)
    bias = torch.tensor([1.0, 2.0, 3.0], device=DEV)
    out = conv_launch.conv2d(x, w, bias, (1, 1), (1, 1))
    assert torch.equal(out, bias[None, :, None, None].expand(2, 3, 5, 5))


# ------------------------------------------------------------------------------------------------ tables


@pytest.mark.parametrize("op", ["conv2d"])
def test_shipped_tables(op):
    check_shipped_tables(op)
