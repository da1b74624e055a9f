"""jetdet.ops.attention_block_mask / block_sparse_attention: Triton (interpreter on CPU, compiled on a GPU) and
torch paths against the fp32 references; work proportional to mask density, counted by the kernel itself."""

import math

import pytest
import torch
from _fast_util import assert_rel

from jetdet.kernels.block_sparse import reference as ref
from jetdet.ops import fast

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _qkv(B, H, N, M, D, DV, dtype):
    return (torch.randn(B, H, N, D).to(dtype), torch.randn(B, H, M, D).to(dtype),
            torch.randn(B, H, M, DV).to(dtype))


def _random_mask(B, H, nqb, nkb, density, seed=1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mask = (torch.rand(B, H, nqb, nkb, generator=g, device="cpu") < density).to(torch.get_default_device())
    mask[..., torch.arange(nqb), torch.arange(nqb) * nkb // nqb] = True
    return mask


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_full_mask_is_dense_attention(backend, dtype, monkeypatch):
    monkeypatch.setenv("JETDET_BACKEND", backend)
    bs = 16
    q, k, v = _qkv(2, 2, 45, 37, 24, 40, dtype)  # odd sizes: tails in both N and M
    full = torch.ones(2, 2, math.ceil(45 / bs), math.ceil(37 / bs), dtype=torch.bool)
    out = fast.block_sparse_attention(q, k, v, full, block_size=bs)
    assert out.dtype == dtype and out.shape == (2, 2, 45, 40)
    assert_rel(out, ref.block_sparse_attention_reference(q, k, v, None), dtype)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_mask_is_masked_dense(backend, dtype, monkeypatch):
    monkeypatch.setenv("JETDET_BACKEND", backend)
    bs = 32
    q, k, v = _qkv(2, 2, 100, 130, 32, 32, dtype)
    mask = _random_mask(2, 2, 4, 5, 0.4)
    scale = 0.3
    out = fast.block_sparse_attention(q, k, v, mask, block_size=bs, scale=scale)
    assert_rel(out, ref.block_sparse_attention_reference(q, k, v, mask, bs, scale), dtype)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_mask_shared_by_batch_and_empty_rows(backend, monkeypatch):
    """A [1, H, ...] mask serves every batch item (e.g. both CFG branches); a query block with no kept KV
    block outputs zeros."""
    monkeypatch.setenv("JETDET_BACKEND", backend)
    q, k, v = _qkv(3, 2, 70, 70, 16, 16, torch.float32)
    mask = _random_mask(1, 2, 3, 3, 0.5)
    mask[0, 1, 2] = False
    out = fast.block_sparse_attention(q, k, v, fast.block_mask_from_bool(mask, 32), block_size=32)
    assert_rel(out, ref.block_sparse_attention_reference(q, k, v, mask, 32), torch.float32)
    assert torch.equal(out[:, 1, 64:], torch.zeros_like(out[:, 1, 64:]))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_a_nan_in_the_input_stays_a_nan(backend, where, monkeypatch):
    """A NaN in q, k or v (an fp16 overflow upstream, say) reaches the output as dense attention's does; only a query
    block with no kept key block is zeros. The torch path turned every NaN into 0 before (a state audit)."""
    monkeypatch.setenv("JETDET_BACKEND", backend)
    q, k, v = _qkv(1, 2, 64, 64, 16, 16, torch.float32)
    t = {"q": q, "k": k, "v": v}
    t[where][0, 0, 5, 3] = float("nan")
    full = torch.ones(1, 2, 4, 4, dtype=torch.bool)
    out = fast.block_sparse_attention(q, k, v, full, block_size=16)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.equal(out.isnan(), dense.isnan()) and out.isnan().any()
    empty = full.clone()
    empty[0, 0, 0] = False
    out = fast.block_sparse_attention(q, k, v, empty, block_size=16)
    assert torch.equal(out[0, 0, :16], torch.zeros_like(out[0, 0, :16]))
    # a NaN in a block a query block does not visit stays out of it (a padded slot gathered block 0: a review)
    diag = torch.eye(4, dtype=torch.bool).expand(1, 2, 4, 4).clone()
    diag[0, :, 3, 2] = True  # query block 3 visits two blocks, so the others' steps have padded slots
    out = fast.block_sparse_attention(q, k, v, diag, block_size=16)
    assert out[0, 0, :16].isnan().any() and not out[0, 0, 16:].isnan().any()  # only query block 0 visits block 0


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("mass,pool_size", [(0.5, None), (0.9, None), (1.0, None), (0.9, 8)])
def test_block_mask_matches_reference(backend, mass, pool_size, monkeypatch):
    monkeypatch.setenv("JETDET_BACKEND", backend)
    q, k, _ = _qkv(2, 2, 150, 130, 32, 32, torch.float16)
    bm = fast.attention_block_mask(q, k, block_size=32, mass=mass, min_blocks=2, pool_size=pool_size)
    expect = ref.attention_block_mask_reference(q, k, 32, mass, 2, pool_size)
    assert torch.equal(bm.mask, expect)
    assert bm.mask.shape == (2, 2, 5, 5) and bm.block_size == 32
    assert (bm.mask.sum(-1) >= 2).all()
    assert bm.mask[..., torch.arange(5), torch.arange(5)].all()  # diagonal always kept
    if mass == 1.0:
        assert bm.mask.all()
    # index form: ascending kept ids, then -1
    for row_m, row_i, c in zip(bm.mask.flatten(0, 2), bm.indices.flatten(0, 2), bm.counts.flatten()):
        kept = row_m.nonzero().flatten().to(torch.int32)
        assert int(c) == len(kept) and torch.equal(row_i[: int(c)], kept) and (row_i[int(c):] == -1).all()


def test_block_pool_kernel_matches_reference(triton_backend):
    from jetdet.kernels.block_sparse import launch

    x = torch.randn(2, 3, 77, 40).half()
    assert torch.allclose(launch.block_pool(x, 32), ref.block_pool(x, 32), atol=1e-6)


def test_work_is_proportional_to_density(triton_backend):
    """The kernel counts the KV tiles each program actually loops over: the total equals the kept block
    pairs × tiles per pair, so it scales with density (no loop over all blocks with a skip)."""
    from jetdet.kernels.block_sparse import launch

    B, H, N, D, bs = 1, 2, 256, 16, 32
    q, k, v = _qkv(B, H, N, N, D, D, torch.float16)
    nb = N // bs
    per_q, per_kv = launch.programs_per_query_block(D, bs, q.dtype, q.device)
    visits = {}
    for density in (0.125, 0.25, 0.5, 1.0):
        # exactly density * nb kept blocks per query block
        keep = int(density * nb)
        mask = torch.zeros(B, H, nb, nb, dtype=torch.bool)
        for i in range(nb):
            mask[:, :, i, [(i + j) % nb for j in range(keep)]] = True
        bm = fast.block_mask_from_bool(mask, bs)
        counter = torch.zeros(B * H * nb * per_q, dtype=torch.int32)
        launch.attention(q, k, v, bm.indices, bm.counts, bs, D ** -0.5, visits=counter)
        work = fast.block_sparse_work(bm)
        assert work["blocks_visited"] == B * H * nb * keep and work["density"] == pytest.approx(density)
        assert int(counter.sum()) == work["blocks_visited"] * per_q * per_kv
        visits[density] = int(counter.sum())
    for density, n in visits.items():
        assert n / visits[1.0] == pytest.approx(density)


def test_custom_ops():
    q, k, v = _qkv(1, 2, 40, 40, 16, 16, torch.float32)
    torch.library.opcheck(torch.ops.jetdet.attention_block_mask.default, (q, k, 16, 0.9, 1, 8))
    bm = fast.attention_block_mask(q, k, 16, 0.9)
    torch.library.opcheck(torch.ops.jetdet.block_sparse_attention.default,
                          (q, k, v, bm.indices, bm.counts, 16, 0.25))


def test_bad_inputs():
    q, k, v = _qkv(2, 2, 40, 40, 16, 16, torch.float32)
    bm = fast.attention_block_mask(q, k, 16)
    with pytest.raises(ValueError, match=r"block_mask: expected shape \(2 or 1, 2, 3, 3\)"):
        fast.block_sparse_attention(q, k, v, torch.ones(2, 2, 3, 4, dtype=torch.bool), block_size=16)
    with pytest.raises(ValueError, match="block_mask: expected shape"):
        fast.block_sparse_attention(q[:, :, :20], k, v, bm, block_size=16)
    with pytest.raises(ValueError, match="block_mask: built with block_size=16"):
        fast.block_sparse_attention(q, k, v, bm, block_size=32)
    with pytest.raises(TypeError, match="block_mask: expected dtype bool"):
        fast.block_sparse_attention(q, k, v, torch.ones(2, 2, 3, 3), block_size=16)
    with pytest.raises(ValueError, match="block_size"):
        fast.attention_block_mask(q, k, block_size=48)
    with pytest.raises(ValueError, match="head dim 160"):
        fast.attention_block_mask(torch.randn(1, 1, 8, 160), torch.randn(1, 1, 8, 160))
    with pytest.raises(ValueError, match="mass"):
        fast.attention_block_mask(q, k, mass=0.0)
    with pytest.raises(ValueError, match="min_blocks"):
        fast.attention_block_mask(q, k, min_blocks=0)
    with pytest.raises(ValueError, match="min_blocks: expected an int >= 1, got 1.5"):
        fast.attention_block_mask(q, k, min_blocks=1.5)
    with pytest.raises(ValueError, match="batch: expected a positive int multiple"):
        fast.block_sparse_work(bm, batch=-1)
    with pytest.raises(ValueError, match="pool_size"):
        fast.attention_block_mask(q, k, block_size=16, pool_size=32)
    with pytest.raises(TypeError, match="k: expected dtype"):
        fast.block_sparse_attention(q, k.half(), v, bm, block_size=16)
    with pytest.raises(ValueError, match="v: expected shape"):
        fast.block_sparse_attention(q, k, v[:, :, :30], bm, block_size=16)


def test_spatial_block_order():
    perm, inv = fast.spatial_block_order(6, 10, 16)  # 4x4 tiles, partial at the edges
    assert torch.equal(torch.sort(perm).values, torch.arange(60)) and torch.equal(perm[inv], torch.arange(60))
    # the first 16 tiled tokens are the top-left 4x4 tile of the raster grid
    assert sorted(perm[:16].tolist()) == [r * 10 + c for r in range(4) for c in range(4)]
    q, k, v = _qkv(1, 2, 60, 60, 16, 16, torch.float32)
    full = torch.ones(1, 2, 4, 4, dtype=torch.bool)
    out = fast.block_sparse_attention(q[:, :, perm], k[:, :, perm], v[:, :, perm], full, block_size=16)
    assert_rel(out[:, :, inv], ref.block_sparse_attention_reference(q, k, v, None), torch.float32)


@pytest.mark.parametrize("dtype,d", [(torch.float16, 128), (torch.float32, 32)])
@pytest.mark.parametrize("m_keys", [168, 148, 128])
def test_partial_last_block_with_sub_tiles(triton_backend, dtype, d, m_keys):
    """A mask block wider than the kernel's KV tile (two tiles per block here): the keys' last block may be partial,
    with a whole tile and a partial one (168 = 2 * 64 + 32 + 8), only a partial one and one wholly past the keys
    (148), or whole (128). Whole tiles run unmasked, the partial tile masked, a tile past the keys not at all: the
    values are the reference's, at a negative scale too, and the kernel counts exactly the tiles that hold keys."""
    from jetdet.kernels.block_sparse import launch

    bs, n = 64, 100
    q, k, v = _qkv(2, 2, n, m_keys, d, d, dtype)
    per_q, per_kv = launch.programs_per_query_block(d, bs, dtype, q.device)
    assert per_kv == 2, "the shipped tile no longer splits a 64-token block in two; pick another head dim"
    nqb, nkb = math.ceil(n / bs), math.ceil(m_keys / bs)
    mask = _random_mask(2, 2, nqb, nkb, 0.5, seed=3)
    mask[..., -1] = True  # every query block keeps the last key block
    mask[1, 1, 0] = False
    mask[1, 1, 0, -1] = True  # only the last (partial) block
    bm = fast.block_mask_from_bool(mask, bs)
    keys_in = [min(bs, m_keys - kb * bs) for kb in range(nkb)]
    tiles_in = [math.ceil(keys_in[kb] / (bs // per_kv)) for kb in range(nkb)]
    want = per_q * sum(tiles_in[kb] * int(mask[..., kb].sum()) for kb in range(nkb))
    for scale in (0.2, -0.5):
        counter = torch.zeros(2 * 2 * nqb * per_q, dtype=torch.int32)
        out = launch.attention(q, k, v, bm.indices, bm.counts, bs, scale, visits=counter)
        assert_rel(out, ref.block_sparse_attention_reference(q, k, v, mask, bs, scale), dtype)
        assert int(counter.sum()) == want
