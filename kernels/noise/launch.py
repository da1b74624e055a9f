"""Host side of the noise kernel: allocation, grid, launch. Arguments are validated by ``jetdet.noise``."""

from __future__ import annotations

import torch

from .._common import empty, on_device
from . import constants as K
from .kernel import bits_to_normal_kernel, philox4x32_10_kernel, philox_randn_kernel

# Philox counters per program (4 elements each). The output does not depend on it (tests check 2 values).
BLOCK = 256
# The interpreter pays per program, not per element: use bigger programs there.
BLOCK_INTERPRETER = 2048
NUM_WARPS = 4
MAX_NUMEL_PER_ITEM = 2**31 - 1  # N is an i32 kernel argument
MAX_GRID_X = 2**31 - 1  # CUDA grid limits: items on axis 0, the item's blocks strided over axis 1
MAX_GRID_Y = 65535
# No FMA contraction: the float ops must be the separately rounded ones the torch reference performs.
LAUNCH_OPTIONS = {"num_warps": NUM_WARPS, "enable_fp_fusion": False}


def _i32(v: int) -> int:
    """uint32 value -> the int32 with the same bits (keeps every kernel argument an ``i32``)."""
    v &= K.MASK32
    return v - (1 << 32) if v >= (1 << 31) else v


def _default_block(device: torch.device) -> int:
    from jetdet.backend import interpreter_enabled

    return BLOCK_INTERPRETER if (device.type == "cpu" and interpreter_enabled()) else BLOCK


def philox_randn(
    n_items: int,
    numel_per_item: int,
    seed: int,
    *,
    item_offset: int = 0,
    step: int = 0,
    dtype: torch.dtype = torch.float32,
    device="cuda",
    block: int | None = None,
) -> torch.Tensor:
    """``[n_items, numel_per_item]`` noise from ``philox_randn_kernel``; bit-identical to
    ``reference.randn_reference`` with the same arguments. ``device`` may be ``cpu`` under
    ``TRITON_INTERPRET=1``. float64 output is the float32 result widened exactly."""
    device = torch.device(device)
    if numel_per_item > MAX_NUMEL_PER_ITEM:
        raise ValueError(f"numel_per_item: at most {MAX_NUMEL_PER_ITEM}, got {numel_per_item}")
    gen_dtype = torch.float32 if dtype == torch.float64 else dtype
    bf16 = gen_dtype == torch.bfloat16
    out = empty((n_items, numel_per_item), gen_dtype, device)
    if out.numel() == 0:
        return out.to(dtype)
    block = block or _default_block(device)
    blocks_per_item = triton_cdiv(triton_cdiv(numel_per_item, 4), block)
    if n_items > MAX_GRID_X:
        raise ValueError(f"n_items: at most {MAX_GRID_X} items per call, got {n_items}")
    grid = (n_items, min(blocks_per_item, MAX_GRID_Y))
    # launch on the output's GPU, not the current one (cuda:1 while cuda:0 is current)
    with on_device(device):
        philox_randn_kernel[grid](
            out.view(torch.int16) if bf16 else out,
            numel_per_item,
            blocks_per_item,
            _i32(seed),
            _i32(seed >> 32),
            _i32(item_offset),
            _i32(item_offset >> 32),
            _i32(step),
            BLOCK=block,
            OUT_BF16_BITS=bf16,
            **LAUNCH_OPTIONS,
        )
    return out.to(dtype)


def philox4x32_10(ctr: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Raw Philox-4x32-10 through the Triton kernel, for known-answer tests.

    ``ctr [n, 4]`` and ``key [n, 2]`` hold uint32 values in any integer dtype; returns ``[n, 4]`` int64 in
    [0, 2^32)."""
    n = ctr.shape[0]
    c = torch.tensor([[_i32(int(v)) for v in row] for row in ctr.tolist()], dtype=torch.int32).to(ctr.device)
    k = torch.tensor([[_i32(int(v)) for v in row] for row in key.tolist()], dtype=torch.int32).to(ctr.device)
    out = torch.empty((n, 4), dtype=torch.int32, device=ctr.device)
    blk = 64
    with on_device(ctr.device):
        philox4x32_10_kernel[(triton_cdiv(n, blk),)](c, k, out, n, BLOCK=blk)
    return out.to(torch.int64) & K.MASK32


def bits_to_normal(words: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """The kernel's uniform -> normal transform on given 32-bit words (any integer dtype holding the bit
    pattern or the uint32 value), for tests. Returns float32 of the same shape."""
    x = words
    if x.dtype != torch.int32:
        x = x.to(torch.int64) & K.MASK32
        x = torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)
    x = x.contiguous().reshape(-1)
    out = empty(x.shape, torch.float32, x.device)
    n = x.numel()
    if n:
        with on_device(x.device):
            bits_to_normal_kernel[(triton_cdiv(n, block),)](x, out, n, BLOCK=block, **LAUNCH_OPTIONS)
    return out.reshape(words.shape)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
