"""Torch reference of the noise generator: the same integer and float32 operations as ``kernel.py``, in the
same order, so that it is bit-identical to the Triton kernel. It is also the CPU path of
``jetdet.noise.randn``. No triton import.

Integers (Philox): numpy uint32 arrays, 32x32 -> 64-bit products in uint64, where unsigned wrap-around is
well defined. numpy, not torch, because torch's int64 bit ops measured 5-50x slower here (1M counters:
numpy 18 ms, torch 80 ms on 1 thread and 1-4 s on 2 contended threads).
Floats (the transform): torch float32 tensors; every operation is one correctly rounded IEEE add, sub or mul
(torch CPU never contracts separate ops into an FMA), every scalar is an exact float32 value from
``constants.py``. No torch division or sqrt: on this machine torch's float32 sqrt is not correctly rounded
and tensor / scalar is a reciprocal multiply (see ``constants.py``).
"""

from __future__ import annotations

import numpy as np
import torch

from . import constants as K

_M32 = K.MASK32
_SH32 = np.uint64(32)


def _mulhilo32(a: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(hi, lo) uint32 halves of the exact 64-bit product ``a * m`` (``a`` uint32 array, ``m`` < 2^32)."""
    p = a.astype(np.uint64) * np.uint64(m)
    return (p >> _SH32).astype(np.uint32), p.astype(np.uint32)


def philox4x32_10(c0, c1, c2, c3, k0, k1) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Philox-4x32-10. Counter words ``c0..c3`` and key words ``k0, k1``: broadcastable uint32 values (ints,
    sequences or arrays). Returns the 4 output words as numpy uint32 arrays of the broadcast shape."""
    c0, c1, c2, c3, k0, k1 = (np.atleast_1d(np.asarray(v, dtype=np.uint32)) for v in (c0, c1, c2, c3, k0, k1))
    w0, w1 = np.uint32(K.PHILOX_W0), np.uint32(K.PHILOX_W1)
    for r in range(K.PHILOX_ROUNDS):
        if r > 0:
            k0 = k0 + w0  # uint32 arrays wrap modulo 2^32
            k1 = k1 + w1
        hi0, lo0 = _mulhilo32(c0, K.PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, K.PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return np.broadcast_arrays(c0, c1, c2, c3)


def _rcp_f32(y: torch.Tensor) -> torch.Tensor:
    """Mirrors ``kernel._rcp_f32``: 1/y from add/mul only."""
    r = (K.RCP_MAGIC - y.view(torch.int32)).view(torch.float32)
    for _ in range(K.RCP_STEPS):
        r = r * (2.0 - y * r)
    return r


def _sqrt_f32(a: torch.Tensor) -> torch.Tensor:
    """Mirrors ``kernel._sqrt_f32``: sqrt(a) = a * rsqrt(a), rsqrt from add/mul only."""
    h = a * 0.5
    r = (K.RSQRT_MAGIC - (a.view(torch.int32) >> 1)).view(torch.float32)
    for _ in range(K.RSQRT_STEPS):
        r = r * (1.5 - (h * r) * r)
    return a * r


def _log_f32(q: torch.Tensor) -> torch.Tensor:
    """Natural log of positive normal float32 values; mirrors ``kernel._log_f32`` op for op."""
    bits = q.view(torch.int32)
    e = (bits >> 23) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).view(torch.float32)
    big = m > K.SQRT2
    m = torch.where(big, m * 0.5, m)
    e = torch.where(big, e + 1, e)
    s = (m - 1.0) * _rcp_f32(m + 1.0)
    s2 = s * s
    t = s2 * (K.LOG_C3 + s2 * (K.LOG_C5 + s2 * (K.LOG_C7 + s2 * K.LOG_C9)))
    logm = (s + s * t) * 2.0
    ef = e.to(torch.float32)
    return ef * K.LN2_HI + (logm + ef * K.LN2_LO)


def bits_to_normal(x: torch.Tensor) -> torch.Tensor:
    """Integer tensor holding 32-bit Philox words (int32 bit patterns, or int64 values in [0, 2^32)) ->
    float32 standard normal; mirrors ``kernel.bits_to_normal``."""
    neg = (x >> 31) != 0
    k = ((x >> 8) & 0x7FFFFF).to(torch.int32)
    q = (k * 2 + 1).to(torch.float32) * K.Q_SCALE
    d = 0.5 - q
    r = K.CONST1 - d * d
    num = d * (((K.A3 * r + K.A2) * r + K.A1) * r + K.A0)
    den = ((K.B3 * r + K.B2) * r + K.B1) * r + 1.0
    g_central = num * _rcp_f32(den)
    t = _sqrt_f32(-_log_f32(q)) - K.CONST2
    num_t = ((K.C3 * t + K.C2) * t + K.C1) * t + K.C0
    den_t = (K.D2 * t + K.D1) * t + 1.0
    g_tail = num_t * _rcp_f32(den_t)
    g = torch.where(d <= K.SPLIT1, g_central, g_tail)
    return torch.where(neg, -g, g)


def to_dtype(z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 -> output dtype, round to nearest even (float64 widens exactly)."""
    return z if dtype == torch.float32 else z.to(dtype)


def randn_reference(
    n_items: int, numel_per_item: int, seed: int, item_offset: int = 0, step: int = 0, dtype=torch.float32
) -> torch.Tensor:
    """``[n_items, numel_per_item]`` standard normal noise on CPU, bit-identical to ``philox_randn_kernel``.

    Element j of item i is word ``j % 4`` of Philox-4x32-10 with key ``(seed mod 2^32, seed >> 32)`` and
    counter ``(j // 4, (item_offset + i) mod 2^32, (item_offset + i) >> 32, step)``.
    """
    nb = (numel_per_item + 3) // 4
    # item = item_offset + i as a 64-bit value in two uint32 halves (item_offset may exceed 2^63)
    lo = np.arange(n_items, dtype=np.uint64) + np.uint64(item_offset & _M32)
    hi = ((lo >> _SH32) + np.uint64(item_offset >> 32)).astype(np.uint32)
    c0 = np.arange(nb, dtype=np.uint32)[None, :]  # [1, nb]
    c1 = lo.astype(np.uint32)[:, None]  # [n, 1]
    c2 = hi[:, None]
    x = philox4x32_10(c0, c1, c2, step, seed & _M32, (seed >> 32) & _M32)
    words = np.stack(x, axis=-1).reshape(n_items, nb * 4)[:, :numel_per_item]
    bits = torch.from_numpy(np.ascontiguousarray(words).view(np.int32))  # same bits, as int32
    return to_dtype(bits_to_normal(bits), dtype)
