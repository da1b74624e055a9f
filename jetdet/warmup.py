"""Compile jetdet's Triton kernels ahead of time, in parallel, for the launches a workload makes.

Triton compiles a kernel variant the first time a launch needs it, one at a time, in the launching thread, so a
cold process waits for every new variant before its first result (about 0.5 s each for attention and GEMM specs
on a 2-core CPU; a GPU check that touches every op, dtype and shape class needs many). :func:`compile_ahead` runs
a workload once with every launch of a jetdet kernel turned into Triton's own warm-up call
(``JITFunction.run(..., warmup=True)``: the arguments are bound and the variant is compiled, nothing runs on the
GPU) inside Triton's ``AsyncCompileMode`` (made for warming kernels up in parallel on a thread pool,
triton-lang/triton#7306; present in 3.5.1, 3.6 and 3.9), which hands each new variant's compile to the pool. Triton's
compiler releases the GIL for nearly all of its work (``PYTHONPATH=. python bench/compile_threads.py`` on a 2-core
CPU, sm_90: 8 attention specs 4.6 s one after another, 2.4 s on two threads; 8 GEMM specs 4.0 s and 2.0 s), so
the variants compile side by side. Leaving the block waits for them; they are then in each kernel's in-memory
cache (and Triton's disk cache), under the keys Triton itself computed from the recorded arguments, so running the
workload again launches without compiling.

Inside the block no jetdet kernel runs: their outputs are uninitialised memory, and code that looks at them
sees garbage. Use it for a throwaway pass, then run the workload for real. A launch whose arguments depend on
earlier results (a data-dependent shape) may differ between the two passes; it then compiles when it is needed,
as without this. Compile errors are left to that real launch too.

    with compile_ahead() as stats:
        model(x)            # nothing computed; every kernel variant it launches compiles in the pool
    model(x)                # no compile
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

_PARSE_LOCK = threading.RLock()  # held by Triton's parse while serial_parse is active
_PATCH_LOCK = threading.Lock()  # guards the patch's use count
_patch = {"users": 0, "owner": None, "orig": None}


def _kernels(kernels):
    if kernels is not None:
        return list(kernels)
    from .static_report import all_kernels

    return all_kernels()


def cached_variants(kernels=None) -> int:
    """How many compiled variants the given (default: every jetdet) kernels hold in Triton's in-memory
    caches, over all devices. A count taken before and after some work says how many variants it compiled or
    loaded."""
    try:
        from triton.runtime._async_compile import FutureKernel
    except ImportError:
        FutureKernel = ()  # noqa: N806 - isinstance(x, ()) is False
    n = 0
    for k in _kernels(kernels):
        for entry in getattr(k, "device_caches", {}).values():
            n += sum(not isinstance(v, FutureKernel) for v in entry[0].values())  # a compile still running: not yet
    return n


def unavailable() -> str | None:
    """Why :func:`compile_ahead` cannot compile ahead here, or None."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "the Triton interpreter is on (TRITON_INTERPRET=1): nothing is compiled"
    try:
        from triton.runtime._async_compile import AsyncCompileMode  # noqa: F401
    except ImportError:
        import triton

        return f"triton {triton.__version__} has no AsyncCompileMode"
    return None


@contextlib.contextmanager
def serial_parse():
    """Inside, Triton parses one kernel source at a time (``JITFunction.parse``, the ``ast.parse`` behind a
    kernel's cache key in the launching thread and behind code generation in each compile thread). CPython 3.11
    before 3.11.8 can fail an ``ast.parse`` that runs while another thread's is under way with ``SystemError: AST
    constructor recursion depth mismatch`` (python/cpython#106905): it did once in this project's test suite (3.11.7,
    triton 3.9), in the launching thread while the pool compiled. Parsing is milliseconds; the compiles still run
    side by side. Blocks may overlap, in one thread or several: Triton's method is patched by the first to enter and
    put back by the last to leave."""
    owner = _parse_owner()
    if owner is None:  # a Triton without the method: nothing to serialise here
        yield
        return
    with _PATCH_LOCK:
        if _patch["users"] == 0:
            orig = owner.__dict__["parse"]

            def parse(self):
                with _PARSE_LOCK:
                    return orig(self)

            owner.parse = parse
            _patch.update(owner=owner, orig=orig)
        _patch["users"] += 1
    try:
        yield
    finally:
        with _PATCH_LOCK:
            _patch["users"] -= 1
            if _patch["users"] == 0:
                _patch["owner"].parse = _patch["orig"]
                _patch.update(owner=None, orig=None)


def _parse_owner():
    """The Triton class that defines ``parse`` (``JITFunction`` in 3.6, its base ``JITCallable`` in 3.9), or None."""
    from triton.runtime.jit import JITFunction

    return next((c for c in JITFunction.__mro__ if "parse" in c.__dict__), None)


@contextlib.contextmanager
def compile_ahead(kernels=None, workers: int | None = None, deadline: float | None = None):
    """Inside, each launch of ``kernels`` (default: every jetdet ``@triton.jit`` kernel,
    :func:`jetdet.static_report.all_kernels`) compiles its variant in a pool of ``workers`` threads (default: the
    CPU count) instead of running; leaving waits for the compiles, until ``deadline`` (a ``time.perf_counter()``
    value; None: for all of them). Compiles running then finish in the background, and a later launch that needs one
    waits for that one only; those not started yet are cancelled, and compiled by their launch as usual. Yields a
    dict:
    ``launches`` (recorded), ``compiles`` (distinct variants handed to the pool; a variant in Triton's disk cache is
    loaded, not compiled), ``pending`` (compiles not finished when the wait ended), ``seconds`` (filled on exit) and
    ``skipped`` (why nothing was compiled ahead, or None: with the interpreter, or a Triton without
    ``AsyncCompileMode``, the launches run as usual)."""
    stats = {"launches": 0, "compiles": 0, "pending": 0, "seconds": 0.0, "skipped": unavailable()}
    if stats["skipped"]:
        yield stats
        return
    from triton.runtime import _async_compile
    from triton.runtime._async_compile import AsyncCompileMode

    t0 = time.perf_counter()
    patched = []
    pool = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1, thread_name_prefix="jetdet-compile")
    parse = contextlib.ExitStack()
    parse.enter_context(serial_parse())  # left when the last compile ends, which may be after this block
    mode = AsyncCompileMode(pool, ignore_errors=True)
    try:
        for kernel in _kernels(kernels):
            if "run" in vars(kernel):
                continue  # already wrapped (e.g. by static_report.capture_launches)

            def run(*args, _orig=kernel.run, grid=None, warmup=False, **kwargs):
                # Triton's AsyncCompileMode is per context (a ContextVar); the kernels are shared. A launch
                # from another thread (or a context outside this block) runs as it would have, instead of
                # compiling and skipping its launch (uninitialised outputs, no error)
                if _async_compile.active_mode.get() is not mode:
                    return _orig(*args, grid=grid, warmup=warmup, **kwargs)
                stats["launches"] += 1
                return _orig(*args, grid=grid, warmup=True, **kwargs)

            kernel.run = run
            patched.append(kernel)
        mode.__enter__()
        try:
            yield stats
        finally:
            _async_compile.active_mode.set(None)
            stats["compiles"] = len(mode.future_kernels)
            stats["pending"] = _finish(mode, deadline, patched, parse)
    finally:
        for kernel in patched:
            vars(kernel).pop("run", None)
        if not stats["pending"]:
            parse.close()
        pool.shutdown(wait=False)  # the pending compiles run on; nothing is left queued that no one waits for
        stats["seconds"] = time.perf_counter() - t0


def _finish(mode, deadline, kernels, parse) -> int:
    """Wait for ``mode``'s compiles until ``deadline`` and put the finished ones in their kernels' caches, as
    leaving ``AsyncCompileMode`` does (failed ones are dropped: the real launch reports the error). Returns how many
    were still pending. A running one's placeholder stays in the cache where it can stand in for its kernel (triton
    >= 3.9), and the launch that needs it waits for that compile only; one not started is cancelled, and its launch
    compiles it. ``parse`` is closed when the last pending compile ends."""
    from concurrent.futures import wait

    from triton.runtime._async_compile import FutureKernel

    futures, placeholders = mode.raw_futures, mode.future_kernels
    mode.raw_futures, mode.future_kernels = [], {}  # as Triton's own exit leaves them
    timeout = None if deadline is None else max(0.0, deadline - time.perf_counter())
    done, pending = wait(futures, timeout=timeout)
    for future in done:
        fk = placeholders[future._key]
        if fk.future is not None:
            fk.result(True)
    if not pending:
        return 0
    # a compile not started yet is cancelled and its placeholder taken out first, so that its launch compiles it
    # instead of waiting for every compile queued ahead of it; a running one's placeholder stays where Triton's can
    # stand in for its kernel (>= 3.9: it forwards attributes to the finished compile; 3.6 keeps no placeholder in
    # the cache, so there its launch compiles anyway)
    forwards = "__getattr__" in FutureKernel.__dict__
    queued = [f for f in pending if not forwards or not f.running()]
    stale = {id(placeholders[f._key]) for f in queued}
    if stale:
        for kernel in kernels:
            for entry in getattr(kernel, "device_caches", {}).values():
                cache = entry[0]
                for key in [k for k, v in cache.items() if id(v) in stale]:
                    del cache[key]
    for future in queued:
        future.cancel()  # one that started meanwhile finishes unused; its launch compiled it again
    left = {"n": len(pending)}
    lock = threading.Lock()

    def ended(_future):
        with lock:
            left["n"] -= 1
            last = left["n"] == 0
        if last:
            parse.close()

    for future in pending:
        future.add_done_callback(ended)
    return len(pending)
