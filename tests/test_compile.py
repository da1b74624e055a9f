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


def _assert_one_graph_of_jetdet_reductions(exp) -> None:
    """``torch._dynamo.explain``'s result: one graph, no break, jetdet custom ops in it and no reduction left to
    the compiler."""
    assert exp.graph_break_count == 0, exp.break_reasons
    assert exp.graph_count == 1
    targets = [n for g in exp.graphs for n in _targets(g)]
    assert any(n.startswith("jetdet.") for n in targets), "no jetdet custom op in the traced graph"
    left = [n for n in targets if not n.startswith("jetdet.") and any(r in n.split(".")[-1] for r in _REDUCING)]
    assert not left, f"reductions left to the compiler: {left}"


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_patched_model_is_one_graph_of_jetdet_reductions(cls):
    torch.manual_seed(0)
    model = cls().eval()
    x, t, y = make_toy_inputs(BATCH)
    with jetdet.patch(model, mode="deterministic"), torch.no_grad():
        exp = torch._dynamo.explain(model)(x, t, y)
    _assert_one_graph_of_jetdet_reductions(exp)


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


# --------------------------------------------------------------- torch.compile inside ``with jetdet.mode(...)``


class _Recorder:
    """A torch.compile backend that keeps every graph Dynamo hands it and runs it as traced (aot_eager-like)."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def jetdet_ops(self, i: int) -> list[str]:
        return [n for n in _targets(self.graphs[i]) if n.startswith("jetdet.")]


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_functional_use_compiles_inside_the_mode_as_one_graph_of_jetdet_reductions(cls):
    """A model run under ``with jetdet.mode("deterministic"):`` (no patch) compiles as one graph whose
    reductions are jetdet's custom ops. Before, the mode's ContextVar broke the graph at every routed call (the
    TinyDiT and TinyUNet each gave 8 graphs, 7 breaks and at most one jetdet op: the model ran mostly eagerly)."""
    torch.manual_seed(0)
    model = cls().eval()
    x, t, y = make_toy_inputs(BATCH)
    with jetdet.mode("deterministic"), torch.no_grad():
        exp = torch._dynamo.explain(model)(x, t, y)
    _assert_one_graph_of_jetdet_reductions(exp)


def test_functional_use_compiled_inside_the_mode_is_batch_invariant():
    torch.manual_seed(0)
    model = TinyDiT().eval()
    items = make_toy_inputs(BATCH)
    compiled = torch.compile(model, dynamic=True)
    with torch.no_grad(), jetdet.mode("deterministic"):
        eager = model(*items)
        full = compiled(*items)
        assert torch.equal(compiled(*items), full), "a rerun differs"
        slots = [s for _, s in random_slots(random.Random("functional"), range(1, BATCH + 1))]
        bad = batch_mismatches(compiled, items, prefixes=range(1, BATCH + 1), slots=slots, full=full)
    assert not bad, f"items run alone differ from the batch's rows: {bad}"
    torch.testing.assert_close(full, eager, atol=1e-5, rtol=1e-5)


def test_a_graph_compiled_inside_the_mode_is_not_used_outside_it():
    """Dynamo guards a graph on the torch function mode stack: the function compiled inside the mode recompiles
    without jetdet's ops outside it, and under a nested ``mode("off")`` (which takes the router off the stack),
    and gives torch's own results there. The last call, inside the mode again, reuses the routed graph."""
    torch.manual_seed(0)
    model = TinyDiT().eval()
    items = make_toy_inputs(2)
    rec = _Recorder()
    compiled = torch.compile(model, backend=rec, dynamic=False)
    with torch.no_grad():
        with jetdet.mode("deterministic"):
            det = compiled(*items)
            with jetdet.mode("off"):
                nested_off = compiled(*items)
        off = compiled(*items)
        eager_off = model(*items)
        with jetdet.mode("deterministic"):
            again = compiled(*items)
    assert rec.jetdet_ops(0), "the graph compiled inside the mode has no jetdet op"
    assert len(rec.graphs) == 2, f"expected one recompile for the mode stack, got {len(rec.graphs)} graphs"
    assert not rec.jetdet_ops(1), f"jetdet ops in the graph compiled outside the mode: {rec.jetdet_ops(1)}"
    assert torch.equal(off, eager_off) and torch.equal(nested_off, eager_off)
    assert torch.equal(again, det)


@pytest.mark.parametrize("use", ["mode", "patch"])
def test_compiled_deterministic_forward_under_autocast_takes_autocasts_dtypes(use):
    """Under ``torch.autocast`` a compiled deterministic forward computes what eager deterministic mode computes:
    the routed calls take autocast's casts (bf16 out here). Negative control (run by hand): with the traced calls
    sent to their handlers without autocast's casts, the mode's compiled TinyDiT returned fp32."""
    torch.manual_seed(0)
    model = TinyDiT().eval()
    items = make_toy_inputs(BATCH)
    ctx = jetdet.mode("deterministic") if use == "mode" else jetdet.patch(model, mode="deterministic")
    with ctx, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        eager = model(*items)
        compiled = torch.compile(model, backend=_Recorder(), dynamic=True)
        full = compiled(*items)
        bad = batch_mismatches(compiled, items, prefixes=range(1, BATCH + 1), full=full)
    assert eager.dtype == torch.bfloat16
    assert full.dtype == eager.dtype
    assert not bad, f"items run alone differ from the batch's rows: {bad}"
    torch.testing.assert_close(full, eager, atol=0, rtol=0)


class _ConvFormsModel(torch.nn.Module):
    """The rebuilt forms (jetdet/conv_forms.py) and the scans/normalisations routed beside them, in one model."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.c1 = nn.Conv1d(8, 8, 7, dilation=3, padding=9)
        self.dw = nn.Conv2d(8, 8, 7, padding=3, groups=8)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.up = nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1)

    def forward(self, x):
        b, c, h, w = x.shape
        a = self.c1(x.flatten(2)).view(b, c, h, w)
        a = self.g(torch.nn.functional.instance_norm(self.dw(a)))
        a = a + torch.logsumexp(a, 1, keepdim=True) + a.cumsum(-1) * 0.01
        return self.up(a)


def test_conv_forms_and_scans_compile_in_the_mode_as_one_batch_invariant_graph():
    torch.manual_seed(0)
    model = _ConvFormsModel().eval()
    x = torch.randn(5, 8, 9, 11)
    with torch.no_grad(), jetdet.mode("deterministic"):
        eager = model(x)
        exp = torch._dynamo.explain(model)(x)
        _assert_one_graph_of_jetdet_reductions(exp)
        compiled = torch.compile(model)
        full = compiled(x)
        torch.testing.assert_close(full, eager, atol=1e-5, rtol=0)
        assert batch_mismatches(compiled, [x], prefixes=(1, 2), slots=(3,), full=full) == []


def test_a_compiled_module_patched_afterwards_is_deterministic():
    """``jetdet.patch(torch.compile(model), mode="deterministic")``, even after the compiled module ran: the same bits
    as deterministic mode on the plain model, item == batch row (a review found a refusal added for fast mode had
    caught this working case too; fast mode still refuses a compiled module, test_patch_prediction.py)."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 64)).eval()
    x = torch.randn(9, 64)
    with torch.no_grad():
        with jetdet.mode("deterministic"):
            want = m(x)
        compiled = torch.compile(m, backend="eager")
        compiled(x)  # compiled and run before the patch
        with jetdet.patch(compiled, mode="deterministic"):
            full, one = compiled(x), compiled(x[4:5])
    assert torch.equal(full, want) and torch.equal(one, full[4:5])


def test_compiled_fast_model_runs_the_cache_eagerly_and_warns_once():
    """``torch.compile`` over a model patched with ``mode="fast"``: Dynamo traced the step cache's Python, a new graph
    at every step as its state changed, until its recompile limit (a user trial: the first 20-step run of a tiny SD
    U-Net took 45-119 s against 0.2 s eager, its bits differing from eager's). The fast forward now breaks the graph
    at the cache, which runs as in eager mode, with one warning that says how to compile the model under it
    (regional compilation). Checked: the compiled model's run equals a fresh eager patch's bit for bit, with the
    same calls saved, and Dynamo made no graph of the cache."""
    from torch._dynamo.utils import counters

    from jetdet.models import load_bundled

    model = load_bundled()
    x0 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 3])

    def euler(fn, steps=12):
        x = x0.clone()
        ts = torch.linspace(1.0, 0.0, steps + 1)
        with torch.no_grad():
            for i in range(steps):
                x = x + (ts[i + 1] - ts[i]) * fn(x, ts[i].expand(2), y)
        return x

    with jetdet.patch(model, mode="fast") as h:
        want, saved = euler(model), h.stats()["cache"]["calls_saved"]
    assert saved > 0
    counters.clear()
    with jetdet.patch(model, mode="fast") as h:
        compiled = torch.compile(model)
        with pytest.warns(UserWarning, match="regional compilation") as w:
            got = euler(compiled)
        mine = [m for m in w if "torch.compile over" in str(m.message)]
        assert len(mine) == 1 and mine[0].filename == __file__, [(m.filename, m.lineno) for m in mine]
        assert torch.equal(got, want) and h.stats()["cache"]["calls_saved"] == saved
        assert counters["stats"]["unique_graphs"] <= 1, dict(counters["stats"])
        # fullgraph=True cannot break the graph there: torch's error carries jetdet's reason
        torch._dynamo.reset()
        with pytest.raises(Exception, match="jetdet fast mode: the step cache decides in Python"):
            euler(torch.compile(model, fullgraph=True), steps=1)


_POWERS = {"x ** 2": lambda x: x ** 2, "2 ** x": lambda x: 2 ** x, "10000 ** x.double()": lambda x: 10000 ** x.double()}


@pytest.mark.parametrize("expr", list(_POWERS))
def test_tensor_power_operators_compile_in_the_mode(expr):
    """``**`` reaches the router as ``Tensor.__pow__`` / ``__rpow__``, wrappers torch defines in Python. Dynamo
    looked such an operator up in the handler table as absent and guarded on that, which failed at once: "Guard
    failed on the same frame it was created" (a crash, found on ComfyUI's compiled Flux, whose RoPE computes
    ``theta ** scale``). Now it runs, batch invariant."""
    def f(x):
        return torch.nn.functional.linear(_POWERS[expr](x).float(), torch.eye(8) * 0.5)

    x = torch.rand(4, 8, generator=torch.Generator().manual_seed(0))
    with jetdet.mode("deterministic"), torch.no_grad():
        compiled = torch.compile(f, backend="aot_eager")
        full = compiled(x)
        assert [torch.equal(compiled(x[i:i + 1])[0], full[i]) for i in range(4)] == [True] * 4
    torch.testing.assert_close(full, f(x))


def test_a_python_tensor_operator_routed_with_route_op_compiles_in_the_mode():
    """An operator torch defines in Python (``Tensor.__rsub__``) routed through ``route_op`` after import was missing
    from the router's identity lookup for traced code, so ``1 - x`` under torch.compile crashed Dynamo as ``**`` did
    ("Guard failed on the same frame it was created", a review). Now it runs through its handler."""
    from jetdet.mode import _HANDLERS, route_op

    seen = []

    def rsub(func, args, kwargs):
        seen.append(1)
        return torch.sub(args[1], args[0])

    x = torch.rand(4, 8, generator=torch.Generator().manual_seed(0))
    route_op(torch.Tensor.__rsub__, rsub)
    try:
        torch._dynamo.reset()
        with jetdet.mode("deterministic"), torch.no_grad():
            out = torch.compile(lambda t: 1.0 - t, backend="aot_eager")(x)
    finally:
        del _HANDLERS[torch.Tensor.__rsub__]
        torch._dynamo.reset()
    assert seen and torch.equal(out, 1.0 - x)
