"""Batch-invariance checks on whole models, shared by the tests and ``python -m jetdet.bench``."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .mode import mode as _mode
from .verify import checksum


@dataclass
class Comparison:
    label: str
    equal: bool
    max_abs_diff: float


def _cmp(label, a, b) -> Comparison:
    eq = torch.equal(a, b)
    diff = 0.0 if eq else (a.double() - b.double()).abs().max().item()
    return Comparison(label, eq, diff)


def check_model(model, inputs, mode: str = "deterministic", max_batch: int = 8, threads=(2, 1), repeats=3,
                seed: int = 0) -> tuple[list[Comparison], str]:
    """Run ``model(*inputs)`` (every input batch-first, at least ``max_batch`` items) and compare:

    * ``repeats`` runs of the full batch,
    * every prefix batch 1..max_batch against the full batch,
    * one random item alone against its slot in each prefix batch,
    * a shuffled batch against the same items in order,
    * each thread count in ``threads`` against the first.

    Every call runs inside ``jetdet.mode(mode)``. To check a model patched with ``jetdet.patch`` (or a pipeline
    part) the way it is called in use, with no context around it, pass ``mode="off"``: with the default the context
    would route calls that the patch alone might not reach.

    Returns the comparisons and the SHA-256 checksum of the reference output.
    """
    rng = random.Random(seed)
    saved = torch.get_num_threads()
    out: list[Comparison] = []
    full_in = [x[:max_batch] for x in inputs]
    try:
        with torch.no_grad(), _mode(mode):
            torch.set_num_threads(threads[0])
            ref = model(*full_in)
            for r in range(1, repeats):
                out.append(_cmp(f"run {r + 1} vs run 1", model(*full_in), ref))
            for b in range(1, max_batch + 1):
                part = model(*[x[:b] for x in full_in])
                out.append(_cmp(f"batch {b} vs batch {max_batch}", part, ref[:b]))
                s = rng.randrange(b)
                one = model(*[x[s : s + 1] for x in full_in])
                out.append(_cmp(f"item {s} alone vs slot {s} of batch {b}", one[0], part[s]))
            perm = list(range(max_batch))
            rng.shuffle(perm)
            shuffled = model(*[x[perm] for x in full_in])
            out.append(_cmp("shuffled batch", shuffled, ref[perm]))
            for t in threads[1:]:
                torch.set_num_threads(t)
                out.append(_cmp(f"{t} thread(s) vs {threads[0]}", model(*full_in), ref))
                one = model(*[x[3:4] for x in full_in])
                out.append(_cmp(f"{t} thread(s), item 3 alone", one[0], ref[3]))
    finally:
        torch.set_num_threads(saved)
    return out, checksum(ref)
