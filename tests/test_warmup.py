"""``jetdet.warmup.compile_ahead``: launches inside compile their variants in a thread pool and run nothing; after
the block, the same launches find their variants in Triton's cache and compile nothing.

There is no GPU here, so the test stands a fake CUDA driver behind Triton (current device 0, target sm_90): the
JIT binds the real arguments of recorded jetdet launches exactly as on a GPU and cross-compiles for sm_90, as the
static report does. A launch that tried to run would need the real driver and fail."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _devices import INTERPRETER

import jetdet
from jetdet import static_report, warmup

#: both tests below record launches in the interpreter; on a GPU, ``bench/gpu_check.py``'s record pass and the
#: ``new_variants`` count of each section after it check the same thing with the real driver
needs_interpreter = pytest.mark.skipif(not INTERPRETER, reason="records launches in the Triton interpreter")


class _FakeDriver:
    """What ``JITFunction.run`` asks of the driver before a launch; nothing to launch with."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def _recorded_launches():
    """(kernel, args, kwargs, grid) of the launches of a routed linear, layer_norm and softmax, in the interpreter
    with the launches recorded instead of run."""
    log = []
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 5, 64, generator=g).half(), torch.randn(48, 64, generator=g).half()
    with static_report.stub_launches(lambda *launch: log.append(launch)), torch.no_grad(), \
            jetdet.mode("deterministic"):
        F.linear(x, w)
        F.linear(x[0], w)  # M = 5 again (in rows): the same variant
        F.layer_norm(x, (64,))
        torch.softmax(x, -1)
    return log


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    from triton.runtime import driver

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))
    monkeypatch.setenv("JETDET_BACKEND", "triton")
    launches = _recorded_launches()  # with the interpreter, as the rest of the suite
    saved = driver._active  # None here: no GPU, so no driver is active
    driver.set_active(_FakeDriver(90))
    try:
        # entered with the interpreter on (see its docstring); inside, TRITON_INTERPRET reads 0, so compile_ahead
        # compiles
        with static_report.compiling():
            memo: dict = {}
            yield [(static_report.as_jit_function(k, memo), a, kw, grid) for k, a, kw, grid in launches]
    finally:
        driver._active = saved


@needs_interpreter
def test_compile_ahead_then_no_compile(fake_gpu):
    jits = list({id(j): j for j, *_ in fake_gpu}.values())
    assert len(fake_gpu) == 4 and len(jits) == 3
    with warmup.compile_ahead(kernels=jits, workers=2) as stats:
        for jit, args, kwargs, grid in fake_gpu:
            jit[grid](*args, **kwargs)  # the launch as the launchers make it
    assert stats["skipped"] is None
    assert stats["launches"] == 4
    assert stats["compiles"] == 3, stats  # the two linears share one variant
    assert warmup.cached_variants(jits) == 3
    assert all("run" not in vars(j) for j in jits)  # the launch path is back
    # the same launches now find their variants: a compile would raise
    for jit in jits:
        jit.compile = _no_compile
    for jit, args, kwargs, grid in fake_gpu:
        kernel = jit.run(*args, grid=grid, warmup=True, **kwargs)
        assert kernel is not None and kernel.asm.get("cubin")
    # negative control: a launch with another specialisation (M = 1 is a compile-time constant) is not cached
    jit, args, kwargs, grid = fake_gpu[0]
    m_at = next(i for i, a in enumerate(args) if isinstance(a, int) and a == 15)  # M of the [15, 64] linear
    args = (*args[:m_at], 1, *args[m_at + 1:])
    with pytest.raises(AssertionError, match="compiled again"):
        jit.run(*args, grid=grid, warmup=True, **kwargs)


def _gate_compiles(jits, gate_of) -> None:
    """Make each kernel's compile wait for its gate (``gate_of(jit)``, a ``threading.Event``) before compiling."""
    for jit in jits:
        jit.device_caches[0]  # makes the kernel's compile function, which the gate then wraps
        gate = gate_of(jit)

        def gated(*args, _orig=jit.compile, _gate=gate, **kwargs):
            assert _gate.wait(60), "the gate was never opened"
            return _orig(*args, **kwargs)

        jit.compile = gated


@needs_interpreter
def test_the_wait_for_compiles_ends_at_the_deadline_and_the_rest_finish_later(fake_gpu):
    """``bench/gpu_check.py`` gives its record pass a share of a fixed time budget; leaving the block used to wait
    for every compile, however long, out of the later sections' time. With ``deadline`` the wait ends there, the
    compiles still running go on, and a launch that needs one gets it. Negative control: without a deadline,
    leaving waits for a compile that cannot finish yet."""
    import threading
    import time

    jits = list({id(j): j for j, *_ in fake_gpu}.values())
    gate = threading.Event()
    _gate_compiles(jits, lambda jit: gate)

    def launch_all():
        for jit, args, kwargs, grid in fake_gpu:
            jit[grid](*args, **kwargs)

    # negative control: no deadline, so leaving blocks while the gate is shut
    left = threading.Event()

    def no_deadline():
        with warmup.compile_ahead(kernels=jits, workers=2):
            launch_all()
        left.set()

    t = threading.Thread(target=no_deadline, daemon=True)
    t.start()
    assert not left.wait(1.0), "left the block before its compiles could finish"
    gate.set()
    t.join(120)
    assert left.is_set()
    for jit in jits:  # a fresh start: nothing cached in memory (the disk cache keeps the compiled variants)
        jit.device_caches[0][0].clear()
    gate.clear()

    t0 = time.perf_counter()
    with warmup.compile_ahead(kernels=jits, workers=2, deadline=time.perf_counter() + 0.3) as stats:
        launch_all()
    assert time.perf_counter() - t0 < 10
    assert stats["compiles"] == 3 and stats["pending"] == 3, stats
    assert all("run" not in vars(j) for j in jits)
    gate.set()
    for jit, args, kwargs, grid in fake_gpu:  # each launch gets its variant, compiled by the pool
        kernel = jit.run(*args, grid=grid, warmup=True, **kwargs)
        assert kernel is not None and kernel.asm.get("cubin")
    end = time.perf_counter() + 10
    while warmup._patch["users"] and time.perf_counter() < end:  # the last compile's callback may still be running
        time.sleep(0.01)
    assert warmup._patch["users"] == 0  # serial parsing lasted as long as the compiles, and Triton's parse is back


@needs_interpreter
def test_a_variant_still_queued_at_the_deadline_is_compiled_by_its_launch(fake_gpu):
    """One compile thread: at the deadline the first variant is compiling and two are queued behind it. A review
    found the launch of a queued one waiting for every compile ahead of it (its placeholder stayed in the cache);
    it now compiles its variant itself, at once, while the first is still held."""
    import threading
    import time

    jits = list({id(j): j for j, *_ in fake_gpu}.values())
    gates = {id(jit): threading.Event() for jit in jits}
    _gate_compiles(jits, lambda jit: gates[id(jit)])
    try:
        with warmup.compile_ahead(kernels=jits, workers=1, deadline=time.perf_counter() + 0.3) as stats:
            for jit, args, kwargs, grid in fake_gpu:
                jit[grid](*args, **kwargs)
        assert stats["compiles"] == 3 and stats["pending"] == 3, stats
        jit, args, kwargs, grid = fake_gpu[-1]  # a variant queued behind the first
        gates[id(jit)].set()
        got = {}
        def launch():  # a real launch reads the kernel's attributes, which waits for a placeholder's compile
            got["cubin"] = jit.run(*args, grid=grid, warmup=True, **kwargs).asm.get("cubin")

        t = threading.Thread(target=launch, daemon=True)
        t.start()
        t.join(30)
        assert not t.is_alive(), "the launch waited for the compiles queued ahead of it"
        assert got["cubin"]
    finally:
        for gate in gates.values():
            gate.set()
    end = time.perf_counter() + 30
    while warmup._patch["users"] and time.perf_counter() < end:
        time.sleep(0.01)
    assert warmup._patch["users"] == 0


@needs_interpreter
def test_a_launch_from_another_thread_runs_as_usual_inside_compile_ahead(fake_gpu):
    """Triton's AsyncCompileMode is per context, but compile_ahead patches the shared kernel objects: a launch from
    another thread during the block compiled and skipped its launch (uninitialised outputs, no error). It now runs
    as it would have; only this context's launches are turned into compiles."""
    import threading

    seen = []

    class Kernel:  # what compile_ahead patches: a kernel object with its own ``run``
        def run(self, *args, grid=None, warmup=False, **kwargs):
            seen.append((threading.current_thread().name, warmup))

    k = Kernel()
    with warmup.compile_ahead(kernels=[k], workers=1) as stats:
        k.run(1, grid=(1,))
        t = threading.Thread(target=lambda: k.run(1, grid=(1,)), name="other")
        t.start()
        t.join()
    assert seen == [("MainThread", True), ("other", False)]
    assert stats["launches"] == 1 and "run" not in vars(k)


def _no_compile(*args, **kwargs):
    raise AssertionError("compiled again")


@needs_interpreter
def test_compile_ahead_is_a_no_op_under_the_interpreter():
    """With the interpreter on (this suite), launches inside run as usual and nothing is compiled."""
    assert warmup.unavailable() and "interpreter" in warmup.unavailable()
    x = torch.randn(4, 32)
    with warmup.compile_ahead() as stats, torch.no_grad(), jetdet.mode("deterministic"):
        y = torch.softmax(x, -1)
    assert stats["skipped"] and stats["launches"] == 0
    assert torch.allclose(y, torch.softmax(x, -1), atol=1e-6)


def test_compile_threads_script(capsys):
    """``bench/compile_threads.py`` (the figures behind the thread pool) runs: two specs, both ways."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "compile_threads.py"
    spec = importlib.util.spec_from_file_location("compile_threads", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--only", "softmax[fp16", "--count", "2", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "one after another" in out and "2 threads" in out and "speed-up" in out
    assert mod.main(["--only", "no such kernel"]) == 2


def test_kernel_sources_are_parsed_one_at_a_time_while_compiling_ahead():
    """CPython 3.11 before 3.11.8 can fail concurrent ``ast.parse`` calls (python/cpython#106905; seen once in this
    suite): inside :func:`warmup.serial_parse` (which compile_ahead enters) two threads' parses never overlap, and
    Triton's own method is back afterwards. Negative control: without it they do overlap."""
    import threading

    from triton.runtime.jit import JITFunction

    kernels = [JITFunction(_source_a), JITFunction(_source_b)]  # compiled-mode objects, whatever TRITON_INTERPRET
    owner = warmup._parse_owner()
    orig = owner.__dict__["parse"]
    state = {"inside": 0, "most": 0}
    lock = threading.Lock()
    barrier = threading.Barrier(2, timeout=5)

    def slow_parse(self):
        with lock:
            state["inside"] += 1
            state["most"] = max(state["most"], state["inside"])
        try:
            threading.Event().wait(0.2)  # long enough for the other thread to arrive
            return orig(self)
        finally:
            with lock:
                state["inside"] -= 1

    def overlap() -> int:
        state["most"] = 0

        def work(k):
            barrier.wait()
            k.parse()

        threads = [threading.Thread(target=work, args=(k,)) for k in kernels]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return state["most"]

    owner.parse = slow_parse
    try:
        assert overlap() == 2  # negative control: Triton's own parse lets two threads in at once
        with warmup.serial_parse():
            assert overlap() == 1
        assert owner.__dict__["parse"] is slow_parse
    finally:
        owner.parse = orig


def test_overlapping_serial_parse_blocks_never_hang_and_restore_triton():
    """Blocks that overlap (nested in one thread, or open in two threads and left in either order) parse without
    deadlocking, and Triton's own method is back once the last one is left."""
    import threading

    from triton.runtime.jit import JITFunction

    owner = warmup._parse_owner()
    orig = owner.__dict__["parse"]
    k = JITFunction(_source_a)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    errors = []

    def a():
        try:
            with warmup.serial_parse():
                a_in.set()
                b_in.wait(5)
                k.parse()
            a_out.set()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def b():
        try:
            a_in.wait(5)
            with warmup.serial_parse():
                b_in.set()
                with warmup.serial_parse():  # nested in one thread too
                    k.parse()
                a_out.wait(5)  # A leaves first
                k.parse()
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=a, daemon=True), threading.Thread(target=b, daemon=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads), "a parse deadlocked"
    assert not errors, errors
    assert owner.__dict__["parse"] is orig


def _source_a(x):
    return x + 1


def _source_b(x):
    return x * 2
