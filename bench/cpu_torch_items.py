"""torch's own CPU kernels on this machine, item alone against the same item in a batch, and jetdet's rebuilt ones.

    PYTHONPATH=. python bench/cpu_torch_items.py

Which of torch's CPU kernels are batch dependent is a property of the CPU (its vector width) and of torch's build:
this prints it for the machine it runs on, for the ops jetdet's deterministic mode rebuilds or warns about on CPU
tensors. Each figure is a count of checks where the item alone differs bitwise from its row of the batch, with
torch's kernel (mode off) and under ``jetdet.mode("deterministic")``:

* activations, ``rsqrt``, ``pow``, ``exp2`` (the checks of ``tests/test_router_activations.py``): a [5, n] input for
  n in 7, 24, 888, 1776, 4099, at 1 and 2 threads; items 0, 3 and 4 alone and the first two rows together against
  the whole call, 40 checks per op and dtype;
* ``var``, ``std``, ``var_mean``, ``std_mean`` over dim 1 of a [64, 333] input: 64 items alone;
* ``nn.GRU``, ``nn.RNN``, ``nn.LSTM`` on 7 items (sequence 5, 8 features): 7 items alone. jetdet does not rebuild
  them (they warn by name), so both columns show torch's.

Exits 1 when an op jetdet rebuilds differs under the mode.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jetdet  # noqa: E402

ACTS = {
    "silu": (F.silu, torch.float32),
    "gelu": (F.gelu, torch.float32),
    "gelu tanh": (lambda x: F.gelu(x, approximate="tanh"), torch.float32),
    "sigmoid": (torch.sigmoid, torch.float32),
    "elu": (lambda x: F.elu(x, 0.7), torch.float32),
    "softplus": (lambda x: F.softplus(x, beta=2.0, threshold=5.0), torch.float32),
    "mish": (F.mish, torch.float32),
    "selu": (F.selu, torch.float32),
    "celu": (lambda x: F.celu(x, 0.8), torch.float32),
    "sigmoid_ (in place)": (lambda x: x.clone().sigmoid_(), torch.float32),
    "rsqrt fp32": (lambda x: torch.rsqrt(x.abs() + 0.1), torch.float32),
    "rsqrt bf16": (lambda x: torch.rsqrt(x.abs() + 0.1), torch.bfloat16),
    "rsqrt fp16": (lambda x: torch.rsqrt(x.abs() + 0.1), torch.float16),
    "pow 1.7": (lambda x: (x.abs() + 0.1).pow(1.7), torch.float32),
    "pow 4": (lambda x: x.pow(4), torch.float32),
    "10000 ** x": (lambda x: torch.pow(10000.0, x / 8), torch.float32),
    "exp2": (torch.exp2, torch.float32),
}
SIZES = (7, 24, 888, 1776, 4099)
REDUCTIONS = {
    "var": lambda t: t.var(1),
    "std": lambda t: t.std(1),
    "var_mean": lambda t: torch.cat(torch.var_mean(t, 1)),
    "std_mean": lambda t: torch.cat(torch.std_mean(t, 1)),
}


def elementwise_cases(fn, dtype) -> list:
    """The checks where an item alone differs bitwise from its row of the whole call, as ``(n, threads, item)``
    (``item`` "prefix" for the first two rows together); ``tests/test_router_activations.py`` asserts on them."""
    g = torch.Generator().manual_seed(0)
    bad = []
    saved = torch.get_num_threads()
    try:
        for n in SIZES:
            x = (torch.randn(5, n, generator=g) * 3).to(dtype)
            for th in (1, 2):
                torch.set_num_threads(th)
                full = fn(x)
                for i in (0, 3, 4):
                    if not torch.equal(fn(x[i:i + 1].clone()), full[i:i + 1]):
                        bad.append((n, th, i))
                if not torch.equal(fn(x[:2]), full[:2]):
                    bad.append((n, th, "prefix"))
    finally:
        torch.set_num_threads(saved)
    return bad


def elementwise_mismatches(fn, dtype) -> tuple[int, int]:
    return len(elementwise_cases(fn, dtype)), len(SIZES) * 2 * 4  # 2 thread counts x (3 items + the prefix)


def reduction_mismatches(fn) -> tuple[int, int]:
    x = torch.randn(64, 333, generator=torch.Generator().manual_seed(0))
    full = fn(x).reshape(-1, 64)
    return sum(not torch.equal(fn(x[i:i + 1].clone()).reshape(-1, 1), full[:, i:i + 1]) for i in range(64)), 64


def recurrent_mismatches(kind) -> tuple[int, int]:
    torch.manual_seed(0)
    layer = getattr(torch.nn, kind)(8, 6)
    x = torch.randn(5, 7, 8)  # sequence 5, 7 items
    with torch.no_grad():
        full = layer(x)[0]
        return sum(not torch.equal(layer(x[:, i:i + 1].clone())[0], full[:, i:i + 1]) for i in range(7)), 7


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.parse_args(argv)
    fp = jetdet.fingerprint("cpu")
    print(f"{fp['cpu']}, {fp['num_threads']} threads by default, torch {fp['torch']}; checks where an item alone "
          "differs from its row of the batch")
    print(f"{'op':<22} {'torch':>12} {'jetdet':>12}")
    failed = []

    def row(name, count, rebuilt=True):
        off = count()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the recurrent layers' fallback warning
            with jetdet.mode("deterministic"):
                det = count()
        line = f"{name:<22} {off[0]:>5} of {off[1]:<4} {det[0]:>5} of {det[1]:<4}{'' if rebuilt else '  (not rebuilt)'}"
        print(line.rstrip(), flush=True)
        if rebuilt and det[0]:
            failed.append(name)

    for name, (fn, dtype) in ACTS.items():
        row(name, lambda fn=fn, dtype=dtype: elementwise_mismatches(fn, dtype))
    for name, fn in REDUCTIONS.items():
        row(f"{name} dim 1", lambda fn=fn: reduction_mismatches(fn))
    for kind in ("GRU", "RNN", "LSTM"):
        row(f"nn.{kind}", lambda kind=kind: recurrent_mismatches(kind), rebuilt=False)
    if failed:
        print(f"FAILED: batch dependent under jetdet's mode: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
