"""Router coverage found by running ComfyUI's models: einsum and conv3d are routed (the other convolution forms:
tests/test_router_conv_forms.py), what is not routed falls back with the named warning. Batch invariance is
checked bitwise with prefix and needle comparisons; mode off is the negative control where torch's own kernels
differ."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from _invariance import assert_batch_invariant
from _tolerances import OPS_MAX_ERR, assert_max_err

import jetdet


def _det(fn, *a, **k):
    with torch.no_grad(), jetdet.mode("deterministic"):
        return fn(*a, **k)


@pytest.mark.parametrize("eq,shapes", [
    ("b i d, b j d -> b i j", [(5, 37, 24), (5, 29, 24)]),  # ComfyUI's basic/split attention scores
    ("b i j, b j d -> b i d", [(5, 37, 29), (5, 29, 24)]),  # ... and their values
    ("bhnd,bhmd->bhnm", [(3, 2, 17, 8), (3, 2, 11, 8)]),
    ("nd,od->no", [(40, 24), (19, 24)]),                    # a linear layer written as an einsum
])
def test_contractions_match_torch_and_are_batch_invariant(eq, shapes):
    a, b = (torch.randn(*s) for s in shapes)
    out = _det(torch.einsum, eq, a, b)
    ref = torch.einsum(eq, a.double(), b.double()).float()
    assert out.shape == ref.shape
    assert_max_err(out, ref, OPS_MAX_ERR[torch.float32])
    # prefix: the first k items alone equal the first k items of the batch ("nd,od": b is a weight, not batched)
    batched = b.shape[0] == a.shape[0] and eq[0] != "n"
    einsum = lambda *ab: _det(torch.einsum, eq, *ab)
    assert_batch_invariant(einsum, [a, b] if batched else [a], [] if batched else [b],
                           prefixes=(1, 2, a.shape[0] - 1), full=out, label=eq)


def test_einsum_without_a_sum_runs_unchanged():
    x = torch.randn(2, 3, 4, 2, 2, 5)
    assert torch.equal(_det(torch.einsum, "nhwpqc->nchpwq", x), torch.einsum("nhwpqc->nchpwq", x))
    p, w = torch.arange(6.0), torch.randn(4)
    assert torch.equal(_det(torch.einsum, "m,d->md", p, w), torch.outer(p, w))
    pos = torch.randn(2, 7)  # Flux/Wan RoPE tables: "...n,d->...nd"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(_det(torch.einsum, "...n,d->...nd", pos, w), torch.einsum("...n,d->...nd", pos, w))


def test_einsum_forms_it_cannot_take_fall_back_with_the_warning():
    sys.modules["jetdet.mode"]._warned.clear()
    x = torch.randn(3, 4, 4)
    with pytest.warns(UserWarning, match="einsum falls back to torch .*repeated index"):
        out = _det(torch.einsum, "bii->bi", x)
    assert torch.equal(out, torch.einsum("bii->bi", x))
    with pytest.warns(UserWarning, match="einsum falls back to torch .*ellipsis with a sum"):
        _det(torch.einsum, "...ij,...jk->...ik", x, x)


@pytest.mark.parametrize("kernel,stride,padding", [((1, 2, 2), (1, 2, 2), 0), ((3, 3, 3), (2, 1, 1), (1, 1, 0))])
def test_conv3d_matches_torch_and_is_batch_invariant(kernel, stride, padding):
    x = torch.randn(4, 3, 5, 8, 8)
    w = torch.randn(6, 3, *kernel) * 0.3
    b = torch.randn(6)
    out = _det(F.conv3d, x, w, b, stride=stride, padding=padding)
    ref = F.conv3d(x.double(), w.double(), b.double(), stride=stride, padding=padding).float()
    assert out.shape == ref.shape
    assert_max_err(out, ref, OPS_MAX_ERR[torch.float32])
    assert_batch_invariant(lambda x: _det(F.conv3d, x, w, b, stride=stride, padding=padding), [x],
                           prefixes=(1, 2, 3), slots=(2,), full=out)


def test_what_is_not_routed_warns_by_name():
    sys.modules["jetdet.mode"]._warned.clear()
    a, b = torch.randn(2, 3, 4), torch.randn(3, 4, 5)
    with pytest.warns(UserWarning, match="tensordot falls back to torch"):
        out = _det(torch.tensordot, a, b, dims=2)
    assert torch.equal(out, torch.tensordot(a, b, dims=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _det(torch.tensordot, a, b, dims=2)  # one warning per op and reason
    with pytest.warns(UserWarning, match="conv3d falls back to torch .*float64"):
        _det(F.conv3d, torch.randn(1, 3, 2, 4, 4, dtype=torch.float64), torch.randn(2, 3, 1, 3, 3, dtype=torch.float64))


def test_negative_control_torch_einsum_and_conv3d_depend_on_the_batch():
    # what the routing buys: with the mode off, row 0 of a 257-row einsum linear and item 0 of a batch-8 conv3d
    # differ from the same row/item computed alone (MKL / oneDNN pick other kernels for other sizes)
    torch.manual_seed(0)
    a, b = torch.randn(257, 96), torch.randn(88, 96)
    assert not torch.equal(torch.einsum("nd,od->no", a[:1], b)[0], torch.einsum("nd,od->no", a, b)[0])
    assert torch.equal(_det(torch.einsum, "nd,od->no", a[:1], b)[0], _det(torch.einsum, "nd,od->no", a, b)[0])
    x, w = torch.randn(8, 3, 5, 8, 8), torch.randn(6, 3, 1, 2, 2)
    assert not torch.equal(F.conv3d(x[:1], w, stride=(1, 2, 2))[0], F.conv3d(x, w, stride=(1, 2, 2))[0])
    assert torch.equal(_det(F.conv3d, x[:1], w, stride=(1, 2, 2))[0], _det(F.conv3d, x, w, stride=(1, 2, 2))[0])


def test_dropout_in_training_mode_warns_and_is_the_identity_otherwise():
    """Dropout in training mode draws one mask for the whole batch (an item's mask depends on the batch): torch's,
    with the one-time fallback warning. In eval mode, or with p=0, it is the identity: no warning."""
    sys.modules["jetdet.mode"]._warned.clear()
    x = torch.randn(4, 8)
    drop = torch.nn.Dropout(0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(_det(lambda t: drop.eval()(t), x), x)
        assert torch.equal(_det(F.dropout, x, p=0.0, training=True), x)
        assert torch.equal(_det(F.alpha_dropout, x, 0.5), x)  # training defaults to False there
    for fn, kw in ((lambda t: drop.train()(t), {}), (F.dropout2d, {"p": 0.3}), (F.feature_alpha_dropout,
                                                                               {"p": 0.3, "training": True})):
        with pytest.warns(UserWarning, match="draws one random mask for the whole batch"):
            _det(fn, torch.randn(2, 3, 4, 4), **kw)


@pytest.mark.parametrize("name", ["dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout"])
@pytest.mark.parametrize("inplace", [False, True])
def test_the_low_level_dropout_calls_warn_in_training_mode(name, inplace):
    """``torch.dropout(input, p, train)`` and its family (what ``F.dropout`` calls, and what some models call
    directly) warn by name when they draw a mask, and pass silently as the identity."""
    sys.modules["jetdet.mode"]._warned.clear()
    fn = getattr(torch, name + ("_" if inplace else ""))
    x = torch.randn(2, 3, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(_det(fn, x.clone(), 0.5, False), x)
        assert torch.equal(_det(fn, x.clone(), 0.0, train=True), x)
    with pytest.warns(UserWarning, match=f"torch.{fn.__name__} in training mode draws one random mask"):
        _det(fn, x.clone(), 0.5, train=True)



def test_a_fallback_warning_names_the_line_that_made_the_call():
    """The one-time fallback warning points at the model's own line (here: this file), past torch's dispatch
    (``torch/overrides.py`` for ``F.dropout``, none for the builtin ``torch.tensordot``) and jetdet's handlers."""
    import inspect

    sys.modules["jetdet.mode"]._warned.clear()
    x = torch.randn(2, 3)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        _det(lambda t: (F.dropout(t, 0.5, True), torch.tensordot(t, t, dims=([1], [1]))), x)
    mine = [w for w in seen if "falls back to torch" in str(w.message)]
    assert len(mine) == 2, [str(w.message) for w in seen]
    assert all((w.filename, w.lineno) == (__file__, line) for w in mine), [(w.filename, w.lineno) for w in mine]
