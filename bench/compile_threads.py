"""Does Triton's compiler run in parallel on threads? ``jetdet.warmup.compile_ahead`` (and ``bench/gpu_check.py``'s
precompile pass) hand kernel compiles to a thread pool, which pays only if the compiler releases the GIL for most
of its work. This compiles the same shipped kernel specs for a GPU target (as the static report does, no GPU
needed) one after another and then on ``--threads`` threads, each time into an empty Triton cache, and prints both
wall times.

    PYTHONPATH=. python bench/compile_threads.py [--only attention] [--count 8] [--threads 2] [--arch 90]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="attention", help="spec name prefix (default attention)")
    p.add_argument("--count", type=int, default=8, help="specs to compile (default 8)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="threads (default: the CPU count)")
    p.add_argument("--arch", type=int, default=90, help="compute capability (default 90)")
    args = p.parse_args(argv)
    from jetdet import static_report as sr

    specs = [s for s in sr.collect_specs(jit=False) if s.name.startswith(args.only) and args.arch in s.archs]
    specs = specs[: args.count]
    if not specs:
        print(f"no spec for sm_{args.arch} starts with {args.only!r}", file=sys.stderr)
        return 2
    jits = [sr.as_jit_function(s.fn) for s in specs]
    saved = os.environ.get("TRITON_CACHE_DIR")
    times = {}
    # held here while the pool compiles: with the interpreter on, the first thread in would otherwise make the swaps
    # (and the environment it restores) its own, racing the others (see static_report.compiling)
    try:
        with sr.compiling():
            for label, workers in (("one after another", 0), (f"{args.threads} threads", args.threads)):
                os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="jetdet-compile-threads-")
                t0 = time.perf_counter()
                if workers:
                    with ThreadPoolExecutor(workers) as pool:
                        list(pool.map(lambda js: sr._compile(js[0], js[1], args.arch), zip(jits, specs)))
                else:
                    for jit, spec in zip(jits, specs):
                        sr._compile(jit, spec, args.arch)
                times[label] = time.perf_counter() - t0
    finally:
        if saved is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = saved
    print(f"{len(specs)} '{args.only}' specs for sm_{args.arch} ({os.cpu_count()} CPUs):")
    for label, t in times.items():
        print(f"  {label:<18} {t:6.1f} s")
    first, second = times.values()
    print(f"  speed-up {first / second:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
