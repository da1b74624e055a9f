"""jetdet.patch(mode="fast", attention_cache=...): block masks computed at refresh steps and reused across steps
and CFG branches, checked against block-sparse attention computed independently from the same masks."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import jetdet
from jetdet.ops import attention_block_mask, block_mask_from_bool, block_sparse_attention


class TwoAttentions(nn.Module):
    """Two attention calls per forward over N=64 tokens, 2 heads of 8; attention is local (a position term in
    q and k), so a block mask can drop blocks."""

    def __init__(self, mask=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        w = torch.randn(2, 3, 16, 16, generator=g) * 0.1
        w[:, :2] += torch.eye(16) * 1.0  # q and k mostly the position term: sharp, local attention
        self.w = nn.Parameter(w)
        pos = torch.arange(64.0)[:, None] / 64 * torch.arange(1, 9.0)[None] * 3.14
        self.register_buffer("pos", torch.cat([pos.sin(), pos.cos()], 1) * 2.0)  # [64, 16]
        self.mask = mask
        self.seen = []  # (layer, q, k, v) of every attention call, to recompute the reference

    def qkv(self, layer, x):
        q, k, v = (torch.einsum("bnd,de->bne", x + self.pos, w) for w in self.w[layer])
        return [t.reshape(x.shape[0], 64, 2, 8).transpose(1, 2) for t in (q, k, v)]  # [B, 2, 64, 8]

    def forward(self, x, t):  # x [B, 64, 16]
        for layer in range(2):
            q, k, v = self.qkv(layer, x)
            self.seen.append((layer, q, k, v))
            m = torch.zeros(64, 64) if self.mask == "all" or (self.mask and layer == 1) else None
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
            x = x + o.transpose(1, 2).reshape(x.shape)
        return x * (1 + t[:, None, None])


def _inputs(b=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 64, 16, generator=g)


SET = {"mass": 0.9, "block_size": 16, "refresh": 2, "check": 1}


def _run_steps(model, ts, x):
    outs = []
    with torch.no_grad():
        for t in ts:
            outs.append(model(x, torch.full((x.shape[0],), t)))
    return outs


def test_refresh_then_reuse_matches_block_sparse_reference():
    """Steps 0, 2, 4 refresh (exact attention, new masks); steps 1, 3, 5 run block-sparse attention over the
    mask of the step before, merged over the batch. The reference recomputes exactly that from the recorded
    q/k/v with the public ops."""
    m = TwoAttentions().eval()
    x = _inputs()
    h = jetdet.patch(m, mode="fast", budget=0.0, attention_cache=SET)
    ts = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _run_steps(m, ts, x)
    st = h.stats()["attention_cache"]
    assert (st["refreshed"], st["reused"]) == (6, 6) and st["approximate"]
    assert 0.0 < st["density_reused"] < 1.0  # something was dropped
    # at the reused steps the cached mask really drops blocks: block-sparse differs from dense there
    masks = {}
    for i, (layer, q, k, v) in enumerate(m.seen):
        step = i // 2
        if step % 2 == 0:
            masks[layer] = block_mask_from_bool(attention_block_mask(q, k, 16, 0.9).mask.any(0, keepdim=True), 16)
        else:
            sparse = block_sparse_attention(q, k, v, masks[layer], 16)
            assert not torch.allclose(sparse, F.scaled_dot_product_attention(q, k, v), atol=1e-6)
    h.remove()
    # end to end: replay the same schedule by hand and compare outputs
    ref_model = TwoAttentions().eval()
    m.seen.clear()
    h = jetdet.patch(m, mode="fast", budget=0.0, attention_cache=SET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outs_patched = _run_steps(m, ts, x)
    h.remove()
    cached = {}
    for step, t in enumerate(ts):
        y = x
        for layer in range(2):
            q, k, v = ref_model.qkv(layer, y)
            if step % 2 == 0:
                o = F.scaled_dot_product_attention(q, k, v)
                cached[layer] = block_mask_from_bool(attention_block_mask(q, k, 16, 0.9).mask.any(0, keepdim=True), 16)
            else:
                o = block_sparse_attention(q, k, v, cached[layer], 16)
            y = y + o.transpose(1, 2).reshape(y.shape)
        want = y * (1 + t)
        torch.testing.assert_close(outs_patched[step], want, atol=1e-5, rtol=1e-5)


def test_mass_one_is_dense_attention_and_remove_restores():
    m = TwoAttentions().eval()
    x = _inputs()
    ts = [0.9, 0.8, 0.7]
    before = _run_steps(m, ts, x)
    h = jetdet.patch(m, mode="fast", budget=0.0, attention_cache={"mass": 1.0, "block_size": 16, "refresh": 3})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        during = _run_steps(m, ts, x)
    st = h.stats()["attention_cache"]
    assert st["density_reused"] == 1.0 and st["reused"] == 4 and st["rel_err_max"] < 1e-5
    for a, b in zip(before, during):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    h.remove()
    after = _run_steps(m, ts, x)
    for a, b in zip(before, after):
        assert torch.equal(a, b)


def test_second_cfg_forward_at_the_same_step_reuses_the_first_ones_mask():
    """CFG as two forwards (cond, uncond) at each timestep: a step is a timestep, so the second forward reuses
    the mask the first one built, and only a new timestep ages the masks."""
    m = TwoAttentions().eval()
    x = _inputs()
    h = jetdet.patch(m, mode="fast", budget=0.0, attention_cache={**SET, "refresh": 1})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in (0.9, 0.8):
            m(x, torch.full((4,), t))  # cond
            m(x * 0.5, torch.full((4,), t))  # uncond
    st = h.stats()["attention_cache"]
    assert (st["refreshed"], st["reused"]) == (4, 4)  # 2 calls refresh per step, the other forward reuses
    h.remove()


def test_new_trajectory_and_shape_change_rebuild_masks():
    m = TwoAttentions().eval()
    h = jetdet.patch(m, mode="fast", budget=0.05, attention_cache={**SET, "refresh": 10})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _run_steps(m, [0.9, 0.8, 0.7], _inputs())
        first = h.stats()["attention_cache"]["refreshed"]
        _run_steps(m, [0.9, 0.8], _inputs())  # the timestep goes up: a new trajectory
        second = h.stats()["attention_cache"]["refreshed"]
        _run_steps(m, [0.9], _inputs(b=2))  # a batch change resets the step cache too
        third = h.stats()["attention_cache"]["refreshed"]
    assert first == 2 and second == 4 and third == 6
    assert h.controller.stats()["resets"]["trajectory"] + h.controller.stats()["resets"]["batch"] >= 2
    h.remove()


def test_masked_calls_left_exact_and_error_reported_once():
    m = TwoAttentions(mask=True).eval()
    h = jetdet.patch(m, mode="fast", budget=0.0, attention_cache=SET)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _run_steps(m, [0.9, 0.8, 0.7, 0.6], _inputs())
    st = h.stats()["attention_cache"]
    assert st["left_exact"] == {"attn_mask": 4}
    assert st["checked"] == 1 and st["rel_err_mean"] > 0
    msgs = [str(x.message) for x in w if "cached block masks" in str(x.message)]
    assert len(msgs) == 1 and "relative L2 error" in msgs[0]
    h.remove()


class OwnSoftmax(nn.Module):
    """Attention written out (matmul, softmax): nothing reaches F.scaled_dot_product_attention."""

    def forward(self, x, t):  # x [B, 64, 16]
        a = torch.softmax(x @ x.transpose(1, 2) / 4.0, -1)
        return (a @ x) * (1 + t[:, None, None])


@pytest.mark.parametrize("option", ["attention_cache", "linear_attention"])
def test_an_attention_option_that_replaces_nothing_says_so_once(option):
    """Turned on for a model whose attention calls all carry a mask, or that computes its softmax itself, the option
    replaced nothing, and the user was told nothing (its approximation warning comes from replaced calls only): a
    helper's trial of ComfyUI's HunyuanVideo with a text mask. Now one warning per patch, at the user's line, naming
    why; none where it replaces calls (the control)."""
    value = SET if option == "attention_cache" else True
    cases = [(TwoAttentions(mask="all"), "left exact: attn_mask 2"),
             (OwnSoftmax(), "none reached F.scaled_dot_product_attention"), (TwoAttentions(), None)]
    for model, why in cases:
        h = jetdet.patch(model.eval(), mode="fast", budget=0.0, **{option: value})
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            _run_steps(model, [0.9, 0.8, 0.7], _inputs())
        got = [x for x in w if "replaced none" in str(x.message)]
        if why is None:
            assert got == [] and h.stats()[option]["forwards"] == 3
        else:
            assert len(got) == 1 and option in str(got[0].message) and why in str(got[0].message), (
                [str(x.message) for x in w])
            assert got[0].filename == __file__  # _run_steps's call, here
        h.remove()


def test_rows_run_alone_use_the_mask_merged_over_the_batch():
    """The step cache may run only some rows of a batch (row compaction). The mask built from all rows is
    merged over the batch, so it serves any subset of rows: rows 1..2 alone at the next step get block-sparse
    attention over the merged mask, exactly."""
    from jetdet.patch.attncache import AttentionCache, parse_option

    m = TwoAttentions().eval()
    q, k, v = m.qkv(0, _inputs(b=4))
    cache = AttentionCache(parse_option(SET))
    with torch.no_grad():
        with cache.mode(torch.tensor([0.9])) as mode:
            first = F.scaled_dot_product_attention(q, k, v)
        cache.after_forward(mode)
        with cache.mode(torch.tensor([0.8])) as mode:
            part = F.scaled_dot_product_attention(q[1:3], k[1:3], v[1:3])
        cache.after_forward(mode)
    assert torch.equal(first, F.scaled_dot_product_attention(q, k, v))  # the refresh is exact attention
    merged = block_mask_from_bool(attention_block_mask(q, k, 16, 0.9).mask.any(0, keepdim=True), 16)
    assert merged.mask.shape[0] == 1 and merged.density < 1.0
    assert torch.equal(part, block_sparse_attention(q[1:3], k[1:3], v[1:3], merged, 16))
    assert (cache.refreshed, cache.reused) == (1, 1)


@pytest.mark.parametrize("bad, key", [
    ({"mass": 0.0}, "mass"), ({"mass": 1.5}, "mass"), ({"block_size": 48}, "block_size"),
    ({"refresh": 0}, "refresh"), ({"check": -1}, "check"), ({"pool_size": 128, "block_size": 64}, "pool_size"),
    ({"colour": 1}, "colour"), ("yes", "attention_cache"),
])
def test_bad_settings_name_the_key_and_leave_the_model_untouched(bad, key):
    m = TwoAttentions().eval()
    fwd = m.forward
    with pytest.raises(ValueError, match=key):
        jetdet.patch(m, mode="fast", attention_cache=bad)
    assert m.forward == fwd and "forward" not in m.__dict__
    with pytest.raises(ValueError, match="choose one"):
        jetdet.patch(m, mode="fast", attention_cache=True, linear_attention=True)
    assert "forward" not in m.__dict__
