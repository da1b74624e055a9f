"""jetdet.patch(mode="fast", linear_attention=...): opt-in, approximate, with the measured error reported."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import jetdet


class OneAttention(nn.Module):
    def __init__(self, mask=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(3, 8, 8, generator=g) * 0.5)
        self.mask = mask

    def forward(self, x, t):  # x [B, N, 8]
        q, k, v = (torch.einsum("bnd,de->bne", x, w)[:, None] for w in self.w)  # [B, 1, N, 8]
        m = torch.zeros(x.shape[1], x.shape[1]) if self.mask else None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)[:, 0] + t[:, None, None]

    def qkv(self, x):
        return [torch.einsum("bnd,de->bne", x, w)[:, None] for w in self.w]


def _x():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 16, 8, generator=g), torch.tensor([0.5, 0.5])


def test_replaces_sdpa_and_reports_the_measured_error():
    m = OneAttention().eval()
    x, t = _x()
    with torch.no_grad():
        exact = m(x, t)
        q, k, v = m.qkv(x)
        lin = jetdet.ops.linear_attention(q, k, v, feature_map="elu1")[:, 0] + t[:, None, None]
    err = ((lin - exact).norm() / (exact - t[:, None, None]).norm()).item()
    handle = jetdet.patch(m, mode="fast", budget=0.0, linear_attention="elu1")
    try:
        with warnings.catch_warnings(record=True) as w, torch.no_grad():
            warnings.simplefilter("always")
            out = m(x, t)
            out2 = m(x, t)
        msgs = [str(i.message) for i in w if "linear attention" in str(i.message)]
        assert len(msgs) == 1 and "approximation" in msgs[0]  # printed once
        assert torch.equal(out, lin) and torch.equal(out2, lin)
        st = handle.stats()["linear_attention"]
        assert st["replaced"] == 2 and st["checked"] == 1 and st["approximate"] and st["feature_map"] == "elu1"
        assert st["rel_err_mean"] == pytest.approx(err, rel=1e-4, abs=1e-6) and st["rel_err_max"] > 0.01
    finally:
        handle.remove()
    with torch.no_grad():
        assert torch.equal(m(x, t), exact)


def test_off_by_default_and_masked_calls_left_exact():
    x, t = _x()
    m = OneAttention().eval()
    with torch.no_grad():
        ref = m(x, t)
    with jetdet.patch(m, mode="fast", budget=0.0) as handle, torch.no_grad():
        assert torch.equal(m(x, t), ref) and "linear_attention" not in handle.stats()
    masked = OneAttention(mask=True).eval()
    with torch.no_grad():
        ref = masked(x, t)
    with jetdet.patch(masked, mode="fast", budget=0.0, linear_attention=True) as handle, torch.no_grad():
        assert torch.equal(masked(x, t), ref)
        st = handle.stats()["linear_attention"]
        assert st["replaced"] == 0 and st["left_exact"] == {"attn_mask": 1} and st["rel_err_mean"] is None


def test_bad_option_names_it_and_leaves_model_untouched():
    m = OneAttention().eval()
    fwd = m.forward
    with pytest.raises(ValueError, match="linear_attention"):
        jetdet.patch(m, mode="fast", linear_attention="softmax")
    with pytest.raises(ValueError, match="linear_attention_check"):
        jetdet.patch(m, mode="fast", linear_attention=True, linear_attention_check=-1)
    assert "forward" not in m.__dict__ and m.forward == fwd and not jetdet.unpatch(m)


def test_bundled_model_every_attention_replaced_and_error_is_large():
    from jetdet.models import bundled

    if not bundled.DIT_FILE.exists():
        pytest.skip("no bundled weights")
    model = bundled.load_bundled()
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([0.7, 0.3]), torch.tensor([1, 10])
    with torch.no_grad():
        ref = model(x, t, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with jetdet.patch(model, mode="fast", budget=0.0, linear_attention=True) as handle, torch.no_grad():
            out = model(x, t, y)
            st = handle.stats()["linear_attention"]
    assert st["replaced"] == model.config["depth"] and st["checked"] == model.config["depth"]
    assert st["rel_err_mean"] > 0.05  # softmax-trained: the approximation is visible, and reported
    assert not torch.equal(out, ref)
    with torch.no_grad():
        assert torch.equal(model(x, t, y), ref)


def test_kv_state_reused_across_steps_and_cfg_forwards_then_refreshed():
    """linear_attention_state_refresh=2: the K/V state of step 0 serves the queries of step 1 (and the second
    forward of each step), step 2 recomputes. Replayed by hand with the public op."""
    m = OneAttention().eval()
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(2, 16, 8, generator=g) for _ in range(6)]
    ts = [0.9, 0.9, 0.8, 0.8, 0.7, 0.7]  # two forwards (cond, uncond) per timestep
    handle = jetdet.patch(m, mode="fast", budget=0.0, linear_attention="relu", linear_attention_state_refresh=2,
                          linear_attention_check=0)
    with torch.no_grad():
        outs = [m(x, torch.full((2,), t)) for x, t in zip(xs, ts)]
    st = handle.stats()["linear_attention"]
    handle.remove()
    assert (st["states_computed"], st["states_reused"]) == (2, 4)
    la = jetdet.ops.linear_attention
    state = None
    for i, (x, t) in enumerate(zip(xs, ts)):
        q, k, v = m.qkv(x)
        if i in (0, 4):  # the first forward of steps 0 and 2 builds the state
            want, state = la(q, k, v, feature_map="relu", return_state=True)
        else:
            want = la(q, None, None, feature_map="relu", state=state)
        assert torch.allclose(outs[i], want[:, 0] + t, atol=1e-6), i
    # negative control: without reuse the later forwards see their own keys, and differ
    with torch.no_grad():
        assert not torch.allclose(outs[1], la(*m.qkv(xs[1]), feature_map="relu")[:, 0] + ts[1], atol=1e-4)


def test_kv_state_not_reused_across_batch_sizes_or_trajectories():
    m = OneAttention().eval()
    g = torch.Generator().manual_seed(4)
    handle = jetdet.patch(m, mode="fast", budget=0.0, linear_attention="relu", linear_attention_state_refresh=5,
                          linear_attention_check=0)
    with torch.no_grad():
        m(torch.randn(2, 16, 8, generator=g), torch.full((2,), 0.9))
        m(torch.randn(3, 16, 8, generator=g), torch.full((3,), 0.8))  # other batch size: recomputed
        m(torch.randn(3, 16, 8, generator=g), torch.full((3,), 0.7))  # reused
        m(torch.randn(3, 16, 8, generator=g), torch.full((3,), 0.95))  # t went up: new trajectory
    st = handle.stats()["linear_attention"]
    handle.remove()
    assert (st["states_computed"], st["states_reused"]) == (3, 1)
    with pytest.raises(ValueError, match="linear_attention_state_refresh"):
        jetdet.patch(m, mode="fast", linear_attention=True, linear_attention_state_refresh=0)
    assert "forward" not in m.__dict__


def test_the_readme_script_runs():
    """``bench/linear_attention_bundled.py`` (the README's linear-attention figures) end to end, tiny settings."""
    import subprocess
    import sys
    from pathlib import Path

    from jetdet.models import bundled

    if not bundled.DIT_FILE.exists():
        pytest.skip("the bundled model is not trained in this checkout")

    root = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, str(root / "bench" / "linear_attention_bundled.py"), "--steps", "2",
                        "--classes", "0", "--reuse-samples", "1", "--refresh", "2"],
                       capture_output=True, text=True, timeout=300, cwd=str(root))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "| relu | " in p.stdout and "| elu1 | " in p.stdout and "| 2 timesteps | " in p.stdout
