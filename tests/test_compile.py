"""Deterministic mode under ``torch.compile``: a model patched with ``jetdet.patch(model, mode="deterministic")``
compiles as one graph (``fullgraph=True``) in which every reduction is a ``torch.ops.jetdet`` custom op, and the
compiled model stays bitwise batch invariant.

The compiler's own kernels (the elementwise work between the custom ops) are not jetdet's, so the compiled
output is compared with eager deterministic mode by tolerance, not bits. Negative control: the same model
compiled without the patch is not batch invariant on this CPU (torch's GEMMs, as in eager mode).

On a GPU the same holds for ``mode="reduce-overhead"`` (CUDA graphs); ``bench/gpu_check.py`` checks and times
that, this file runs where there is no GPU too.
"""

from __future__ import annotations

import random

import pytest
import torch
from _invariance import batch_mismatches, random_slots

import jetdet
from jetdet.mode import torch_flags
from jetdet.models import TinyDiT, TinyUNet, make_toy_inputs

#: aten/torch targets that reduce (or wrap a reduction) and must not be left to the compiler in the traced graph
_REDUCING = ("linear", "addmm", "matmul", "mm", "bmm", "conv", "layer_norm", "group_norm", "rms_norm", "softmax",
             "scaled_dot_product_attention", "sum", "mean", "baddbmm", "einsum")
MODELS = [TinyDiT, TinyUNet]
BATCH = 4


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _targets(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_patched_model_is_one_graph_of_jetdet_reductions(cls):
    torch.manual_seed(0)
    model = cls().eval()
    x, t, y = make_toy_inputs(BATCH)
    with jetdet.patch(model, mode="deterministic"), torch.no_grad():
        exp = torch._dynamo.explain(model)(x, t, y)
    assert exp.graph_break_count == 0, exp.break_reasons
    assert exp.graph_count == 1
    targets = [n for g in exp.graphs for n in _targets(g)]
    jet = [n for n in targets if n.startswith("jetdet.")]
    assert jet, "no jetdet custom op in the traced graph"
    left = [n for n in targets if not n.startswith("jetdet.") and any(r in n.split(".")[-1] for r in _REDUCING)]
    assert not left, f"reductions left to the compiler: {left}"


def _compiled_calls(model, dynamic):
    compiled = torch.compile(model, fullgraph=True, dynamic=dynamic)

    def call(x, t, y):
        with torch.no_grad():
            return compiled(x, t, y)

    return call


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_compiled_deterministic_model_is_batch_invariant(cls):
    torch.manual_seed(0)
    model = cls().eval()
    items = make_toy_inputs(BATCH)
    with torch.no_grad():
        ref = model(*items)
    with jetdet.patch(model, mode="deterministic"):
        with torch.no_grad():
            eager = model(*items)
        call = _compiled_calls(model, dynamic=True)  # one compile serves every batch size
        full = call(*items)
        assert torch.equal(call(*items), full), "a rerun differs"
        slots = [s for _, s in random_slots(random.Random(cls.__name__), range(1, BATCH + 1))]
        bad = batch_mismatches(call, items, prefixes=range(1, BATCH + 1), slots=slots, full=full)
        assert not bad, f"compiled {cls.__name__}: items run alone differ from the batch's rows: {bad}"
    # the compiler's elementwise kernels round differently from eager torch, nothing more
    torch.testing.assert_close(full, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full, ref, atol=1e-4, rtol=1e-4)
    assert model(*items).shape == full.shape  # unpatched again


def test_negative_control_compiled_unpatched_model_is_not_batch_invariant():
    """Without the patch the compiled graph keeps torch's GEMMs, whose rows depend on the batch on this CPU; if
    this ever passes, the test above could not fail for the reason it is there."""
    torch.manual_seed(0)
    call = _compiled_calls(TinyDiT().eval(), dynamic=True)
    found = batch_mismatches(call, make_toy_inputs(8), prefixes=range(1, 9))
    assert found, "the compiled unpatched TinyDiT was batch invariant here: the negative control did not fire"


def test_nothing_changed_after_compiled_use():
    model = TinyDiT().eval()
    items = make_toy_inputs(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = torch_flags()
    with jetdet.patch(model, mode="deterministic"):
        _compiled_calls(model, dynamic=False)(*items)
        assert torch_flags() == flags  # the compiled forward sets no torch flag
    assert "forward" not in vars(model)  # the patch's forward is gone
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch_flags() == flags
