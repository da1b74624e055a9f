"""Where the kernel tests run. Imported by ``conftest.py`` after it has set ``TRITON_INTERPRET``.

On a CUDA machine the Triton kernels run compiled, on CUDA tensors; without CUDA (or with ``TRITON_INTERPRET=1``
exported) they run in the interpreter on CPU tensors. Tests that run kernels create their tensors the usual way
(``torch.randn(...)``) inside :func:`on_backend` / the ``triton_backend`` and ``kernel_device`` fixtures, which on
a GPU make CUDA the default device for new tensors; on CPU they change nothing. The torch path stays on CPU.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch.overrides import TorchFunctionMode

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
#: "cuda" when the kernel tests run the compiled kernels on a GPU, "cpu" when they run in the interpreter.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETER else "cpu"
ON_GPU = KERNEL_DEVICE == "cuda"


#: The factories a test calls with a CPU generator (``torch.randn(..., generator=g)``).
_RANDOM_FACTORIES = frozenset({torch.randn, torch.rand, torch.randint, torch.randperm})


class _DrawOnCpu(TorchFunctionMode):
    """Inside :func:`on_device` of a GPU: a random factory given a CPU generator and no ``device`` draws on the
    CPU and moves the result. Under a CUDA default device torch refuses the pair ("Expected a 'cuda' device type
    for generator but found 'cpu'"), and the tests (and the ops' ``sample`` functions they call) draw that way
    throughout; drawn on the CPU, the inputs are also the CPU run's, value for value."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        g = kwargs.get("generator")
        if (func in _RANDOM_FACTORIES and g is not None and g.device.type == "cpu" and kwargs.get("device") is None
                and kwargs.get("out") is None):
            grad = kwargs.pop("requires_grad", False)
            return func(*args, **kwargs, device="cpu").to(self.device).requires_grad_(grad)
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_device(device):
    """New tensors default to ``device`` inside (nothing to do for CPU), random draws with a CPU generator made on
    the CPU and moved (:class:`_DrawOnCpu`). Both are torch-function modes, popped on the way out: the stack is as it
    was (``torch.set_default_device(previous)`` would leave a CPU device mode on it for the rest of the session)."""
    device = torch.device(device)
    if device.type == "cpu":
        yield device
        return
    with device, _DrawOnCpu(device):
        yield device


@contextlib.contextmanager
def on_backend(monkeypatch, name: str):
    """``JETDET_BACKEND=name`` (undone by ``monkeypatch``); for ``"triton"`` inside :func:`on_device` of
    :data:`KERNEL_DEVICE`. Yields the device the op's inputs are created on."""
    monkeypatch.setenv("JETDET_BACKEND", name)
    with on_device(KERNEL_DEVICE if name == "triton" else "cpu") as dev:
        yield dev


def cpu_generator(seed: int) -> torch.Generator:
    """A CPU generator; draw with ``device="cpu"`` and move the result, so the values are the same on a GPU."""
    return torch.Generator(device="cpu").manual_seed(seed)


def to_default_device(tensors):
    """``tensors`` (None entries kept) moved to torch's current default device (CUDA inside a GPU kernel test)."""
    dev = torch.get_default_device()
    return [t.to(dev) if isinstance(t, torch.Tensor) else t for t in tensors]
