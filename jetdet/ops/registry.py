"""The op registry: every ``jetdet::<op>`` is built here, the same way, from the spec its kernel folder exports.

A kernel folder ``kernels/<folder>/`` is one self-describing unit: the Triton kernel (``kernel.py``), its launch
code (``launch.py``), its static-report compile specs (``specs.py``), the batch-invariant torch path
(``torch_path.py``), the plain fp32 reference (``reference.py``), and ``op.py``, which exports ``SPECS``: one
:class:`~jetdet.ops.spec.OpSpec` per op the folder serves. :data:`FOLDERS` is every folder with an ``op.py``;
adding an op is a folder, its package line in ``pyproject.toml`` and its test file.

:func:`register` turns a spec into:

* the ``torch.library`` custom op ``torch.ops.jetdet.<name>`` with the spec's schema and fake (for
  ``torch.compile``/export), whose body dispatches on the device (:func:`jetdet.backend.backend_for`): the
  Triton launcher on CUDA (or with ``JETDET_BACKEND=triton``), the torch path elsewhere;
* the eager shortcut :meth:`Op.__call__`, which runs that body directly when nothing needs the dispatcher
  (plain tensors, no autograd recording, not tracing): going through the dispatcher costs ~60 us per call on
  this CPU (94 against 27 us for a tiny linear), more than the op itself for the small layers of a diffusion
  model.

Argument checks live in the public wrappers (``jetdet.ops.<op>``), which give errors that name the argument;
the registered op takes the wrapper's normalised arguments.

``static_report``, the deterministic-mode router and the tests enumerate :func:`specs`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence

import torch

from .. import backend
from .spec import OpSpec


def _discover() -> tuple[str, ...]:
    """Every kernel folder with an ``op.py``, in name order."""
    from .. import _paths

    _paths.install()
    import jetdet.kernels as kernels

    found = set()
    for root in kernels.__path__:
        for name in os.listdir(root):
            if os.path.isfile(os.path.join(root, name, "op.py")) and os.path.isfile(
                    os.path.join(root, name, "__init__.py")):
                found.add(name)
    return tuple(sorted(found))


#: The kernel folders whose ``op.py`` exports ``SPECS``: found on disk, so a new folder registers itself; the one
#: line to add is its package name in ``pyproject.toml`` (so a pip install ships it; ``tests/test_import.py``
#: fails when a package is missing there).
FOLDERS = _discover()


class Op:
    """A registered op: ``op(*args)`` runs it (eagerly when it can), ``op.custom_op`` is the torch op."""

    def __init__(self, spec: OpSpec):
        self.spec = spec
        self._launcher = None
        # Only ops whose schema takes a tensor list pay for looking inside list arguments on the eager path.
        self._lists = "Tensor[]" in spec.schema
        self.body = self._body  # the plain Python body, dispatching on the device
        self.custom_op = torch.library.custom_op(f"jetdet::{spec.name}", self._op_body, mutates_args=(),
                                                 schema=spec.schema)
        self.custom_op.register_fake(spec.fake)
        if spec.schema.rstrip().endswith("-> Tensor") and "Tensor[]" not in spec.schema:
            self.custom_op.register_autograd(self._backward, setup_context=_setup_context)
        self.overload = getattr(torch.ops.jetdet, spec.name).default

    def launcher(self) -> Callable:
        fn = self._launcher
        if fn is None:
            fn = self.spec.launcher
            if isinstance(fn, str):
                from .. import _paths

                _paths.install()
                fn = getattr(importlib.import_module(f"jetdet.kernels.{self.spec.folder}.launch"), fn)
            self._launcher = fn
        return fn

    def launch(self, *args):
        """The Triton launcher on ``args``, with the GPU of the ``device_arg`` tensor as torch's current device.

        Triton launches on torch's *current* CUDA device and its stream (``triton/backends/driver.py``:
        ``get_current_device = torch.cuda.current_device``), whatever device the arguments live on: a model on
        ``cuda:1`` while ``cuda:0`` is current would hand one GPU the other's pointers. The check is inline (no
        context manager, no helper) because every routed call pays it on the host: one C call and a comparison on
        the current GPU, nothing on the CPU."""
        try:  # no cost unless raised; the launchers import triton when first called
            fn = self._launcher or self.launcher()
            t = args[self.spec.device_arg]
            if self._lists and isinstance(t, (list, tuple)):
                t = t[0]
            # is_cuda and get_device(): no torch.device object built per call. torch._C._cuda_getDevice:
            # torch.cuda.current_device() without its Python layers (CUDA is initialised: the tensor is on a GPU)
            if t.is_cuda:
                index = t.get_device()
                if index != torch._C._cuda_getDevice():
                    with torch.cuda.device(index):
                        return fn(*args)
            return fn(*args)
        except ModuleNotFoundError as e:
            backend.raise_if_no_triton(e)
            raise

    def _body(self, *args):
        t = args[self.spec.device_arg]
        if self._lists and isinstance(t, (list, tuple)):
            t = t[0]
        if backend.backend_for(t) == "triton":
            return self.launch(*args)
        return self.spec.torch_path(*args)

    def _op_body(self, *args):
        """The custom op's body: :meth:`_body`, its result never a view. A body that reshapes its result (linear's
        ``[M, N]`` GEMM output seen as ``[..., N]``) returns a view of that intermediate, and autograd then refuses an
        in-place change of the op's output (``y.addcmul_(...)`` after a linear, as ComfyUI's Flux and Chroma blocks
        do) as a view created inside a custom Function. ``detach`` gives the same storage as a tensor of its own."""
        out = self._body(*args)
        if isinstance(out, torch.Tensor) and out._is_view():
            return out.detach()
        return out

    def _backward(self, ctx, grad):
        """Gradients through the op: the vector-Jacobian product of the spec's fp32 ``reference`` (the same
        arguments), recomputed from the saved inputs, cast back to each input's dtype. torch's own backward ops, so
        the batch-invariance guarantee covers the forward only. Torch functions are off while it runs: the
        reference's calls must not be routed back into jetdet's ops (and their backward) by deterministic mode.

        Each differentiable argument enters the recomputation as its own view of the saved input: an input passed
        twice (``attention(q, q, q)``) gets one gradient per argument, and under ``create_graph=True`` (grad mode on
        here) the gradients stay connected to the inputs, so second derivatives are right."""
        create = torch.is_grad_enabled()
        args = list(ctx.others)
        wants = []
        with torch._C.DisableTorchFunction(), torch.enable_grad():
            for i, t in zip(ctx.tensor_pos, ctx.saved_tensors):
                if ctx.needs_input_grad[i] and t.is_floating_point():
                    t = t.view_as(t) if (create and t.requires_grad) else t.detach().requires_grad_(True)
                    wants.append((i, t))
                args[i] = t
            grads = [None] * len(args)
            if wants:
                out = self.spec.reference(*args)
                found = torch.autograd.grad(out, [t for _, t in wants], grad.to(out.dtype), allow_unused=True,
                                            create_graph=create)
                for (i, t), g in zip(wants, found):
                    grads[i] = None if g is None else g.to(t.dtype)
        return tuple(grads)

    def __call__(self, *args):
        grad = torch.is_grad_enabled()
        for a in args:
            if isinstance(a, torch.Tensor):
                if type(a) not in backend.PLAIN or (grad and a.requires_grad):
                    return self.overload(*args)  # autograd sees one op, its backward _backward's
            elif self._lists and isinstance(a, (list, tuple)):
                for t in a:
                    if isinstance(t, torch.Tensor) and (type(t) not in backend.PLAIN or (grad and t.requires_grad)):
                        return self.overload(*args)
        if torch.compiler.is_compiling():
            return self.overload(*args)
        # The body's own torch calls must not meet the deterministic-mode router (a patched layer calls
        # jetdet.ops directly while the router is on the stack): they are the batch-invariant implementation.
        # backend.run_body turns torch's NaN fill of new tensors off for the body.
        with torch._C.DisableTorchFunction():
            return backend.run_body(self._body, *args)

    def __repr__(self) -> str:
        return f"<jetdet op {self.spec.name} ({self.spec.folder})>"


def _setup_context(ctx, inputs, output) -> None:
    ctx.tensor_pos = [i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor)]
    ctx.others = [None if isinstance(a, torch.Tensor) else a for a in inputs]
    ctx.save_for_backward(*[inputs[i] for i in ctx.tensor_pos])


#: Every registered op by name (what :func:`get` reads; the wrappers index it directly on their hot path).
OPS: dict[str, Op] = {}


def register(spec: OpSpec) -> Op:
    """Build the custom op, its fake, the device dispatch and the eager shortcut from ``spec``."""
    if not isinstance(spec, OpSpec):
        raise TypeError(f"spec: expected an OpSpec, got {type(spec).__name__}")
    if spec.name in OPS:
        raise ValueError(f"spec: an op named {spec.name!r} is already registered ({OPS[spec.name].spec.folder})")
    op = Op(spec)
    OPS[spec.name] = op
    return op


def _load(folders: Sequence[str]) -> None:
    from .. import _paths

    _paths.install()
    for folder in folders:
        mod = importlib.import_module(f"jetdet.kernels.{folder}.op")
        found = getattr(mod, "SPECS", None)
        if not found:
            raise RuntimeError(f"jetdet.kernels.{folder}.op exports no SPECS: every registered folder needs one")
        for spec in found:
            if spec.folder != folder:
                raise RuntimeError(f"{spec.name}: spec.folder is {spec.folder!r} but it is exported by {folder!r}")
            register(spec)


def get(name: str) -> Op:
    """The registered op ``name`` (``"mm"``, ``"linear"``, ...)."""
    try:
        return OPS[name]
    except KeyError:
        raise KeyError(f"name: no jetdet op {name!r}; registered: {', '.join(sorted(OPS))}") from None


def ops() -> list[Op]:
    """Every registered op, in registration order."""
    return list(OPS.values())


def specs() -> list[OpSpec]:
    return [op.spec for op in OPS.values()]


_load(FOLDERS)
