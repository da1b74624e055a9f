"""Counter-based Gaussian noise: the same bits for the same (seed, item, step) on any device and batch.

``randn(shape, seed, item_offset=..., step=...)`` treats dim 0 of ``shape`` as the batch: item ``i`` of the
result is a function of ``(seed, item_offset + i, step)`` only, so one item generated alone equals the same
item generated at any slot of any batch. Element ``j`` of an item (flat index over ``shape[1:]``) is word
``j % 4`` of Philox-4x32-10 with

* key     = (seed mod 2^32, seed >> 32),
* counter = (j // 4, item mod 2^32, item >> 32, step),

turned into a standard normal by an inverse normal CDF (Wichura's AS 241) that uses only correctly rounded
float32 add/sub/mul and exact integer/bit operations. CUDA tensors use the Triton kernel
(``jetdet.kernels.noise``), CPU tensors the torch reference; both give the same bits, which the tests check
through the Triton interpreter. ``JETDET_BACKEND=triton`` (with ``TRITON_INTERPRET=1``) runs the kernel on
CPU. See ``kernels/noise/README.md`` for the math and the measured accuracy.
"""

from __future__ import annotations

import math
import numbers

import torch

from . import backend

__all__ = ["randn", "DTYPES"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_U64 = 2**64
_U32 = 2**32
_MAX_NUMEL_PER_ITEM = 2**31 - 1


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)):
        raise TypeError(f"shape: expected a tuple of ints (batch first), got {type(shape).__name__}")
    if len(shape) == 0:
        raise ValueError("shape: expected at least one dimension (dim 0 is the batch), got ()")
    for d in shape:
        if not _is_int(d) or int(d) < 0:
            raise ValueError(f"shape: expected non-negative ints, got {tuple(shape)}")
    return tuple(int(d) for d in shape)


def _check_uint(name: str, v, bound: int, what: str) -> int:
    if not _is_int(v):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    v = int(v)
    if not 0 <= v < bound:
        raise ValueError(f"{name}: expected an int in [0, {what}), got {v}")
    return v


def randn(
    shape,
    seed: int,
    *,
    item_offset: int = 0,
    step: int = 0,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """Standard normal noise of ``shape`` (``[B, ...]``, dim 0 the batch) for ``seed`` at ``step``.

    Args:
        shape: tuple of non-negative ints, at least one dimension; zero sizes give an empty tensor.
        seed: int in [0, 2^64).
        item_offset: index of the first item (``out[i]`` is item ``item_offset + i``); int >= 0 with
            ``item_offset + shape[0] <= 2^64``.
        step: sampler step (or any second stream index), int in [0, 2^32).
        dtype: float32, float16, bfloat16 (generated in float32, rounded to nearest even) or float64
            (the float32 values widened exactly).
        device: None (CPU), a string or a ``torch.device``.

    Returns:
        ``[B, ...]`` tensor, contiguous, on ``device``.
    """
    shape = _check_shape(shape)
    seed = _check_uint("seed", seed, _U64, "2^64")
    item_offset = _check_uint("item_offset", item_offset, _U64, "2^64")
    step = _check_uint("step", step, _U32, "2^32")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype: expected a torch.dtype, got {type(dtype).__name__}")
    if dtype not in DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in DTYPES)
        raise TypeError(f"dtype: expected one of {names}, got {str(dtype).replace('torch.', '')}")
    try:
        dev = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: expected None, a device string or a torch.device, got {device!r}") from e
    n_items = shape[0]
    per_item = math.prod(shape[1:])
    if item_offset + n_items > _U64:
        raise ValueError(f"item_offset: item_offset + shape[0] must be <= 2^64, got {item_offset}+{n_items}")
    if per_item > _MAX_NUMEL_PER_ITEM:
        raise ValueError(f"shape: at most {_MAX_NUMEL_PER_ITEM} elements per item, got {per_item}")

    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} asks for CUDA, which this torch build or machine does not have")
    probe = torch.empty(0, device=dev)
    if n_items * per_item == 0:
        return torch.empty(shape, dtype=dtype, device=dev)
    if backend.backend_for(probe) == "triton":
        philox_randn = backend.import_launcher("jetdet.kernels.noise.launch").philox_randn
        out = philox_randn(n_items, per_item, seed, item_offset=item_offset, step=step, dtype=dtype, device=dev)
    else:
        from jetdet.kernels.noise.reference import randn_reference

        out = randn_reference(n_items, per_item, seed, item_offset, step, dtype).to(dev)
    return out.reshape(shape)
