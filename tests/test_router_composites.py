"""Composite torch functions that torch hands to the router as one call: ``F.multi_head_attention_forward``
(``nn.MultiheadAttention``'s body), ``F.log_softmax`` and its family, ``F.softmin``. A Python function of
``torch.nn.functional`` that checks for ``__torch_function__`` first reaches the router whole, and anything the
router does not take runs as torch's with the router off inside: its products and reductions were not routed, and
an item alone differed from the same item in a batch with no warning (a model-family sweep found it in HunyuanDiT's
text pooler in diffusers). Each is now rebuilt from the routed ops, or falls back with the warning naming it."""

import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import jetdet

mode_module = sys.modules["jetdet.mode"]


def _det(fn, *a, **k):
    with torch.no_grad(), jetdet.mode("deterministic"):
        return fn(*a, **k)


def _items_equal(fn, x, n, dim=1):
    """Whether each of the ``n`` items of ``x`` (along ``dim``) alone gives its slice of the whole batch's output."""
    full = fn(x)
    return all(torch.equal(full.narrow(dim, i, 1), fn(x.narrow(dim, i, 1))) for i in range(n))


def test_hunyuandit_style_attention_pool_is_batch_invariant():
    """HunyuanDiT's pooler: a query of one token against the sequence, separate projection weights, an output
    projection; sequence-first input. torch's own differs between an item alone and the batch here (the negative
    control); under the mode each item equals its batch slice."""
    g = torch.Generator().manual_seed(0)
    L, N, C, H = 6, 4, 16, 2
    x = torch.randn(L, N, C, generator=g)
    w = [torch.randn(C, C, generator=g) / 4 for _ in range(3)]
    w_out = torch.randn(24, C, generator=g) / 4  # an output width other than the input's, as HunyuanDiT's
    b, cb = torch.randn(3 * C, generator=g) * 0.1, torch.randn(24, generator=g) * 0.1

    def pool(t):
        return F.multi_head_attention_forward(
            query=t[:1], key=t, value=t, embed_dim_to_check=C, num_heads=H, in_proj_weight=None, in_proj_bias=b,
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=w_out, out_proj_bias=cb,
            training=False, need_weights=False, use_separate_proj_weight=True, q_proj_weight=w[0],
            k_proj_weight=w[1], v_proj_weight=w[2])[0]

    with torch.no_grad():
        ref = pool(x)
        assert not _items_equal(pool, x, N)  # torch's own
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # routed, not the fallback
        out = _det(pool, x)
        assert _det(_items_equal, pool, x, N)
    assert out.shape == ref.shape == (1, N, 24)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _module_cases():
    E, H, L, S, N = 32, 4, 7, 9, 4
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(L, N, E, generator=g), torch.randn(S, N, E, generator=g)
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[1:, -3:] = True  # items pad differently
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    return E, H, N, x, y, {
        "self-attention, weights": ((x, x, x), {}),
        "self-attention, no weights": ((x, x, x), {"need_weights": False}),
        "cross-attention": ((x, y, y), {}),
        "padding mask, weights": ((x, y, y), {"key_padding_mask": kpm}),
        "padding mask, no weights": ((x, y, y), {"key_padding_mask": kpm, "need_weights": False}),
        "float mask": ((x, y, y), {"attn_mask": torch.randn(L, S, generator=g), "need_weights": False}),
        "causal": ((x, x, x), {"attn_mask": causal, "is_causal": True, "need_weights": False}),
        "causal, weights per head": ((x, x, x), {"attn_mask": causal, "average_attn_weights": False}),
    }


@pytest.mark.parametrize("case", list(_module_cases()[5]))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multihead_attention_module_is_batch_invariant_and_close_to_torch(case, dtype):
    E, H, N, *_, cases = _module_cases()
    (q, k, v), kw = cases[case]
    torch.manual_seed(2)
    m = torch.nn.MultiheadAttention(E, H).eval().to(dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    with torch.no_grad():
        ref_out, ref_w = m(q, k, v, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, wts = _det(m, q, k, v, **kw)
        for i in range(N):
            kw1 = dict(kw, key_padding_mask=kw["key_padding_mask"][i:i + 1]) if "key_padding_mask" in kw else kw
            one, w1 = _det(m, q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], **kw1)
            assert torch.equal(out[:, i:i + 1], one), (case, i)
            assert (wts is None) == (w1 is None) and (wts is None or torch.equal(wts[i:i + 1], w1)), (case, i)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)
    assert (wts is None) == (ref_w is None)
    if wts is not None:
        torch.testing.assert_close(wts, ref_w, rtol=tol, atol=tol)


def test_multihead_attention_other_layouts():
    """batch_first, an unbatched call, key and value widths of their own (separate projection weights)."""
    E, H = 32, 4
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    mb = torch.nn.MultiheadAttention(E, H, batch_first=True).eval()
    xb = torch.randn(4, 7, E, generator=g)
    assert _det(_items_equal, lambda t: mb(t, t, t)[0], xb, 4, dim=0)
    with torch.no_grad():
        torch.testing.assert_close(_det(mb, xb, xb, xb)[0], mb(xb, xb, xb)[0], rtol=1e-5, atol=1e-5)
    u = xb[0]
    out, wts = _det(mb, u, u, u)
    assert out.shape == (7, E) and wts.shape == (7, 7)
    torch.testing.assert_close(out, _det(mb, xb[:1], xb[:1], xb[:1])[0][0], rtol=0, atol=0)
    mk = torch.nn.MultiheadAttention(E, H, kdim=12, vdim=20).eval()
    q, k, v = torch.randn(5, 4, E, generator=g), torch.randn(6, 4, 12, generator=g), torch.randn(6, 4, 20, generator=g)
    out = _det(mk, q, k, v)[0]
    for i in range(4):
        assert torch.equal(out[:, i:i + 1], _det(mk, q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1])[0])
    with torch.no_grad():
        torch.testing.assert_close(out, mk(q, k, v)[0], rtol=1e-5, atol=1e-5)


def test_multihead_attention_options_it_does_not_rebuild_fall_back_with_the_warning():
    mode_module._warned.clear()
    x = torch.randn(5, 2, 16)
    m = torch.nn.MultiheadAttention(16, 2, add_bias_kv=True).eval()
    with pytest.warns(UserWarning, match="multi_head_attention_forward falls back to torch \\(bias_k/bias_v\\)"):
        out = _det(m, x, x, x)[0]
    with torch.no_grad():
        assert torch.equal(out, m(x, x, x)[0])
    m = torch.nn.MultiheadAttention(16, 2, dropout=0.5).train()
    with pytest.warns(UserWarning, match="dropout_p=0.5 in training mode"):
        _det(m, x, x, x)
    m = torch.nn.MultiheadAttention(16, 2).eval()
    with pytest.raises(RuntimeError):  # torch's own error, as without the mode
        _det(m, x, x, x, is_causal=True)


@pytest.mark.parametrize("fn", [F.log_softmax, torch.log_softmax, torch.Tensor.log_softmax,
                                torch.special.log_softmax, F.softmin, torch.special.softmax])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_log_softmax_softmin_and_special_softmax_are_routed(fn, dtype, monkeypatch):
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(6, 3, 77, generator=g) * 4).to(dtype)
    if fn not in (F.softmin, torch.special.softmax):  # log_softmax sums through jetdet's row reduction
        ops, sums = mode_module._ops(), []
        real = ops.sum
        monkeypatch.setattr(ops, "sum", lambda *a, **k: sums.append(1) or real(*a, **k))
        _det(fn, x, -1)
        assert sums, "log_softmax did not reach jetdet's sum"  # torch's own is batch invariant on some CPUs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = _det(fn, x, -1)
        assert _det(_items_equal, lambda t: fn(t, -1), x, 6, dim=0)
        assert _det(_items_equal, lambda t: fn(t, 1), x, 6, dim=0)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out, fn(x, -1), rtol=tol, atol=tol)
    assert out.dtype == dtype
    out64 = _det(fn, x, 0, dtype=torch.float32)  # dtype= casts first, as torch's
    assert out64.dtype == torch.float32
    torch.testing.assert_close(out64, fn(x, 0, dtype=torch.float32), rtol=1e-5, atol=1e-5)


def test_rmatmul_and_trace():
    a, b = torch.randn(5, 8), torch.randn(8, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(_det(torch.Tensor.__rmatmul__, b, a), _det(torch.matmul, a, b))
    mode_module._warned.clear()
    with pytest.warns(UserWarning, match="trace falls back to torch \\(trace is not routed\\)"):
        assert torch.equal(_det(torch.trace, a[:5, :5]), torch.trace(a[:5, :5]))


@pytest.mark.parametrize("make", [lambda: torch.nn.BatchNorm2d(3).train(),
                                  lambda: torch.nn.BatchNorm2d(3, track_running_stats=False).eval()])
def test_batch_norm_with_batch_statistics_warns_and_with_running_statistics_passes(make):
    """Batch statistics make an item's output depend on the batch by definition: the named warning. In eval mode
    with running statistics it is elementwise per item: silent, torch's own result."""
    x = torch.randn(4, 3, 5, 5)
    bn = torch.nn.BatchNorm2d(3).eval()
    bn.running_mean.uniform_(-1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            assert torch.equal(_det(bn, x), bn(x))
    mode_module._warned.clear()
    with pytest.warns(UserWarning, match="batch_norm in training mode normalises with the whole batch's statistics"):
        _det(make(), x)


def test_log_softmax_of_large_logits_keeps_torchs_precision_and_mha_keeps_torchs_dtype_error():
    """(x - m) - log(s), not x - (m + log s), which lost m's ulp (1.2e-4 at logits near 3000; a review); a float mask
    of another dtype than the query's gets torch's own error, not one naming jetdet's internal mat2."""
    x = torch.randn(4, 50, generator=torch.Generator().manual_seed(5)) + 3000.0
    exact = torch.log_softmax(x.double(), -1)
    assert (_det(F.log_softmax, x, -1).double() - exact).abs().max() < 2e-6
    m = torch.nn.MultiheadAttention(16, 2).eval().half()
    q = torch.randn(5, 2, 16).half()
    with pytest.raises(RuntimeError) as plain:
        with torch.no_grad():
            m(q, q, q, attn_mask=torch.zeros(5, 5))
    with pytest.raises(RuntimeError) as routed:
        _det(m, q, q, q, attn_mask=torch.zeros(5, 5))
    assert str(routed.value) == str(plain.value)
