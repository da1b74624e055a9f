"""The shared batch-invariance checks (``_invariance.py``) catch what they are for: a function whose item output
depends on the batch around it fails every kind of check, an invariant one passes, and the comparison is bitwise."""

import random

import pytest
import torch
from _invariance import (
    assert_batch_invariant,
    assert_planted_invariant,
    batch_mismatches,
    planted_mismatches,
    random_slots,
    same_bits,
)

X = torch.randn(8, 5, 7, generator=torch.Generator().manual_seed(0))


def leaky(x):
    """Item i's output depends on the batch (its sum over dim 0): not batch invariant."""
    return x + x.sum(0) * 1e-3


def per_item(x, w):
    return torch.tanh(x) * w


def test_a_batch_dependent_function_fails_every_check():
    assert batch_mismatches(leaky, [X], prefixes=[1, 4, 8]) == [(0, 1), (0, 4)]  # the whole batch is itself
    assert batch_mismatches(leaky, [X], slots=[0, 5]) == [(0, 1), (5, 6)]
    assert batch_mismatches(leaky, [X], windows=[(2, 6)]) == [(2, 6)]
    hay = lambda n: [torch.randn(n, 5, 7)]
    assert planted_mismatches(leaky, [X[:1]], hay, [(3, 1), (8, 7)]) == [(3, 1), (8, 7)]
    with pytest.raises(AssertionError, match=r"leaky: items \[start, stop\) run alone differ"):
        assert_batch_invariant(leaky, [X], prefixes=range(1, 9), label="leaky")
    with pytest.raises(AssertionError, match="planted"):
        assert_planted_invariant(leaky, [X[:1]], hay, random_slots(random.Random(0), range(2, 9)))


def test_an_invariant_function_passes_with_items_and_shared_arguments():
    w = torch.randn(7)
    rng = random.Random(0)
    assert_batch_invariant(per_item, [X], [w], prefixes=range(1, 9), slots=[rng.randrange(8)], windows=[(3, 7)])
    assert_planted_invariant(per_item, [X[2:3]], lambda n: [torch.randn(n, 5, 7)], random_slots(rng, range(1, 9)),
                             [w])
    # items sliced together, several of them
    assert_batch_invariant(torch.bmm, [X, X.transpose(1, 2)], prefixes=range(1, 9), slots=range(8))


def test_a_given_full_output_is_what_items_are_compared_with():
    full = per_item(X, 1.0)
    assert batch_mismatches(per_item, [X], [1.0], prefixes=[3], full=full) == []
    other = full.clone()
    other[1, 0, 0] = torch.nextafter(other[1, 0, 0], torch.tensor(2.0))  # one ulp in one element
    assert batch_mismatches(per_item, [X], [1.0], prefixes=[1, 3], slots=[1], full=other) == [(0, 3), (1, 2)]


def test_the_comparison_is_bitwise():
    a = torch.tensor([0.0, 1.0, 2.0])
    assert same_bits(a, a.clone())
    assert not same_bits(a, torch.tensor([-0.0, 1.0, 2.0]))  # torch.equal alone would accept -0.0
    assert not same_bits(a, a.half())  # dtype
    assert not same_bits(a, a[None])  # shape
    nan = torch.tensor([float("nan")])
    assert not same_bits(nan, nan.clone())  # as torch.equal: a NaN never matches
    assert same_bits(torch.arange(3), torch.arange(3)) and not same_bits(torch.arange(3), torch.arange(1, 4))
    for dt in (torch.float64, torch.bfloat16, torch.float16):
        b = a.to(dt)
        assert same_bits(b, b.clone()) and not same_bits(b, torch.nextafter(b, b + 1))


def test_nothing_to_compare_is_an_error():
    with pytest.raises(AssertionError, match="nothing to compare"):
        assert_batch_invariant(leaky, [X])
    with pytest.raises(AssertionError, match="nothing to compare"):
        assert_planted_invariant(leaky, [X[:1]], lambda n: [torch.randn(n, 5, 7)], [])
