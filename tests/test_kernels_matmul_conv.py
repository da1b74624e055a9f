"""Batch-invariant GEMM and conv2d kernels (Triton interpreter on CPU) against their fp32 references:
accuracy with tails, strided operands, bias, and bitwise prefix / needle invariance over the batch."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from _devices import KERNEL_DEVICE
from _invariance import assert_batch_invariant, assert_planted_invariant, random_slots
from _tolerances import KERNEL_ATOL_RTOL

from jetdet import _paths
from jetdet.kernels.conv2d import launch as conv_launch
from jetdet.kernels.conv2d.reference import conv2d_reference
from jetdet.kernels.matmul import launch as mm_launch
from jetdet.kernels.matmul.reference import bmm_reference, matmul_reference

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
    reason="needs CUDA or TRITON_INTERPRET=1",
)

DEV = KERNEL_DEVICE  # CUDA tensors through the compiled kernels on a GPU, else CPU tensors in the interpreter

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype and out.shape == ref.shape
    assert not out.isnan().any(), "NaN in the output (an element was never written?)"
    atol, rtol = KERNEL_ATOL_RTOL["matmul"][dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)


def rand(*shape, dtype, scale=1.0):
    return (torch.randn(*shape) * scale).to(dtype).to(DEV)


# ------------------------------------------------------------------------------------------------ matmul


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
    close(out, matmul_reference(a, w.t(), b_), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_matmul_any_strides(dtype):
    m, k, n = 37, 45, 29
    a = rand(m, k, dtype=dtype)
    b = rand(k, n, dtype=dtype, scale=k**-0.5)
    bias = rand(n, dtype=dtype)
    ref = matmul_reference(a, b, bias)
    close(mm_launch.matmul(a, b, bias), ref, dtype)  # both contiguous
    close(mm_launch.matmul(a.t().contiguous().t(), b.t().contiguous().t(), bias), ref, dtype)  # column-major
    big = rand(m, 2 * k, dtype=dtype)
    big[:, ::2] = a
    close(mm_launch.matmul(big[:, ::2], b, bias), ref, dtype)  # stride_ak == 2


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
    close(out, bmm_reference(a, b), dtype)
    rng = random.Random(1)
    assert_batch_invariant(mm_launch.bmm, [a, b], prefixes=range(1, 6), slots=[rng.randrange(n) for n in range(1, 6)],
                           full=out)


# ------------------------------------------------------------------------------------------------ conv2d

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
    close(out, conv2d_reference(x, w, bias, stride, padding), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_conv2d_strided_input(dtype):
    """channels_last input and a non-contiguous slice give the same numbers as the contiguous input."""
    x = rand(2, 6, 9, 9, dtype=dtype)
    w = rand(7, 6, 3, 3, dtype=dtype, scale=(6 * 9) ** -0.5)
    bias = rand(7, dtype=dtype)
    ref = conv2d_reference(x, w, bias, (1, 1), (1, 1))
    close(conv_launch.conv2d(x.to(memory_format=torch.channels_last), w, bias, (1, 1), (1, 1)), ref, dtype)
    wide = rand(2, 6, 9, 18, dtype=dtype)
    wide[..., ::2] = x
    close(conv_launch.conv2d(wide[..., ::2], w, bias, (1, 1), (1, 1)), ref, dtype)


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


def test_conv2d_zero_channels():
    x = torch.zeros(2, 0, 5, 5, device=DEV)
    w = torch.zeros(3, 0, 3, 3, device=DEV)
    bias = torch.tensor([1.0, 2.0, 3.0], device=DEV)
    out = conv_launch.conv2d(x, w, bias, (1, 1), (1, 1))
    assert torch.equal(out, bias[None, :, None, None].expand(2, 3, 5, 5))


# ------------------------------------------------------------------------------------------------ tables


@pytest.mark.parametrize("op", ["matmul", "conv2d"])
def test_shipped_tables(op):
    """Every shipped table parses, has size keys and complete power-of-two tile configs; the names the
    brief promises exist; configs never key on anything batch-dependent (lookup by N / O only)."""
    base = os.path.join(_paths.configs_dir(), op)
    names = sorted(os.listdir(base))
    for want in ("NVIDIA_A100-SXM4-80GB", "NVIDIA_H100_80GB_HBM3", "sm_80", "sm_90"):
        assert f"device_name={want}.json" in names
        assert f"device_name={want},dtype=fp32.json" in names
    for fname in names:
        with open(os.path.join(base, fname)) as f:
            table = json.load(f)
        assert table, fname
        for key, cfg in table.items():
            assert key.isdigit(), (fname, key)
            assert set(cfg) == {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"}, fname
            for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps"):
                assert cfg[name] & (cfg[name] - 1) == 0, (fname, key, name)
            assert cfg["BLOCK_K"] >= 16, "tl.dot needs K >= 16"
