"""The packed copy of a conv weight (``cached_pack``) and CUDA graphs.

On a GPU the conv launcher reads a channels-last copy of each weight, kept per ``nn.Parameter``. Two CUDA-graph
situations need it made differently, and neither can happen on a CPU, so these tests turn the GPU branch on for
CPU tensors (``_graph_aware``) and stand in for torch's capture query (``_capturing``):

- inside a capture the copy is made at every call (the captured graph then copies at every replay, so it reads
  the weight as it is at that replay) and nothing is cached;
- outside one, a new copy is made on a thread of its own, whose allocations torch.compile's CUDA-graph trees do
  not route into their pool during a compiled function's warm-up.

What a GPU adds (the pool itself, the streams) is checked by ``bench/gpu_check.py``'s ``compiled`` section (a UNet
stage under ``torch.compile(mode="reduce-overhead")`` with no eager call first, and an in-place weight change
after capture), not here.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from _devices import INTERPRETER

import jetdet
from jetdet import static_report
from jetdet.kernels.matmul import torch_path as tp


@pytest.fixture
def gpu_branch(monkeypatch):
    """The GPU branch of ``cached_pack`` for CPU tensors; ``state["capturing"]`` stands in for the capture query."""
    state = {"capturing": False}
    monkeypatch.setattr(tp, "_graph_aware", lambda b: True)
    monkeypatch.setattr(tp, "_capturing", lambda b: state["capturing"])
    tp.clear_weight_cache()
    yield state
    tp.clear_weight_cache()


def _weight():
    return torch.nn.Parameter(torch.randn(6, 4, 3, 3), requires_grad=False)


def _recording_make(w, threads):
    def make():
        threads.append(threading.get_ident())
        return w.detach().contiguous(memory_format=torch.channels_last)

    return make


def test_a_new_copy_is_made_on_a_thread_of_its_own_and_kept(gpu_branch):
    w, threads = _weight(), []
    a = tp.cached_pack(w, "t", _recording_make(w, threads))
    b = tp.cached_pack(w, "t", _recording_make(w, threads))
    assert len(threads) == 1 and threads[0] != threading.get_ident()
    assert a is b and torch.equal(a, w) and a.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        w.mul_(2)  # an in-place change: a new copy, again on a thread of its own
    c = tp.cached_pack(w, "t", _recording_make(w, threads))
    assert len(threads) == 2 and threads[1] != threading.get_ident() and torch.equal(c, w)


def test_negative_control_without_the_gpu_branch_the_copy_is_made_on_the_callers_thread():
    # what the test above tells apart: a CPU weight's copy is made in place, on the calling thread
    tp.clear_weight_cache()
    w, threads = _weight(), []
    tp.cached_pack(w, "t", _recording_make(w, threads))
    assert threads == [threading.get_ident()]
    tp.clear_weight_cache()


def test_inside_a_capture_the_copy_is_made_at_every_call_and_nothing_is_kept(gpu_branch):
    w, threads = _weight(), []
    kept = tp.cached_pack(w, "t", _recording_make(w, threads))  # eager, before the capture
    gpu_branch["capturing"] = True
    x = tp.cached_pack(w, "t", _recording_make(w, threads))
    y = tp.cached_pack(w, "t", _recording_make(w, threads))
    # made on the capturing thread (a capture is per stream; the copy is part of the graph), each time, and never
    # the kept copy, which a replay would keep reading after an in-place change of the weight
    assert threads[1:] == [threading.get_ident()] * 2
    assert x is not kept and y is not kept and x is not y and torch.equal(x, w)
    assert len(tp._packed) == 1  # the eager copy only
    gpu_branch["capturing"] = False
    assert tp.cached_pack(w, "t", _recording_make(w, threads)) is kept


def test_an_error_while_packing_reaches_the_caller(gpu_branch):
    w = _weight()

    def make():
        raise MemoryError("no room for the copy")

    with pytest.raises(MemoryError, match="no room for the copy"):
        tp.cached_pack(w, "t", make)
    assert not tp._packed


@pytest.mark.skipif(not INTERPRETER, reason="forces the Triton path on CPU tensors (the faked GPU branch), which "
                                           "takes the interpreter; a GPU machine runs the suite without it")
def test_the_conv_launcher_packs_per_call_under_capture_and_once_outside(gpu_branch, monkeypatch):
    """Through the routed conv (Triton launcher, launches stubbed): an NCHW weight is packed once outside a
    capture and at every call inside one."""
    monkeypatch.setenv("JETDET_BACKEND", "triton")
    made = []
    real = tp.cached_pack

    def spy(b, tag, make):
        def counted():
            made.append((tag, threading.get_ident()))
            return make()

        return real(b, tag, counted)

    from jetdet.kernels.conv2d import launch as conv_launch

    monkeypatch.setattr(conv_launch, "cached_pack", spy)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad(), static_report.stub_launches(lambda *a: None), jetdet.mode("deterministic"):
        for _ in range(3):
            F.conv2d(x, conv.weight, conv.bias, 1, 1)
        assert [t for t, _ in made] == ["conv2d.cl"] and made[0][1] != threading.get_ident()
        gpu_branch["capturing"] = True
        for _ in range(2):
            F.conv2d(x, conv.weight, conv.bias, 1, 1)
    assert [t for t, _ in made] == ["conv2d.cl"] * 3 and made[1][1] == made[2][1] == threading.get_ident()


def test_each_stream_waits_for_a_copy_and_is_recorded_on_it_once(monkeypatch):
    """A cached CUDA copy was made after an event on one stream: any stream that uses it first waits for that event
    (else it could read the copy before it is made) and is recorded on it (else freeing the copy, when the weight
    changes, would not wait for that stream's queued work). Streams and the copy are stand-ins (no CUDA here)."""
    calls = []

    class Stream:
        def __init__(self, handle):
            self.cuda_stream = handle

        def wait_event(self, ev):
            calls.append(("wait", self.cuda_stream, ev))

    class Copy:
        def record_stream(self, s):
            calls.append(("record", s.cuda_stream))

    current = {"s": Stream(1)}
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current["s"])
    monkeypatch.setattr(tp, "_current_raw_stream", lambda device: current["s"].cuda_stream)
    b, copy, streams = torch.zeros(1), Copy(), set()
    tp._use_on_stream(b, copy, "done", streams)
    tp._use_on_stream(b, copy, "done", streams)  # the same stream again: nothing more
    current["s"] = Stream(2)
    tp._use_on_stream(b, copy, "done", streams)
    assert calls == [("wait", 1, "done"), ("record", 1), ("wait", 2, "done"), ("record", 2)]
    tp._use_on_stream(b, copy, None, set())  # a CPU copy (no event): nothing to order
    assert len(calls) == 4
