"""Triton kernels for counter-based Gaussian noise: Philox-4x32-10 bits, then an inverse-normal-CDF transform
built only from correctly rounded float32 add, sub and mul (division and square root are Newton iterations
from an integer initial guess) and exact integer/bit operations, so that the result is bit-identical to the
torch reference in ``reference.py`` on any device. Launch with ``enable_fp_fusion=False`` (no FMA
contraction). The math is in ``README.md``.
"""

import triton
import triton.language as tl

from . import constants as _k

_M0 = tl.constexpr(_k.PHILOX_M0)
_M1 = tl.constexpr(_k.PHILOX_M1)
_W0 = tl.constexpr(_k.PHILOX_W0)
_W1 = tl.constexpr(_k.PHILOX_W1)
_ROUNDS = tl.constexpr(_k.PHILOX_ROUNDS)
_Q_SCALE = tl.constexpr(_k.Q_SCALE)
_SPLIT1 = tl.constexpr(_k.SPLIT1)
_CONST1 = tl.constexpr(_k.CONST1)
_CONST2 = tl.constexpr(_k.CONST2)
_A0 = tl.constexpr(_k.A0)
_A1 = tl.constexpr(_k.A1)
_A2 = tl.constexpr(_k.A2)
_A3 = tl.constexpr(_k.A3)
_B1 = tl.constexpr(_k.B1)
_B2 = tl.constexpr(_k.B2)
_B3 = tl.constexpr(_k.B3)
_C0 = tl.constexpr(_k.C0)
_C1 = tl.constexpr(_k.C1)
_C2 = tl.constexpr(_k.C2)
_C3 = tl.constexpr(_k.C3)
_D1 = tl.constexpr(_k.D1)
_D2 = tl.constexpr(_k.D2)
_SQRT2 = tl.constexpr(_k.SQRT2)
_LOG_C3 = tl.constexpr(_k.LOG_C3)
_LOG_C5 = tl.constexpr(_k.LOG_C5)
_LOG_C7 = tl.constexpr(_k.LOG_C7)
_LOG_C9 = tl.constexpr(_k.LOG_C9)
_LN2_HI = tl.constexpr(_k.LN2_HI)
_LN2_LO = tl.constexpr(_k.LN2_LO)
_RCP_MAGIC = tl.constexpr(_k.RCP_MAGIC)
_RCP_STEPS = tl.constexpr(_k.RCP_STEPS)
_RSQRT_MAGIC = tl.constexpr(_k.RSQRT_MAGIC)
_RSQRT_STEPS = tl.constexpr(_k.RSQRT_STEPS)


@triton.jit
def _mulhilo32(a, M: tl.constexpr):
    """(hi, lo) 32-bit halves of the exact 64-bit product ``a * M`` (``a`` uint32)."""
    p = a.to(tl.uint64) * tl.full(a.shape, M, tl.uint64)
    return (p >> 32).to(tl.uint32), p.to(tl.uint32)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox-4x32-10 on uint32 tensors of one shape: counter (c0..c3), key (k0, k1) -> 4 uint32 words."""
    for r in tl.static_range(_ROUNDS):
        if r > 0:
            k0 = k0 + _W0
            k1 = k1 + _W1
        hi0, lo0 = _mulhilo32(c0, _M0)
        hi1, lo1 = _mulhilo32(c2, _M1)
        n0 = hi1 ^ c1 ^ k0
        n2 = hi0 ^ c3 ^ k1
        c0 = n0
        c1 = lo1
        c2 = n2
        c3 = lo0
    return c0, c1, c2, c3


@triton.jit
def _rcp_f32(y):
    """1/y for positive normal float32 y: integer initial guess, then Newton r' = r (2 - y r) (add/mul)."""
    r0 = tl.full(y.shape, _RCP_MAGIC, tl.int32) - y.to(tl.int32, bitcast=True)
    r = r0.to(tl.float32, bitcast=True)
    for _ in tl.static_range(_RCP_STEPS):
        r = r * (2.0 - y * r)
    return r


@triton.jit
def _sqrt_f32(a):
    """sqrt(a) for positive normal float32 a, as a * rsqrt(a); rsqrt by an integer initial guess and
    Newton steps r' = r (1.5 - (a/2 r) r) (add/mul only)."""
    h = a * 0.5
    r0 = tl.full(a.shape, _RSQRT_MAGIC, tl.int32) - (a.to(tl.int32, bitcast=True) >> 1)
    r = r0.to(tl.float32, bitcast=True)
    for _ in tl.static_range(_RSQRT_STEPS):
        r = r * (1.5 - (h * r) * r)
    return a * r


@triton.jit
def _log_f32(q):
    """Natural log of a positive, normal float32 tensor, from bit ops and correctly rounded arithmetic."""
    bits = q.to(tl.int32, bitcast=True)
    e = (bits >> 23) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)  # [1, 2)
    big = m > _SQRT2
    m = tl.where(big, m * 0.5, m)  # [sqrt(1/2), sqrt(2)), exact
    e = tl.where(big, e + 1, e)
    s = (m - 1.0) * _rcp_f32(m + 1.0)  # m - 1 is exact (Sterbenz)
    s2 = s * s
    t = s2 * (_LOG_C3 + s2 * (_LOG_C5 + s2 * (_LOG_C7 + s2 * _LOG_C9)))
    logm = (s + s * t) * 2.0
    ef = e.to(tl.float32)
    return ef * _LN2_HI + (logm + ef * _LN2_LO)


@triton.jit
def bits_to_normal(x):
    """uint32 tensor -> float32 standard normal: bit 31 is the sign, bits 8..30 give q = (2k+1) 2^-25 in
    (0, 1/2), and |z| = -Phi^-1(q) by AS 241 (PPND7) with our own log and sqrt in the tail branch."""
    neg = (x >> 31) != 0
    k = ((x >> 8) & 0x7FFFFF).to(tl.int32)
    q = (k * 2 + 1).to(tl.float32) * _Q_SCALE  # exact
    # central branch: q in [0.075, 0.5)
    d = 0.5 - q  # exact: a multiple of 2^-25 below 1/2
    r = _CONST1 - d * d
    num = d * (((_A3 * r + _A2) * r + _A1) * r + _A0)
    den = ((_B3 * r + _B2) * r + _B1) * r + 1.0
    g_central = num * _rcp_f32(den)
    # tail branch: q < 0.075, r = sqrt(-log q) in (1.6, 4.17]
    t = _sqrt_f32(-_log_f32(q)) - _CONST2
    num_t = ((_C3 * t + _C2) * t + _C1) * t + _C0
    den_t = (_D2 * t + _D1) * t + 1.0
    g_tail = num_t * _rcp_f32(den_t)
    g = tl.where(d <= _SPLIT1, g_central, g_tail)
    return tl.where(neg, -g, g)


# The seed, item and step words are data, not shapes: without do_not_specialize the JIT turns a value of 1 into
# a Python int constant (``.to`` on it then fails to compile, as a seed of 1 did on an H200) and compiles a new
# kernel for each divisibility class of a seed. N and blocks_per_item stay specialisable (sizes).
@triton.jit(do_not_specialize=["key0", "key1", "item_lo", "item_hi", "step"])
def philox_randn_kernel(
    out_ptr,  # [n_items, N] contiguous; fp32 / fp16, or int16 holding bf16 bits when OUT_BF16_BITS
    N,  # elements per item (i32)
    blocks_per_item,  # cdiv(cdiv(N, 4), BLOCK)
    key0,  # seed bits 0..31, as i32 (bit pattern)
    key1,  # seed bits 32..63
    item_lo,  # item_offset bits 0..31
    item_hi,  # item_offset bits 32..63
    step,  # step, uint32 bit pattern as i32
    BLOCK: tl.constexpr,  # Philox counters per program iteration; each gives 4 elements
    OUT_BF16_BITS: tl.constexpr,
):
    # grid = (n_items, min(blocks_per_item, 65535)): axis 0 is the item, axis 1 strides over the item's
    # blocks (no integer division in the kernel: it would compile to I2F + MUFU.RCP).
    item = tl.program_id(0)
    item_u = item.to(tl.uint32)
    lo = item_lo.to(tl.uint32, bitcast=True) + item_u  # 64-bit add with carry, in uint32 halves
    hi = item_hi.to(tl.uint32, bitcast=True) + (lo < item_u).to(tl.uint32)
    zero = tl.zeros([BLOCK], dtype=tl.uint32)
    c1 = zero + lo
    c2 = zero + hi
    c3 = zero + step.to(tl.uint32, bitcast=True)
    k0 = zero + key0.to(tl.uint32, bitcast=True)
    k1 = zero + key1.to(tl.uint32, bitcast=True)
    w = tl.arange(0, 4)[None, :]
    base = out_ptr + item.to(tl.int64) * N
    for pb in range(tl.program_id(1), blocks_per_item, tl.num_programs(1)):
        blk = pb * BLOCK + tl.arange(0, BLOCK)  # Philox block index: elements 4*blk .. 4*blk+3 of the item
        x0, x1, x2, x3 = philox4x32_10(blk.to(tl.uint32), c1, c2, c3, k0, k1)
        x = tl.where(w == 0, x0[:, None], tl.where(w == 1, x1[:, None], tl.where(w == 2, x2[:, None], x3[:, None])))
        z = bits_to_normal(x)  # [BLOCK, 4] float32
        offs = blk.to(tl.int64)[:, None] * 4 + w
        mask = offs < N
        if OUT_BF16_BITS:
            # fp32 -> bf16, round to nearest even, on the bits (finite values only; the interpreter's own
            # fp32 -> bf16 cast truncates, so we do not rely on it)
            b = z.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
            tl.store(base + offs, b.to(tl.int32).to(tl.int16), mask=mask)
        else:
            tl.store(base + offs, z.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def philox4x32_10_kernel(ctr_ptr, key_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Raw Philox words for known-answer tests: ctr [n, 4], key [n, 2], out [n, 4], all int32 bit patterns."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    c0 = tl.load(ctr_ptr + i * 4 + 0, mask=m, other=0).to(tl.uint32, bitcast=True)
    c1 = tl.load(ctr_ptr + i * 4 + 1, mask=m, other=0).to(tl.uint32, bitcast=True)
    c2 = tl.load(ctr_ptr + i * 4 + 2, mask=m, other=0).to(tl.uint32, bitcast=True)
    c3 = tl.load(ctr_ptr + i * 4 + 3, mask=m, other=0).to(tl.uint32, bitcast=True)
    k0 = tl.load(key_ptr + i * 2 + 0, mask=m, other=0).to(tl.uint32, bitcast=True)
    k1 = tl.load(key_ptr + i * 2 + 1, mask=m, other=0).to(tl.uint32, bitcast=True)
    x0, x1, x2, x3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
    tl.store(out_ptr + i * 4 + 0, x0.to(tl.int32, bitcast=True), mask=m)
    tl.store(out_ptr + i * 4 + 1, x1.to(tl.int32, bitcast=True), mask=m)
    tl.store(out_ptr + i * 4 + 2, x2.to(tl.int32, bitcast=True), mask=m)
    tl.store(out_ptr + i * 4 + 3, x3.to(tl.int32, bitcast=True), mask=m)


@triton.jit
def bits_to_normal_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """The transform alone, for tests on chosen words: x [n] int32 bit patterns -> out [n] float32."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    x = tl.load(x_ptr + i, mask=m, other=0).to(tl.uint32, bitcast=True)
    tl.store(out_ptr + i, bits_to_normal(x), mask=m)
