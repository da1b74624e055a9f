"""Kernels launch on their tensors' GPU, not on torch's current one.

Triton launches on ``torch.cuda.current_device()`` and its current stream, whatever device the arguments are on
(``triton/backends/driver.py``). A model on ``cuda:1`` while ``cuda:0`` is current would hand one GPU another GPU's
pointers. Every registered op's launcher therefore runs under ``kernels._common.on_device`` of its device argument.

No GPU here: the tests replace torch's current-device state with a fake one and check which device is current when
the launcher body runs. The last test runs on a machine with two GPUs.
"""

from __future__ import annotations

import types

import pytest
import torch

import jetdet  # noqa: F401  (registers the ops, sets up jetdet.kernels)
from jetdet.kernels import _common
from jetdet.ops import registry


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch's current CUDA device as a fake, settable value (starting at 0); ``torch.cuda.device`` switches it."""
    state = {"current": 0, "switches": 0}

    class FakeDevice:
        def __init__(self, device):
            self.idx = torch.device(device).index

        def __enter__(self):
            state["switches"] += 1
            self.prev, state["current"] = state["current"], self.idx

        def __exit__(self, *exc):
            state["current"] = self.prev
            return False

    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])
    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    return state


def on(device: str):
    """A stand-in for a tensor on ``device`` (this machine cannot make CUDA tensors)."""
    return types.SimpleNamespace(device=torch.device(device))


def test_on_device_switches_only_to_another_gpu(fake_cuda):
    assert _common.on_device(torch.device("cpu")) is _common._SAME_DEVICE
    assert _common.on_device(torch.device("cuda", 0)) is _common._SAME_DEVICE
    assert _common.on_device(torch.device("cuda")) is _common._SAME_DEVICE  # no index: the current device
    with _common.on_device(torch.device("cuda", 1)):
        assert fake_cuda["current"] == 1
    assert fake_cuda["current"] == 0 and fake_cuda["switches"] == 1


@pytest.mark.parametrize("lists", [False, True])
def test_launcher_runs_on_its_tensors_gpu(fake_cuda, lists):
    seen = []

    def body(*args):
        seen.append(torch.cuda.current_device())
        return "out"

    launch = registry.on_arg_device(body, 1, lists)
    x = [on("cuda:1"), on("cuda:1")] if lists else on("cuda:1")
    assert launch(None, x) == "out"
    assert launch(None, [on("cuda:0")] if lists else on("cuda:0")) == "out"
    assert launch(None, [on("cpu")] if lists else on("cpu")) == "out"
    assert seen == [1, 0, 0]
    assert fake_cuda["current"] == 0 and fake_cuda["switches"] == 1  # restored; switched only for cuda:1
    # negative control: the launcher called as Triton would call it, without the wrapper, runs on cuda:0
    seen.clear()
    body(None, x)
    assert seen == [0]


def test_launcher_restores_the_device_when_it_raises(fake_cuda):
    def body(x):
        raise RuntimeError("launch failed")

    with pytest.raises(RuntimeError, match="launch failed"):
        registry.on_arg_device(body, 0)(on("cuda:1"))
    assert fake_cuda["current"] == 0


@pytest.mark.parametrize("name", sorted(registry.OPS))
def test_every_registered_launcher_is_guarded(name):
    op = registry.OPS[name]
    fn = op.launcher()
    assert getattr(fn, "__wrapped__", None) is not None, f"{name}: its launcher runs on the current GPU"
    assert fn is op.launcher()  # wrapped once, then cached


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_linear_on_the_second_gpu_while_the_first_is_current():
    from jetdet import ops

    torch.cuda.set_device(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=g).to(torch.bfloat16)
    w = torch.randn(80, 96, generator=g).to(torch.bfloat16)
    want = ops.linear(x.cuda(0), w.cuda(0), None).cpu()
    got = ops.linear(x.cuda(1), w.cuda(1), None)
    torch.cuda.synchronize(1)
    assert got.device == torch.device("cuda", 1)
    assert torch.equal(got.cpu(), want)
