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

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
#: "cuda" when the kernel tests run the compiled kernels on a GPU, "cpu" when they run in the interpreter.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETER else "cpu"
ON_GPU = KERNEL_DEVICE == "cuda"


@contextlib.contextmanager
def on_device(device):
    """New tensors default to ``device`` inside (nothing to do for CPU); the previous default comes back."""
    device = torch.device(device)
    if device.type == "cpu":
        yield device
        return
    saved = torch.get_default_device()
    torch.set_default_device(device)
    try:
        yield device
    finally:
        torch.set_default_device(saved)


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
