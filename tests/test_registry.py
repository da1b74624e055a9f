"""The op registry: every registered op is complete (compile specs, reference, invariance), registered as
``torch.ops.jetdet.<name>``, bitwise the same through the eager shortcut and the dispatcher, batch invariant on
both paths and close to its fp32 reference. The tests enumerate :func:`jetdet.ops.registry.specs`, so a new op
is covered by adding it, and an op that lacks a piece fails here."""

from __future__ import annotations

import importlib
import inspect
import random

import pytest
import torch
from _devices import to_default_device
from _invariance import assert_batch_invariant, random_slots

import jetdet
from jetdet.ops import registry

SPECS = {s.name: s for s in registry.specs()}
NAMES = sorted(SPECS)
#: Public names in ``jetdet.ops`` that are helpers, not ops (no tensor computation of their own to register).
HELPERS = {"LinearAttentionState", "BlockMask", "block_mask_from_bool", "block_sparse_work", "spatial_block_order",
           "forecast_weights"}
#: fp32 tolerance (atol, rtol) against the reference, per op where the default (1e-5, 1e-5) does not fit.
TOL = {"attention_block_mask": (0, 0), "forecast": (1e-5, 1e-4), "relative_change": (1e-6, 1e-5)}


def _sample(spec, batch, seed=0, dtype=torch.float32):
    args = spec.sample(batch, dtype, torch.Generator().manual_seed(seed))
    return [to_default_device(a) if isinstance(a, list) else to_default_device([a])[0] for a in args]


def _outs(res):
    return list(res) if isinstance(res, (tuple, list)) else [res]


def _as_items(fn, spec, args):
    """``(call, items)`` for the shared prefix/needle helper: ``items`` are the batched tensors (a list argument
    counts each of its tensors), ``call(*items)`` rebuilds the op's arguments and returns its outputs as one
    ``[B, ...]`` float64 tensor (every output, bool and int ones included, converts exactly), so a mismatch in any
    output is a mismatch of that tensor."""
    slots, items = [], []
    for i in spec.batched:
        a = args[i]
        n = len(a) if isinstance(a, list) else None
        slots.append((i, n))
        items += a if n is not None else [a]

    def call(*batched):
        full, at = list(args), 0
        for i, n in slots:
            if n is None:
                full[i], at = batched[at], at + 1
            else:
                full[i], at = list(batched[at : at + n]), at + n
        outs = [o for o in _outs(fn(*full)) if isinstance(o, torch.Tensor)]
        return torch.cat([o.reshape(o.shape[0], -1).double() for o in outs], dim=1)

    return call, items


def check_invariant(fn, spec, batch=6, seed=0):
    """Prefix and needle (tests/_invariance.py): every prefix of the batch and one random item per prefix, run
    alone, give bitwise what the full batch gives for those items."""
    call, items = _as_items(fn, spec, _sample(spec, batch, seed))
    rng = random.Random(spec.name)
    assert_batch_invariant(call, items, prefixes=range(1, batch + 1),
                           slots=[s for _, s in random_slots(rng, range(1, batch + 1))], label=spec.name)


# ------------------------------------------------------------------------------------------------- completeness


def test_every_folder_registers_ops():
    folders = {s.folder for s in registry.specs()}
    assert folders == set(registry.FOLDERS)
    assert len(NAMES) == len(registry.specs())  # no name twice


@pytest.mark.parametrize("name", NAMES)
def test_op_has_every_piece(name):
    spec = SPECS[name]
    for piece in ("schema", "fake", "torch_path", "launcher", "reference", "sample"):
        assert getattr(spec, piece), f"{name}: no {piece}"
    # the static report compiles the folder's kernels: it needs compile specs that come from that folder
    cs = importlib.import_module(f"jetdet.kernels.{spec.folder}.specs").compile_specs()
    assert cs, f"{name}: kernels/{spec.folder}/specs.py gives no compile specs"
    assert all(inspect.getmodule(getattr(c.fn, "fn", c.fn)).__name__.startswith(f"jetdet.kernels.{spec.folder}.")
               for c in cs)
    if isinstance(spec.launcher, str):
        launch = importlib.import_module(f"jetdet.kernels.{spec.folder}.launch")
        assert callable(getattr(launch, spec.launcher)), f"{name}: launch.{spec.launcher} does not exist"
    if spec.table is not None:
        import glob
        import os

        from jetdet import _paths

        files = glob.glob(os.path.join(_paths.configs_dir(), spec.table, "device_name=*.json"))
        assert files, f"{name}: no shipped launch table autotune_configs/{spec.table}/"


@pytest.mark.parametrize("name", NAMES)
def test_reference_is_named_after_the_op(name):
    """One naming rule in every folder: the op ``name``'s fp32 reference is ``reference.<name>_reference``."""
    spec = SPECS[name]
    ref = importlib.import_module(f"jetdet.kernels.{spec.folder}.reference")
    assert callable(getattr(ref, f"{name}_reference", None)), \
        f"{name}: kernels/{spec.folder}/reference.py has no {name}_reference"


def _jit_functions(folder):
    """The folder's Triton functions defined in its ``kernel*.py`` (name -> function), and its launch code's text."""
    from pathlib import Path

    import triton

    found = {}
    root = Path(importlib.import_module(f"jetdet.kernels.{folder}").__file__).parent
    for path in sorted(root.glob("kernel*.py")):
        mod = importlib.import_module(f"jetdet.kernels.{folder}.{path.stem}")
        found.update({k: v for k, v in vars(mod).items() if isinstance(v, triton.runtime.KernelInterface)
                      and inspect.getmodule(v.fn) is mod})
    launch_src = "".join(p.read_text() for p in sorted(root.glob("launch*.py")))
    return found, launch_src


@pytest.mark.parametrize("folder", sorted(set(registry.FOLDERS) | {"noise"}))
def test_kernel_names_follow_one_rule(folder):
    """A Triton function that the folder's launch code launches (``name[grid](...)``) is public and named
    ``*_kernel``; one it does not launch (a ``@triton.jit`` helper called inside a kernel) is not named so."""
    import re

    found, launch_src = _jit_functions(folder)
    assert found, f"kernels/{folder}: no Triton functions found"
    launched = {n for n in found if re.search(rf"\b{re.escape(n)}\[", launch_src)}
    assert launched, f"kernels/{folder}: launch*.py launches none of {sorted(found)}"
    for n in found:
        if n in launched:
            assert n.endswith("_kernel") and not n.startswith("_"), f"kernels/{folder}: launched kernel {n}"
        else:
            assert not n.endswith("_kernel"), f"kernels/{folder}: {n} is named a kernel but never launched"


def test_static_report_covers_every_registered_folder():
    from jetdet import static_report

    modules = set(static_report.KERNEL_MODULES)
    for folder in registry.FOLDERS:
        assert f"jetdet.kernels.{folder}.specs" in modules, folder


@pytest.mark.parametrize("name", NAMES)
def test_registered_as_torch_op(name):
    assert hasattr(torch.ops.jetdet, name)
    assert registry.get(name).overload is getattr(torch.ops.jetdet, name).default


def test_every_public_op_is_a_torch_op():
    """The README: every public op is registered as ``jetdet::<op>`` (``linear`` and ``addmm`` were not)."""
    public = [n for n in jetdet.ops.__all__ if n not in HELPERS]
    assert {"linear", "addmm", "gelu_gate"} <= set(public)
    for n in public:
        assert hasattr(torch.ops.jetdet, n), f"jetdet.ops.{n} has no torch.ops.jetdet.{n}"
    assert set(public) == {s.public for s in registry.specs()}


def test_unknown_op_is_a_clear_error():
    with pytest.raises(KeyError, match="no jetdet op 'nope'"):
        registry.get("nope")


def test_routed_functions_have_router_handlers():
    """What a spec says the router may send it is what the router handles (by name)."""
    routed = {getattr(f, "__name__", str(f)) for s in registry.specs() for f in s.routed}
    router = importlib.import_module("jetdet.mode")  # jetdet.mode is also the name of a function
    assert routed and routed <= set(router.ROUTED)


# ---------------------------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("name", NAMES)
def test_eager_shortcut_equals_dispatcher(name, torch_backend):
    spec, op = SPECS[name], registry.get(name)
    args = _sample(spec, 3)
    for a, b in zip(_outs(op(*args)), _outs(op.overload(*args))):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("name", NAMES)
def test_opcheck(name, torch_backend):
    args = _sample(SPECS[name], 2)
    torch.library.opcheck(registry.get(name).overload, tuple(args),
                          test_utils=("test_schema", "test_faketensor"))


def _column_major(a):
    """The same values with the last two dims' strides swapped (what a transposed view gives a kernel)."""
    if isinstance(a, list):
        return [_column_major(t) for t in a]
    if isinstance(a, torch.Tensor) and a.dim() >= 2:
        return a.transpose(-1, -2).contiguous().transpose(-1, -2)
    return a


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", NAMES)
def test_opcheck_strided_inputs(name, backend):
    """Fakes must give the real output's strides for any input layout: ``torch.compile`` trusts them (a fake that
    copied a transposed input's strides made a compiled DiT fail at its first layer norm)."""
    args = [_column_major(a) for a in _sample(SPECS[name], 2)]
    torch.library.opcheck(registry.get(name).overload, tuple(args), test_utils=("test_faketensor",))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", NAMES)
def test_batch_invariant(name, backend):
    check_invariant(registry.get(name), SPECS[name], batch=4 if backend == "triton" else 6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", NAMES)
def test_close_to_reference(name, backend):
    spec = SPECS[name]
    args = _sample(spec, 3, seed=1)
    atol, rtol = TOL.get(name, (1e-5, 1e-5))
    got, want = _outs(registry.get(name)(*args)), _outs(spec.reference(*args))
    for g, w in zip(got, want):
        if w is None:
            continue
        if g.dtype in (torch.bool, torch.int32, torch.int64):
            assert torch.equal(g.cpu(), w.cpu()), name
        else:
            torch.testing.assert_close(g.double().cpu(), w.double().cpu(), atol=atol, rtol=rtol, equal_nan=True)


def test_invariance_check_fails_on_a_batch_dependent_op():
    """Negative control: the same check rejects an op whose items depend on the batch."""
    spec = SPECS["softmax"]

    def leaky(x):
        return torch.softmax(x, -1) + x.sum() * 1e-3

    with pytest.raises(AssertionError, match="run alone differ"):
        check_invariant(leaky, spec)


def test_reference_check_fails_on_a_wrong_body():
    spec = SPECS["gelu_gate"]
    args = _sample(spec, 3, seed=1)
    wrong = spec.reference(args[0], "none")  # the erf form where the tanh form was asked for
    with pytest.raises(AssertionError):
        torch.testing.assert_close(wrong, spec.reference(*args), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_every_launch_chooses_fp_fusion(name, triton_backend):
    """Every kernel launch passes ``enable_fp_fusion`` explicitly (``jetdet.kernels._common.FP_FUSION`` or the
    kernel's own choice): the launch then compiles what the static report compiles, on every Triton, whatever
    Triton's own default (on in 3.9, off from 3.10: an FMA contracted or not is a different bit)."""
    from jetdet import static_report

    registry.OPS[name].launcher()  # sets up the jetdet.kernels alias
    # the folder's kernels, imported before the capture so that it sees them (some launchers import lazily)
    importlib.import_module(f"jetdet.kernels.{SPECS[name].folder}.launch")
    with static_report.capture_launches() as log:
        registry.get(name)(*_sample(SPECS[name], 2))
    assert log, f"{name}: no kernel launched"
    left = sorted({getattr(k, "fn", k).__name__ for k, _, kw in log if "enable_fp_fusion" not in kw})
    assert not left, f"{name}: launches that leave enable_fp_fusion to Triton's default: {left}"
