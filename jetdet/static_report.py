"""Static report: cross-compile every shipped kernel config for sm_80/89/90 and read what the GPU would run.

No GPU is needed. Each kernel module under ``KERNEL_MODULES`` exposes ``compile_specs() ->
list[CompileSpec]`` (``jetdet.kernels._common``); each spec is compiled with
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32))``.
The cubin is then read with ``cuobjdump --dump-resource-usage`` (registers, stack = spills, static shared
memory) and ``cuobjdump -sass`` (instruction classes). Per (kernel, arch) the row holds:

``regs``, ``stack`` (bytes of local-memory stack: register spills), ``shared`` (static + Triton's dynamic
shared memory, bytes), ``hmma`` / ``hgmma`` (tensor-core MMA / Hopper warpgroup MMA), ``tf32`` (how many of
those are ``.TF32``), ``atomics`` (RED/REDG/ATOM/ATOMG/ATOMS and TMA reductions), ``mufu`` (special-function
unit approximations), ``ffma`` (fused multiply-adds), ``narrow_loads`` (global loads of 8 or 16 bits:
``LDG.*.U16`` and the like, the element-wise gather of a 16-bit tensor), ``instructions`` (all SASS
instructions). ``narrow_loads`` counts only loads inside a loop, so an epilogue's bias load is not one.

:func:`violations` fails: any atomic in a ``deterministic`` spec, any stack/spill bytes, shared memory over
the arch's per-block limit, a compile error, and a class the spec forbids (``forbid``): ``no_fma`` (FFMA),
``no_mufu`` (MUFU), ``no_tf32`` (any .TF32 tensor-core instruction), ``no_gather`` (any 8/16-bit global load
inside a loop: a kernel whose 16-bit operands must arrive in vector loads).

Spec conventions (matching what Triton's launcher specializes at run time):

* ``signature`` names each non-constexpr argument's type (``"*fp16"``, ``"i32"``, ``"fp32"``). Constexpr
  arguments may be listed as ``"constexpr"`` or simply left out; their values come from ``constexprs``
  (or the Python default). To model Triton's ``== 1`` specialization, list an int argument as
  ``"constexpr"`` with value 1.
* Pointers are taken as 16-byte aligned (what the launcher sees for torch allocations). A type suffix
  ``":16"`` marks an int argument divisible by 16 (``"i32:16"``); ``":1"`` on a pointer drops the alignment.

JIT specialisation: at a launch, Triton's JIT turns argument values into the signature it compiles (an int
equal to 1 becomes a compile-time constant, 0 and multiples of 16 get a divisibility attribute, pointers an
alignment one), which a hand-written signature can miss: a seed of 1 turned ``key0.to(...)`` into ``.to`` on a
Python int and the noise kernel failed to compile on an H200 while this report passed. So by default
:func:`collect_specs` adds :func:`jit_variants`: per kernel function and flag combination, the same spec
launched with every int argument 0/16, 1, or 17 (with misaligned pointers), bound by Triton's own binder
(:func:`jit_specialization`, the code ``JITFunction.run`` runs), compiled for sm_90 and checked like any other
row (``"<name> jit[ints=1]"``). :func:`declared_vs_jit` checks that a spec's declared signature is what the
binder makes of the values it stands for; :func:`capture_launches` and :func:`launch_spec` compile the
launches a real call makes.

Interpreter processes: with ``TRITON_INTERPRET=1`` set before triton was imported (the test suite),
``@triton.jit`` returns an ``InterpretedFunction`` that ``ASTSource`` cannot compile. :func:`as_jit_function`
rebuilds a real ``JITFunction`` from the same Python function, with a copy of its globals where every
interpreted callee (also inside imported helper modules) is replaced the same way. :func:`compiling` then
swaps ``triton.language``'s own interpreted functions (``tl.cdiv``, ``tl.sum``, ``tl.randn``, tensor member
wrappers) for JITFunctions and switches ``triton.knobs.runtime.interpret`` off, restoring both on exit. So
the report works whether or not the interpreter is on, in the same process as the interpreter tests, which
keep working afterwards.

Results are cached as JSON under ``$JETDET_STATIC_CACHE`` (default ``~/.cache/jetdet/static``), keyed by
the kernel's source hash (Triton's ``cache_key``, which covers called ``@jit`` functions), the spec, the
arch and the Triton version. ``JETDET_STATIC_CACHE=0`` disables it. Cache misses compile in forked worker
processes (``jobs``, ``$JETDET_STATIC_JOBS``, default: the CPU count up to 8); :class:`Progress` counts them
on stderr. Every compile passes ``enable_fp_fusion`` explicitly (:func:`fp_fusion_default`).

Command line: ``python -m jetdet.static_report [--module M] [--arch 80 --arch 90] [--only matmul]
[--no-cache] [--no-jit] [--jobs N] [--json]`` prints the table and exits 1 when there are violations (a module whose
``compile_specs()`` fails counts as one).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import types
from collections.abc import Iterable, Sequence

from . import _paths
from .ops import registry as _registry

_paths.install()

# one ``specs`` module per kernel folder: ``kernels/<op>/specs.py`` with ``compile_specs()``
#: Kernel folders that are not registered ops: ``noise`` is the generator behind ``jetdet.randn``.
UNREGISTERED_FOLDERS = ("noise",)
#: Every registered op folder (:data:`jetdet.ops.registry.FOLDERS`) and the unregistered ones.
KERNEL_MODULES = [f"jetdet.kernels.{f}.specs" for f in (*_registry.FOLDERS, *UNREGISTERED_FOLDERS)]

DEFAULT_ARCHS = (80, 89, 90)
#: The oldest Triton whose internals the report uses (the JIT binder's ``_pack_args``, ``triton.knobs``); the
#: kernels themselves also run on 3.3 and 3.4 (interpreter-checked), only this report needs 3.5.
MIN_TRITON = (3, 5)


def unsupported(version: str | None = None) -> str | None:
    """Why the report cannot run with the installed (or the given) Triton version, or None."""
    from .backend import _release

    if version is None:
        import triton

        version = triton.__version__
    if _release(version) < MIN_TRITON:
        return (
            f"the static report needs triton >= {'.'.join(map(str, MIN_TRITON))} (installed: {version}); "
            "the kernels themselves run on older versions"
        )
    return None

# Largest shared memory one block may use (opt-in maximum), bytes.
SHARED_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}

_REPORT_VERSION = 3  # bump when the row format or the SASS classification changes

_ATOMIC_OPS = {"ATOM", "ATOMG", "ATOMS", "RED", "REDG", "REDAS", "UTMAREDG", "UBLKRED"}
_FORBID = {
    "no_fma": ("ffma", "FFMA"),
    "no_mufu": ("mufu", "MUFU"),
    "no_tf32": ("tf32", "TF32 tensor-core"),
    "no_gather": ("narrow_loads", "8/16-bit global load"),
}
_NARROW = {".U8", ".S8", ".U16", ".S16"}
_BRA_RE = re.compile(r"\bBRA\b[^;]*?0x([0-9a-fA-F]+)")
_LAYOUT_RULES = {"no_gather"}  # depend on the strides a spec declares: not checked on JIT variants
_SASS_RE = re.compile(
    r"^\s*/\*(?P<addr>[0-9a-fA-F]{4,})\*/\s+(?:@!?U?P[0-9T]+\s+)?(?P<op>[A-Z][A-Z0-9_]*)(?P<mods>(?:\.[A-Za-z0-9_]+)*)"
)
_RES_RE = re.compile(r"Function\s+(\S+):\s*\n\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


# ------------------------------------------------------------------------------------------ spec collection


def collect_specs(modules: Iterable[str] | None = None, errors: list[dict] | None = None, *, jit: bool = True) -> list:
    """All ``compile_specs()`` of ``modules`` (default :data:`KERNEL_MODULES`), and with ``jit`` (default)
    each module's :func:`jit_variants`: its kernels compiled the way Triton's JIT specialises launches.

    Nothing is skipped: a module that cannot be imported (a renamed or missing kernel folder), has no
    ``compile_specs``, or whose ``compile_specs()`` fails or returns no spec raises, or, when ``errors`` is a
    list, is appended to it as an error row (``{"kernel": <module>, "arch": None, "error": ...}``), so a
    kernel module never silently leaves the report.
    """
    specs = []
    for name in KERNEL_MODULES if modules is None else modules:
        try:
            mod = importlib.import_module(name)
            fn = getattr(mod, "compile_specs", None)
            if fn is None:
                raise AttributeError(f"{name} has no compile_specs()")
            found = list(fn())
            if not found:
                raise ValueError(f"{name}.compile_specs() returned no spec")
            if jit:
                with compiling():
                    found += jit_variants(found)
            specs.extend(found)
        except Exception as e:
            if errors is None:
                raise
            errors.append(_error_row(name, None, e, deterministic=True, forbid=()))
    return specs


def _error_row(kernel: str, arch, e: BaseException, *, deterministic: bool, forbid) -> dict:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if len(lines) > 1:  # a CompilationError starts with "at 23:16:" and ends with the cause
        text = f"{text} ... {lines[-1]}"
    return {
        "kernel": kernel,
        "arch": arch,
        "deterministic": bool(deterministic),
        "forbid": list(forbid),
        "cached": False,
        "error": f"{type(e).__name__}: {text}",
    }


# ---------------------------------------------------------------------------- interpreter -> JITFunction


def _interp_types():
    from triton.runtime.jit import JITFunction

    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - very old/new triton
        InterpretedFunction = ()
    return JITFunction, InterpretedFunction


def _contains_interpreted(mod: types.ModuleType, interp_cls) -> bool:
    return any(isinstance(v, interp_cls) for v in vars(mod).values())


def as_jit_function(fn, _memo: dict | None = None):
    """A compilable ``JITFunction`` for ``fn`` (returned as is when it already is one).

    For an ``InterpretedFunction`` the original Python function is re-created with a copy of its globals in
    which interpreted callees, and modules holding them, are replaced by compilable equivalents.
    """
    JITFunction, interp_cls = _interp_types()
    if isinstance(fn, JITFunction):
        return fn
    if not interp_cls or not isinstance(fn, interp_cls):
        raise TypeError(f"expected a @triton.jit function, got {type(fn).__name__}")
    memo = {} if _memo is None else _memo
    if id(fn) in memo:
        return memo[id(fn)]
    raw = fn.fn
    new_globals = dict(raw.__globals__)
    new_fn = types.FunctionType(raw.__code__, new_globals, raw.__name__, raw.__defaults__, raw.__closure__)
    new_fn.__module__ = raw.__module__
    new_fn.__qualname__ = raw.__qualname__
    new_fn.__kwdefaults__ = raw.__kwdefaults__
    new_fn.__annotations__ = dict(raw.__annotations__)  # tl.constexpr parameters: the JIT's binder reads these
    allowed = set(inspect.signature(JITFunction.__init__).parameters) - {"self", "fn"}
    jit = JITFunction(new_fn, **{k: v for k, v in fn.kwargs.items() if k in allowed})
    memo[id(fn)] = jit
    for key, val in raw.__globals__.items():
        new_globals[key] = _convert_value(val, memo, interp_cls)
    return jit


def _convert_value(val, memo: dict, interp_cls):
    if isinstance(val, interp_cls):
        return as_jit_function(val, memo)
    if (
        isinstance(val, types.ModuleType)
        and not val.__name__.startswith("triton")
        and _contains_interpreted(val, interp_cls)
    ):
        key = ("module", id(val))
        if key not in memo:
            proxy = types.ModuleType(val.__name__, val.__doc__)
            memo[key] = proxy
            for k, v in vars(val).items():
                setattr(proxy, k, _convert_value(v, memo, interp_cls) if isinstance(v, interp_cls) else v)
        return memo[key]
    return val


# ------------------------------------------------------------------------------------------- compilation


def _tool(name: str) -> str:
    import triton

    try:
        path = getattr(triton.knobs.nvidia, name).path
        if path and os.path.isfile(path):
            return path
    except Exception:  # fall back to the bundled binary
        pass
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _resolve_signature(jit, spec) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ``ASTSource``: every argument in order, constexprs typed
    ``"constexpr"``, alignment hints as ``tt.divisibility`` attributes."""
    params = inspect.signature(jit.fn).parameters
    signature, constexprs, attrs = {}, {}, {}
    for i, (arg, param) in enumerate(params.items()):
        if arg in spec.signature and spec.signature[arg] != "constexpr":
            ty, _, hint = spec.signature[arg].partition(":")
            signature[arg] = ty
            div = int(hint) if hint else (16 if ty.startswith("*") else 1)
            if div >= 16 and div % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
            continue
        if arg in spec.constexprs:
            value = spec.constexprs[arg]
        elif param.default is not inspect.Parameter.empty:
            value = param.default
        else:
            raise ValueError(f"{spec.name}: argument {arg!r} has neither a signature type nor a constexpr value")
        signature[arg] = "constexpr"
        constexprs[arg] = value
    unknown = (set(spec.signature) | set(spec.constexprs)) - set(params)
    if unknown:
        raise ValueError(f"{spec.name}: {sorted(unknown)} are not arguments of {jit.fn.__name__}")
    return signature, constexprs, attrs


# ------------------------------------------------------------------------------------- JIT specialisation

#: Integer values a launch is modelled with. Triton's JIT turns an int argument equal to 1 into a compile-time
#: constant and marks 0 and multiples of 16 as divisible by 16 (which changes vectorisation); 17 stands for
#: every other value and goes with misaligned pointers.
JIT_INT_VALUES = (0, 1, 16, 17)
#: The arch the JIT variants are compiled for (the H100/H200 class, where a specialisation failure was seen).
JIT_ARCH = 90

_TORCH_DTYPES = {
    "fp32": "float32",
    "fp16": "float16",
    "bf16": "bfloat16",
    "fp64": "float64",
    "i8": "int8",
    "i16": "int16",
    "i32": "int32",
    "i64": "int64",
    "u8": "uint8",
    "i1": "bool",
    "u1": "bool",
}


class Pointer:
    """A tensor argument as Triton's launcher sees it: ``dtype`` and ``data_ptr()``, ``offset`` bytes past a
    256-byte aligned address (0: aligned like a fresh torch allocation; else a view into one)."""

    def __init__(self, dtype, offset: int = 0):
        self.dtype = dtype
        self.offset = int(offset)

    def data_ptr(self) -> int:
        return (1 << 32) + self.offset

    def __repr__(self) -> str:
        return f"Pointer({self.dtype}, offset={self.offset})"


def _pointer(ty: str, aligned: bool) -> Pointer:
    import torch

    name = _TORCH_DTYPES.get(ty[1:])
    if name is None:
        raise ValueError(f"pointer type {ty!r}: expected one of *{', *'.join(sorted(_TORCH_DTYPES))}")
    dtype = getattr(torch, name)
    return Pointer(dtype, 0 if aligned else torch.empty((), dtype=dtype).element_size())


_DESC_RE = re.compile(r"^tensordesc<(\w+)\[([\d, ]+)\]>$")


def _descriptor(ty: str):
    """A host tensor descriptor standing in for a ``"tensordesc<fp16[128, 64]>"`` argument: the JIT's
    signature depends only on its dtype and block shape (the shape and strides are runtime values)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    m = _DESC_RE.match(ty.replace(" ", "").replace(",", ", "))
    if m is None:
        raise ValueError(f"descriptor type {ty!r}: expected 'tensordesc<dtype[d0, d1, ...]>'")
    block = [int(x) for x in m.group(2).split(",")]
    base = _pointer("*" + m.group(1), True)
    rank = len(block)
    return TensorDescriptor(base, [16] * rank, [16] * (rank - 1) + [1], block)


def _is_int_type(ty: str) -> bool:
    return ty[:1] in ("i", "u") and ty[1:].isdigit() and ty not in ("i1", "u1")


def launch_values(spec, ints: int | None = None) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a launch ``spec.fn[grid](*args, **kwargs)`` that ``spec`` stands for.

    ``ints=None``: the spec's declared classes (``"i32:16"`` -> 16, ``"i32"`` -> 17, an int argument listed as
    ``"constexpr"`` -> its value; pointers 16-byte aligned unless ``":1"``). ``ints=v``: every integer
    argument is ``v``, also those the spec lists as ``"constexpr"``; pointers are misaligned when ``v`` is
    none of 0, 1 or a multiple of 16 (the "any other value" class). Floats are 0.5, constexpr parameters
    come from ``spec.constexprs`` (or their defaults), options (``num_warps``...) are passed as at a launch.
    """
    jit = as_jit_function(spec.fn, _STATE["memo"])
    other = ints is not None and ints not in (0, 1) and ints % 16 != 0
    kwargs = {}
    for p in jit.params:
        name = p.name
        declared = spec.signature.get(name)
        if p.is_constexpr:
            if name in spec.constexprs:
                kwargs[name] = spec.constexprs[name]
            elif not p.has_default:
                raise ValueError(f"{spec.name}: constexpr {name!r} has no value in constexprs")
            continue
        if declared is None:
            if name in spec.constexprs:
                declared = "constexpr"
            elif p.has_default:
                continue
            else:
                raise ValueError(f"{spec.name}: argument {name!r} has neither a signature type nor a constexpr value")
        ty, _, hint = declared.partition(":")
        if ty == "constexpr":  # an int the JIT specialises (== 1)
            if name not in spec.constexprs:
                raise ValueError(f"{spec.name}: {name!r} is listed as constexpr but has no value in constexprs")
            kwargs[name] = spec.constexprs[name] if ints is None else ints
        elif ty.startswith("*"):
            aligned = not other if ints is not None else hint != "1"
            kwargs[name] = _pointer(ty, aligned)
        elif ty.startswith("tensordesc<"):
            kwargs[name] = _descriptor(declared)  # always aligned: the host refuses to make a misaligned one
        elif _is_int_type(ty):
            if ints is not None:
                kwargs[name] = ints
            else:
                div = int(hint) if hint else 1
                base = 1 << 32 if ty.endswith("64") else 0
                kwargs[name] = base + (16 if div % 16 == 0 else 17)
        elif ty in ("fp16", "bf16", "fp32", "fp64"):
            kwargs[name] = 0.5
        elif ty in ("i1", "u1"):
            kwargs[name] = True
        else:
            raise ValueError(f"{spec.name}: argument {name!r} has type {ty!r}, which launch_values cannot model")
    unknown = (set(spec.signature) | set(spec.constexprs)) - {p.name for p in jit.params}
    if unknown:
        raise ValueError(f"{spec.name}: {sorted(unknown)} are not arguments of {jit.fn.__name__}")
    kwargs.update(spec.options)
    return (), kwargs


def _bind(fn, args, kwargs, arch: int):
    """Triton's own launch-time binding (what ``JITFunction.run`` does before it compiles), with the CUDA
    backend of ``sm_<arch>``: ``(specialization, signature, constexprs, attrs, options)``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime import jit as triton_jit

    jit = as_jit_function(fn, _STATE["memo"])
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = dict(kwargs)
    kwargs.setdefault("debug", jit.debug or triton.knobs.runtime.debug)  # as JITFunction.run
    kwargs.setdefault("enable_fp_fusion", fp_fusion_default())  # explicit: see fp_fusion_default
    binder = triton_jit.create_function_from_signature(jit.signature, jit.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    return specialization, signature, constexprs, attrs, options


def jit_specialization(fn, args=(), kwargs=None, arch: int = JIT_ARCH) -> tuple[dict, dict, dict, dict]:
    """What Triton's JIT compiles for the launch ``fn[grid](*args, **kwargs)`` on ``sm_<arch>``:
    ``(signature, constexprs, attrs, options)``, from Triton's own binder
    (``triton.runtime.jit.create_function_from_signature`` and ``JITFunction._pack_args``, the code
    ``JITFunction.run`` calls), so it follows the installed Triton's rules. No GPU is needed: the binder reads
    only Python values and, of tensors, ``data_ptr()`` and ``dtype`` (see :class:`Pointer`)."""
    _, signature, constexprs, attrs, options = _bind(fn, args, kwargs or {}, arch)
    return signature, constexprs, attrs, dict(options.__dict__)


def specialization_key(fn, args=(), kwargs=None, arch: int = JIT_ARCH) -> str:
    """The part of the JIT's cache key that the argument values decide (types, constants, alignment)."""
    return repr(_bind(fn, args, kwargs or {}, arch)[0])


def _stand_in(value):
    """A launch argument as the cache key and the binder need it: a tensor becomes a :class:`Pointer` with the
    same dtype and 16-byte alignment class; anything else is kept."""
    if hasattr(value, "data_ptr") and hasattr(value, "dtype") and not isinstance(value, Pointer):
        return Pointer(value.dtype, value.data_ptr() % 16)
    base = getattr(value, "base", None)
    if dataclasses.is_dataclass(value) and hasattr(base, "data_ptr") and not isinstance(base, Pointer):
        return dataclasses.replace(value, base=_stand_in(base), shape=list(value.shape), strides=list(value.strides))
    return value


def launch_spec(kernel, args, kwargs, *, name: str | None = None, arch: int = JIT_ARCH, deterministic=True, forbid=()):
    """A spec for one real launch ``kernel[grid](*args, **kwargs)`` (e.g. recorded by
    :func:`capture_launches`), compiled from Triton's binder on those values for ``sm_<arch>``."""
    from jetdet.kernels._common import CompileSpec

    args = tuple(_stand_in(a) for a in args)
    kwargs = {k: _stand_in(v) for k, v in kwargs.items()}
    fn = getattr(kernel, "fn", kernel)
    return CompileSpec(
        name=name or f"{fn.__name__} launch",
        fn=kernel,
        signature={},
        constexprs={},
        deterministic=deterministic,
        archs=(arch,),
        forbid=tuple(forbid),
        launch=(args, kwargs),
        jit_class="launch",
    )


def all_kernels() -> list:
    """Every ``@triton.jit`` kernel of jetdet: the kernel modules of :data:`KERNEL_MODULES` are imported first."""
    for name in KERNEL_MODULES:
        importlib.import_module(name)
    return _loaded_kernels()


def _loaded_kernels() -> list:
    from triton.runtime.jit import KernelInterface

    found = []
    for mod_name, mod in list(sys.modules.items()):
        # kernel.py, and kernel_tma.py (matmul's persistent TMA kernel)
        leaf = mod_name.rsplit(".", 1)[-1]
        if mod is None or not (mod_name.startswith("jetdet.kernels.") and leaf.startswith("kernel")):
            continue
        found += [v for v in vars(mod).values() if isinstance(v, KernelInterface) and v not in found]
    return found


@contextlib.contextmanager
def stub_launches(on_launch):
    """Inside, no jetdet kernel (:func:`all_kernels`) runs: each launch ``kernel[grid](*args, **kwargs)`` calls
    ``on_launch(kernel, args, kwargs, grid)`` instead (``kwargs`` without ``grid`` and ``warmup``). Outputs are
    left as allocated. For timing the host side of a call and for recording launch arguments."""
    kernels = all_kernels()
    for k in kernels:
        def run(*args, _k=k, grid=None, warmup=False, **kwargs):
            on_launch(_k, args, kwargs, grid)

        k.run = run
    try:
        yield
    finally:
        for k in kernels:
            vars(k).pop("run", None)


@contextlib.contextmanager
def capture_launches(kernels: Iterable | None = None):
    """Record every launch ``kernel[grid](*args, **kwargs)`` of ``kernels`` (default: every ``@triton.jit``
    kernel of the loaded ``jetdet.kernels.*.kernel`` modules) made inside the block, as ``(kernel, args,
    kwargs)`` in the yielded list. The launches still run (on a GPU, or in the interpreter)."""
    log: list = []
    patched = []
    for kernel in list(kernels) if kernels is not None else _loaded_kernels():
        if "run" in vars(kernel):
            continue  # already recorded by an outer capture

        def run(*args, _kernel=kernel, _orig=kernel.run, **kwargs):
            launch_kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
            log.append((_kernel, args, launch_kwargs))
            return _orig(*args, **kwargs)

        kernel.run = run
        patched.append(kernel)
    try:
        yield log
    finally:
        for kernel in patched:
            vars(kernel).pop("run", None)


def declared_vs_jit(spec, arch: int = JIT_ARCH) -> list[str]:
    """Where ``spec``'s declared signature differs from what Triton's JIT binder makes of the launch it
    stands for (:func:`launch_values`); empty when the spec language models that launch faithfully (e.g. an
    argument declared ``"constexpr"`` with a value other than 1 is not what the JIT would compile)."""
    jit = as_jit_function(spec.fn, _STATE["memo"])
    sig, consts, attrs = _resolve_signature(jit, spec)
    jsig, jconsts, jattrs, _ = jit_specialization(jit, *launch_values(spec), arch=arch)
    names = [p.name for p in jit.params]

    def by_name(d: dict, drop_empty: bool = False) -> dict:
        out = {(names[k[0]] if isinstance(k, tuple) else k): v for k, v in d.items()}
        return {k: v for k, v in out.items() if v or not drop_empty}

    diffs = []
    for what, mine, theirs in (
        ("type", sig, jsig),
        ("constexpr", by_name(consts), by_name(jconsts)),
        ("attrs", by_name(attrs, True), by_name(jattrs, True)),
    ):
        for name in names:
            if name in mine or name in theirs:
                a, b = mine.get(name), theirs.get(name)
                if a != b or type(a) is not type(b):
                    diffs.append(f"{spec.name}: {name} {what}: declared {a!r}, JIT {b!r}")
    return diffs


def _group_key(spec) -> tuple:
    """Kernel function, pointer types, non-integer constexprs (flags such as ``HAS_BIAS``) and options other
    than ``num_warps``/``num_stages``: specs that differ only in tile sizes and warps share a key."""
    ptrs = tuple(sorted((k, v) for k, v in spec.signature.items() if v.startswith("*")))
    flags = tuple(
        sorted((k, repr(v)) for k, v in spec.constexprs.items() if not isinstance(v, int) or isinstance(v, bool))
    )
    opts = tuple(sorted((k, repr(v)) for k, v in spec.options.items() if k not in ("num_warps", "num_stages")))
    return (getattr(spec.fn, "fn", spec.fn), ptrs, flags, opts)


def quick_specs(specs: Iterable, arch: int = JIT_ARCH, *, jit: bool = False) -> list:
    """A representative subset of ``specs`` for a fast report (``python -m jetdet.bench`` by default): per
    kernel function, pointer types, flag combination and non-tile options (the grouping of
    :func:`jit_variants`), the first declared spec that runs on ``arch``, restricted to ``arch`` (a group with
    no spec for ``arch``: its first spec, on its newest arch); with ``jit`` also every JIT variant in ``specs``
    (each is compiled for one arch already). Every kernel function and dtype is compiled once, so a kernel
    that no longer compiles, gains an atomic, or uses a forbidden class fails here too; tile-size effects
    (spills, shared memory) and the other archs need the full report. The cache keys are the full report's,
    so the subset's results serve it too."""
    groups: dict = {}
    variants = []
    for spec in specs:
        if spec.launch is not None:
            variants.append(spec)
        else:
            groups.setdefault(_group_key(spec), []).append(spec)
    out = []
    for members in groups.values():
        rep = next((s for s in members if arch in tuple(s.archs)), None)
        if rep is None:  # a group shipped for other archs only: its first spec on the newest of them
            rep = members[0]
        out.append(dataclasses.replace(rep, archs=(arch if arch in tuple(rep.archs) else max(rep.archs),)))
    return out + (variants if jit else [])


def jit_variants(specs: Iterable, arch: int = JIT_ARCH, values: Sequence[int] = JIT_INT_VALUES) -> list:
    """Specs compiled the way Triton's JIT specialises real launches, one per specialisation class.

    ``specs`` are grouped by kernel function, pointer types, non-integer constexprs (flags such as
    ``HAS_BIAS``) and options other than ``num_warps``/``num_stages``; tile sizes do not change which
    arguments the JIT specialises. For one spec per group (the first that runs on ``arch``) a launch with
    every integer argument equal to each of ``values`` is bound by Triton's binder (:func:`launch_values`,
    :func:`specialization_key`). Every distinct specialisation that differs from the declared spec's becomes
    a spec named ``"<name> jit[ints=<values>]"`` for ``arch`` only, compiled from the binder's signature, so
    a kernel that only compiles with its declared types (a seed of 1 turned into a Python int, say) fails
    the report here, on CPU."""
    groups: dict = {}
    for spec in specs:
        if spec.launch is None:
            groups.setdefault(_group_key(spec), []).append(spec)
    out = []
    for members in groups.values():
        rep = next((s for s in members if arch in tuple(s.archs)), members[0])
        target = arch if arch in tuple(rep.archs) else max(rep.archs)
        seen = {specialization_key(rep.fn, *launch_values(rep), arch=target)}
        classes: dict[str, tuple[list, tuple]] = {}
        for v in values:
            launch = launch_values(rep, v)
            key = specialization_key(rep.fn, *launch, arch=target)
            if key in seen and key not in classes:
                continue
            classes.setdefault(key, ([], launch))[0].append(v)
        for vals, launch in classes.values():
            label = "ints=" + ",".join(str(v) for v in vals)
            name = f"{rep.name} jit[{label}]"
            # every int argument at one value is no real layout (all strides 16, say), so the rules about how
            # a layout is read do not apply; compiling, atomics and spills do
            forbid = tuple(f for f in rep.forbid if f not in _LAYOUT_RULES)
            out.append(dataclasses.replace(rep, name=name, archs=(target,), launch=launch, jit_class=label,
                                           forbid=forbid))
    return out


def _cache_dir() -> str | None:
    env = os.environ.get("JETDET_STATIC_CACHE")
    if env == "0":
        return None
    return env or os.path.join(os.path.expanduser("~"), ".cache", "jetdet", "static")


def _cache_key(jit, spec, arch: int) -> str:
    import triton

    blob = json.dumps(
        {
            "v": _REPORT_VERSION,
            "triton": triton.__version__,
            "src": jit.cache_key,
            "fn": jit.fn.__qualname__,
            "signature": spec.signature,
            "constexprs": {k: repr(v) for k, v in spec.constexprs.items()},
            "options": {k: repr(v) for k, v in sorted(spec.options.items())},
            "arch": arch,
            "fp_fusion": os.environ.get("TRITON_DEFAULT_FP_FUSION", ""),
            **(
                {"force_no_fp_fusion": os.environ["TRITON_FORCE_DISABLE_FP_FUSION"]}
                if os.environ.get("TRITON_FORCE_DISABLE_FP_FUSION")
                else {}
            ),
            # a JIT variant: the binder's specialisation (it depends on do_not_specialize, not on the source)
            **(
                {"launch": repr(spec.launch), "jit": specialization_key(jit, *spec.launch, arch=arch)}
                if spec.launch is not None
                else {}
            ),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


_STATE: dict = {"depth": 0, "memo": None}
_DEPTH_LOCK = threading.Lock()


def _wrapped_interpreted(val, interp_cls):
    """The InterpretedFunction behind a ``tl.tensor`` member wrapper (``x.sum()``), else None."""
    for cell in getattr(val, "__closure__", None) or ():
        try:
            content = cell.cell_contents
        except ValueError:
            continue
        if isinstance(content, interp_cls):
            return content
    return None


def _made_by_interpreter(val, interp_module: str) -> bool:
    fn = val.func if isinstance(val, functools.partial) else val
    return isinstance(fn, types.FunctionType) and fn.__module__ == interp_module


def _interpreter_leftovers() -> list[tuple[types.ModuleType, str, object]]:
    """``(module, name, pristine value)`` for each ``triton.language`` module attribute that Triton's interpreter
    replaced and never put back.

    ``InterpretedFunction.__call__`` (a ``@jit`` helper called from a running kernel, e.g. ``tl.max`` or
    ``tl.sum``, whose module sees ``triton.language.core``) patches the modules the helper sees and drops the
    scope that would restore them (triton 3.9). After the interpreter has run such a kernel,
    ``triton.language.core.reduce`` and the ``core`` builtins are the interpreter's versions, and compiling any
    kernel that calls ``tl.max`` fails (``'value' object has no attribute 'dtype'``). The pristine value is the
    builtin the interpreter wrapped, else the same name in the ``triton.language`` package (which the running
    kernel's own scope did restore)."""
    import builtins

    import triton.language as tl

    interp = "triton.runtime.interpreter"
    if interp not in sys.modules:
        return []
    found = []
    for mod_name in sorted(m for m in sys.modules if m == "triton.language" or m.startswith("triton.language.")):
        mod = sys.modules.get(mod_name)
        if mod is None:
            continue
        for name, val in list(vars(mod).items()):
            if not (_made_by_interpreter(val, interp) or (name == "static_print" and val is builtins.print)):
                continue
            member = (getattr(val, "__kwdefaults__", None) or {}).get("member")
            pristine = member if member is not None else getattr(tl, name, None)
            if pristine is None or _made_by_interpreter(pristine, interp) or pristine is builtins.print:
                continue
            found.append((mod, name, pristine))
    return found


@contextlib.contextmanager
def compiling():
    """Context in which Triton compiles for a GPU target even when the interpreter is on.

    * ``triton.compiler.code_generator`` is imported first: importing it imports gluon, which asserts at
      import time that ``triton.language``'s functions are JITFunctions unless the interpreter is on.
    * With the interpreter on, every ``@jit`` function in the loaded ``triton.language`` modules
      (``tl.cdiv``, ``tl.sum``, ``tl.randn``, ...), and the ``tl.tensor`` member wrappers that forward to them,
      are swapped for JITFunctions, and restored on exit.
    * ``triton.knobs.runtime.interpret`` is off inside, so ``constexpr_function`` results are constexprs.
    * ``triton.language`` attributes the interpreter patched and left patched (:func:`_interpreter_leftovers`)
      are their pristine values inside, so a kernel compiles the same whether or not the interpreter has run
      kernels in this process before (the test suite runs them first).

    Re-entrant; kernels converted with :func:`as_jit_function` inside share one memo. Threads may enter it while
    one thread holds it (the outermost entry does the swaps and undoes them, its environment included): compiles
    on a thread pool run inside a ``compiling()`` of the thread that waits for them (``bench/compile_threads.py``).
    """
    import triton
    import triton.compiler.code_generator  # noqa: F401 - see above

    with _DEPTH_LOCK:
        nested = _STATE["depth"] > 0
        if nested:
            _STATE["depth"] += 1
    if nested:
        try:
            yield
        finally:
            with _DEPTH_LOCK:
                _STATE["depth"] -= 1
        return
    _, interp_cls = _interp_types()
    memo: dict = {}
    patches = []
    try:
        for mod, attr, pristine in _interpreter_leftovers():
            patches.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, pristine)
        if interp_cls:
            for name in [m for m in list(sys.modules) if m == "triton.language" or m.startswith("triton.language.")]:
                mod = sys.modules.get(name)
                if mod is None:
                    continue
                for attr, val in list(vars(mod).items()):
                    if isinstance(val, interp_cls):
                        patches.append((mod, attr, val))
                        setattr(mod, attr, as_jit_function(val, memo))
            tensor = triton.language.core.tensor
            for attr, val in list(vars(tensor).items()):
                fn = _wrapped_interpreted(val, interp_cls)
                if fn is not None:
                    patches.append((tensor, attr, val))
                    setattr(tensor, attr, as_jit_function(fn, memo))
        _STATE.update(depth=1, memo=memo)
        with triton.knobs.runtime.scope():
            triton.knobs.runtime.interpret = False
            yield
    finally:
        _STATE.update(depth=0, memo=None)
        for obj, attr, val in reversed(patches):
            setattr(obj, attr, val)


def fp_fusion_default() -> bool:
    """``enable_fp_fusion`` for a spec that does not name it: ``jetdet.kernels._common.FP_FUSION``, the value
    every such kernel's launch passes explicitly, so the report compiles what the launches run whatever Triton's
    own default (on in 3.9, off from 3.10). Every compile here passes the value explicitly: Triton 3.9 warns once
    per process when a compile leaves it to the default (``TRITON_DEFAULT_FP_FUSION is unset ...``), and the
    report's forked workers each printed that warning. ``$TRITON_FORCE_DISABLE_FP_FUSION`` still wins inside
    Triton."""
    _paths.install()
    from jetdet.kernels._common import FP_FUSION

    return FP_FUSION


def _compile(jit, spec, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    with compiling():
        if spec.launch is not None:
            signature, constexprs, attrs, options = jit_specialization(jit, *spec.launch, arch=arch)
        else:
            signature, constexprs, attrs = _resolve_signature(jit, spec)
            options = dict(spec.options)
            options.setdefault("enable_fp_fusion", fp_fusion_default())  # explicit: see fp_fusion_default
        src = ASTSource(jit, signature, constexprs, attrs)
        return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _parse_resources(text: str) -> dict:
    rows = _RES_RE.findall(text)
    if not rows:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{text}")
    _, reg, stack, shared, local = rows[0]
    return {"regs": int(reg), "stack": int(stack), "static_shared": int(shared), "local": int(local)}


def count_sass(sass: str) -> dict:
    """Instruction-class counts of a ``cuobjdump -sass`` listing. ``narrow_loads`` counts the 8/16-bit global
    loads inside a loop (between a backward branch and its target): an epilogue's one load per thread (a bias, say)
    is not a gather."""
    counts = {"hmma": 0, "hgmma": 0, "tf32": 0, "atomics": 0, "mufu": 0, "ffma": 0, "narrow_loads": 0,
              "instructions": 0}
    narrow, loops = [], []
    for line in sass.splitlines():
        m = _SASS_RE.match(line)
        if not m:
            continue
        op, mods, addr = m["op"], m["mods"], int(m["addr"], 16)
        counts["instructions"] += 1
        if op == "BRA":
            b = _BRA_RE.search(line)
            if b and int(b.group(1), 16) < addr:
                loops.append((int(b.group(1), 16), addr))
        elif op == "LDG" and not _NARROW.isdisjoint(mods.replace(".", " .").split()):
            narrow.append(addr)
        if op == "HMMA":
            counts["hmma"] += 1
        elif op == "HGMMA":
            counts["hgmma"] += 1
        if op in ("HMMA", "HGMMA") and ".TF32" in mods:
            counts["tf32"] += 1
        if op in _ATOMIC_OPS:
            counts["atomics"] += 1
        elif op == "MUFU":
            counts["mufu"] += 1
        elif op == "FFMA":
            counts["ffma"] += 1
    counts["narrow_loads"] = sum(any(lo <= a <= hi for lo, hi in loops) for a in narrow)
    return counts


def _text_sections(cubin: bytes) -> bytes:
    """The instruction bytes of a cubin: its ``.text.<function>`` sections (64-bit little-endian ELF), in
    section order, which is what ``cuobjdump -sass`` disassembles."""
    import struct

    if cubin[:4] != b"\x7fELF" or cubin[4] != 2 or cubin[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF")
    shoff = struct.unpack_from("<Q", cubin, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", cubin, shoff + i * shentsize) for i in range(shnum)]
    names_at = sections[shstrndx][4]
    out = b""
    for name, _type, _flags, _addr, offset, size in sections:
        start = names_at + name
        if cubin[start : cubin.index(b"\0", start)].startswith(b".text."):
            if size % 16:
                raise ValueError(f"a .text section of {size} bytes is not whole 128-bit instructions")
            out += cubin[offset : offset + size]
    if not out:
        raise ValueError("no .text section")
    return out


_ADDR_RE = re.compile(r"^\s*/\*([0-9a-fA-F]{4,})\*/")


def _sass_batch(cubins: Sequence[bytes], arch: int) -> list[str]:
    """SASS listings of several cubins for ``sm_<arch>`` from one ``nvdisasm`` run over their concatenated
    instructions, split back by address. Starting the disassembler costs ~0.7 s of CPU whatever the size, as
    much as compiling a small kernel, so the report disassembles its compiles in batches instead of running
    ``cuobjdump -sass`` once per kernel; the listing lines (and so :func:`count_sass`) are the same."""
    texts = [_text_sections(c) for c in cubins]
    bounds, at = [], 0
    for t in texts:
        bounds.append(at + len(t))
        at += len(t)
    with tempfile.TemporaryDirectory(prefix="jetdet-static-") as tmp:
        path = os.path.join(tmp, "text.bin")
        with open(path, "wb") as f:
            f.write(b"".join(texts))
        sm = f"SM{arch}{'a' if arch >= 90 else ''}"  # Triton compiles sm_90 and newer as sm_XXa
        listing = subprocess.run(
            [_tool("nvdisasm"), "--binary", sm, path], capture_output=True, text=True, check=True
        ).stdout
    out: list[list[str]] = [[] for _ in texts]
    k = 0
    for line in listing.splitlines():
        m = _ADDR_RE.match(line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        while k < len(bounds) and addr >= bounds[k]:
            k += 1
        if k == len(bounds):
            raise RuntimeError(f"nvdisasm listed address {addr:#x} past the {at} bytes it was given")
        out[k].append(line)
    return ["\n".join(lines) for lines in out]


def _measure_many(kernels: Sequence, arch: int) -> list[dict]:
    """:func:`_measure` for several kernels of one arch, disassembled together (:func:`_sass_batch`); if the
    batch cannot be read that way, each kernel gets its own ``cuobjdump -sass``."""
    cubins = [k.asm["cubin"] for k in kernels]
    try:
        listings = _sass_batch(cubins, arch)
    except (ValueError, RuntimeError, OSError, subprocess.CalledProcessError):
        listings = [None] * len(cubins)
    rows = []
    with tempfile.TemporaryDirectory(prefix="jetdet-static-") as tmp:
        cuobjdump = _tool("cuobjdump")
        for i, (kernel, cubin, sass) in enumerate(zip(kernels, cubins, listings)):
            path = os.path.join(tmp, f"kernel{i}.cubin")
            with open(path, "wb") as f:
                f.write(cubin)
            res = subprocess.run(
                [cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True, check=True
            ).stdout
            if sass is None:
                sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout
            row = _parse_resources(res)
            row.update(count_sass(sass))
            row["dynamic_shared"] = int(getattr(kernel.metadata, "shared", 0) or 0)
            row["shared"] = row["static_shared"] + row["dynamic_shared"]
            rows.append(row)
    return rows


def _measure(kernel, arch: int) -> dict:
    return _measure_many([kernel], arch)[0]


def _store(path: str, measured: dict) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(measured, f)
        os.replace(tmp, path)
    except OSError:
        pass


def _row(spec, arch: int, measured: dict, cached: bool) -> dict:
    return {
        "kernel": spec.name,
        "arch": arch,
        **measured,
        "deterministic": bool(spec.deterministic),
        "forbid": list(spec.forbid),
        "cached": cached,
        "error": None,
    }


def _cache_path(spec, arch: int, use_cache: bool) -> str | None:
    cache = _cache_dir() if use_cache else None
    if not cache:
        return None
    jit = as_jit_function(spec.fn, _STATE["memo"])
    return os.path.join(cache, f"{_cache_key(jit, spec, arch)}.json")


def _load_cached(path: str | None) -> dict | None:
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _measure_spec(spec, arch: int) -> dict:
    return _measure(_compile(as_jit_function(spec.fn, _STATE["memo"]), spec, arch), arch)


def analyze(spec, arch: int, *, use_cache: bool = True) -> dict:
    """Compile ``spec`` for ``sm_<arch>`` and return its report row (see the module docstring).

    Raises on compile errors; :func:`report` turns those into rows with an ``error``.
    """
    with compiling():
        path = _cache_path(spec, arch, use_cache)
        measured = _load_cached(path)
        cached = measured is not None
        if measured is None:
            measured = _measure_spec(spec, arch)
            if path:
                _store(path, measured)
    return _row(spec, arch, measured, cached)


# Work list of a parallel report; forked workers inherit it (specs hold functions, which do not pickle).
_FORK_TASKS: list = []
#: Compiles per work item: one item is disassembled in one batch (:func:`_sass_batch`); one nvdisasm start per 32
#: kernels (0.020 s per kernel to read, against 0.043 s in batches of 8; README, "Static kernel report").
CHUNK = 32


def _run_chunk(tasks: Sequence[tuple[int, object, int]]) -> list[tuple[int, dict | None, dict | None]]:
    """Compile ``(index, spec, arch)`` tasks (one arch), measure them together: ``(index, measured, error
    row)`` each."""
    out, compiled = [], []
    with compiling():
        for index, spec, arch in tasks:
            try:
                compiled.append((index, spec, arch, _compile(as_jit_function(spec.fn, _STATE["memo"]), spec, arch)))
            except Exception as e:  # a failed compile is a reported violation
                out.append((index, None, _error_row(spec.name, arch, e, deterministic=spec.deterministic,
                                                    forbid=spec.forbid)))  # fmt: skip
        if compiled:
            try:
                measured = _measure_many([c[3] for c in compiled], compiled[0][2])
            except Exception as e:
                out += [(i, None, _error_row(s.name, a, e, deterministic=s.deterministic, forbid=s.forbid))
                        for i, s, a, _ in compiled]  # fmt: skip
            else:
                out += [(i, m, None) for (i, _, _, _), m in zip(compiled, measured)]
    return out


def _fork_worker(chunk: int):
    return _run_chunk(_FORK_TASKS[chunk])


def default_jobs() -> int:
    """``$JETDET_STATIC_JOBS``, else the CPU count (at most 8)."""
    env = os.environ.get("JETDET_STATIC_JOBS")
    if env:
        return max(1, int(env))
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def pairs(specs: Iterable, archs: Iterable[int] = DEFAULT_ARCHS, only: str | Iterable[str] | None = None) -> list:
    """The ``(spec, arch)`` pairs :func:`report` compiles, in the order of its rows (after any module error
    rows): every spec whose name contains ``only`` (a substring, or any of several), for every arch in both
    ``archs`` and ``spec.archs``."""
    if isinstance(only, str):
        only = (only,)
    archs = tuple(archs)
    return [
        (spec, arch)
        for spec in specs
        if only is None or any(o in spec.name for o in only)
        for arch in archs
        if arch in tuple(spec.archs)
    ]


class Progress:
    """A progress counter for :func:`report` on ``stream`` (default stderr): ``label: 12/67 compiled, 3
    cached, 0:41``. On a terminal the line is rewritten after every compile; elsewhere (CI logs, a pipe) a
    line is printed at every tenth of the work, so a long report is never silent. Nothing is printed when
    everything was cached."""

    def __init__(self, label: str = "static report", stream=None):
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.total = self.done = self.cached = 0
        self._start = 0.0
        self._printed = -1
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def start(self, total: int, cached: int = 0) -> None:
        import time

        self.total, self.done, self.cached = total, 0, cached
        self._start = time.monotonic()
        self._printed = -1
        self._show()

    def step(self, n: int = 1) -> None:
        self.done += n
        self._show()

    def _show(self) -> None:
        import time

        if not self.total:
            return
        tenth = self.done * 10 // self.total
        if not self._tty and tenth == self._printed:
            return
        self._printed = tenth
        took = int(time.monotonic() - self._start)
        text = (
            f"{self.label}: {self.done}/{self.total} compiled"
            f"{f', {self.cached} cached' if self.cached else ''}, {took // 60}:{took % 60:02d}"
        )
        end = "\n" if not self._tty or self.done >= self.total else ""
        self.stream.write(("\r" if self._tty else "") + text + end)
        self.stream.flush()


def report(
    specs: Sequence | None = None,
    archs: Iterable[int] = DEFAULT_ARCHS,
    only: str | Iterable[str] | None = None,
    *,
    use_cache: bool = True,
    jobs: int | None = None,
    progress: Progress | None = None,
) -> list[dict]:
    """Rows for every spec and every arch in both ``archs`` and ``spec.archs`` (:func:`pairs`). ``only``: keep
    specs whose name contains this substring (or any of these). With ``specs=None`` the specs of all
    :data:`KERNEL_MODULES` are collected, and a module whose ``compile_specs()`` fails becomes an error
    row (``arch`` None), which :func:`violations` reports.

    Cache misses compile in ``jobs`` forked processes (default :func:`default_jobs`; 1 = in this process;
    platforms without ``fork`` always compile here). ``progress`` (a :class:`Progress`) counts the misses as
    they finish."""
    import multiprocessing

    rows: list[dict] = []
    if specs is None:
        specs = collect_specs(errors=rows)
    tasks = pairs(specs, archs, only)
    results: list[dict | None] = [None] * len(tasks)
    with compiling():
        misses = []
        for i, (spec, arch) in enumerate(tasks):
            try:
                path = _cache_path(spec, arch, use_cache)
            except Exception as e:  # e.g. not a @triton.jit function
                results[i] = _error_row(spec.name, arch, e, deterministic=spec.deterministic, forbid=spec.forbid)
                continue
            measured = _load_cached(path)
            if measured is not None:
                results[i] = _row(spec, arch, measured, True)
            else:
                misses.append((i, path))
        jobs = default_jobs() if jobs is None else max(1, jobs)
        fork_ok = "fork" in multiprocessing.get_all_start_methods()
        if progress is not None:
            progress.start(len(misses), cached=len(tasks) - len(misses))

        def take(k, measured, err):  # stored as each batch finishes: an interrupted cold run keeps its work
            i, path = misses[k]
            spec, arch = tasks[i]
            if progress is not None:
                progress.step()
            if err is not None:
                results[i] = err
                return
            if path:
                _store(path, measured)
            results[i] = _row(spec, arch, measured, False)

        by_arch: dict[int, list] = {}
        for k, (i, _) in enumerate(misses):
            spec, arch = tasks[i]
            by_arch.setdefault(arch, []).append((k, spec, arch))
        chunks = [group[c : c + CHUNK] for group in by_arch.values() for c in range(0, len(group), CHUNK)]
        if jobs > 1 and len(misses) > 1 and fork_ok:
            import concurrent.futures

            if len(chunks) < jobs:  # few compiles: smaller batches, so every worker gets some
                size = -(-len(misses) // jobs)
                chunks = [g[c : c + size] for g in by_arch.values() for c in range(0, len(g), size)]
            _FORK_TASKS[:] = chunks
            try:
                ctx = multiprocessing.get_context("fork")
                with concurrent.futures.ProcessPoolExecutor(min(jobs, len(chunks)), mp_context=ctx) as pool:
                    futures = [pool.submit(_fork_worker, c) for c in range(len(chunks))]
                    for done in concurrent.futures.as_completed(futures):
                        for outcome in done.result():
                            take(*outcome)
            finally:
                _FORK_TASKS.clear()
        else:
            for chunk in chunks:
                for outcome in _run_chunk(chunk):
                    take(*outcome)
    return rows + [r for r in results if r is not None]


# ------------------------------------------------------------------------------------------------ output


def row_violations(row: dict) -> list[str]:
    if row.get("error"):
        if row["arch"] is None:
            return [f"{row['kernel']}: compile_specs() failed: {row['error']}"]
        return [f"{row['kernel']} @ sm_{row['arch']}: compile failed: {row['error']}"]
    where = f"{row['kernel']} @ sm_{row['arch']}"
    out = []
    if row["deterministic"] and row["atomics"]:
        out.append(f"{where}: {row['atomics']} atomic instruction(s) (RED/ATOM) in a deterministic kernel")
    if row["stack"] or row["local"]:
        out.append(f"{where}: spills ({row['stack']} B stack, {row['local']} B local memory)")
    limit = SHARED_LIMIT.get(row["arch"])
    if limit is not None and row["shared"] > limit:
        out.append(f"{where}: {row['shared']} B shared memory > the {limit} B per-block limit")
    for rule in row["forbid"]:
        if rule not in _FORBID:
            out.append(f"{where}: unknown forbid class {rule!r} (known: {', '.join(sorted(_FORBID))})")
            continue
        field, what = _FORBID[rule]
        if row[field]:
            out.append(f"{where}: {row[field]} {what} instruction(s), forbidden by {rule}")
    return out


def violations(rows: Iterable[dict]) -> list[str]:
    """Human-readable violations (empty when every row is clean)."""
    return [v for row in rows for v in row_violations(row)]


_COLUMNS = [
    ("kernel", "kernel"),
    ("arch", "arch"),
    ("regs", "regs"),
    ("stack", "stack"),
    ("shared", "smem"),
    ("hmma", "hmma"),
    ("hgmma", "hgmma"),
    ("tf32", "tf32"),
    ("atomics", "atom"),
    ("mufu", "mufu"),
    ("ffma", "ffma"),
    ("narrow_loads", "ldg16"),
    ("instructions", "instr"),
]


def format_table(rows: Iterable[dict]) -> str:
    """Fixed-width text table, one line per (kernel, arch), with an ``ok``/``FAIL`` column."""
    rows = list(rows)
    header = [title for _, title in _COLUMNS] + ["status"]
    body = []
    for row in rows:
        if row.get("error"):
            arch = "-" if row["arch"] is None else f"sm_{row['arch']}"
            cells = [row["kernel"], arch] + ["-"] * (len(_COLUMNS) - 2) + ["ERROR"]
        else:
            cells = [row["kernel"], f"sm_{row['arch']}"] + [str(row[k]) for k, _ in _COLUMNS[2:]]
            cells.append("FAIL" if row_violations(row) else "ok")
        body.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    lines = []
    for i, cells in enumerate([header, *body]):
        lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jetdet.static_report", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability (repeatable)")
    parser.add_argument("--only", action="append", help="keep kernels whose name contains this (repeatable)")
    parser.add_argument("--module", action="append", help="kernel module(s) instead of KERNEL_MODULES")
    parser.add_argument("--no-cache", action="store_true", help="recompile instead of reading the cache")
    parser.add_argument("--json", action="store_true", help="print rows as JSON instead of a table")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: CPUs)")
    parser.add_argument("--no-jit", action="store_true", help="only the declared specs, no JIT-specialised variants")
    parser.add_argument("--quiet", action="store_true", help="print only the rows that break a rule, and the summary")
    args = parser.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs: expected a number of processes >= 1, got {args.jobs}")
    import triton

    why = unsupported()
    if why:
        print(why, file=sys.stderr)
        return 2
    errors: list[dict] = []
    specs = collect_specs(args.module, errors=errors, jit=not args.no_jit)
    known = sorted({a for spec in specs for a in spec.archs})
    archs = list(dict.fromkeys(args.arch or DEFAULT_ARCHS))  # a repeated --arch once
    unknown = [a for a in archs if a not in known]
    if unknown and specs:
        parser.error(f"--arch: no kernel is built for compute capability {unknown}; expected some of {known}")
    if not errors and not pairs(specs, archs, args.only):
        parser.error(f"--only: no kernel name contains any of {args.only} for arch {archs}; the report without "
                     "--only lists the names")
    rows = errors + report(
        specs,
        archs=archs,
        only=args.only,
        use_cache=not args.no_cache,
        jobs=args.jobs,
        progress=Progress(),
    )
    bad = violations(rows)
    shown = [r for r in rows if row_violations(r)] if args.quiet else rows
    if args.json:
        print(json.dumps(shown, indent=1))
    elif shown:
        print(format_table(shown))
    if bad:
        print(f"\n{len(bad)} violation(s) (triton {triton.__version__}):", file=sys.stderr)
        for v in bad:
            print(f"  {v}", file=sys.stderr)
        return 1
    print(f"\n{len(rows)} kernel/arch pairs, no violations (triton {triton.__version__}).", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "JIT_ARCH",
    "JIT_INT_VALUES",
    "KERNEL_MODULES",
    "MIN_TRITON",
    "Pointer",
    "Progress",
    "analyze",
    "as_jit_function",
    "capture_launches",
    "collect_specs",
    "count_sass",
    "declared_vs_jit",
    "format_table",
    "fp_fusion_default",
    "jit_specialization",
    "jit_variants",
    "launch_spec",
    "launch_values",
    "main",
    "pairs",
    "quick_specs",
    "report",
    "specialization_key",
    "violations",
    "unsupported",
]
