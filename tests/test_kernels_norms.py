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


# ------------------------------------------------------------------------------------- channels-last group norm

CL = torch.channels_last
# (shape, groups): C/G = 3 at 5x7 (C/G not a power of two, H*W = 35 not a multiple of the tile's 32 pixels);
# a UNet's C/G = 10 at 8x8 (C = 320, G = 32); C/G = 80, wider than one 64-channel block, at 4x3
CL_CASES = [((3, 12, 5, 7), 4), ((2, 320, 8, 8), 32), ((2, 160, 4, 3), 2)]


def _cl(x):
    return x.contiguous(memory_format=CL)


def _is_cl(t):
    return t.is_contiguous(memory_format=CL) and not t.is_contiguous()


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("shape,groups", CL_CASES, ids=["3x12x5x7g4", "2x320x8x8g32", "2x160x4x3g2"])
def test_group_norm_channels_last_matches_reference(dtype, shape, groups):
    """Channels-last input is read in place by ``group_norm_cl_kernel`` and gives channels-last output with the
    reference's values. Not compared bit for bit with the NCHW path: the two kernels add a group's elements in
    different orders (NCHW: BLOCK lanes over the group's run, element i in lane i % BLOCK; channels-last: a
    [pixels, channels] tile, element (p, c) in lane (p % BLOCK_P, c % BLOCK_C)), so they round differently
    (fp32: ~1 ulp apart); each order is fixed for its layout, so either is batch invariant."""
    x = _cl((torch.randn(shape) * 2 - 1).to(dtype))
    w, b = _affine(shape[1], dtype)
    out = group_norm(x, groups, w, b, 1e-5)
    assert _is_cl(out)
    close(out, group_norm_reference(x, groups, w, b, 1e-5), dtype, "norms")
    out = group_norm(x, groups, None, None, 1e-5)
    assert _is_cl(out)
    close(out, group_norm_reference(x, groups, eps=1e-5), dtype, "norms")
    if dtype == F32:
        torch.testing.assert_close(out, torch.nn.functional.group_norm(x, groups, None, None, 1e-5))


def test_group_norm_channels_last_sample_past_32_bit_offsets(monkeypatch):
    """A channels-last sample of 2**31 elements or more (a VAE decoder's group norms at 4K) takes the NCHW kernel,
    whose rows are one group each, and still returns channels-last; before, the launcher asserted. Forced on a small
    image by lowering the limit: the bits are the NCHW path's, every item equal to it alone."""
    from jetdet.kernels.norms import launch as norms_launch

    x = _cl(torch.randn(3, 8, 5, 7) * 2 - 1)
    w, b = _affine(8, F32)
    nchw = group_norm(x.contiguous(), 4, w, b, 1e-5)
    monkeypatch.setattr(norms_launch, "_I32", 8 * 5 * 7)
    out = group_norm(x, 4, w, b, 1e-5)
    assert _is_cl(out) and torch.equal(out, nchw)
    assert all(torch.equal(group_norm(x[i : i + 1], 4, w, b, 1e-5), out[i : i + 1]) for i in range(3))
    close(out, group_norm_reference(x, 4, w, b, 1e-5), F32, "norms")


def test_group_norm_channels_last_ambiguous_and_nan():
    """C == 1 or H*W == 1: channels-last and NCHW are the same memory (the tensor is contiguous too), so the
    NCHW kernel runs and the output is contiguous, as for any contiguous input. A NaN stays in its group."""
    for shape, groups in (((2, 1, 3, 5), 1), ((3, 8, 1, 1), 4)):
        x = _cl(torch.randn(shape))
        out = group_norm(x, groups, None, None, 1e-5)
        assert out.is_contiguous()
        close(out, group_norm_reference(x, groups, eps=1e-5), F32, "norms")
    g = torch.randn(2, 12, 7, 5)
    g[1, 4, 3, 3] = float("nan")  # group 1 of sample 1
    out = group_norm(_cl(g), 4, None, None, 1e-5)
    same_nonfinite(out, group_norm_reference(g, 4, eps=1e-5))
    assert out[1, 3:6].isnan().all() and out[1, :3].isfinite().all() and out[1, 6:].isfinite().all()
    assert out[0].isfinite().all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_group_norm_output_layout_follows_input(backend):
    """``jetdet.ops.group_norm`` and the registered op give channels-last output for channels-last input and
    contiguous output for NCHW input, on both paths (as torch's group_norm does); F.group_norm routed in
    deterministic mode too."""
    from jetdet.ops import registry

    op = registry.get("group_norm").overload
    x = torch.randn(3, 12, 5, 7)
    w, b = _affine(12, F32)
    for xin, want in ((x, torch.contiguous_format), (_cl(x), CL)):
        for out in (jetdet.ops.group_norm(xin, 4, w, b, 1e-5), op(xin, 4, w, b, 1e-5)):
            assert out.is_contiguous(memory_format=want) and (want == CL) != out.is_contiguous()
            close(out, group_norm_reference(x, 4, w, b, 1e-5), F32, "norms")
        with jetdet.mode("deterministic"):
            out = torch.nn.functional.group_norm(xin, 4, w, b, 1e-5)
        assert out.is_contiguous(memory_format=want) and (want == CL) != out.is_contiguous()


def test_group_norm_routed_direct_cpu_keeps_channels_last():
    """With no backend override, the router sends plain fp32 CPU group norms straight to the torch path
    (``jetdet.mode._direct_cpu``): channels-last in, channels-last out, the public op's bits."""
    x = _cl(torch.randn(2, 12, 5, 7))
    w, b = _affine(12, F32)
    with jetdet.mode("deterministic"):
        out = torch.nn.functional.group_norm(x, 4, w, b, 1e-5)
    assert _is_cl(out)
    assert torch.equal(out, jetdet.ops.group_norm(x, 4, w, b, 1e-5))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [F32, F16])
def test_group_norm_channels_last_batch_invariant(backend, dtype):
    """Item i of a channels-last batch == the same item run alone (a channels-last batch of one), bit for bit;
    and a prefix of the batch. On the torch path NCHW and channels-last input also give the same bits (it
    normalises a contiguous copy); the Triton path's two layouts do not (see the reference test above)."""
    x = _cl((torch.randn(5, 12, 5, 7) * 2 - 1).to(dtype))
    w, b = _affine(12, dtype)
    gn = lambda t: jetdet.ops.group_norm(t, 4, w, b, 1e-5)
    full = gn(x)
    assert _is_cl(full)
    for i in range(5):
        alone = gn(x[i : i + 1])
        assert _is_cl(alone) and torch.equal(alone, full[i : i + 1]), i
    assert torch.equal(gn(x[:3]), full[:3])
    if backend == "torch":
        assert torch.equal(gn(x.contiguous()), full)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_group_norm_op_fake_follows_the_layout(backend):
    """opcheck of ``jetdet::group_norm`` on channels-last (and NCHW) input: the fake must give the real output's
    strides, which torch.compile trusts. Negative control (run by hand): with a fake that returns NCHW
    (``x.new_empty(x.shape)``, the fake before channels-last support) this test fails in
    ``test_faketensor`` on both paths, as the stride mismatch of the channels-last call."""
    from jetdet.ops import registry

    op = registry.get("group_norm").overload
    x = torch.randn(2, 12, 5, 7)
    w, b = _affine(12, F32)
    for xin in (_cl(x), x):
        torch.library.opcheck(op, (xin, 4, w, b, 1e-5), test_utils=("test_schema", "test_faketensor"))
    assert _is_cl(op(_cl(x), 4, w, b, 1e-5))


@pytest.mark.parametrize("mod", [norms_specs], ids=["norms"])
def test_compile_specs_cover_every_parameter(mod):
    check_compile_specs(mod)


def test_compile_specs_cover_every_channels_last_tile():
    """Every (BLOCK, BLOCK_C) the channels-last launcher can pick from a shipped table is a compile spec."""
    from jetdet import configs
    from jetdet.kernels.norms.launch import DEFAULT_CONFIG, block_c

    names = {s.name for s in norms_specs.compile_specs()}
    for _dev, _archs, dt, table in configs.shipped_tables("norms", default={"1024": DEFAULT_CONFIG}):
        for cfg in table.values():
            cfg = {**DEFAULT_CONFIG, **cfg}
            for cpg in range(1, 300):
                bc = block_c(cpg, cfg["BLOCK"])
                assert f"group_norm_cl[{dt},BLOCK{cfg['BLOCK']},C{bc},w{cfg['num_warps']}]" in names


@pytest.mark.parametrize("dtype", [F32, torch.float16, torch.bfloat16], ids=["float32", "float16", "bfloat16"])
def test_rms_norm_default_eps_is_torchs(dtype):
    """``eps=None`` is torch's default: the machine epsilon of the compute type, fp32 for fp16/bf16 inputs (it was
    the input dtype's, 2**-7 for bf16: on rows of size 0.01 the result moved by about 2 against torch's). Compared
    with torch's own ``F.rms_norm`` and with the explicit value, in and out of deterministic mode."""
    import torch.nn.functional as F

    from jetdet import ops

    x = (torch.randn(6, 64, generator=torch.Generator().manual_seed(0)) * 0.01).to(dtype)
    want_eps = torch.finfo(F32 if dtype != F32 else dtype).eps
    assert torch.equal(ops.rms_norm(x, (64,)), ops.rms_norm(x, (64,), eps=want_eps))
    with jetdet.mode("deterministic"):
        routed = F.rms_norm(x, (64,))
    assert torch.equal(routed, ops.rms_norm(x, (64,), eps=want_eps))
    close(ops.rms_norm(x, (64,)), F.rms_norm(x.float(), (64,), eps=want_eps), dtype, "norms")
