"""Reductions in deterministic mode: ``sum``, ``mean``, 2-norms, ``var``/``std`` (and ``var_mean``/``std_mean``) over
given dims are routed to jetdet's fixed-order row reductions (ComfyUI's HunyuanVideo and Mochi pool text tokens with
``sum``; Stable Cascade's GlobalResponseNorm takes ``torch.norm`` and ``mean``; Cosmos normalises a position table
with ``linalg.vector_norm``; RescaleCFG and ACE-Step's ControlNet take ``std`` per item; Wan's and HunyuanVideo's
VAEs ``F.normalize`` every feature map over its channels), every other form
runs as it is without a warning, and the row ops' torch path is batch invariant for strided rows too."""

from __future__ import annotations

import re
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from _invariance import assert_batch_invariant
from _tolerances import OPS_MAX_ERR, assert_max_err

import jetdet
from jetdet.ops import registry

ROUTER = sys.modules["jetdet.mode"]


def _det(fn, *a, **k):
    with torch.no_grad(), jetdet.mode("deterministic"):
        return fn(*a, **k)


@pytest.fixture
def op_calls(monkeypatch):
    """Names of the jetdet row-reduction ops run (their bodies, whatever the entry)."""
    seen = []
    for name in ("sum", "mean"):
        op = registry.OPS[name]
        orig = op._body

        def spy(*args, _orig=orig, _name=name):
            seen.append(_name)
            return _orig(*args)

        monkeypatch.setattr(op, "_body", spy)
    return seen


ROUTED = [
    ("Tensor.sum dim 1", lambda t: t.sum(1)),
    ("torch.sum dims (1, 2) keepdim", lambda t: torch.sum(t, dim=(1, 2), keepdim=True)),
    ("Tensor.sum dim=-1 dtype=same", lambda t: t.sum(dim=-1, dtype=t.dtype)),
    ("Tensor.mean dim -1", lambda t: t.mean(-1)),
    ("torch.mean dims [2, 1]", lambda t: torch.mean(t, [2, 1])),
    ("torch.norm p=2 dims (1, 2) keepdim", lambda t: torch.norm(t, p=2, dim=(1, 2), keepdim=True)),
    ("Tensor.norm dim 1", lambda t: t.norm(dim=1)),
    ("Tensor.norm fro dims (1, 2)", lambda t: t.norm("fro", (1, 2))),
    ("linalg.vector_norm dim -1 keepdim", lambda t: torch.linalg.vector_norm(t, dim=-1, keepdim=True)),
    ("F.normalize dim 1 (Wan's VAE RMS_norm)", lambda t: F.normalize(t, dim=1)),
    ("F.normalize p=2 dims (1, 2) eps=1e-3", lambda t: F.normalize(t, 2, (1, 2), 1e-3)),
    ("Tensor.var dim 1", lambda t: t.var(1)),
    ("torch.var dims (1, 2) unbiased=False keepdim", lambda t: torch.var(t, (1, 2), False, True)),
    ("torch.std dims (1, 2) keepdim (RescaleCFG)", lambda t: torch.std(t, dim=(1, 2), keepdim=True)),
    ("Tensor.std dim -1 correction=0", lambda t: t.std(dim=-1, correction=0)),
    ("torch.var dim 1 correction=2.5", lambda t: torch.var(t, 1, correction=2.5)),
    ("torch.var_mean dim -1", lambda t: torch.var_mean(t, -1)),  # these two return (var or std, mean)
    ("torch.std_mean dims (1, 2) correction=0 keepdim", lambda t: torch.std_mean(t, (1, 2), correction=0,
                                                                                 keepdim=True)),
]


def _outputs(o) -> tuple:
    """A reduction's outputs as a tuple (``var_mean``/``std_mean`` return two)."""
    return o if isinstance(o, tuple) else (o,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,fn", ROUTED, ids=[n for n, _ in ROUTED])
def test_routed_reductions_reach_jetdet_match_torch_and_are_batch_invariant(name, fn, dtype, op_calls):
    x = torch.randn(5, 37, 24).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = _det(fn, x)
    assert op_calls, f"{name}: no jetdet reduction ran"
    out, ref, plain = _outputs(out), _outputs(fn(x.double())), _outputs(fn(x))
    for i in range(len(out)):
        label = name if len(out) == 1 else f"{name} {('var/std', 'mean')[i]}"
        assert out[i].shape == ref[i].shape and out[i].dtype == plain[i].dtype
        assert_max_err(out[i], ref[i], OPS_MAX_ERR[dtype], label)
        assert_batch_invariant(lambda t, i=i: _outputs(_det(fn, t))[i], [x], prefixes=(1, 2, 4), slots=(3,),
                               full=out[i], label=label)


PASSED_THROUGH = [
    ("sum of everything", lambda t: t.sum()),
    ("mean of everything", lambda t: torch.mean(t)),
    ("sum with another dtype", lambda t: t.sum(1, dtype=torch.float64)),
    ("1-norm", lambda t: t.norm(p=1, dim=1)),
    ("inf vector norm", lambda t: torch.linalg.vector_norm(t, ord=float("inf"), dim=-1)),
    ("float64 input", lambda t: t.double().sum(1)),
    ("integer input", lambda t: (t > 0).long().sum(1)),
    ("sum with out=", lambda t: torch.sum(t, 1, out=torch.empty(5, 24))),
    ("empty tensor", lambda t: t[:0].mean(1)),
    ("dim given twice", lambda t: t.sum((1, -2))),
    ("Frobenius over 3 dims", lambda t: t.norm(dim=(0, 1, 2))),  # torch raises: a matrix norm takes 2 dims
    ("var of everything", lambda t: t.var()),
    ("std with a positional unbiased", lambda t: t.std(False)),
    ("var with unbiased and correction", lambda t: torch.var(t, 1, unbiased=True, correction=0)),  # torch raises
    ("var of float64", lambda t: t.double().var(1)),
    ("F.normalize p=1", lambda t: F.normalize(t, p=1, dim=1)),
    ("F.normalize with out=", lambda t: F.normalize(t, dim=1, out=torch.empty(5, 37, 24))),
]


@pytest.mark.parametrize("name,fn", PASSED_THROUGH, ids=[n for n, _ in PASSED_THROUGH])
def test_other_forms_run_as_they_are_without_a_warning(name, fn, op_calls):
    x = torch.randn(5, 37, 24)
    ref = None
    try:
        ref = fn(x)
    except (RuntimeError, TypeError) as e:  # torch refuses some forms itself (a dim twice): so must deterministic mode
        with pytest.raises(type(e), match=re.escape(str(e).split("\n")[0][:40])):
            _det(fn, x)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning, and strict mode does not raise
        out = _det(fn, x)
    assert torch.equal(out, ref) and out.dtype == ref.dtype, name
    assert op_calls == [], f"{name}: routed to jetdet's {op_calls}"


def test_var_with_no_degrees_of_freedom_is_nan_as_torch_s():
    x = torch.randn(4, 1, 6)
    for fn in (lambda t: t.var(1), lambda t: t.std(1), lambda t: t.var(1, correction=3)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about the degrees of freedom
            out, ref = _det(fn, x), fn(x)
        assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    torch.testing.assert_close(_det(lambda t: t.var(1, correction=0), x), torch.zeros(4, 6))


def test_reductions_keep_autograd_and_autocast():
    x = torch.randn(3, 9, 8, requires_grad=True)
    with jetdet.mode("deterministic"):
        y = torch.linalg.vector_norm(x, dim=-1).sum(1) + x.mean((1, 2))
    y.sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    (torch.linalg.vector_norm(xr, dim=-1).sum(1) + xr.mean((1, 2))).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-4)
    # CPU autocast keeps a bf16 input's dtype for these (torch's CPU policy), as the router does
    xb = torch.randn(3, 9, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = xb.sum(1)
        with jetdet.mode("deterministic"):
            out = xb.sum(1)
    assert out.dtype == ref.dtype


def test_a_norm_of_a_zero_row_has_torch_s_zero_gradient():
    y = torch.randn(4, 4, 5)
    y[1, 0, 0], y[2, 1, 1] = float("nan"), float("inf")  # NaN and inf rows give NaN and inf, as torch's
    for fn in (lambda t: torch.linalg.vector_norm(t, dim=-1), lambda t: t.norm(dim=(1, 2))):
        assert torch.equal(_det(fn, y).isnan(), fn(y).isnan()) and torch.equal(_det(fn, y).isinf(), fn(y).isinf())
    x = torch.zeros(3, 4, 5)
    x[0] = torch.randn(4, 5)
    for fn in (lambda t: torch.linalg.vector_norm(t, dim=-1), lambda t: torch.norm(t, p=2, dim=(1, 2)),
               lambda t: t.norm("fro", (1, 2))):
        a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        with jetdet.mode("deterministic"):
            fn(a).sum().backward()
        fn(b).sum().backward()
        assert torch.isfinite(a.grad).all()  # sqrt's gradient at 0 is inf; inf * 0 was NaN
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)


def test_mode_off_leaves_torch_reductions_alone(op_calls):
    x = torch.randn(4, 6, 5)
    assert torch.equal(x.sum(1), torch.sum(x, 1)) and op_calls == []


@pytest.mark.parametrize("name,fn", [
    ("ops.sum over dim 1", lambda t: jetdet.ops.sum(t, 1)),
    ("ops.mean over dims (1, 2) of a transposed input", lambda t: jetdet.ops.mean(t.transpose(1, 2), (1, 2))),
    ("ops.softmax over dim 1", lambda t: jetdet.ops.softmax(t, 1)),
    ("rms_norm of a transposed input", lambda t: jetdet.ops.rms_norm(t.transpose(1, 2), (t.shape[1],))),
    ("layer_norm of a transposed input", lambda t: jetdet.ops.layer_norm(t.transpose(1, 2), (t.shape[1],))),
])
def test_row_ops_are_batch_invariant_on_strided_rows(name, fn, restore_threads):
    """The torch path reduces contiguous rows: ``[B * K, N]`` views of permuted inputs are strided rows at batch 1
    (a view) and contiguous at batch 8 (a copy), and torch reduces the two in different orders (negative control
    below). ops.sum over dim 1 and rms_norm of a transposed input differed between batch 1 and 8 before."""
    torch.set_num_threads(2)
    x = torch.randn(8, 1024, 64)
    assert_batch_invariant(fn, [x], prefixes=(1, 2), slots=(5,), label=name)


def test_negative_control_strided_rows_reduce_in_another_order():
    torch.manual_seed(0)
    x = torch.randn(1, 4096, 64)
    strided = x.permute(0, 2, 1).reshape(64, 4096)  # a view: rows of stride 64
    assert strided.stride() == (1, 64)
    assert not torch.equal(strided.sum(-1), strided.contiguous().sum(-1))
    # and the routed call on the same input
    assert torch.equal(_det(lambda t: t.sum(1), x)[0], _det(lambda t: t.sum(1), torch.cat([x, x]))[0])


def test_an_sd_like_group_response_norm_is_batch_invariant(restore_threads):
    """Stable Cascade's GlobalResponseNorm as ComfyUI writes it: ``torch.norm`` over (H, W), then ``mean`` over
    channels."""
    torch.set_num_threads(2)
    x = torch.randn(4, 12, 12, 96)
    g, b = torch.randn(1, 1, 1, 96), torch.randn(1, 1, 1, 96)

    def grn(t):
        agg = torch.norm(t, p=2, dim=(1, 2), keepdim=True)
        stand = agg / (agg.mean(dim=-1, keepdim=True) + 1e-6)
        return g * (t * stand) + b + t

    out = _det(grn, x)
    assert_max_err(out, grn(x.double()), OPS_MAX_ERR[torch.float32])
    assert_batch_invariant(lambda t: _det(grn, t), [x], prefixes=(1, 3), slots=(2,), full=out)
    assert ROUTER.handler_for(torch.norm) is not None and ROUTER.handler_for(torch.Tensor.mean) is not None


SCANS_AND_PRODUCTS = [
    ("Tensor.logsumexp dim 1", lambda t: t.logsumexp(1)),
    ("torch.logsumexp dims (1, 2) keepdim", lambda t: torch.logsumexp(t, (1, 2), keepdim=True)),
    ("Tensor.cumsum dim 1", lambda t: t.cumsum(1)),
    ("torch.cumsum dim -1", lambda t: torch.cumsum(t, dim=-1)),
    ("Tensor.cumprod dim 2", lambda t: (1 + 0.05 * t).cumprod(2)),
    ("Tensor.prod dim 1", lambda t: (1 + 0.05 * t).prod(1)),
    ("torch.prod dim -1 keepdim", lambda t: torch.prod(1 + 0.05 * t, -1, keepdim=True)),
    ("F.instance_norm with weight and bias", lambda t: F.instance_norm(
        t, weight=torch.linspace(0.5, 1.5, 37).to(t.dtype), bias=torch.linspace(-1, 1, 37).to(t.dtype))),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,fn", SCANS_AND_PRODUCTS, ids=[n for n, _ in SCANS_AND_PRODUCTS])
def test_scans_products_and_instance_norm_match_torch_and_are_batch_invariant(name, fn, dtype):
    """logsumexp (its sum jetdet's row reduction), cumsum/cumprod (a fixed doubling scan), prod (a fixed pairwise
    tree) and instance_norm (jetdet's group_norm, one group per channel) in deterministic mode."""
    assert ROUTER.handler_for(torch.cumsum) is not None
    x = torch.randn(5, 37, 24).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = _det(fn, x)
    ref, plain = fn(x.double()), fn(x)
    assert out.shape == ref.shape and out.dtype == plain.dtype
    # the running products and sums grow along the row: the error is relative to the largest value
    assert_max_err(out, ref, OPS_MAX_ERR[dtype] * (4 if "cum" in name else 1), name)
    assert_batch_invariant(lambda t: _det(fn, t), [x], prefixes=(1, 2, 4), slots=(3,), full=out, label=name)


def test_logsumexp_keeps_torch_s_infinities_and_nans():
    inf, nan = float("inf"), float("nan")
    y = torch.tensor([[0.0, -inf, inf], [-inf, -inf, -inf], [nan, 1.0, 2.0], [1e30, 1e30, -1e30]])
    out, ref = _det(torch.logsumexp, y, 1), torch.logsumexp(y, 1)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    torch.testing.assert_close(out[3], ref[3])


def test_scan_and_product_forms_jetdet_leaves_run_as_they_are():
    x = torch.randn(4, 9, 6)
    i = (x > 0).long()
    for fn in (lambda: i.cumsum(1), lambda: x.double().cumsum(1), lambda: x.cumsum(1, dtype=torch.float64),
               lambda: x.prod(), lambda: i.prod(1), lambda: torch.logsumexp(x.double(), 1),
               lambda: F.instance_norm(x, torch.zeros(9), torch.ones(9), use_input_stats=False)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = _det(fn)
        assert torch.equal(out, fn())


def test_linalg_matmul_is_routed_as_matmul():
    """``torch.linalg.matmul`` is torch.matmul's alias but a function object of its own: it went through unrouted."""
    a, b = torch.randn(3, 4, 5), torch.randn(5, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(_det(torch.linalg.matmul, a, b), _det(torch.matmul, a, b))
    assert ROUTER.handler_for(torch.linalg.matmul) is ROUTER.handler_for(torch.matmul)


def test_instance_norm_with_running_statistics_to_update_falls_back_with_the_warning():
    ROUTER._warned.clear()
    m = torch.nn.InstanceNorm2d(4, track_running_stats=True)
    x = torch.randn(3, 4, 5, 5)
    ref = torch.nn.InstanceNorm2d(4, track_running_stats=True)
    with pytest.warns(UserWarning, match="instance_norm falls back to torch .*running statistics"):
        out = _det(m, x)
    assert torch.equal(out, ref(x)) and torch.equal(m.running_mean, ref.running_mean)


@pytest.mark.parametrize("name,fn", [
    ("cosine_similarity", lambda a, b: F.cosine_similarity(a, b)),
    ("cdist", lambda a, b: torch.cdist(a, b)),
    ("mv", lambda a, b: torch.mv(a, b[0])),
    ("dot", lambda a, b: torch.dot(a[0], b[0])),
    ("nansum", lambda a, b: torch.nansum(a, 1)),
    ("logcumsumexp", lambda a, b: torch.logcumsumexp(a, 1)),
    ("linalg_norm", lambda a, b: torch.linalg.norm(a, dim=1)),
    ("linalg_multi_dot", lambda a, b: torch.linalg.multi_dot([a, b.t(), a])),
    ("bilinear", lambda a, b: F.bilinear(a, b, torch.ones(3, 8, 8))),
    ("linalg_vecdot", lambda a, b: torch.linalg.vecdot(a, b)),
    ("embedding_bag", lambda a, b: F.embedding_bag(torch.tensor([1, 2, 3, 0]), a, torch.tensor([0, 2]), mode="sum")),
])
def test_reductions_jetdet_does_not_route_warn_by_name(name, fn):
    """No longer silent: a float reduction deterministic mode cannot vouch for names itself (integer ones are exact
    and stay quiet)."""
    ROUTER._warned.clear()
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.warns(UserWarning, match=f"{name} falls back to torch .*does not route"):
        out = _det(fn, a, b)
    assert torch.equal(out, fn(a, b))
    if name in ("dot", "mv"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _det(fn, a.long(), b.long())
