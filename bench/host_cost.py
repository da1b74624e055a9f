"""Host time of jetdet's GPU (Triton) path per call, measured on any machine: every kernel launch is replaced by a
no-op, so what is timed is the Python from the torch call to the launch, which a GPU run pays on the CPU.

On an H200 a mid-sized model in deterministic mode was host-bound (issue 13: ~56 routed calls per forward at about
90 us each, the GPU idle most of the time). A GPU adds Triton's own launch cost to the figures here; this script
measures the part jetdet owns, on CPU, where CI can watch it.

It prints, median of ``--repeats`` (microseconds):

1. **Per op**, under ``torch.no_grad()`` in deterministic mode (the router's path: ``F.linear`` -> checks ->
   registered op -> launcher -> launch): linear, layer_norm, group_norm, conv2d, scaled_dot_product_attention,
   softmax.
2. **Per forward** of TinyDiT and TinyUNet at batch 4: host time, routed calls, and time per routed call.
3. **Triton's binder and cache key** for each op's launch: what ``JITFunction.run`` does with the launch's
   arguments before it looks up the compiled kernel and calls the driver (Triton's own host cost, which the stubbed
   launches above leave out; the driver launch after it needs a GPU). Timed on the recorded argument lists with the
   installed Triton's own binder for sm_90.
4. **The step cache per model call** on the bundled DiT (8 classes, batched CFG, 30 Euler steps, the defaults), with
   the torch path and the garbage collector off during each sample: ``stats()["host_ms"]`` per call, the part of
   it inside the bodies of ``relative_change`` and ``forecast`` (CPU compute here, three Triton launches per call on
   a GPU), and the rest: the controller's Python and its small tensor ops, which a GPU pays as host time and
   launches.

    TRITON_INTERPRET=1 python bench/host_cost.py

``TRITON_INTERPRET=1`` lets Triton import without a GPU; no kernel runs, interpreted or not. The outputs are
uninitialised memory, so nothing is checked here: this script only times.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["JETDET_BACKEND"] = "triton"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jetdet  # noqa: E402
from jetdet import static_report  # noqa: E402
from jetdet.models import TinyDiT, TinyUNet, make_toy_inputs  # noqa: E402


@contextlib.contextmanager
def launches_stubbed(log: list | None = None):
    """Every ``jetdet.kernels.*`` kernel's launch does nothing inside; counts the launches (and appends
    ``(kernel, args, kwargs)`` of each to ``log`` when given)."""
    count = [0]

    def on_launch(kernel, args, kwargs, grid):
        count[0] += 1
        if log is not None:
            log.append((kernel, args, kwargs))

    with static_report.stub_launches(on_launch):
        yield count


def per_call_us(fn, repeats: int, inner: int) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner * 1e6)
    return statistics.median(times)


def op_cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 256, 512, generator=g)
    w = torch.randn(512, 512, generator=g)
    b = torch.randn(512, generator=g)
    # channels-last input and a Parameter weight, as in a model: no layout copy is timed (on this CPU a copy is real
    # work, on a GPU a kernel of its own)
    img = torch.randn(4, 64, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
    cw = torch.nn.Parameter(torch.randn(64, 64, 3, 3, generator=g).contiguous(memory_format=torch.channels_last),
                            requires_grad=False)
    img_nchw = img.contiguous()
    q = torch.randn(4, 8, 256, 64, generator=g)
    ln = torch.nn.LayerNorm(512)
    gn = torch.nn.GroupNorm(32, 64)
    return {
        "linear": lambda: F.linear(x, w, b),
        "layer_norm": lambda: ln(x),
        "group_norm": lambda: gn(img_nchw),
        "conv2d 3x3": lambda: F.conv2d(img, cw, None, 1, 1),
        "sdpa": lambda: F.scaled_dot_product_attention(q, q, q),
        "softmax": lambda: torch.softmax(x, -1),
    }


def binder_us(kernel, args, kwargs, repeats: int, inner: int) -> float:
    """Triton's launch-time binding plus its cache-key step for one recorded launch, per call (us)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime import jit as triton_jit

    jit = static_report.as_jit_function(kernel)
    backend = make_backend(GPUTarget("cuda", 90, 32))
    binder = triton_jit.create_function_from_signature(jit.signature, jit.params, backend)
    kwargs = {**kwargs, "debug": False}
    mode = getattr(getattr(triton.knobs, "compilation", None), "instrumentation_mode", None)
    if mode is not None:  # JITFunction.run adds it on the triton versions that have it
        kwargs["instrumentation_mode"] = mode
    keys: dict = {}

    def bind():
        _, spec, options = binder(*args, **kwargs)
        triton_jit.compute_cache_key(keys, spec, options)

    return per_call_us(bind, repeats, inner)


def binder_costs(repeats: int, inner: int) -> dict:
    """Per op of :func:`op_cases`: (kernel name, argument count, binder + cache key us) of its launches."""
    out = {}
    log: list = []
    spans = {}
    with torch.no_grad(), launches_stubbed(log), jetdet.mode("deterministic"):
        for name, fn in op_cases().items():
            n0 = len(log)
            fn()
            spans[name] = (n0, len(log))
    # timed outside the router, as the launchers call Triton: with torch functions off
    with torch._C.DisableTorchFunction():
        for name, (lo, hi) in spans.items():
            out[name] = [(getattr(k, "fn", k).__name__, len(a) + len(kw), round(binder_us(k, a, kw, repeats, inner), 1))
                         for k, a, kw in log[lo:hi]]
    return out


def step_cache_ms(samples: int) -> dict:
    """Medians over ``samples`` samples of the step cache's host time per model call (see the module docstring,
    4.), ms. The garbage collector is off during each sample: a full collection of the objects torch and triton keep
    tracked (``tracked_objects``) lands in whichever call it interrupts."""
    import gc

    from jetdet import ops
    from jetdet.models import load_bundled
    from jetdet.models.sampling import sample

    dit = load_bundled(device="cpu")
    inside = [0.0]

    def timed(fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                inside[0] += time.perf_counter() - t0

        return wrapper

    saved = {name: getattr(ops, name) for name in ("relative_change", "forecast")}
    saved_env, was_on = os.environ.get("JETDET_BACKEND"), gc.isenabled()
    rows = []
    try:
        os.environ["JETDET_BACKEND"] = "torch"
        for name, fn in saved.items():
            setattr(ops, name, timed(fn))
        for _ in range(samples + 1):  # the first one warms up
            inside[0] = 0.0
            gc.collect()
            gc.disable()
            try:
                with jetdet.patch(dit, mode="fast", num_steps=30) as handle:
                    sample(dit, list(range(8)), steps=30, seed=1)
                    st = handle.stats()["cache"]
            finally:
                if was_on:
                    gc.enable()
            calls = st["calls"]
            rows.append({"host": st["host_ms"] / calls, "ops": inside[0] * 1e3 / calls, "calls": calls,
                         "calls_run": st["calls_run"]})
    finally:
        for name, fn in saved.items():
            setattr(ops, name, fn)
        if saved_env is None:
            os.environ.pop("JETDET_BACKEND", None)
        else:
            os.environ["JETDET_BACKEND"] = saved_env
    rows = rows[1:]
    host = statistics.median(r["host"] for r in rows)
    op_ms = statistics.median(r["ops"] for r in rows)
    return {"host_ms_per_call": round(host, 3), "op_bodies_ms_per_call": round(op_ms, 3),
            "rest_ms_per_call": round(statistics.median(r["host"] - r["ops"] for r in rows), 3),
            "calls": rows[-1]["calls"], "calls_run": rows[-1]["calls_run"], "samples": len(rows),
            "tracked_objects": len(gc.get_objects())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--inner", type=int, default=200, help="calls per timed repeat (per op)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = {"ops_us": {}, "models": {}}
    with torch.no_grad(), launches_stubbed() as launches, jetdet.mode("deterministic"):
        for name, fn in op_cases().items():
            out["ops_us"][name] = round(per_call_us(fn, args.repeats, args.inner), 1)
    for model_cls in (TinyDiT, TinyUNet):
        model = model_cls().eval()
        inputs = make_toy_inputs(1)
        inputs = inputs if model_cls is TinyDiT else inputs[:2]
        fwd = lambda m=model, a=inputs: m(*a)  # noqa: E731
        inner = max(1, args.inner // 10)
        with torch.no_grad():
            off = per_call_us(fwd, args.repeats, inner)
            with launches_stubbed() as launches, jetdet.mode("deterministic"):
                fwd()
                before = launches[0]
                fwd()
                n = launches[0] - before
                det = per_call_us(fwd, args.repeats, inner)
        out["models"][model_cls.__name__] = {"off_us": round(off), "deterministic_us": round(det), "launches": n,
                                             "added_us_per_launch": round((det - off) / n, 1)}
    try:
        out["triton_binder_us"] = binder_costs(args.repeats, args.inner)
    except (ImportError, AttributeError) as e:  # Triton internals this version does not have
        out["triton_binder_us"] = f"not measured: {type(e).__name__}: {e}"
    out["step_cache"] = step_cache_ms(max(1, min(3, args.repeats)))
    print("host time per call, launches stubbed (us, median):")
    for name, us in out["ops_us"].items():
        print(f"  {name:12s} {us:8.1f}")
    for name, r in out["models"].items():
        print(f"  {name} forward at batch 1: off {r['off_us']} us (computed), deterministic {r['deterministic_us']} us "
              f"({r['launches']} launches, stubbed): {r['added_us_per_launch']} us added per launch")
    binder = out["triton_binder_us"]
    if isinstance(binder, str):
        print(f"triton's binder and cache key: {binder}")
    else:
        import triton

        print(f"triton {triton.__version__}'s binder and cache key per launch (us, median; the driver launch "
              "comes on top):")
        for name, rows in binder.items():
            print(f"  {name:12s} " + "; ".join(f"{k} ({n} args) {us}" for k, n, us in rows))
    sc = out["step_cache"]
    print(f"step cache on the bundled DiT ({sc['calls_run']} of {sc['calls']} calls run, median of {sc['samples']} "
          f"samples, ms per model call): host {sc['host_ms_per_call']}, of which relative_change/forecast bodies "
          f"{sc['op_bodies_ms_per_call']}, the rest (Python, small tensor ops) {sc['rest_ms_per_call']}; "
          f"{sc['tracked_objects']} objects tracked by the garbage collector")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
