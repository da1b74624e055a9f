"""The batch-invariance checks the tests share: an item's output must not depend on the batch around it.

* **prefix**: the first ``b`` items run alone give the first ``b`` rows of the whole batch's output;
* **slot** (a needle taken out): item ``s`` run alone gives row ``s`` of the batch's output;
* **window**: items ``start:stop`` run alone give those rows (a prefix and a slot are windows too);
* **planted** (a needle put in): one item run alone gives the same as that item planted at slot ``s`` of a batch
  of ``n`` other items.

``call(*items, *shared)`` runs the function under test: ``items`` are tensors batched on dim 0 (sliced and
planted), ``shared`` are passed as they are (weights, masks for the whole batch). Every comparison is bitwise
(:func:`same_bits`). The ``*_mismatches`` functions return what differed, for sweeps that collect failures;
the ``assert_*`` ones fail with them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence

import torch

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bits in every element: ``torch.equal`` (so a NaN never matches), and floats
    compared as their bit patterns as well (so ``-0.0`` does not match ``0.0``)."""
    if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
        return False
    if not a.dtype.is_floating_point:
        return True
    view = _INT_OF_SIZE[a.element_size()]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def random_slots(rng: random.Random, sizes: Iterable[int]) -> list[tuple[int, int]]:
    """``(n, slot)`` with a random slot in ``range(n)`` for each batch size ``n`` in ``sizes``."""
    return [(n, rng.randrange(n)) for n in sizes]


def _windows(prefixes, slots, windows) -> list[tuple[int, int]]:
    return [(0, b) for b in prefixes] + [(s, s + 1) for s in slots] + [tuple(w) for w in windows]


def batch_mismatches(call: Callable, items: Sequence[torch.Tensor], shared: Sequence = (), *,
                     prefixes: Iterable[int] = (), slots: Iterable[int] = (),
                     windows: Iterable[tuple[int, int]] = (), full: torch.Tensor | None = None) -> list[tuple]:
    """The windows ``(start, stop)`` whose items run alone do not give ``full[start:stop]`` bit for bit.

    ``full`` is the whole batch's output (computed here when not given, e.g. to compare against an output
    computed with another thread count)."""
    if full is None:
        full = call(*items, *shared)
    bad = []
    for start, stop in _windows(prefixes, slots, windows):
        part = call(*[x[start:stop] for x in items], *shared)
        if not same_bits(part, full[start:stop]):
            bad.append((start, stop))
    return bad


def assert_batch_invariant(call: Callable, items: Sequence[torch.Tensor], shared: Sequence = (), *,
                           prefixes: Iterable[int] = (), slots: Iterable[int] = (),
                           windows: Iterable[tuple[int, int]] = (), full: torch.Tensor | None = None,
                           label: str = "") -> None:
    """Fail unless every prefix, slot and window of ``items`` run alone matches the batch (:func:`batch_mismatches`)."""
    windows = _windows(prefixes, slots, windows)
    assert windows, "nothing to compare"
    bad = batch_mismatches(call, items, shared, windows=windows, full=full)
    assert not bad, f"{label}: items [start, stop) run alone differ from the batch's rows: {bad}"


def planted_mismatches(call: Callable, needle: Sequence[torch.Tensor], hay: Callable[[int], Sequence[torch.Tensor]],
                       plants: Iterable[tuple[int, int]], shared: Sequence = ()) -> list[tuple[int, int]]:
    """The ``(n, slot)`` plants where the needle (``needle``: batch-1 items) planted at ``slot`` of a batch of
    ``n`` (``hay(n)``: fresh items, overwritten at ``slot``) does not give the needle's own output bit for bit."""
    alone = call(*needle, *shared)[0]
    bad = []
    for n, slot in plants:
        batch = list(hay(n))
        for x, one in zip(batch, needle):
            x[slot] = one[0]
        if not same_bits(call(*batch, *shared)[slot], alone):
            bad.append((n, slot))
    return bad


def assert_planted_invariant(call: Callable, needle: Sequence[torch.Tensor],
                             hay: Callable[[int], Sequence[torch.Tensor]], plants: Iterable[tuple[int, int]],
                             shared: Sequence = (), label: str = "") -> None:
    """Fail unless the needle gives the same bits alone and planted at every ``(n, slot)`` of ``plants``."""
    plants = list(plants)
    assert plants, "nothing to compare"
    bad = planted_mismatches(call, needle, hay, plants, shared)
    assert not bad, f"{label}: the item alone differs from the item planted at (batch, slot) {bad}"
