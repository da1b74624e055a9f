"""jetdet.ops.linear_attention: Triton (interpreter on CPU, compiled on a GPU) and torch
paths against the fp32 reference."""

import pytest
import torch
from _fast_util import assert_rel

from jetdet.kernels.linear_attention import reference as ref
from jetdet.ops import fast

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(B, H, N, M, D, DV, dtype, feature_map):
    q, k, v = torch.randn(B, H, N, D), torch.randn(B, H, M, D), torch.randn(B, H, M, DV)
    if feature_map == "identity":  # identity needs positive features, or the denominator crosses zero
        q, k = q.abs() + 0.1, k.abs() + 0.1
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("feature_map", ["relu", "elu1", "identity"])
def test_matches_reference(backend, dtype, feature_map, monkeypatch):
    monkeypatch.setenv("JETDET_BACKEND", backend)
    q, k, v = _inputs(2, 3, 37, 45, 24, 40, dtype, feature_map)
    out = fast.linear_attention(q, k, v, feature_map=feature_map)
    assert out.dtype == dtype and out.shape == (2, 3, 37, 40)
    assert_rel(out, ref.linear_attention_reference(q, k, v, feature_map), dtype)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_state_round_trip(backend, monkeypatch):
    """A state returned by one call and passed back in gives the very same output, and equals the
    reference state; it can be applied to new queries (reuse across steps)."""
    monkeypatch.setenv("JETDET_BACKEND", backend)
    q, k, v = _inputs(2, 2, 33, 50, 32, 32, torch.float16, "relu")
    out, st = fast.linear_attention(q, k, v, return_state=True)
    assert st.kv.dtype == torch.float32 and st.kv.shape == (2, 2, 32, 32) and st.k_sum.shape == (2, 2, 32)
    rkv, rks = ref.linear_attention_state_reference(k, v, "relu")
    assert torch.allclose(st.kv, rkv, rtol=1e-5, atol=1e-4) and torch.allclose(st.k_sum, rks, rtol=1e-5, atol=1e-4)
    again = fast.linear_attention(q, None, None, state=st)
    assert torch.equal(again, out)
    assert torch.equal(fast.linear_attention(q, k, v), out)
    q2 = torch.randn_like(q)
    assert_rel(fast.linear_attention(q2, None, None, state=(st.kv, st.k_sum)),
               ref.linear_attention_apply_reference(q2, rkv, rks, "relu"), torch.float16)


def test_chunked_state_is_exact_and_batch_invariant(triton_backend):
    """M > CHUNK_N splits pass 1 over token chunks, summed in chunk order: still matches the reference, and
    an item's state does not depend on the batch it is in."""
    q, k, v = _inputs(2, 1, 5, 2100, 16, 16, torch.float32, "elu1")
    out, st = fast.linear_attention(q, k, v, feature_map="elu1", return_state=True)
    assert_rel(out, ref.linear_attention_reference(q, k, v, "elu1"), torch.float32)
    _, st1 = fast.linear_attention(q[1:], k[1:], v[1:], feature_map="elu1", return_state=True)
    assert torch.equal(st1.kv[0], st.kv[1]) and torch.equal(st1.k_sum[0], st.k_sum[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_torch_path_is_batch_invariant(dtype, monkeypatch, restore_threads):
    """The torch path's products are row-tiled GEMMs (plain torch.matmul was not batch invariant: a sweep found 170 of
    768 cases differing, up to 2e-3 in fp16): an item alone equals its row of a batch, at 1 and 2 threads."""
    monkeypatch.setenv("JETDET_BACKEND", "torch")
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(5, 2, n, 24, generator=g).to(dtype) for n in (37, 900, 900))
    for th in (1, 2):
        torch.set_num_threads(th)
        full, st = fast.linear_attention(q, k, v, feature_map="elu1", return_state=True)
        for i in (0, 3):
            one, st1 = fast.linear_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], feature_map="elu1", return_state=True)
            assert torch.equal(one[0], full[i]) and torch.equal(st1.kv[0], st.kv[i]), (th, i)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_strided_inputs(backend, monkeypatch):
    """[B, N, H, D] projections viewed as [B, H, N, D] without a copy."""
    monkeypatch.setenv("JETDET_BACKEND", backend)
    x = torch.randn(3, 2, 19, 3, 16)  # (qkv, B, N, H, D)
    q, k, v = (t.transpose(1, 2) for t in x)
    assert not q.is_contiguous()
    assert_rel(fast.linear_attention(q, k, v), ref.linear_attention_reference(q, k, v), torch.float32)


def test_custom_op_and_fake():
    q, k, v = _inputs(1, 2, 9, 11, 8, 8, torch.float32, "relu")
    torch.library.opcheck(torch.ops.jetdet.linear_attention.default, (q, k, v, "relu", 1e-6))
    torch.library.opcheck(torch.ops.jetdet.linear_attention_state.default, (k, v, "elu1"))
    kv, ks = ref.linear_attention_state_reference(k, v, "relu")
    torch.library.opcheck(torch.ops.jetdet.linear_attention_apply.default, (q, kv, ks, "relu", 1e-6))


def test_bad_inputs():
    q, k, v = _inputs(1, 2, 9, 11, 8, 8, torch.float32, "relu")
    with pytest.raises(ValueError, match="head dim 129"):
        fast.linear_attention(torch.randn(1, 1, 4, 129), torch.randn(1, 1, 4, 129), torch.randn(1, 1, 4, 8))
    with pytest.raises(ValueError, match="k: expected shape"):
        fast.linear_attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="v: expected shape"):
        fast.linear_attention(q, k, v[:, :, :5])
    with pytest.raises(TypeError, match="k: expected dtype"):
        fast.linear_attention(q, k.half(), v)
    with pytest.raises(TypeError, match="q: expected dtype"):
        fast.linear_attention(q.int(), k.int(), v.int())
    with pytest.raises(ValueError, match="q: expected 4 dims"):
        fast.linear_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="feature_map"):
        fast.linear_attention(q, k, v, feature_map="softmax")
    with pytest.raises(ValueError, match="eps"):
        fast.linear_attention(q, k, v, eps=-1.0)
    with pytest.raises(ValueError, match="k, v: required"):
        fast.linear_attention(q, None, None)
    _, st = fast.linear_attention(q, k, v, return_state=True)
    with pytest.raises(ValueError, match="state: built with feature_map='relu'"):
        fast.linear_attention(q, None, None, feature_map="elu1", state=st)
    with pytest.raises(ValueError, match="state.kv: expected shape"):
        fast.linear_attention(q[:, :1], None, None, state=st)
    with pytest.raises(TypeError, match="state.kv: expected dtype float32"):
        fast.linear_attention(q, None, None, state=(st.kv.half(), st.k_sum))
