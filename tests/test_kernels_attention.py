"""Tests of the attention kernel (``jetdet.kernels.attention``) against its literal fp32 reference: in the
interpreter on CPU, or compiled on CUDA tensors when there is a GPU (every test runs with the ``kernel_device``
fixture, which makes new tensors CUDA tensors there).

Accuracy uses the per-dtype tolerances documented in the kernel's README (``_tolerances.py``); determinism
tests are bitwise (``torch.equal``): a prefix of the batch, or one item at a random slot of a batch, gives
the very same bits as the item alone. Shapes are small and odd on purpose: the interpreter is slow, and
non-power-of-two sizes exercise the masked tails. The interpreter's config lookup for the attention, norm and
reduce tables is checked here too (one test, kept with the op it checks most).
"""

from __future__ import annotations

import random

import pytest
import torch
from _invariance import assert_batch_invariant, assert_planted_invariant, random_slots
from _kernel_util import check_compile_specs, close, same_nonfinite

import jetdet  # noqa: F401  (registers jetdet.kernels)
from jetdet import configs
from jetdet.kernels.attention import specs as attn_specs
from jetdet.kernels.attention.launch import MAX_HEAD_DIM, attention, split_head_dim, unit_strides
from jetdet.kernels.attention.reference import attention_reference

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

pytestmark = pytest.mark.usefixtures("kernel_device")


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


def test_split_head_dim():
    """A head dim that is not a power of two is read as a power-of-two block plus a masked tail when that is
    narrower than one padded block (and at most 128 wide)."""
    got = {d: split_head_dim(d) for d in (8, 16, 24, 32, 40, 48, 64, 72, 80, 96, 112, 128, 160, 256)}
    assert got == {8: (16, 0), 16: (16, 0), 24: (32, 0), 32: (32, 0), 40: (32, 16), 48: (32, 16), 64: (64, 0),
                   72: (64, 16), 80: (64, 16), 96: (64, 32), 112: (128, 0), 128: (128, 0), 160: (256, 0),
                   256: (256, 0)}


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("d,dv", [(72, 72), (96, 40), (64, 80), (80, 24), (48, 128)])
def test_attention_split_head_dims(dtype, d, dv):
    """Split q/k head dims and split v head dims, alone and together, with and without a mask, against the
    reference; and batch invariance at a split head dim."""
    q, k, v = qkv(2, 2, 19, 45, d, dtype, dv=dv)
    close(attention(q, k, v), attention_reference(q, k, v), dtype, "attention")
    mask = torch.randn(2, 1, 19, 45)
    mask[..., ::5] = float("-inf")
    close(attention(q, k, v, mask), attention_reference(q, k, v, mask), dtype, "attention")
    if (d, dv) == (72, 72):
        q, k, v = qkv(4, 2, 19, 45, d, dtype, dv=dv)
        assert_batch_invariant(attention, [q, k, v], prefixes=range(1, 5), label="attention D=72")


def test_unit_strides():
    """The kernel gets batch/head/row strides in units of the largest power of two (up to 16 bytes) dividing them
    all, 0 for a size-1 dim; the last-dim stride as it is."""
    x = torch.empty(2, 3, 5, 72, dtype=F16)
    assert unit_strides([x], 8) == (8, [3 * 5 * 9, 5 * 9, 9, 1])
    assert unit_strides([x[:1]], 8) == (8, [0, 5 * 9, 9, 1])  # a batch of one is never stepped
    assert unit_strides([torch.empty(2, 3, 5, 20, dtype=F16)], 8)[0] == 4  # 20 = 4 x 5: 8-byte loads
    assert unit_strides([x, torch.empty(2, 3, 5, 75, dtype=F16)], 8)[0] == 1
    t = torch.empty(2, 5, 3, 64).transpose(1, 2)  # [B, H, N, D] view of [B, N, H, D]
    assert unit_strides([t], 4) == (4, [5 * 3 * 16, 16, 3 * 16, 1])


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_attention_row_strides_any_unit(dtype):
    """Rows whose strides are multiples of 8, of 4 and of nothing (a view into a wider buffer) give the reference's
    values and the same bits as the same values in a fresh contiguous tensor."""
    for width in (72, 76, 75):
        buf = torch.randn(2, 2, 23, width).to(dtype)
        q = buf[..., :72]
        k, v = torch.randn(2, 2, 31, 72).to(dtype), torch.randn(2, 2, 31, 72).to(dtype)
        out = attention(q, k, v)
        close(out, attention_reference(q, k, v), dtype, "attention")
        assert torch.equal(out, attention(q.contiguous(), k, v)), width



def test_split_loops_rule_and_row_copies():
    """``SPLIT_TAIL`` (whole KV blocks unmasked, the partial one apart) depends on the dtype, the GPU generation and
    the head dims only: 16-bit dots on sm_80-sm_11x and in the interpreter, head dims of whole 16-byte rows. With it,
    rows off 16-byte boundaries are read from contiguous copies (same values); without it, views are read as
    they are."""
    from jetdet.kernels.attention.launch import plan_loads, split_tail

    assert [split_tail(False, a) for a in (None, 75, 80, 86, 89, 90, 100, 120)] == [True, False, True, True, True,
                                                                                     True, True, False]
    assert not split_tail(True, 90) and not split_tail(True, None)  # fp32 FMA dots: one masked loop
    cpu = torch.device("cpu")
    q = torch.randn(2, 2, 23, 76, dtype=F16)[..., :72]  # rows 152 bytes apart: 8-byte loads at best
    k, v, out = (torch.randn(2, 2, 31, 72, dtype=F16) for _ in range(3))
    split, (q2, k2, v2, o2), unit, _ = plan_loads(False, cpu, (72, 72), (q, k, v, out))
    assert split and unit == 8 and q2.is_contiguous() and torch.equal(q2, q) and k2 is k and o2 is out
    qf = torch.randn(2, 2, 23, 75)[..., :72]
    split, (q2, *_), unit, _ = plan_loads(True, cpu, (72, 72), (qf, k.float(), v.float(), out.float()))
    assert not split and unit == 1 and q2 is qf
    q36 = torch.randn(2, 2, 23, 36, dtype=F16)
    split, (q2, *_), unit, _ = plan_loads(False, cpu, (36, 36), (q36, q36, q36, q36))
    assert not split and unit == 4 and q2 is q36  # 72-byte rows: 8-byte loads at best, copy or not


@pytest.mark.parametrize("split", [False, True])
def test_both_loop_structures_with_16_bit_dots(monkeypatch, split):
    """16-bit dots in both loop structures: one masked loop (what a GPU no table is compiled for runs, and what
    gpu_check times as the A/B; the interpreter otherwise runs the split loops for fp16) and split (forced on),
    each against the reference, with and without a mask, and bitwise batch invariant."""
    from jetdet.kernels.attention import launch

    monkeypatch.setattr(launch, "split_tail", lambda dot_fp32, arch: split and not dot_fp32)
    for nk in (64, 77):
        q, k, v = qkv(3, 2, 19, nk, 72, F16)
        mask = torch.randn(3, 2, 19, nk)
        for m in (None, mask):
            out = attention(q, k, v, m)
            close(out, attention_reference(q, k, v, m), F16, "attention")
            assert torch.equal(out[1:2], attention(q[1:2], k[1:2], v[1:2], None if m is None else m[1:2]))

def test_attention_explicit_scale_value_dim_and_strides():
    # v with its own head dim; q/k/v as [B, N, H, D] tensors viewed as [B, H, N, D] (non-contiguous)
    q = torch.randn(2, 21, 3, 40, dtype=F16).transpose(1, 2)
    k = torch.randn(2, 45, 3, 40, dtype=F16).transpose(1, 2)
    v = torch.randn(2, 45, 3, 24, dtype=F16).transpose(1, 2)
    out = attention(q, k, v, scale=0.3)
    assert out.shape == (2, 3, 21, 24)
    close(out, attention_reference(q, k, v, scale=0.3), F16, "attention")



@pytest.mark.parametrize("dtype", [F32, BF16])
def test_attention_any_scale_sign_and_whole_blocks(dtype):
    """The kernel scales after the row maximum, which holds only for a scale >= 0: a negative scale (the launcher
    negates q, exactly) and a zero scale (uniform weights) give the reference's values, with and without a mask.
    Key counts that are whole multiples of every shipped BLOCK_N (64, 128) take the loop with no partial block."""
    for nk in (64, 128, 45):
        q, k, v = qkv(2, 2, 19, nk, 40, dtype)
        mask = torch.randn(2, 1, 19, nk)
        # at -6 a wrong row maximum overflows exp2 (bf16; fp32's tolerance is too tight for scores that sharp)
        for scale in (-1.5 if dtype == F32 else -6.0, -0.4, 0.0, 0.7):
            for m in (None, mask):
                out, ref = attention(q, k, v, m, scale=scale), attention_reference(q, k, v, m, scale=scale)
                close(out, ref, dtype, "attention")
    ref = attention_reference(q, k, v, scale=0.0)
    assert torch.allclose(ref, v.float().mean(2, keepdim=True).expand_as(ref), atol=1e-5)  # the reference too

@pytest.mark.parametrize("dtype", [F32, F16])
def test_attention_masks(dtype):
    b, h, nq, nk, d = 2, 2, 19, 37, 40
    q, k, v = qkv(b, h, nq, nk, d, dtype)
    # broadcast [1, 1, Nq, Nk]: random values, scattered -inf, one row fully masked -> 0 as in the reference (and
    # torch's SDPA)
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
    assert torch.equal(attention(q, k, v, bmask)[:, :, 5], torch.zeros_like(q[:, :, 5, :]))


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
    q, k, v = qkv(1, 2, 5, 0, 264, F16)  # the same past the kernel's widest head dim
    assert torch.equal(attention(q, k, v), torch.zeros(1, 2, 5, 264, dtype=F16))
    assert attention(*qkv(1, 2, 0, 7, 264, F16)).shape == (1, 2, 0, 264)


# ------------------------------------------------------------- head dims past the kernel's (attention_wide)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the fully masked row (then 0)
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("d,dv", [(512, 512), (264, 40), (40, 320)])
def test_wide_head_dims_match_reference(dtype, d, dv):
    """Head dims past ``MAX_HEAD_DIM`` (a VAE mid block's single head over 512 channels) run as jetdet's GEMMs around
    its row softmax. Before, they raised on the Triton backend, so deterministic mode failed there on every SD-type
    VAE while the CPU path took them."""
    q, k, v = qkv(2, 1, 19, 23, d, dtype, dv)
    assert max(d, dv) > MAX_HEAD_DIM
    close(attention(q, k, v), attention_reference(q, k, v), dtype, "attention")
    close(attention(q, k, v, scale=-0.3), attention_reference(q, k, v, scale=-0.3), dtype, "attention")
    bmask = torch.rand(19, 23) > 0.3
    bmask[4] = False  # a row with no key: 0, as the kernel and torch's SDPA give
    fmask = torch.randn(2, 1, 1, 23)
    for mask in (bmask, fmask):
        out, ref = attention(q, k, v, mask), attention_reference(q, k, v, mask)
        same_nonfinite(out, ref)
        close(out, ref, dtype, "attention")
    assert torch.equal(attention(q, k, v, bmask)[:, :, 4], torch.zeros(2, 1, dv, dtype=dtype))


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_wide_head_dims_batch_and_row_blocks_bitwise(monkeypatch, dtype):
    """Bitwise: an item alone or in any batch, and whatever number of query rows one step takes (the step size
    follows the batch: its scores are capped at ``WIDE_SCORE_BYTES``)."""
    from jetdet.kernels.attention import launch

    q, k, v = qkv(3, 2, 9, 11, 264, dtype)
    mask = torch.randn(3, 2, 9, 11)
    mask[..., ::4] = float("-inf")
    whole = attention(q, k, v, mask)
    assert_batch_invariant(attention, [q, k, v, mask], prefixes=range(1, 4), slots=range(3), label="wide attention")
    for rows in (1, 4):  # 9 query rows in steps of 1, and of 4 (a partial last step)
        monkeypatch.setattr(launch, "WIDE_SCORE_BYTES", 4 * 3 * 2 * 11 * rows)
        assert torch.equal(attention(q, k, v, mask), whole), rows


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


# ----------------------------------------------------------------------------------- tables and specs


def test_interpreter_uses_sm80_tables_keyed_by_size():
    cfg = configs.get_config("attention", 40, dtype=F16, device=torch.device("cpu"), default={})
    assert cfg == {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3}
    cfg32 = configs.get_config("attention", 128, dtype=F32, device=torch.device("cpu"), default={})
    assert cfg32["BLOCK_N"] == 16  # the fp32 table (ieee dots need smaller tiles)
    assert configs.get_config("norms", 1300, dtype=F16, device=None, default={})["BLOCK"] == 1024
    assert configs.get_config("reduce", 90, dtype=F16, device=None, default={})["BLOCK"] == 64


@pytest.mark.parametrize("mod", [attn_specs], ids=["attention"])
def test_compile_specs_cover_every_parameter(mod):
    check_compile_specs(mod)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fully_masked_rows_match_torch_sdpa(backend):
    """``F.scaled_dot_product_attention`` routed in deterministic mode gives what torch gives for a query row with no
    key to attend to: 0 (torch >= 2.5), for a boolean key-padding mask that drops one item's every key and for a
    float mask with one row of -inf; the other rows agree to fp32 accuracy. Both backends (the torch path and the
    kernel). Negative control (run by hand): with the kernel dividing by ``l`` as before, the triton case is NaN."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(3)
    with torch.device("cpu"):  # CPU draws (the triton case runs on CUDA tensors on a GPU), then moved
        q = torch.randn(2, 2, 5, 16, generator=g)
        k, v = torch.randn(2, 2, 7, 16, generator=g), torch.randn(2, 2, 7, 16, generator=g)
        keep = torch.ones(2, 1, 1, 7, dtype=torch.bool)
        keep[1] = False
        fmask = torch.zeros(2, 1, 5, 7)
        fmask[0, 0, 3] = float("-inf")
    dev = torch.get_default_device()
    q, k, v, keep, fmask = (t.to(dev) for t in (q, k, v, keep, fmask))
    for mask in (keep, fmask):  # torch's answer from its CPU kernel (CUDA backends have differed on such rows)
        want = F.scaled_dot_product_attention(*(t.cpu() for t in (q, k, v)), attn_mask=mask.cpu()).to(dev)
        with jetdet.mode("deterministic"):
            got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert not got.isnan().any()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(want[0, :, 3], torch.zeros(2, 16, device=dev)) and torch.equal(got[0, :, 3], want[0, :, 3])
