"""Shared pieces for the Triton kernels: compile specs for the static report, launch helpers.

Launch tables, dtype names and the shipped-table enumeration live in :mod:`jetdet.configs`."""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

from jetdet._paths import getenv
from jetdet.configs import DTYPE_NAMES

#: What :func:`on_device` returns when the launch needs no device switch (a reusable, do-nothing context).
_SAME_DEVICE = contextlib.nullcontext()


def on_device(device: torch.device):
    """A context for launching kernels on ``device``'s tensors.

    Triton launches on torch's *current* CUDA device and that device's current stream
    (``triton/backends/driver.py``: ``get_current_device = torch.cuda.current_device``), whatever device the
    arguments live on. For a model on ``cuda:1`` while ``cuda:0`` is current, that is a kernel on one GPU handed
    another GPU's pointers (a fault, or a race with the other GPU's stream). When ``device`` is a CUDA device
    other than the current one, this is ``torch.cuda.device(device)``; otherwise a context that does nothing.

    Registered ops switch once, in ``jetdet.ops.registry.Op.launch``, around their whole launcher (TMA launchers
    included); this is for launchers called outside the registry (the noise kernel's)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return _SAME_DEVICE


#: ``enable_fp_fusion`` for the kernels that do not choose it themselves (matmul, conv2d and noise turn it off),
#: passed explicitly at every launch and by the static report: Triton 3.9's default (on), which the H200 runs
#: were measured with, kept when Triton's own default changes (3.10: off).
FP_FUSION = True


#: ``$JETDET_FP32_DOT``: how the GEMM and conv2d kernels multiply fp32 operands.
#:
#: - ``ieee`` (the default): an IEEE fp32 dot, FFMA on CUDA cores, never TF32.
#: - ``tf32x3``: Triton's split-precision dot on the tensor cores. Each operand is split as ``big = tf32(x)``,
#:   ``small = x - big``, and three TF32 products are summed: ``small_a*big_b + big_a*small_b``, then
#:   ``+ big_a*big_b``. The ``small*small`` term is dropped.
#:   Opt-in until a GPU has timed it and measured its error (``bench/gpu_check.py`` does both).
#:   ``bench/fp32_dot_accuracy.py`` emulates it on the CPU.
#:
#: Either way the tile is fixed per op, size class, dtype and device, and the K loop runs in order, so batch
#: invariance holds as before. The interpreter ignores the dot precision: on CPU both give the IEEE result.
FP32_DOT_ENV = "JETDET_FP32_DOT"
FP32_DOTS = ("ieee", "tf32x3")

#: The tile of a ``tf32x3`` GEMM or conv2d, per arch, for every N (one tile: nothing depends on M or the batch).
#: Chosen from the static report, not from timings: the widest tile tried that compiles without spills on triton
#: 3.6 and 3.9, JIT variants included. sm_90: warpgroup MMA, up to 248 registers, 65 KiB of shared memory; at
#: BLOCK_K 32 the same tile spilled 56 B with odd sizes. sm_80/89: HMMA, up to 181 registers, 48 KiB; 128x128
#: tiles spilled there: the split operands double the MMA fragments a thread holds.
TF32X3_CONFIGS = {
    "sm_90": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=16, GROUP_M=8, num_warps=8, num_stages=4),
}
TF32X3_DEFAULT = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)


def fp32_dot() -> str:
    """``$JETDET_FP32_DOT``, one of :data:`FP32_DOTS` (unset or empty: ``"ieee"``)."""
    val = getenv(FP32_DOT_ENV)
    if not val:
        return "ieee"
    val = val.strip().lower() or "ieee"
    if val not in FP32_DOTS:
        raise ValueError(f"{FP32_DOT_ENV}={val!r}: expected 'ieee' or 'tf32x3'")
    return val


def tf32x3_config(arch: str) -> dict:
    """The fixed ``tf32x3`` tile for ``arch`` (``"sm_90"``; the interpreter's is ``"sm_80"``)."""
    return TF32X3_CONFIGS.get(arch, TF32X3_DEFAULT)


def tf32x3_tiles() -> list[tuple[dict, tuple[int, ...]]]:
    """``(tile, archs)`` of the fixed ``tf32x3`` tiles over the static report's archs, for the compile specs."""
    own = {int(arch[3:]): cfg for arch, cfg in TF32X3_CONFIGS.items()}
    rest = tuple(a for a in (80, 89, 90) if a not in own)
    return [(cfg, (arch,)) for arch, cfg in own.items()] + ([(TF32X3_DEFAULT, rest)] if rest else [])


@dataclass
class CompileSpec:
    """One kernel at one shipped config, for ``triton.compile(ASTSource(...))`` cross-compilation.

    ``signature`` maps every non-constexpr argument name to a triton type string (``"*fp16"``, ``"i32"``,
    ``"fp32"``); ``constexprs`` maps constexpr names to values. ``deterministic`` kernels must contain no
    atomics (RED/ATOM) in SASS. ``options`` go to ``triton.compile`` (``num_warps``, ``num_stages``,
    ``enable_fp_fusion``).
    """

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    deterministic: bool = True
    archs: tuple[int, ...] = (80, 89, 90)
    # "no_fma" / "no_mufu" make the report fail the kernel if SASS contains FFMA / MUFU instructions
    forbid: tuple[str, ...] = ()
    # Set on the variants ``jetdet.static_report.jit_variants`` derives: ``(args, kwargs)`` of a launch
    # ``fn[grid](*args, **kwargs)``, turned into a signature by Triton's own JIT binder instead of from
    # ``signature``/``constexprs``. ``jit_class`` names the value class (``"ints=1"``).
    launch: tuple[tuple, dict] | None = None
    jit_class: str | None = None


def tl_ptr(dtype) -> str:
    """``torch.float16`` -> ``"*fp16"`` (the names of :data:`jetdet.configs.DTYPE_NAMES`)."""
    return "*" + DTYPE_NAMES[dtype]


def signature(kernel, types: dict[str, str]) -> dict[str, str]:
    """Triton signature of every non-constexpr parameter of ``kernel``: ``types[name]``, else ``"i32"``
    (sizes and strides). Works on a ``JITFunction`` and on the interpreter's ``InterpretedFunction``."""
    params = inspect.signature(kernel.fn).parameters.values()
    return {p.name: types.get(p.name, "i32") for p in params if "constexpr" not in str(p.annotation)}


#: CUDA's limit on a grid's y and z dims (x goes to 2**31 - 1): launchers with the batch on one of them launch big
#: batches in chunks of this many items, each item's programs the same
MAX_GRID_YZ = 65535


def cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` for host ints. Triton's is a constexpr function, and a Python call of it costs ~2 us; a
    launch computes a few of these on every call."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """``triton.next_power_of_2`` for host ints (0 -> 0, 1 -> 1, 5 -> 8), without its ~2 us call cost."""
    return 0 if n == 0 else 1 << (int(n) - 1).bit_length()


def empty(shape, dtype, device, memory_format=None):
    """``torch.empty`` that fills with NaN when ``JETDET_DEBUG_FILL_NAN=1`` (set by the test conftest), so an
    element a kernel forgets to write fails the test instead of passing on leftover memory."""
    fmt = torch.contiguous_format if memory_format is None else memory_format
    out = torch.empty(shape, dtype=dtype, device=device, memory_format=fmt)
    if getenv("JETDET_DEBUG_FILL_NAN") == "1" and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def kernel_choice(env: str) -> str:
    """``$env`` (``JETDET_MATMUL_KERNEL``, ``JETDET_ATTENTION_KERNEL``, ``JETDET_CONV_KERNEL``): ``default`` (the op's
    default kernel) or ``tma`` (its opt-in TMA-fed twin, for the calls that twin takes); read at each launch."""
    val = (getenv(env) or "default").strip().lower() or "default"
    if val not in ("default", "tma"):
        raise ValueError(f"{env}={val!r}: expected 'default' or 'tma'")
    return val


def tensor_descriptor(env: str):
    """Triton's host ``TensorDescriptor`` class, for the opt-in TMA kernels (``$env=tma``). Imported when one runs:
    Triton before 3.4 has none, and the default kernels must still import and run there. On such a Triton an opt-in
    call is an error naming the variable."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError as e:
        import triton

        raise RuntimeError(f"{env}=tma needs triton >= 3.4 (tensor descriptors); installed: triton "
                           f"{triton.__version__}. Unset {env} to use the default kernel.") from e  # fmt: skip
    return TensorDescriptor


def descriptor_strides(t: torch.Tensor) -> list[int] | None:
    """Strides a tensor descriptor (TMA) can take for ``t``, or None: a 16-byte aligned base, 16-byte aligned
    strides and a contiguous last dim. A size-1 dim is never stepped: it gets the stride a contiguous layout would
    have."""
    if t.stride(-1) != 1 or t.data_ptr() % 16:
        return None
    size, strides = t.element_size(), list(t.stride())
    for i in range(t.dim() - 2, -1, -1):
        if t.shape[i] == 1:
            strides[i] = strides[i + 1] * t.shape[i + 1]
        if (strides[i] * size) % 16:
            return None
    return strides


def out_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout of an op's output for input ``x``, as torch's conv2d and group_norm give it: channels-last for
    a channels-last 4-D ``x`` (one that is not also plain contiguous, as with C == 1 or H * W == 1, where both
    layouts are the same memory), contiguous otherwise. The Triton path, the torch path and the fake of an op
    that keeps its input's layout all follow it."""
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format
