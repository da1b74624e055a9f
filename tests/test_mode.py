"""The mode switch: nesting, exceptions, threads, asyncio tasks, flag restoration, routing."""

import asyncio
import contextlib
import contextvars
import importlib
import sys
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F

import jetdet
from jetdet.mode import Mode, torch_flags


def test_default_off_and_names():
    assert jetdet.get_mode() is Mode.OFF
    with pytest.raises(ValueError, match="mode: expected one of"):
        jetdet.mode("turbo")


def test_nesting_restores_outer():
    with jetdet.mode("fast"):
        assert jetdet.get_mode() is Mode.FAST
        with jetdet.mode("deterministic"):
            assert jetdet.get_mode() is Mode.DETERMINISTIC
            with jetdet.mode("off"):
                assert jetdet.get_mode() is Mode.OFF
            assert jetdet.get_mode() is Mode.DETERMINISTIC
        assert jetdet.get_mode() is Mode.FAST
    assert jetdet.get_mode() is Mode.OFF


def test_fast_mode_as_a_context_says_it_changes_nothing():
    """``jetdet.mode("fast")`` selects no kernels (the step cache is jetdet.patch's): it warns once, naming what to
    use, and models run as with mode off."""
    import warnings

    sys.modules["jetdet.mode"]._warned.discard("mode: fast context")
    with pytest.warns(UserWarning, match=r"mode 'fast' changes nothing by itself.*jetdet.patch\(model, mode='fast'"):
        with jetdet.mode("fast"):
            pass
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with jetdet.mode("fast"):  # once
            pass


def test_exception_restores_everything():
    before = torch_flags()
    prec = torch.get_float32_matmul_precision()
    stack = torch.overrides._get_current_function_mode_stack()
    with pytest.raises(RuntimeError, match="boom"):
        with jetdet.mode("deterministic"):
            assert torch_flags() != before
            with jetdet.mode("deterministic"):
                raise RuntimeError("boom")
    assert jetdet.get_mode() is Mode.OFF
    assert torch_flags() == before
    assert torch.get_float32_matmul_precision() == prec
    assert torch.overrides._get_current_function_mode_stack() == stack


def test_flags_set_inside_and_restored():
    torch.backends.cudnn.benchmark = True  # a user setting that must come back
    try:
        before = torch_flags()
        with jetdet.mode("deterministic"):
            f = torch_flags()
            assert f["use_deterministic_algorithms"] == (True, False)
            assert f["cudnn.deterministic"] is True and f["cudnn.benchmark"] is False
            assert f["cuda.matmul.allow_fp16_reduced_precision_reduction"] is False
            if "matmul.fp32 (precision, cuda, mkldnn)" in f:
                assert f["matmul.fp32 (precision, cuda, mkldnn)"] == ("highest", "ieee", "ieee")
            else:
                assert f["cuda.matmul.allow_tf32"] is False
        assert torch_flags() == before
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = False



def _legacy_reads() -> tuple:
    """What code reading the legacy TF32 flags gets: a value, or "raises"."""
    out = []
    for read in (lambda: torch.backends.cudnn.allow_tf32, lambda: torch.backends.cuda.matmul.allow_tf32):
        try:
            out.append(read())
        except RuntimeError as e:
            assert "legacy and new APIs" in str(e) or "mix" in str(e), e
            out.append("raises")
    return tuple(out)


def _mixed_conv():
    torch.backends.cudnn.conv.fp32_precision = "ieee"  # the new API only: allow_tf32 stays True


def _mixed_legacy_false():
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.conv.fp32_precision = "tf32"


def _global_ieee():
    torch.backends.fp32_precision = "ieee"


def _matmul_tf32_new_api():
    torch.backends.cuda.matmul.fp32_precision = "tf32"  # TF32 on by the new API only: the precision stays "highest"


def _mkldnn_matmul_tf32_new_api():
    torch.backends.mkldnn.matmul.fp32_precision = "tf32"


STARTS = {
    "default": lambda: None,
    "legacy allow_tf32 False": lambda: setattr(torch.backends.cudnn, "allow_tf32", False),
    "conv ieee by the new API (mixed)": _mixed_conv,
    "legacy False, conv tf32 (mixed)": _mixed_legacy_false,
    "global fp32_precision ieee": _global_ieee,
    "float32 matmul precision high": lambda: torch.set_float32_matmul_precision("high"),
    "float32 matmul precision medium": lambda: torch.set_float32_matmul_precision("medium"),
    # torch refuses torch.get_float32_matmul_precision() in these two, which jetdet read to save the state: entering
    # the mode raised torch's "mix of the legacy and new APIs" error (a user trial)
    "cuda matmul tf32 by the new API": _matmul_tf32_new_api,
    "mkldnn matmul tf32 by the new API": _mkldnn_matmul_tf32_new_api,
}


@pytest.mark.skipif(not hasattr(torch.backends, "fp32_precision"), reason="torch < 2.9: allow_tf32 is the only API")
@pytest.mark.parametrize("start", sorted(STARTS))
def test_legacy_tf32_flags_read_inside_the_mode_and_every_state_comes_back(start):
    """Deterministic mode turns TF32 off through the fp32_precision API. torch keeps the legacy ``cudnn.allow_tf32``
    and ``float32_matmul_precision`` as settings of their own, and reading ``cudnn.allow_tf32`` or
    ``cuda.matmul.allow_tf32`` raises while they disagree with it. They were left as they were, so code reading them
    during a deterministic call (``torch.backends.cudnn.flags()``, ComfyUI's ``tf32_mode``, a third-party node) raised
    (a review's find). Now both read False inside, from every starting state, and each state comes back exactly: the
    legacy flag included, probed where torch refuses to read it. Negative control: the mixed starting states raise
    on read before the mode."""
    import importlib

    mode_module = importlib.import_module("jetdet.mode")  # (``jetdet.mode`` is also the context function)
    b = torch.backends
    saved = (mode_module._cudnn_tf32(), mode_module._matmul_precision(), b.fp32_precision, b.cudnn.fp32_precision)
    mode_module._set_cudnn_tf32(("tf32", "tf32", True))  # torch's defaults (a GPU session fixture changes them)
    mode_module._set_matmul_precision(("highest", "none", "none"))
    try:
        STARTS[start]()
        before, reads = torch_flags(), _legacy_reads()
        if "mixed" in start:
            assert reads[0] == "raises", reads  # the negative control: this state cannot be read as it is
        with jetdet.mode("deterministic"):
            assert _legacy_reads() == (False, False)
            c = b.cudnn
            with c.flags(enabled=c.enabled, benchmark=False, deterministic=True, allow_tf32=False):
                pass
        assert torch_flags() == before and _legacy_reads() == reads
    finally:
        b.fp32_precision, b.cudnn.fp32_precision = saved[2], saved[3]
        mode_module._set_cudnn_tf32(saved[0])
        mode_module._set_matmul_precision(saved[1])


@pytest.mark.skipif(not hasattr(torch.backends, "fp32_precision"), reason="torch < 2.9: allow_tf32 is the only API")
def test_mode_enters_with_tf32_on_through_the_global_fp32_precision():
    """``torch.backends.fp32_precision = "tf32"`` (every backend's "none" inherits it) leaves
    ``torch.get_float32_matmul_precision()`` unreadable, with the matmul settings at "none" too: the mode reads it with
    them at "ieee" for a moment. TF32 is off inside, and every setting comes back. (``cudnn.flags()`` is not probed
    here: torch's own raises in this state, without jetdet.)"""
    import importlib

    mode_module = importlib.import_module("jetdet.mode")
    b = torch.backends
    saved = (mode_module._cudnn_tf32(), mode_module._matmul_precision(), b.fp32_precision, b.cudnn.fp32_precision)
    mode_module._set_matmul_precision(("highest", "none", "none"))
    try:
        b.fp32_precision = "tf32"
        before = torch_flags()
        with jetdet.mode("deterministic"):
            assert (b.cuda.matmul.fp32_precision, b.mkldnn.matmul.fp32_precision) == ("ieee", "ieee")
            assert _legacy_reads() == (False, False)
        assert torch_flags() == before and b.fp32_precision == "tf32"
    finally:
        b.fp32_precision, b.cudnn.fp32_precision = saved[2], saved[3]
        mode_module._set_cudnn_tf32(saved[0])
        mode_module._set_matmul_precision(saved[1])


def test_torch_flags_does_not_race_a_mode_entry_on_another_thread(monkeypatch):
    """``torch_flags()`` reads the matmul precision with both ``fp32_precision`` at "ieee" for a moment (TF32 on
    through the new API alone); a deterministic context entered on another thread meanwhile saved that moment's
    "ieee" as the user's setting and put it back on exit: TF32 was off for good (2 in 20000 entries with a thread
    calling torch_flags() in a loop; a concurrent read also raised torch's "mix of the legacy and new APIs").
    Here the other thread enters while the first one's read is held open at the flip."""
    mode_module = importlib.import_module("jetdet.mode")
    b = torch.backends
    saved = mode_module._matmul_precision()
    real_get = torch.get_float32_matmul_precision
    entered, done = threading.Event(), threading.Event()

    def enter_elsewhere():
        entered.set()
        with jetdet.mode("deterministic"):
            pass
        done.set()

    def held_get():
        if b.cuda.matmul.fp32_precision == "ieee" and threading.current_thread() is threading.main_thread() \
                and not entered.is_set():
            threading.Thread(target=enter_elsewhere, daemon=True).start()
            done.wait(1.0)  # without the fix the entry completes here, inside the flip
        return real_get()

    mode_module._set_matmul_precision(("highest", "none", "none"))
    try:
        b.cuda.matmul.fp32_precision = "tf32"
        monkeypatch.setattr(torch, "get_float32_matmul_precision", held_get)
        assert torch_flags()["matmul.fp32 (precision, cuda, mkldnn)"] == ("highest", "tf32", "none")
        assert done.wait(10.0)
        monkeypatch.undo()
        assert mode_module._matmul_precision() == ("highest", "tf32", "none")
    finally:
        monkeypatch.undo()
        mode_module._set_matmul_precision(saved)


def test_flags_comfyui_sets_are_off_inside_and_restored():
    """ComfyUI turns on fp16 accumulation in cuBLAS (``--fast fp16_accumulation``) and reduced-precision reductions in
    the math SDPA kernel (on every torch >= 2.5). Off inside deterministic mode (a fallback may reach either), back on
    afterwards."""
    b = torch.backends
    if not hasattr(b.cuda.matmul, "allow_fp16_accumulation"):
        pytest.skip("this torch has no fp16 accumulation flag")
    b.cuda.matmul.allow_fp16_accumulation = True
    b.cuda.allow_fp16_bf16_reduction_math_sdp(True)
    try:
        with jetdet.mode("deterministic"):
            assert b.cuda.matmul.allow_fp16_accumulation is False
            assert b.cuda.fp16_bf16_reduction_math_sdp_allowed() is False
        assert b.cuda.matmul.allow_fp16_accumulation is True
        assert b.cuda.fp16_bf16_reduction_math_sdp_allowed() is True
    finally:
        b.cuda.matmul.allow_fp16_accumulation = False
        b.cuda.allow_fp16_bf16_reduction_math_sdp(False)


def test_set_mode_and_back():
    before = torch_flags()
    old = jetdet.set_mode("deterministic")
    try:
        assert old is Mode.OFF and jetdet.get_mode() is Mode.DETERMINISTIC
        assert torch_flags()["use_deterministic_algorithms"][0]
    finally:
        jetdet.set_mode("off")
    assert torch_flags() == before


def _det_call_count(monkeypatch):
    """Counts GEMMs run by the CPU path: both the router's direct CPU route and the public ops end there."""
    from jetdet.kernels.matmul import torch_path as cpu

    calls = []
    orig = cpu.mm_f32

    def spy(*a):
        calls.append(1)
        return orig(*a)

    monkeypatch.setattr(cpu, "mm_f32", spy)
    return calls


def test_routing_only_inside(monkeypatch):
    calls = _det_call_count(monkeypatch)
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    F.linear(x, w)
    assert calls == []
    with jetdet.mode("deterministic"):
        F.linear(x, w)
        x @ w.t()
        with jetdet.mode("off"):
            F.linear(x, w)
    assert len(calls) == 2


def test_threads_do_not_share_mode(monkeypatch):
    calls = _det_call_count(monkeypatch)
    seen = {}
    ready = threading.Event()
    done = threading.Event()

    def other():
        ready.wait()
        seen["mode"] = jetdet.get_mode()
        F.linear(torch.randn(2, 8), torch.randn(3, 8))
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with jetdet.mode("deterministic"):
        ready.set()
        done.wait(10)
    t.join()
    assert seen["mode"] is Mode.OFF
    assert calls == []  # the other thread's linear was not routed


def test_asyncio_tasks_do_not_share_mode(monkeypatch):
    calls = _det_call_count(monkeypatch)
    log = []

    async def det_task(ev_in, ev_out):
        with jetdet.mode("deterministic"):
            ev_out.set()
            await ev_in.wait()
            F.linear(torch.randn(2, 8), torch.randn(3, 8))
            log.append(("det", jetdet.get_mode()))

    async def off_task(ev_in, ev_out):
        await ev_in.wait()  # runs while det_task is inside its with-block, on the same thread
        log.append(("off", jetdet.get_mode()))
        F.linear(torch.randn(2, 8), torch.randn(3, 8))
        ev_out.set()

    async def main():
        a, b = asyncio.Event(), asyncio.Event()
        await asyncio.gather(det_task(b, a), off_task(a, b))

    asyncio.run(main())
    assert ("off", Mode.OFF) in log and ("det", Mode.DETERMINISTIC) in log
    assert len(calls) == 1
    assert jetdet.get_mode() is Mode.OFF


def test_a_thread_that_inherits_the_context_starts_off(monkeypatch):
    """``asyncio.to_thread`` and ``copy_context().run`` copy the caller's context into another thread, where jetdet's
    router is not on the torch function stack. That thread reads ``off`` (as every new thread does) and is not
    routed; a ``mode(...)`` of its own works there, nested ``off`` included. Before, it read ``deterministic`` while
    nothing was routed, its own ``mode("deterministic")`` did nothing, and a nested ``mode("off")`` raised
    AttributeError."""
    calls = _det_call_count(monkeypatch)
    x, w = torch.randn(2, 8), torch.randn(3, 8)

    def in_thread():
        seen = [jetdet.get_mode()]
        F.linear(x, w)  # not routed
        with jetdet.mode("deterministic"):
            seen.append(jetdet.get_mode())
            F.linear(x, w)  # routed
            with jetdet.mode("off"):
                seen.append(jetdet.get_mode())
                F.linear(x, w)  # not routed
        seen.append(jetdet.get_mode())
        return seen

    async def main():
        with jetdet.mode("deterministic"):
            return await asyncio.to_thread(in_thread)

    before = torch_flags()
    seen = asyncio.run(main())
    assert seen == [Mode.OFF, Mode.DETERMINISTIC, Mode.OFF, Mode.OFF]
    assert len(calls) == 1
    with jetdet.mode("deterministic"):
        ctx = contextvars.copy_context()
    t = threading.Thread(target=ctx.run, args=(lambda: calls.append(jetdet.get_mode()),))
    t.start()
    t.join()
    assert calls[-1] is Mode.OFF
    assert jetdet.get_mode() is Mode.OFF and torch_flags() == before
    assert torch._C._len_torch_function_stack() == 0



def test_a_task_that_outlives_the_block_it_was_created_in_reads_the_mode_outside(monkeypatch):
    """An asyncio task created inside ``with jetdet.mode("deterministic"):`` copies the context, and may run after
    the block has exited (the router and torch's flags gone). It reads the mode outside the block (``off`` here),
    is not routed, and a ``mode("deterministic")`` of its own routes its calls; the thread's state ends as it
    started. Before, it read ``deterministic`` while nothing was routed, and its own deterministic context did
    nothing (``get_mode()`` said deterministic, and an item alone differed from the batch: a user trial)."""
    calls = _det_call_count(monkeypatch)
    x, w = torch.randn(2, 8), torch.randn(3, 8)
    seen = []

    async def job():
        await asyncio.sleep(0)
        seen.append(jetdet.get_mode())
        F.linear(x, w)  # not routed
        with jetdet.mode("off"):
            seen.append(jetdet.get_mode())
        with jetdet.mode("deterministic"):
            seen.append(jetdet.get_mode())
            F.linear(x, w)  # routed
        seen.append(jetdet.get_mode())

    async def main():
        with jetdet.mode("deterministic"):
            task = asyncio.create_task(job())
        await task
        with jetdet.mode("deterministic"):  # a context inside another, exited first, inherited by a task
            with jetdet.mode("off"):
                inner = asyncio.create_task(asyncio.sleep(0, result=0))
                await inner
                task = asyncio.create_task(job())
            await task  # runs inside the outer deterministic block: reads it
        return seen

    before = torch_flags()
    det, off = Mode.DETERMINISTIC, Mode.OFF
    first, second = [off, off, det, off], [det, off, det, det]
    assert asyncio.run(main()) == first + second
    assert len(calls) == 3  # the first job's own context, the second job's plain call and its own context
    assert jetdet.get_mode() is Mode.OFF and torch_flags() == before
    assert torch._C._len_torch_function_stack() == 0

def test_a_task_whose_own_context_outlives_the_block_it_was_created_in_leaves_the_counts_as_they_started():
    """A task's own context entered inside an outer block and exited after that block: its exit undoes what its entry
    did, not what the modes read then (the outer block's frames are closed by then). Before, a deterministic context
    entered inside a deterministic block released a hold it never took (depth and users -1: every later deterministic
    context on the thread did nothing), and an ``off`` context entered inside a nested ``off`` took one it never gave
    back (torch's flags stayed set after every context had exited)."""
    mode_mod = importlib.import_module("jetdet.mode")

    def counts():
        return (getattr(mode_mod._tls, "depth", 0), mode_mod._global_users, mode_mod._router_on_stack())

    def job(inner, entered, go):
        async def run():
            with jetdet.mode(inner):
                entered.set()
                await go.wait()
        return run()

    async def det_inside_det():
        entered, go = asyncio.Event(), asyncio.Event()
        with jetdet.mode("deterministic"):
            task = asyncio.create_task(job("deterministic", entered, go))
            await entered.wait()
        go.set()
        await task

    async def off_inside_nested_off():
        entered, go = asyncio.Event(), asyncio.Event()
        with jetdet.mode("deterministic"):
            with jetdet.mode("off"):
                task = asyncio.create_task(job("off", entered, go))
                await entered.wait()
            go.set()
            await task
            assert counts() == (1, 1, True)

    before = torch_flags()
    asyncio.run(det_inside_det())
    assert counts() == (0, 0, False) and torch_flags() == before
    with jetdet.mode("deterministic"):  # a later context still routes
        assert counts() == (1, 1, True)
    assert counts() == (0, 0, False) and torch_flags() == before
    asyncio.run(off_inside_nested_off())
    assert counts() == (0, 0, False) and torch_flags() == before
    assert jetdet.get_mode() is Mode.OFF and torch._C._len_torch_function_stack() == 0


def test_a_task_that_turns_the_mode_off_keeps_its_creators_and_siblings_routed(monkeypatch):
    """Tasks created inside a deterministic block (``asyncio.gather``) inherit it; one that turns the mode off for a
    while (``mode("off")``, ``set_mode("off")``) turns it off for itself only. Before, it released the block's hold:
    a sibling read ``deterministic`` while its linear ran unrouted with torch's flags off, and the block's own exit
    then released again (depth and users -1: every later deterministic context on the thread did nothing)."""
    calls = _det_call_count(monkeypatch)
    mode_mod = importlib.import_module("jetdet.mode")
    x, w = torch.randn(2, 8), torch.randn(3, 8)
    seen = []

    def counts():
        return (getattr(mode_mod._tls, "depth", 0), mode_mod._global_users, mode_mod._router_on_stack())

    async def reader(ev):
        await ev.wait()  # while the sibling is in its off block
        n = len(calls)
        F.linear(x, w)
        seen.append((jetdet.get_mode(), len(calls) - n, torch.are_deterministic_algorithms_enabled()))

    async def off_block(ev):
        with jetdet.mode("off"):
            ev.set()
            await asyncio.sleep(0.01)

    async def off_set(ev):
        jetdet.set_mode("off")
        ev.set()
        await asyncio.sleep(0.01)

    async def main(other):
        ev = asyncio.Event()
        with jetdet.mode("deterministic"):
            await asyncio.gather(reader(ev), other(ev))
            n = len(calls)
            F.linear(x, w)  # the block's own call, after the tasks
            seen.append((jetdet.get_mode(), len(calls) - n, torch.are_deterministic_algorithms_enabled()))

    before = torch_flags()
    det = Mode.DETERMINISTIC
    for other in (off_block, off_set):
        seen.clear()
        asyncio.run(main(other))
        assert seen == [(det, 1, True), (det, 1, True)], other.__name__
        assert counts() == (0, 0, False) and torch_flags() == before, other.__name__


def test_a_tasks_own_deterministic_context_keeps_routing_after_the_block_it_was_created_in_exits(monkeypatch):
    """A task created inside a deterministic block enters a deterministic context of its own while the block is
    open, and is still in it after the block exits: its calls stay routed (it holds the router itself). Before,
    ``get_mode()`` there said deterministic while nothing was routed (the router was the block's)."""
    calls = _det_call_count(monkeypatch)
    x, w = torch.randn(2, 8), torch.randn(3, 8)
    seen = []

    async def job(entered, go):
        with jetdet.mode("deterministic"):
            entered.set()
            await go.wait()
            n = len(calls)
            F.linear(x, w)
            seen.append((jetdet.get_mode(), len(calls) - n, torch.are_deterministic_algorithms_enabled()))

    async def main():
        entered, go = asyncio.Event(), asyncio.Event()
        with jetdet.mode("deterministic"):
            task = asyncio.create_task(job(entered, go))
            await entered.wait()
        go.set()
        await task

    before = torch_flags()
    asyncio.run(main())
    assert seen == [(Mode.DETERMINISTIC, 1, True)]
    assert torch_flags() == before and torch._C._len_torch_function_stack() == 0


def test_a_task_reads_what_holds_after_its_creator_replaces_its_set_mode():
    """A task created after ``set_mode("deterministic")`` reads deterministic; once its creator calls
    ``set_mode("off")`` (the hold gone), it reads off, and a deterministic context of its own entered before keeps
    routing. Before, it read deterministic with no router on the stack and torch's flags off."""
    mode_mod = importlib.import_module("jetdet.mode")
    seen = []

    def state():
        return (jetdet.get_mode(), mode_mod._router_on_stack(), torch.are_deterministic_algorithms_enabled())

    async def reads(ev, go):
        ev.set()
        await go.wait()
        seen.append(state())

    async def own_block(ev, go):
        with jetdet.mode("deterministic"):
            ev.set()
            await go.wait()
            seen.append(state())

    async def main(job):
        ev, go = asyncio.Event(), asyncio.Event()
        jetdet.set_mode("deterministic")
        task = asyncio.create_task(job(ev, go))
        await ev.wait()
        jetdet.set_mode("off")
        go.set()
        await task

    before = torch_flags()
    for job in (reads, own_block):
        asyncio.run(main(job))
    assert seen == [(Mode.OFF, False, False), (Mode.DETERMINISTIC, True, True)]
    assert torch_flags() == before and torch._C._len_torch_function_stack() == 0


def test_set_mode_again_with_the_same_mode_leaves_tasks_and_copied_contexts_reading_it():
    """``set_mode("deterministic")`` called again (an init run twice) replaced the first call's frame and closed it:
    a task created in between, or a ``contextvars.copy_context()`` taken then, read off while its creator and
    torch's flags stayed deterministic (its calls ran unrouted). 30c6152 read deterministic; so does this."""
    mode_mod = importlib.import_module("jetdet.mode")
    before = torch_flags()
    for m in (Mode.DETERMINISTIC, Mode.FAST):
        jetdet.set_mode(m)
        ctx = contextvars.copy_context()
        jetdet.set_mode(m)
        assert ctx.run(jetdet.get_mode) is m and jetdet.get_mode() is m
        jetdet.set_mode("off")
    assert torch_flags() == before and torch._C._len_torch_function_stack() == 0
    seen = []

    async def reads(go):
        await go.wait()
        seen.append((jetdet.get_mode(), mode_mod._router_on_stack(), torch.are_deterministic_algorithms_enabled()))

    async def main():
        go = asyncio.Event()
        jetdet.set_mode("deterministic")
        task = asyncio.create_task(reads(go))
        await asyncio.sleep(0)
        jetdet.set_mode("deterministic")
        go.set()
        await task
        jetdet.set_mode("off")  # control: the one hold is released, as after one set_mode call
        seen.append((jetdet.get_mode(), mode_mod._router_on_stack(), torch.are_deterministic_algorithms_enabled()))

    asyncio.run(main())
    assert seen == [(Mode.DETERMINISTIC, True, True), (Mode.OFF, False, False)]
    assert torch_flags() == before and torch._C._len_torch_function_stack() == 0


def test_an_async_generator_left_inside_a_block_restores_everything_when_asyncio_run_closes_it():
    """``async for ... : break`` leaves an async generator suspended inside its ``with jetdet.mode(...)`` block;
    ``asyncio.run`` closes it at shutdown in a task of its own, whose exit undoes the block's hold (a hold is undone
    on its thread by whichever task exits the block)."""
    mode_mod = importlib.import_module("jetdet.mode")

    async def stream():
        with jetdet.mode("deterministic"):
            yield 1
            yield 2

    async def main():
        async for _ in stream():
            break

    before = torch_flags()
    asyncio.run(main())
    assert (getattr(mode_mod._tls, "depth", 0), mode_mod._global_users, mode_mod._router_on_stack()) == (0, 0, False)
    assert torch_flags() == before and torch._C._len_torch_function_stack() == 0


def _run_seeds_and_check_restored(main, seeds: int = 60) -> None:
    """``asyncio.run(main(seed))`` for each seed: after each, the thread's depth, the process's users, the router and
    torch's flags are as they started, and no torch function mode is left on the stack."""
    mode_mod = importlib.import_module("jetdet.mode")
    before = torch_flags()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in range(seeds):
            asyncio.run(main(seed))
            state = (getattr(mode_mod._tls, "depth", 0), mode_mod._global_users, mode_mod._router_on_stack())
            assert state == (0, 0, False) and torch_flags() == before, f"seed {seed}: {state}"
    assert torch._C._len_torch_function_stack() == 0


def test_random_interleavings_with_set_mode_and_exceptions_leave_the_counts_as_they_started():
    """As the test below, with ``set_mode`` calls (inside blocks, and ``off``/``fast`` at a task's top) and blocks
    left by an exception: everything ends as it started. On the code before, 111 of 300 such seeds ended with the
    counts negative (a task's ``off`` released its creator's hold)."""
    import random

    modes = ["off", "deterministic", "deterministic", "fast"]

    class Boom(Exception):
        pass

    async def actor(rng, depth, spawned, top):
        for _ in range(rng.randint(1, 3)):
            r = rng.random()
            if top and r < 0.1:
                jetdet.set_mode(rng.choice(["off", "fast"]))
            elif depth < 3 and r < 0.8:
                with contextlib.suppress(Boom), jetdet.mode(rng.choice(modes)):
                    if rng.random() < 0.3:
                        jetdet.set_mode(rng.choice(modes))
                    if rng.random() < 0.5:
                        spawned.append(asyncio.create_task(
                            actor(random.Random(rng.random()), depth + 1, spawned, True)))
                    for _ in range(rng.randint(0, 4)):
                        await asyncio.sleep(0)
                    await actor(rng, depth + 1, spawned, False)
                    if rng.random() < 0.1:
                        raise Boom
            else:
                await asyncio.sleep(0)

    async def main(seed):
        rng, spawned = random.Random(seed), []
        with jetdet.mode(rng.choice(modes)):
            await actor(rng, 0, spawned, False)
        while spawned:
            await spawned.pop()

    _run_seeds_and_check_restored(main)


def test_random_interleavings_of_tasks_contexts_leave_the_counts_as_they_started():
    """Asyncio tasks on one thread, created inside each other's blocks at random and switching at random, each with
    nested ``mode`` contexts: once every task and block has exited, the thread's depth, the process's users, the
    router and torch's flags are as they started (on the code before, 143 of 400 such seeds ended
    with the counts off)."""
    import random

    modes = ["off", "deterministic", "deterministic", "fast"]

    async def actor(rng, depth, spawned):
        for _ in range(rng.randint(1, 3)):
            if depth < 3 and rng.random() < 0.8:
                with jetdet.mode(rng.choice(modes)):
                    if rng.random() < 0.5:
                        spawned.append(asyncio.create_task(actor(random.Random(rng.random()), depth + 1, spawned)))
                    for _ in range(rng.randint(0, 4)):
                        await asyncio.sleep(0)
                    await actor(rng, depth + 1, spawned)
                    for _ in range(rng.randint(0, 4)):
                        await asyncio.sleep(0)
            else:
                await asyncio.sleep(0)

    async def main(seed):
        rng, spawned = random.Random(seed), []
        with jetdet.mode(rng.choice(modes)):
            await actor(rng, 0, spawned)
            for _ in range(rng.randint(0, 3)):
                await asyncio.sleep(0)
        while spawned:
            await spawned.pop()

    _run_seeds_and_check_restored(main)


def _hold(m, **kw):
    with jetdet.mode(m, **kw):
        yield jetdet.get_mode()
        yield jetdet.get_mode()


@pytest.mark.parametrize("first,second", [("deterministic", "off"), ("off", "deterministic"),
                                          ("deterministic", "deterministic"), ("fast", "deterministic")])
def test_contexts_exited_out_of_order_restore_everything(first, second):
    """Two contexts left in the order they were entered (interleaved generators): after both, the mode, torch's
    flags and the torch function stack are as before. Before, the second one's exit set the first one's mode
    again, leaving deterministic mode and its flags on."""
    before = torch_flags()
    a, b = _hold(first), _hold(second)
    next(a)
    assert next(b) is Mode(second)
    for _ in a:  # a ends first: b's mode holds until b ends
        pass
    assert jetdet.get_mode() is Mode(second)
    for _ in b:
        pass
    assert jetdet.get_mode() is Mode.OFF
    assert torch_flags() == before
    assert torch._C._len_torch_function_stack() == 0


def test_set_mode_inside_a_context_ends_with_it_and_set_mode_does_not_pile_up():
    """A set_mode inside a ``with`` block lasts until the block ends, as a ContextVar reset gave (the first version
    of the frame chain kept it past the block); repeated set_mode calls replace each other instead of growing the
    chain of frames."""
    mode_mod = importlib.import_module("jetdet.mode")
    before = torch_flags()
    with jetdet.mode("off"):
        jetdet.set_mode("deterministic")
        assert torch.are_deterministic_algorithms_enabled()
    assert jetdet.get_mode() is Mode.OFF and torch_flags() == before
    with jetdet.mode("deterministic"):
        jetdet.set_mode("off")
        assert not torch.are_deterministic_algorithms_enabled()
    assert jetdet.get_mode() is Mode.OFF and torch_flags() == before
    for _ in range(100):
        jetdet.set_mode("deterministic")
        jetdet.set_mode("off")
    depth, f = 0, mode_mod._current.get()
    while f is not None:
        depth, f = depth + 1, f.parent
    assert depth <= 2 and torch_flags() == before and torch._C._len_torch_function_stack() == 0


def test_out_of_order_exit_drops_the_set_mode_made_inside():
    def held(m, then):
        with jetdet.mode(m):
            jetdet.set_mode(then)
            yield
            yield

    before = torch_flags()
    a, b = held("off", "deterministic"), _hold("off")
    next(a)
    next(b)
    for _ in a:
        pass
    assert jetdet.get_mode() is Mode.OFF and not torch.are_deterministic_algorithms_enabled()
    for _ in b:
        pass
    assert jetdet.get_mode() is Mode.OFF and torch_flags() == before
    assert torch._C._len_torch_function_stack() == 0


def test_one_mode_object_shared_by_overlapping_tasks():
    """One ``jetdet.mode`` object used by two tasks at once (``DET = jetdet.mode("deterministic")`` shared like
    ``torch.no_grad()``): each exit takes its own task's frame, and everything ends as it started. Before, each
    exit took the other task's frame and restored nothing: the router and torch's flags stayed on."""
    det = jetdet.mode("deterministic")
    before = torch_flags()

    async def job(delay):
        with det:
            await asyncio.sleep(delay)
            return jetdet.get_mode()

    async def main():
        return await asyncio.gather(job(0.01), job(0.02))

    assert asyncio.run(main()) == [Mode.DETERMINISTIC, Mode.DETERMINISTIC]
    assert jetdet.get_mode() is Mode.OFF and torch_flags() == before
    assert torch._C._len_torch_function_stack() == 0


def test_a_reused_thread_ident_does_not_take_an_ended_threads_frames():
    """Thread idents are reused once a thread ends: a later thread running a context copied in an ended thread's
    deterministic block reads ``off`` (frames name their thread by an object of its own, not by its ident)."""
    box = {}

    def first():
        box["ident"] = threading.get_ident()
        with jetdet.mode("deterministic"):
            box["ctx"] = contextvars.copy_context()

    t = threading.Thread(target=first)
    t.start()
    t.join()
    seen = []

    def later():
        seen.append((threading.get_ident() == box["ident"], jetdet.get_mode()))
        with jetdet.mode("off"):  # raised AttributeError when the frame was taken for this thread's
            pass

    for _ in range(20):
        t = threading.Thread(target=box["ctx"].run, args=(later,))
        t.start()
        t.join()
        if seen[-1][0]:
            break
    assert all(m is Mode.OFF for _, m in seen)


def test_three_contexts_exited_out_of_order():
    before = torch_flags()
    gens = [_hold("deterministic"), _hold("off"), _hold("deterministic")]
    for g in gens:
        next(g)
    for order in ([1], [0], [2]):
        for i in order:
            for _ in gens[i]:
                pass
        if order == [1]:
            assert jetdet.get_mode() is Mode.DETERMINISTIC and torch.are_deterministic_algorithms_enabled()
    assert jetdet.get_mode() is Mode.OFF and torch_flags() == before


def test_warn_only_outlives_a_nested_off_and_a_strict_inner_context_says_it_is_not_strict():
    before = torch_flags()
    with jetdet.mode("deterministic", warn_only=True):
        with jetdet.mode("off"):
            assert not torch.are_deterministic_algorithms_enabled()
        # back in the outer context: its warn_only again (before, the re-entry turned it strict)
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        importlib.import_module("jetdet.mode")._warned.discard("mode: warn_only=False")  # once per process
        with pytest.warns(UserWarning, match="keeps that context's warn_only=True"):
            with jetdet.mode("deterministic"):
                assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch_flags() == before


def test_fallback_warns_once_and_is_correct():
    x = torch.randn(3, 4, 9, 9, dtype=torch.float64)
    w = torch.randn(8, 2, 3, 3, dtype=torch.float64)  # float64: not a jetdet dtype
    with jetdet.mode("deterministic"):
        with pytest.warns(UserWarning, match="dtype torch.float64"):
            y = F.conv2d(x, w, groups=2)
    assert torch.equal(y, F.conv2d(x, w, groups=2))


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_query_attention_is_routed(monkeypatch, kv_heads):
    """``F.scaled_dot_product_attention(..., enable_gqa=True)`` with fewer key/value heads than query heads (diffusers'
    ACE-Step and Cosmos 3 attention) is torch's attention with each key/value head repeated for its group of query
    heads: routed so, within 1e-5 of torch, each item alone equal to its row in the batch. It fell back to torch
    before (a user trial); the fallback raises here, so the test fails where it would be taken."""
    mode_module = importlib.import_module("jetdet.mode")

    def no_fallback(func, args, kwargs, why):
        raise AssertionError(f"fell back: {why}")

    monkeypatch.setattr(mode_module, "_fallback", no_fallback)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 4, 13, 16, generator=g)
    k, v = torch.randn(4, kv_heads, 11, 16, generator=g), torch.randn(4, kv_heads, 11, 16, generator=g)
    mask = torch.rand(4, 1, 13, 11, generator=g) > 0.3
    for kw in ({}, {"attn_mask": mask}, {"scale": 0.2}):
        ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
        with jetdet.mode("deterministic"):
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
            for i in (0, 3):
                one = {n: (t[i:i + 1] if n == "attn_mask" else t) for n, t in kw.items()}
                alone = F.scaled_dot_product_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], enable_gqa=True, **one)
                assert torch.equal(alone[0], out[i])
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_routed_results_match_torch_closely():
    x = torch.randn(2, 3, 10, 10)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    gn = torch.nn.GroupNorm(1, 5)
    q = torch.randn(2, 2, 7, 8)
    with torch.no_grad():
        ref = (gn(conv(x)), F.scaled_dot_product_attention(q, q, q, is_causal=True), torch.baddbmm(
            torch.ones(2, 7, 7), q[:, 0], q[:, 1].transpose(1, 2), alpha=0.5), torch.softmax(x, 1))
        with jetdet.mode("deterministic"):
            got = (gn(conv(x)), F.scaled_dot_product_attention(q, q, q, is_causal=True), torch.baddbmm(
                torch.ones(2, 7, 7), q[:, 0], q[:, 1].transpose(1, 2), alpha=0.5), x.softmax(1))
    for r, g in zip(ref, got):
        assert torch.allclose(r, g, atol=1e-5, rtol=1e-5)


def test_the_users_torch_function_modes_keep_working_across_jetdet_contexts():
    """Torch function modes the user enters (a counter, ``torch.device("meta")``) interleaved with deterministic mode,
    a nested ``mode("off")`` and ``set_mode``: each user mode keeps seeing every call while it is entered, its exit
    pops itself, and the stack ends as it started with no router left behind. The router sits under the user's
    modes (``mode._insert_at_bottom``). Negative controls (run by hand): with the router pushed on top and exited
    unconditionally, as before, the nested "off" popped the user's mode (the counter saw nothing, zeros came out on
    the CPU) and its exit pushed a second router; ``set_mode`` inside ``torch.device("meta")`` left meta on for good
    and deterministic mode without a router."""
    from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

    class Counter(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    def stack():
        return [type(m).__name__ for m in _get_current_function_mode_stack()]

    x, w = torch.randn(4, 8), torch.randn(8, 8)
    before = stack()
    counter = Counter()
    with jetdet.mode("deterministic"):
        with counter:
            with jetdet.mode("off"):
                n = counter.n
                F.linear(x, w)
                assert counter.n > n and "_Router" not in stack()
            n = counter.n
            assert torch.equal(F.linear(x, w), F.linear(x, w))  # routed (the router is under the counter)
            assert counter.n > n and stack().count("_Router") == 1
        with torch.device("meta"):
            with jetdet.mode("off"):
                assert torch.zeros(1).device.type == "meta"
            assert torch.zeros(1).device.type == "meta"
    assert stack() == before and jetdet.get_mode() is Mode.OFF

    # the deterministic context exits while the user's mode is still entered: the router leaves, the mode stays
    counter = Counter()
    with jetdet.mode("deterministic"):
        counter.__enter__()
    assert stack() == [*before, "Counter"]
    counter.__exit__(None, None, None)
    assert stack() == before

    # set_mode (no with block) inside a user's torch.device context: leaving the context pops the device mode, and
    # deterministic mode keeps its router until set_mode("off")
    with torch.device("meta"):
        jetdet.set_mode("deterministic")
    try:
        assert torch.zeros(1).device.type == "cpu" and stack() == [*before, "_Router"]
        with jetdet.mode("deterministic"):
            assert stack().count("_Router") == 1
    finally:
        jetdet.set_mode("off")
    assert stack() == before


def test_route_op_takes_exactly_one_of_a_handler_and_a_reason():
    """``route_op`` with neither a handler nor an unrouted reason, or with both, is refused; the error says what it
    takes ("exactly one of", not "not both", which was wrong for neither). Nothing is registered."""
    from jetdet.mode import handler_for, route_op

    f = torch.ops.aten.special_entr
    for kw in ({}, {"handler": lambda func, args, kwargs: None, "unrouted": "why"}):
        with pytest.raises(TypeError, match="exactly one of a handler and an unrouted reason"):
            route_op(f, **kw)
    assert handler_for(f) is None


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.create_task(context=) is Python 3.11's")
def test_set_mode_across_cells_each_its_own_task_over_one_context():
    """Jupyter (ipykernel 7) runs each cell in an asyncio task of its own over one persistent context. A cell's
    ``set_mode("off")`` after an earlier cell's ``set_mode("deterministic")`` read off but kept the hold: torch's
    flags stayed deterministic and the router on (30c6152 released it), and a ``mode("off")`` block ran with torch's
    flags deterministic. Same for "deterministic" set twice, then off.
    Control: a task the creator is still awaiting (not finished) turns it off for itself only, as before."""
    mode_mod = importlib.import_module("jetdet.mode")
    before = torch_flags()
    ctx = contextvars.copy_context()
    loop = asyncio.new_event_loop()

    def cell(fn):
        async def body():
            out = fn()
            return await out if asyncio.iscoroutine(out) else out
        return loop.run_until_complete(loop.create_task(body(), context=ctx))

    def state():
        return (jetdet.get_mode(), mode_mod._router_on_stack(), torch.are_deterministic_algorithms_enabled())

    try:
        for sets in (["deterministic"], ["deterministic", "deterministic"], ["deterministic", "fast"]):
            for m in sets:
                cell(lambda m=m: jetdet.set_mode(m))
            assert cell(state)[0] is Mode(sets[-1])
            if sets[-1] == "deterministic":  # a block turning it off in a later cell: torch's flags too, meanwhile

                def off_block():
                    with jetdet.mode("off"):
                        return state()

                assert cell(off_block) == (Mode.OFF, False, False)
                assert cell(state) == (Mode.DETERMINISTIC, True, True)
            cell(lambda: jetdet.set_mode("off"))
            assert cell(state) == (Mode.OFF, False, False), sets
            assert torch_flags() == before and torch._C._len_torch_function_stack() == 0

        async def creator():  # control: the creator still runs while its task turns the mode off
            jetdet.set_mode("deterministic")
            seen = await asyncio.create_task(child())
            seen.append(state())
            jetdet.set_mode("off")
            return seen

        async def child():
            jetdet.set_mode("off")
            return [state()]

        assert cell(creator) == [(Mode.OFF, True, True), (Mode.DETERMINISTIC, True, True)]
        assert cell(state) == (Mode.OFF, False, False)
    finally:
        loop.close()
    assert torch_flags() == before and torch._C._len_torch_function_stack() == 0
