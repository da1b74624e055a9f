"""Test setup. Must run before any kernel module is imported:

* ``TRITON_INTERPRET=1`` when there is no CUDA device, so Triton kernels run on CPU;
* ``JETDET_DEBUG_FILL_NAN=1`` so every buffer a kernel allocates starts as NaN and an element it forgets to
  write fails the test;
* in the interpreter, ``tl.dot`` as an unblocked ``numpy.einsum`` instead of ``numpy.matmul``. With numpy 2.4's
  OpenBLAS (0.3.31) a row's result in ``A @ B`` depends on its position in ``A`` (the microkernel's edge rows
  round differently: in a sweep of [16..128, 16..64] @ [.., 16..64] fp32 blocks, 60-340 of every 50-320 moved
  rows differed), which a GPU's MMA does not do; the interpreter then reported the matmul kernel as not batch
  invariant for a row in another tile position. ``einsum`` computes every output element with the same loop, so
  the interpreter models the kernel, not the BLAS. Accuracy is unchanged (both sum fp32 products in fp32).

With CUDA the kernel tests run the compiled kernels on CUDA tensors (see ``_devices.py``): the fixtures below
make CUDA the default device for new tensors during such a test. CPU CI is unchanged.
"""

import os

os.environ.setdefault("JETDET_DEBUG_FILL_NAN", "1")
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from _devices import KERNEL_DEVICE, on_backend, on_device  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _ieee_fp32_convolutions_on_gpu():
    """On a GPU, torch's fp32 convolutions run TF32 by default (cuDNN: ``torch.backends.cudnn.conv.fp32_precision``
    is "tf32"), about 1e-3 relative error, so the fp32 references that call ``F.conv2d`` on CUDA tensors (conv2d,
    depthwise conv2d) would be farther from the exact result than the kernels checked against them at 1e-5. IEEE
    fp32 for the session, the setting put back afterwards; on CPU nothing changes."""
    if KERNEL_DEVICE != "cuda":
        yield
        return
    if hasattr(torch.backends, "fp32_precision"):  # torch >= 2.9: both APIs, kept in agreement as the mode does
        from jetdet.mode import _cudnn_tf32, _set_cudnn_tf32

        get, put, value = _cudnn_tf32, _set_cudnn_tf32, ("ieee", "ieee", False)
    else:  # pragma: no cover - older torch
        c = torch.backends.cudnn
        get, put, value = (lambda: c.allow_tf32), (lambda v: setattr(c, "allow_tf32", v)), False
    saved = get()
    put(value)
    try:
        yield
    finally:
        put(saved)


@pytest.fixture
def kernel_device():
    """The device the kernel tests run on ("cuda" on a GPU, else "cpu"); new tensors default to it."""
    with on_device(KERNEL_DEVICE) as dev:
        yield dev


def _position_invariant_interpreter_dot() -> None:
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.create_dot
    if getattr(original, "jetdet_einsum", False):
        return

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.data.dtype != np.float32 or b.data.dtype != np.float32:
            return original(self, a, b, d, input_precision, max_num_imprecise_acc)
        prod = np.einsum("...ik,...kj->...ij", a.data, b.data, optimize=False).astype(d.data.dtype)
        return interpreter.TensorHandle(prod + d.data, d.dtype.scalar)

    create_dot.jetdet_einsum = True
    builder.create_dot = create_dot


if os.environ.get("TRITON_INTERPRET") == "1":
    _position_invariant_interpreter_dot()


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the Triton kernels for jetdet.ops calls inside the test: the interpreter on CPU, the compiled
    kernels on CUDA tensors on a GPU. Yields the device."""
    with on_backend(monkeypatch, "triton") as dev:
        yield dev


@pytest.fixture(autouse=True)
def _backend_param(request, monkeypatch):
    """A test parametrised over ``backend`` ("torch" / "triton", directly or through a fixture's params) runs
    inside ``on_backend``: the env var is set and, for "triton" on a GPU, new tensors are CUDA tensors."""
    callspec = getattr(request.node, "callspec", None)
    name = callspec.params.get("backend") if callspec is not None else None
    if name not in ("torch", "triton"):
        yield
        return
    with on_backend(monkeypatch, name):
        yield


@pytest.fixture
def torch_backend(monkeypatch):
    with on_backend(monkeypatch, "torch") as dev:
        yield dev


@pytest.fixture
def restore_threads():
    """For tests that change torch's thread count: it is put back afterwards."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
