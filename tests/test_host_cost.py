"""The Python a routed call runs before its kernel launch (the host cost of the GPU path, which a mid-sized model
cannot hide on a GPU: issue 13 found a width-1024 DiT's forward host-bound at ~90 us per routed call).

The launches are stubbed, and what is counted is Python function calls (``sys.setprofile`` "call" events) from
the torch call to the launch: a count, unlike a time, is the same on every machine. The bounds are today's counts
with a little room; ``python bench/host_cost.py`` gives the times. The negative control re-runs the linear with
the launch-config cache defeated (what every call paid before it existed) and sees the bound broken."""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch
import torch.nn.functional as F
from _devices import KERNEL_DEVICE

import jetdet
from jetdet import configs, static_report

#: op -> most Python calls from the torch call to the (stubbed) launch, routed in deterministic mode: the counts
#: with the router's direct route to the launcher (linear 54, sdpa 51, layer_norm 64 with nn.Module's own calls,
#: conv2d 68, softmax 42; the fp32 linear and conv2d read JETDET_FP32_DOT; through the public ops they were 53, 54,
#: 73, 71, 36; two of each count are the router's ``torch.compiler.is_compiling()``, which lets traced code be
#: routed without reading the mode's ContextVar) plus a little room (1 to 4 calls)
BOUNDS = {"linear": 55, "sdpa": 54, "layer_norm": 68, "conv2d": 70, "softmax": 44}


@contextlib.contextmanager
def _stubbed():
    launched = []
    with static_report.stub_launches(lambda kernel, *_: launched.append(kernel)):
        yield launched


def _calls(fn) -> int:
    n = 0

    def prof(frame, event, arg):
        nonlocal n
        if event == "call":
            n += 1

    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return n


def _cases(dev):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 64, generator=g).to(dev)
    w = torch.randn(32, 64, generator=g).to(dev)
    q = torch.randn(2, 2, 16, 32, generator=g).to(dev)
    img = torch.randn(2, 16, 8, 8, generator=g).to(dev).contiguous(memory_format=torch.channels_last)
    cw = torch.nn.Parameter(torch.randn(16, 16, 3, 3, generator=g).to(dev).contiguous(
        memory_format=torch.channels_last), requires_grad=False)
    ln = torch.nn.LayerNorm(64).to(dev)
    return {
        "linear": lambda: F.linear(x, w),
        "sdpa": lambda: F.scaled_dot_product_attention(q, q, q),
        "layer_norm": lambda: ln(x),
        "conv2d": lambda: F.conv2d(img, cw, None, 1, 1),
        "softmax": lambda: torch.softmax(x, -1),
    }


def _count(dev, name) -> int:
    fn = _cases(dev)[name]
    with torch.no_grad(), _stubbed() as launched, jetdet.mode("deterministic"):
        fn()  # first call: tables read, caches filled
        launched.clear()
        n = _calls(fn)
    assert launched, f"{name}: no kernel was launched"
    return n


@pytest.fixture
def kernels(monkeypatch):
    """The Triton kernels forced, on the kernel device's tensors, with no default-device context around the count:
    on a GPU, ``torch.set_default_device`` is a Python torch-function mode that every torch call would pass through
    (and count), which a user's model does not."""
    monkeypatch.setenv("JETDET_BACKEND", "triton")
    return torch.device(KERNEL_DEVICE)


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_python_calls_per_routed_call(kernels, name):
    n = _count(kernels, name)
    assert n <= BOUNDS[name], f"{name}: {n} Python calls before the launch, bound {BOUNDS[name]}"


class _NoStore(dict):
    def __setitem__(self, key, value):
        pass


def test_negative_control_without_config_cache(kernels, monkeypatch):
    monkeypatch.setattr(configs, "_entries", _NoStore())
    n = _count(kernels, "linear")
    assert n > BOUNDS["linear"], n  # 74 on 2026-12-05, through the public op


def test_host_cost_script_runs(tmp_path):
    """``bench/host_cost.py`` runs end to end (tiny repeats) and reports every op, both models, Triton's binder
    cost per op launch and the step cache's host time per call."""
    import json
    import os
    import subprocess
    from pathlib import Path

    from jetdet import backend

    problem = backend.interpreter_problem()  # the script forces the interpreter, also on a GPU machine
    if problem:
        pytest.skip(problem)
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "host.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    subprocess.run([sys.executable, str(root / "bench" / "host_cost.py"), "--repeats", "1", "--inner", "20",
                    "--json", str(out)], check=True, env=env, capture_output=True, timeout=600)
    res = json.loads(out.read_text())
    assert set(res["ops_us"]) == {"linear", "layer_norm", "group_norm", "conv2d 3x3", "sdpa", "softmax"}
    assert all(v > 0 for v in res["ops_us"].values())
    assert set(res["models"]) == {"TinyDiT", "TinyUNet"}
    binder = res["triton_binder_us"]
    assert set(binder) == set(res["ops_us"]), binder
    assert all(rows and all(n > 0 and us > 0 for _, n, us in rows) for rows in binder.values()), binder
    sc = res["step_cache"]
    assert sc["calls"] == 30 and 0 < sc["calls_run"] < 30, sc  # the defaults skip some calls of the bundled DiT
    assert 0 < sc["op_bodies_ms_per_call"] < sc["host_ms_per_call"], sc
