"""jetdet.verify: checksum format and bitwise sensitivity, fingerprint contents, match() rules."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys

import pytest
import torch

from jetdet.verify import TOLERANCES, MatchResult, checksum, fingerprint, match

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flip_bit(t: torch.Tensor, flat_index: int, bit: int = 0) -> torch.Tensor:
    iv = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    out = t.clone()
    v = out.reshape(-1).view(iv)
    v[flat_index] ^= 1 << bit
    return out


# ---------------------------------------------------------------------------------------------- checksum


def test_checksum_format_is_pinned():
    t = torch.tensor([1.0, -2.5], dtype=torch.float32)
    want = hashlib.sha256(b"jetdet.checksum.v1|float32|(2,)|" + struct.pack("<2f", 1.0, -2.5)).hexdigest()
    assert checksum(t) == want
    assert len(want) == 64 and int(want, 16) >= 0


def test_checksum_same_values_same_digest_any_layout():
    x = torch.randn(5, 7)
    assert checksum(x) == checksum(x.clone())
    assert checksum(x) == checksum(x.t().contiguous().t())  # different strides, same values
    assert checksum(x[:, ::2]) == checksum(x[:, ::2].contiguous())
    assert checksum(x.requires_grad_()) == checksum(x.detach())


def test_checksum_sees_dtype_shape_and_every_bit():
    x = torch.randn(4, 6)
    c = checksum(x)
    assert checksum(x.reshape(6, 4)) != c  # same bytes, other shape
    assert checksum(x.view(torch.int32)) != c  # same bytes, other dtype
    for i, bit in [(0, 0), (23, 31), (11, 7)]:
        assert checksum(flip_bit(x, i, bit)) != c  # negative control: one flipped bit
    assert checksum(torch.tensor([0.0])) != checksum(torch.tensor([-0.0]))


@pytest.mark.parametrize(
    "t",
    [
        torch.randn(3, 5).to(torch.bfloat16),
        torch.randn(3, 5).to(torch.float16),
        torch.randn(3, dtype=torch.float64),
        torch.arange(10, dtype=torch.int64),
        torch.tensor([True, False]),
        torch.randn(2, 2, dtype=torch.complex64),
        torch.tensor(3.5),  # 0-dim
        torch.empty(0, 4),
    ],
)
def test_checksum_dtypes(t):
    c = checksum(t)
    assert c == checksum(t.clone()) and len(c) == 64


def test_checksum_bf16_is_its_bits():
    x = torch.randn(8).to(torch.bfloat16)
    assert checksum(x) != checksum(flip_bit(x, 3, 0))
    raw = x.view(torch.int16).numpy().tobytes()
    assert checksum(x) == hashlib.sha256(b"jetdet.checksum.v1|bfloat16|(8,)|" + raw).hexdigest()


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_checksum_errors():
    with pytest.raises(TypeError, match="tensor"):
        checksum([1.0, 2.0])
    with pytest.raises(ValueError, match="tensor"):
        checksum(torch.eye(3).to_sparse())
    with pytest.raises(ValueError, match="^tensor: a meta tensor has no values"):
        checksum(torch.empty(3, device="meta"))
    q = torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8)
    with pytest.raises(ValueError, match=r"^tensor: expected a tensor of values, got a quantized one"):
        checksum(q)  # its bytes leave out the scale: two scales would hash alike
    with pytest.raises(ValueError, match=r"^a: expected a tensor of values, got a quantized one"):
        match(q, q)


# ------------------------------------------------------------------------------------------- fingerprint


def test_fingerprint_contents():
    fp = fingerprint()
    for key in ("device", "device_type", "cpu", "cuda", "cuda_driver", "torch", "triton", "jetdet", "num_threads",
                "python", "platform", "machine"):  # fmt: skip
        assert key in fp
    assert fp["torch"] == torch.__version__
    assert fp["num_threads"] == torch.get_num_threads()
    assert fp["python"] == ".".join(map(str, sys.version_info[:3]))
    assert fp["jetdet"] and fp["triton"]
    assert isinstance(fp["device"], str) and fp["device"]
    if not torch.cuda.is_available():
        assert fp["device_type"] == "cpu" and fp["device"] == fp["cpu"] and fp["cuda_driver"] is None
    json.dumps(fp)  # plain values only
    assert fingerprint("cpu")["device_type"] == "cpu"
    for dev in ("meta", *(d for d in ("cuda", "mps", "xpu") if not getattr(torch, d).is_available())):
        with pytest.raises(ValueError, match=f"^device: '{dev}', which this machine does not have"):
            fingerprint(dev)  # never the CPU's fingerprint under another device's name


def test_fingerprint_follows_thread_count():
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert fingerprint()["num_threads"] == 1
    finally:
        torch.set_num_threads(n)


def test_import_and_fingerprint_probe_no_device():
    code = (
        "import sys, torch, jetdet.verify as v\n"
        "had_triton = 'triton' in sys.modules\n"
        "assert not torch.cuda.is_initialized()\n"
        "v.checksum(torch.ones(3)); v.match(torch.ones(3), torch.ones(3))\n"
        "fp = v.fingerprint('cpu')\n"
        "assert not torch.cuda.is_initialized()\n"
        "assert had_triton or 'triton' not in sys.modules\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


# ------------------------------------------------------------------------------------------------- match


def test_exact_match_and_str():
    x = torch.randn(16, 256)
    r = match(x, x.clone())
    assert isinstance(r, MatchResult) and r.ok and bool(r)
    assert r.mismatches == 0 and r.first_mismatch is None and r.max_abs_err == 0.0 and r.numel == 4096
    assert str(r) == "MATCH exact: 0 of 4096 differ"


def test_exact_negative_control_one_flipped_bit():
    x = torch.randn(2, 4, 3)
    y = flip_bit(x, 1 * 12 + 3 * 3 + 1, 0)  # index (1, 3, 1), lowest mantissa bit
    r = match(y, x)
    assert not r.ok and not bool(r)
    assert r.mismatches == 1 and r.first_mismatch == (1, 3, 1)
    assert 0 < r.max_abs_err < 1e-6
    assert str(r).startswith("MISMATCH exact: 1 of 24 elements differ, max abs ")
    assert str(r).endswith("first at (1, 3, 1)")
    assert checksum(x) != checksum(y)
    assert match(y, x, "1e-6").ok  # the values are within 1e-6


def test_exact_bitwise_details():
    nan = torch.tensor([float("nan")])
    assert match(nan, nan.clone()).ok  # same NaN bits
    other_nan = nan.view(torch.int32).bitwise_or(1).view(torch.float32)  # other payload
    assert torch.isnan(other_nan).all()
    assert not match(other_nan, nan).ok
    assert match(other_nan, nan, "1e-6").ok and match(other_nan, nan, "structural").ok
    zero, negzero = torch.tensor([0.0]), torch.tensor([-0.0])
    assert not match(zero, negzero).ok
    assert match(zero, negzero, "1e-6").ok
    assert not match(torch.ones(3), torch.ones(3, dtype=torch.float64)).ok  # dtype differs
    assert "dtype float32 vs float64" in str(match(torch.ones(3), torch.ones(3, dtype=torch.float64)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int32, torch.int64, torch.bool])
def test_exact_other_dtypes(dtype):
    x = (torch.randn(64) * 10).to(dtype)
    assert match(x, x.clone()).ok
    if dtype != torch.bool:
        y = x.clone()
        y[5] = y[5] + 1 if not dtype.is_floating_point else y[5] * 2 + 1
        r = match(y, x)
        assert not r.ok and r.mismatches == 1 and r.first_mismatch == (5,)


@pytest.mark.parametrize("tol,eps", [("1e-6", 1e-6), ("1e-4", 1e-4)])
def test_numeric_tolerance_rule(tol, eps):
    b = torch.tensor([0.0, 1.0, -1000.0, 1e6], dtype=torch.float64)
    inside = b + torch.tensor([0.9, -0.9, 0.9, -0.9], dtype=torch.float64) * eps * (1 + b.abs())
    outside = b + torch.tensor([0.0, 0.0, 1.1, 0.0], dtype=torch.float64) * eps * (1 + b.abs())
    assert match(inside, b, tol).ok
    r = match(outside, b, tol)
    assert not r.ok and r.mismatches == 1 and r.first_mismatch == (2,)
    assert r.max_abs_err == pytest.approx(1.1 * eps * 1001, rel=1e-6)
    assert r.max_rel_err == pytest.approx(1.1 * eps * 1001 / 1000, rel=1e-6)
    assert f"MISMATCH {tol}: 1 of 4 elements differ" in str(r)


def test_numeric_nan_and_inf_positions_must_match():
    b = torch.tensor([1.0, float("nan"), float("inf"), -float("inf")])
    assert match(b.clone(), b, "1e-4").ok
    for i, v in [(0, float("nan")), (1, 1.0), (2, -float("inf")), (3, 1e30)]:
        a = b.clone()
        a[i] = v
        r = match(a, b, "1e-4")
        assert not r.ok and r.first_mismatch == (i,) and r.mismatches == 1
        assert r.max_abs_err == float("inf")


def test_numeric_compares_values_across_dtypes():
    b = torch.randn(100)
    a = b.to(torch.float16)
    assert match(a, b, "1e-4").ok is False  # fp16 rounding is ~5e-4 relative
    assert match(a.float(), a, "1e-6").ok  # same values, different dtype
    assert match(b.double(), b, "1e-6").ok


def test_structural():
    b = torch.randn(64, 64)
    assert match(b + 1e-3 * torch.randn(64, 64), b, "structural").ok
    r = match(b + 0.1 * torch.randn(64, 64), b, "structural")
    assert not r.ok and "rel-RMS" in str(r) and r.rel_rms > 0.05
    nan_b = b.clone()
    nan_b[3, 4] = float("nan")
    assert match(nan_b.clone(), nan_b, "structural").ok
    r = match(b, nan_b, "structural")  # NaN pattern differs
    assert not r.ok and r.first_mismatch == (3, 4)
    r = match(torch.full_like(b, float("nan")), b, "structural")  # all NaN: no statistic may read 0 (it said rel-RMS 0)
    assert not r.ok and r.rel_rms == r.max_abs_err == float("inf") and "rel-RMS inf" in str(r)
    inf_b = b.clone()
    inf_b[0, 0] = float("inf")
    a = inf_b.clone()
    a[0, 0] = -float("inf")
    assert not match(a, inf_b, "structural").ok
    assert not match(b.double(), b, "structural").ok  # dtype must match
    z = torch.zeros(10)
    assert match(z + 1e-9, z, "structural").ok  # absolute shortcut for an all-zero reference
    r = match(z + 1e-3, z, "structural")
    assert not r.ok and "the reference is all zeros and the RMS difference is above 1e-06" in str(r)
    r = match(z + 1e-7, z, "structural")
    assert r.ok and "the reference is all zeros and the RMS difference is within 1e-06" in str(r)


def test_shape_mismatch_is_a_result_not_an_exception():
    for tol in TOLERANCES:
        r = match(torch.zeros(2, 3), torch.zeros(3, 2), tol)
        assert not r.ok and r.shape_a == (2, 3) and r.shape_b == (3, 2)
        assert str(r) == f"MISMATCH {tol}: shape (2, 3) vs (3, 2)"


def test_large_integers_are_compared_exactly():
    """Integers past 2^53 are not exact in float64: the differences come from the integers."""
    a, b = torch.tensor([2**62, 5]), torch.tensor([2**62 + 1, 5])
    r = match(a, b)
    assert not r.ok and r.mismatches == 1 and r.max_abs_err == 1.0 and r.first_mismatch == (0,)
    r = match(a, b, "1e-6")  # within the relative rule, and the difference is still reported
    assert r.ok and r.max_abs_err == 1.0 and 0 < r.max_rel_err < 1e-18
    assert match(torch.tensor([3], dtype=torch.uint8), torch.tensor([250], dtype=torch.uint8)).max_abs_err == 247
    lo, hi = torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max
    assert match(torch.tensor([hi]), torch.tensor([lo])).max_abs_err == float(2**64 - 1)  # no int64 overflow
    assert match(torch.tensor([lo]), torch.tensor([0])).max_abs_err == float(2**63)
    u = torch.tensor([2**64 - 1], dtype=torch.uint64)
    r = match(u, torch.tensor([-1]), "1e-6")  # values, across dtypes: 2^64 apart
    assert not r.ok and r.max_abs_err == float(2**64)


def test_edge_shapes_and_layouts():
    s = torch.tensor(2.0)
    assert match(s, s.clone()).ok
    r = match(torch.tensor(2.0), torch.tensor(3.0))
    assert r.first_mismatch == () and r.mismatches == 1
    e = torch.empty(0, 3)
    r = match(e, e.clone(), "1e-4")
    assert r.ok and r.numel == 0 and r.mismatches == 0
    x = torch.randn(6, 8)
    assert match(x.t(), x.t().contiguous()).ok  # non-contiguous input
    c = torch.randn(4, dtype=torch.complex64)
    assert match(c, c.clone()).ok and not match(c * 1.01, c, "1e-4").ok


def test_match_argument_errors():
    x = torch.ones(3)
    with pytest.raises(TypeError, match="^a: "):
        match([1.0], x)
    with pytest.raises(TypeError, match="^b: "):
        match(x, 1.0)
    with pytest.raises(ValueError, match="'exact', '1e-6', '1e-4', 'structural'"):
        match(x, x, "1e-5")
    with pytest.raises(ValueError, match="tolerance"):
        match(x, x, 1e-4)


def test_exact_mismatch_of_equal_values_says_why():
    """A trial: ``match`` said "MISMATCH ... max abs 0" for 0.0 against -0.0 (or NaNs of other bits) and nothing
    more. It now says what differs; a mismatch of values (the control) does not get the note."""
    import jetdet

    zeros = str(jetdet.match(torch.tensor([0.0, 1.0]), torch.tensor([-0.0, 1.0])))
    assert zeros.startswith("MISMATCH exact: 1 of 2") and "0.0 against -0.0" in zeros, zeros
    a = torch.tensor([float("nan")])
    b = a.clone()
    b.view(torch.int32)[0] ^= 1
    assert "NaNs of other bit patterns" in str(jetdet.match(a, b))
    assert "against -0.0" not in str(jetdet.match(torch.tensor([1.0]), torch.tensor([2.0])))
