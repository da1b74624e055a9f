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
            self.idx = device if isinstance(device, int) else torch.device(device).index

        def __enter__(self):
            state["switches"] += 1
            self.prev, state["current"] = state["current"], self.idx

        def __exit__(self, *exc):
            state["current"] = self.prev
            return False

    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: state["current"], raising=False)  # CUDA builds only
    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    return state


def on(device: str):
    """A stand-in for a tensor on ``device`` (this machine cannot make CUDA tensors): what ``Op.launch`` reads."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    index = (0 if dev.index is None else dev.index) if cuda else -1  # get_device(): a CUDA tensor's is never None
    return types.SimpleNamespace(device=dev, is_cuda=cuda, get_device=lambda: index)


def test_on_device_switches_only_to_another_gpu(fake_cuda):
    assert _common.on_device(torch.device("cpu")) is _common._SAME_DEVICE
    assert _common.on_device(torch.device("cuda", 0)) is _common._SAME_DEVICE
    assert _common.on_device(torch.device("cuda")) is _common._SAME_DEVICE  # no index: the current device
    with _common.on_device(torch.device("cuda", 1)):
        assert fake_cuda["current"] == 1
    assert fake_cuda["current"] == 0 and fake_cuda["switches"] == 1


def _recorded(monkeypatch, name):
    """Op ``name`` with its launcher replaced by one that records torch's current device when it runs."""
    op = registry.OPS[name]
    seen = []
    monkeypatch.setattr(op, "_launcher", lambda *args: seen.append(torch.cuda.current_device()) or "out")
    return op, seen


def test_launch_runs_on_its_tensors_gpu(fake_cuda, monkeypatch):
    op, seen = _recorded(monkeypatch, "softmax")  # device_arg 0
    assert op.spec.device_arg == 0
    assert op.launch(on("cuda:1")) == "out"
    assert op.launch(on("cuda:0")) == "out"
    assert op.launch(on("cuda")) == "out"
    assert op.launch(on("cpu")) == "out"
    assert seen == [1, 0, 0, 0]
    assert fake_cuda["current"] == 0 and fake_cuda["switches"] == 1  # restored; switched only for cuda:1
    # negative control: the launcher called as Triton would call it, without Op.launch, runs on cuda:0
    seen.clear()
    op._launcher(on("cuda:1"))
    assert seen == [0]


def test_launch_takes_the_device_of_a_list_argument(fake_cuda, monkeypatch):
    names = [n for n, o in registry.OPS.items() if o._lists]
    if not names:
        pytest.skip("no registered op takes a tensor list")
    op, seen = _recorded(monkeypatch, names[0])
    args = [None] * (op.spec.device_arg + 1)
    args[op.spec.device_arg] = [on("cuda:1"), on("cuda:1")]
    op.launch(*args)
    assert seen == [1] and fake_cuda["current"] == 0


def test_launch_restores_the_device_when_it_raises(fake_cuda, monkeypatch):
    op = registry.OPS["softmax"]

    def body(x):
        raise RuntimeError("launch failed")

    monkeypatch.setattr(op, "_launcher", body)
    with pytest.raises(RuntimeError, match="launch failed"):
        op.launch(on("cuda:1"))
    assert fake_cuda["current"] == 0


def test_both_routes_to_a_launcher_go_through_launch(monkeypatch):
    """The op's body on the Triton backend and deterministic mode's direct route both call ``Op.launch``."""
    import importlib

    mode_mod = importlib.import_module("jetdet.mode")
    op = registry.OPS["softmax"]
    calls = []
    monkeypatch.setattr(registry.Op, "launch", lambda self, *a: calls.append(self.spec.name) or a[0])
    monkeypatch.setenv("JETDET_BACKEND", "triton")
    monkeypatch.setattr(registry.backend, "backend_for", lambda t: "triton")
    x = torch.randn(2, 3)
    op.body(x)
    mode_mod._run_triton("softmax", x)
    assert calls == ["softmax", "softmax"]


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
