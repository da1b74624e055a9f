"""Test setup. Must run before any kernel module is imported:

* ``TRITON_INTERPRET=1`` when there is no CUDA device, so Triton kernels run on CPU;
* ``JETDET_DEBUG_FILL_NAN=1`` so every buffer a kernel allocates starts as NaN and an element it forgets to
  write fails the test.
"""

import os

os.environ.setdefault("JETDET_DEBUG_FILL_NAN", "1")
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the Triton kernels (the interpreter on CPU) for jetdet.ops calls inside the test."""
    monkeypatch.setenv("JETDET_BACKEND", "triton")
    yield


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("JETDET_BACKEND", "torch")
    yield


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
