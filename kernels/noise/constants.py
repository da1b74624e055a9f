"""Constants shared by the Triton kernel and the torch reference of the noise generator (pure Python, no
triton import, so the CPU path never imports triton).

Every float constant here is an exact float32 value (rounded from its published decimal once, with
``struct``), so the kernel literal, the torch scalar and the interpreter's numpy scalar are the same number
and no compiler or runtime gets to round it differently.
"""

from __future__ import annotations

import struct


def f32(x: float) -> float:
    """Round ``x`` to the nearest float32 and return it as a Python float (exactly representable)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


# --- Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11; Random123) ---
PHILOX_M0 = 0xD2511F53  # multiplier applied to counter word 0
PHILOX_M1 = 0xCD9E8D57  # multiplier applied to counter word 2
PHILOX_W0 = 0x9E3779B9  # key bump for key word 0 (golden ratio)
PHILOX_W1 = 0xBB67AE85  # key bump for key word 1 (sqrt(3) - 1)
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF

# --- uniform from 32 bits -------------------------------------------------------------------------------
# bit 31 -> sign; bits 8..30 -> k in [0, 2^23); q = (2k + 1) * 2^-25 in (0, 1/2), exact in float32.
Q_SCALE = 2.0**-25

# --- inverse normal CDF: Wichura, Algorithm AS 241 (PPND7), Applied Statistics 37 (1988) 477-484 --------
# Relative accuracy about 1e-7 over the whole range, the right precision for float32.
SPLIT1 = f32(0.425)  # central branch when 0.5 - q <= SPLIT1
CONST1 = f32(0.180625)  # 0.425^2
CONST2 = f32(1.6)
A0 = f32(3.3871327179e00)
A1 = f32(5.0434271938e01)
A2 = f32(1.5929113202e02)
A3 = f32(5.9109374720e01)
B1 = f32(1.7895169469e01)
B2 = f32(7.8757757664e01)
B3 = f32(6.7187563600e01)
C0 = f32(1.4234372777e00)
C1 = f32(2.7568153900e00)
C2 = f32(1.3067284816e00)
C3 = f32(1.7023821103e-01)
D1 = f32(7.3700164250e-01)
D2 = f32(1.2021132975e-01)
# AS 241's third branch (r > 5, i.e. q < exp(-25) ~ 1.4e-11) is unreachable: the smallest q is 2^-25.

# --- natural log for q in [2^-25, 0.5) (our own; no libm) -----------------------------------------------
# q = m * 2^e with m in [sqrt(1/2), sqrt(2)); log m = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.1716,
# 2 atanh(s) = 2 s (1 + s^2/3 + s^4/5 + s^6/7 + s^8/9 + ...); the dropped s^10/11 term is < 2.1e-9 relative.
SQRT2 = f32(1.4142135623730951)
LOG_C3 = f32(1.0 / 3.0)
LOG_C5 = f32(1.0 / 5.0)
LOG_C7 = f32(1.0 / 7.0)
LOG_C9 = f32(1.0 / 9.0)
# Cody-Waite split of ln 2: LN2_HI has 9 significant bits, so e * LN2_HI is exact for |e| < 2^15.
LN2_HI = 0.693359375
LN2_LO = f32(0.6931471805599453 - 0.693359375)

# --- division and square root without div/sqrt instructions ---------------------------------------------
# Measured (torch 2.13 CPU, AVX512): torch.sqrt is not correctly rounded for float32 (17% of random inputs
# differ from the rounded float64 root), nor for float64; tensor / python-scalar is a reciprocal multiply
# (15% differ). In Triton, fp32 '/' is div.full.f32 (approximate).
# On the GPU, div.rn / sqrt.rn compile to MUFU.RCP / MUFU.RSQ plus FFMA refinement. So 1/y and 1/sqrt(a)
# come from an integer initial guess (an exact bit operation) refined by Newton steps that use only
# add/sub/mul, each correctly rounded everywhere; the result is then the same bits on every IEEE machine.
RCP_MAGIC = 0x7EF311C7  # 1/y ~ bits(RCP_MAGIC - bits(y)): relative error <= 5.1% (measured), squared per step
RCP_STEPS = 3  # 5.1e-2 -> 2.6e-3 -> 6.7e-6 -> 4e-11, then float32 rounding: 1.5e-7 measured
RSQRT_MAGIC = 0x5F375A86  # 1/sqrt(a) ~ bits(RSQRT_MAGIC - (bits(a) >> 1)): relative error <= 3.5% (measured)
RSQRT_STEPS = 3  # 3.5e-2 -> 1.8e-3 -> 4.9e-6 -> 4e-11, then float32 rounding: 1.8e-7 measured
