"""Host side of the batch-invariant GEMM: config lookup, allocation, grid, launch.

The caller (``jetdet.ops``) has validated dtypes, devices and shapes; the asserts here are cheap guards.
"""

from __future__ import annotations

import torch

from jetdet import configs
from jetdet.kernels._common import MAX_GRID_YZ, cdiv, empty, fp32_dot, kernel_choice, tf32x3_config

from .kernel import matmul_kernel

OP = "matmul"

# Used when no table matches the device (e.g. sm_86, sm_120); fits 99 KiB of shared memory and compiles
# without spills on sm_80/89/90 (see ``python -m jetdet.static_report --only matmul``).
DEFAULT_CONFIG = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)
DEFAULT_CONFIG_FP32 = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=3)

# Explicit, so the numbers do not change when Triton flips its default (3.10). Nothing here contracts:
# the dot's FMAs are explicit and the epilogue only adds; the static report shows identical SASS either way.
FP_FUSION = False
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _default(dtype: torch.dtype) -> dict:
    return DEFAULT_CONFIG_FP32 if dtype == torch.float32 else DEFAULT_CONFIG


def config(n: int, dtype: torch.dtype, device=None, f32_dot: str | None = None) -> dict:
    """Tile config for output width ``n``: never M or the batch size, which keeps it batch-invariant. fp32 under
    ``JETDET_FP32_DOT=tf32x3`` (or ``f32_dot="tf32x3"``, the launch's reading of it): the fixed tensor-core tile
    of ``kernels/_common.py``."""
    if dtype == torch.float32 and (f32_dot or fp32_dot()) == "tf32x3":
        return tf32x3_config(configs.device_identity(device)[1])
    return configs.get_config(OP, n, dtype=dtype, device=device, default=_default(dtype))


def _dot_f32(dtype: torch.dtype, device: torch.device) -> bool:
    # fp32: IEEE dot, never TF32 (unless JETDET_FP32_DOT=tf32x3 asks for the split-precision one). bf16 under the
    # interpreter: its bf16 dot gives wrong numbers, and the bf16 x bf16 products are exact in fp32, so the fp32 dot
    # computes what the tensor cores do.
    return dtype == torch.float32 or (dtype == torch.bfloat16 and device.type != "cuda")


#: ``default`` or ``tma``: the persistent TMA kernel of ``launch_tma.py`` for eligible fp16/bf16 2-D problems (opt-in
#: until a GPU has measured it; ``kernels._common.kernel_choice``)
KERNEL_ENV = "JETDET_MATMUL_KERNEL"


def _launch(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, c: torch.Tensor) -> None:
    """a [M, K], b [K, N], c [M, N] (one problem), or a [B, M, K], b [B, K, N], c [B, M, N]."""
    if c.dtype == torch.bfloat16 and c.device.type != "cuda":
        # The interpreter truncates fp32 -> bf16 casts (the GPU rounds to nearest even): write fp32 and
        # let torch round, which is what the GPU's cvt.rn.bf16.f32 does.
        c32 = empty(c.shape, torch.float32, c.device)
        _launch(a, b, bias, c32)
        c.copy_(c32)
        return
    if a.dim() == 2:
        if kernel_choice(KERNEL_ENV) == "tma":
            from .launch_tma import eligible, matmul_tma

            w = b.t()  # [N, K]: nn.Linear's weight when b = weight.t()
            if eligible(a, w, c):  # a choice that does not depend on M: the same kernel for every batch
                matmul_tma(a, w, bias, out=c)
                return
        # a single problem never steps its batch stride; 0 keeps Triton's divisibility-16 specialization
        _run(a, b, bias, c, 1, (0, *a.stride(), 0, *b.stride(), 0, *c.stride()))
        return
    nb = a.shape[0]
    for start in range(0, nb, MAX_GRID_YZ):
        stop = min(nb, start + MAX_GRID_YZ)
        a_, b_, c_ = (a, b, c) if nb <= MAX_GRID_YZ else (a[start:stop], b[start:stop], c[start:stop])
        strides = (*a_.stride(), *b_.stride(), *c_.stride())
        if nb == 1:
            strides = (0, *strides[1:3], 0, *strides[4:6], 0, *strides[7:])
        _run(a_, b_, bias, c_, stop - start, strides)


def _run(a, b, bias, c, nb: int, strides: tuple) -> None:
    """One launch over ``nb`` problems; ``strides`` are a's, b's and c's (batch, row, column)."""
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    prec = fp32_dot() if a.dtype == torch.float32 else "ieee"  # bf16 under the interpreter: exact products
    cfg = config(n, a.dtype, a.device, prec)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    matmul_kernel[(cdiv(m, bm) * cdiv(n, bn), nb)](
        a, b, bias if bias is not None else c, c,
        m, n, k,
        *strides,
        HAS_BIAS=bias is not None,
        DOT_F32=_dot_f32(a.dtype, a.device),
        F32_DOT=prec,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        enable_fp_fusion=FP_FUSION,
    )  # fmt: skip


def matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b + bias``: a [M, K], b [K, N] (any strides, e.g. ``weight.t()``), bias [N] or None -> [M, N].

    Output in ``a.dtype``; fp32 accumulation; the K loop runs in order inside one program (no split-K, no
    atomics), with one tile config chosen by N, so row i of the result is bitwise the same for any M.
    """
    assert a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[0], (tuple(a.shape), tuple(b.shape))
    assert a.dtype in _DTYPES and b.dtype == a.dtype and a.device == b.device
    m, n = a.shape[0], b.shape[1]
    if bias is not None:
        assert bias.shape == (n,) and bias.device == a.device, tuple(bias.shape)
    c = empty((m, n), a.dtype, a.device)
    if m == 0 or n == 0:
        return c
    if a.shape[1] == 0:
        c.zero_()
        if bias is not None:
            c += bias.to(c.dtype)
        return c
    _launch(a, b, bias, c)
    return c


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched ``a @ b``: a [B, M, K], b [B, K, N] (any strides) -> [B, M, N] in ``a.dtype``.

    Each batch item runs the same fixed-tile, in-order K loop as :func:`matmul`, so ``bmm(a, b)[i]`` is
    bitwise ``bmm(a[i:i+1], b[i:i+1])[0]``.
    """
    assert a.dim() == 3 and b.dim() == 3, (tuple(a.shape), tuple(b.shape))
    assert a.shape[0] == b.shape[0] and a.shape[2] == b.shape[1], (tuple(a.shape), tuple(b.shape))
    assert a.dtype in _DTYPES and b.dtype == a.dtype and a.device == b.device
    nb, m, n = a.shape[0], a.shape[1], b.shape[2]
    c = empty((nb, m, n), a.dtype, a.device)
    if c.numel() == 0:
        return c
    if a.shape[2] == 0:
        return c.zero_()
    _launch(a, b, None, c)
    return c
