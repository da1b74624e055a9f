"""``jetdet.patch(model, mode="fast", sana_linear_attention=True)`` on a tiny random diffusers SanaTransformer2DModel:
SANA's own linear attention through ``jetdet.ops.linear_attention`` (torch path and Triton kernel) against
diffusers' ``SanaLinearAttnProcessor2_0`` and PAG variants as the reference; ``remove()`` and a failed patch put the
model back; deterministic mode stays batch invariant with it."""

import warnings

import pytest
import torch
from _devices import cpu_generator, to_default_device

import jetdet

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional extra (pip install '.[diffusers]')")
from diffusers.models.attention_processor import (  # noqa: E402
    AttnProcessor2_0,
    PAGCFGSanaLinearAttnProcessor2_0,
    PAGIdentitySanaLinearAttnProcessor2_0,
    SanaLinearAttnProcessor2_0,
)

FP32_TOL = 1e-5  # max abs error / max |reference|; measured 2e-7 to 5e-7 (the same sums in another order)


def _sana(qk_norm=None, dtype=torch.float32):
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    m = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                               num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=16,
                               cross_attention_dim=32, caption_channels=16, sample_size=8, qk_norm=qk_norm)
    return m.to(dtype).eval()


def _inputs(batch, dtype=torch.float32):
    g = cpu_generator(1)
    x, e = torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 6, 16, generator=g)
    return to_default_device([x.to(dtype), e.to(dtype), torch.linspace(900.0, 100.0, batch)])


def _run(m, x, e, t):
    with torch.no_grad():
        return m(hidden_states=x, encoder_hidden_states=e, timestep=t).sample


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _snapshot(m):
    return ({k: v.clone() for k, v in m.state_dict().items()}, dict(m.attn_processors),
            {n for n, mod in m.named_modules() if "forward" in mod.__dict__})


def _assert_as_before(m, snap, ref, inputs):
    state, procs, forwards = snap
    assert {n for n, mod in m.named_modules() if "forward" in mod.__dict__} == forwards == set()
    assert all(m.attn_processors[k] is p for k, p in procs.items())
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())
    assert torch.equal(_run(m, *inputs), ref)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype,qk_norm", [(torch.float32, None), (torch.float32, "rms_norm_across_heads"),
                                           (torch.bfloat16, None)])
def test_route_matches_diffusers_processor(backend, dtype, qk_norm):
    from jetdet.backend import backend_for

    m = _sana(qk_norm, dtype)
    inputs = _inputs(2, dtype)
    assert backend_for(inputs[0]) == backend  # the Triton kernel (the interpreter on a CPU), or the torch path
    snap = _snapshot(m)
    ref = _run(m, *inputs)
    h = jetdet.patch(m, mode="fast", budget=0.0, sana_linear_attention=True)
    got = _run(m, *inputs)
    st = h.stats()["sana_linear_attention"]
    assert st["modules"] == 2 and st["routed"] == {"SanaLinearAttnProcessor2_0": 2} and not st["left_to_diffusers"]
    # fp32: the same math summed in another order. bf16: the processor's fp32 result cast once, as here (bitwise on
    # the CPU at these sizes; a GPU's other summation order may flip a rounding, one bf16 step of the output)
    assert _rel(got, ref) <= (FP32_TOL if dtype == torch.float32 else 2 ** -7)
    h.remove()
    _assert_as_before(m, snap, ref, inputs)


def test_pag_processors_are_routed():
    """SanaPAGPipeline sets PAG processors on the patched model for the length of a call: they are looked up at
    each call and routed too (their norm-free q/k and identity branch as diffusers computes them)."""
    m = _sana()
    inputs = _inputs(6)  # PAGCFG: 3 chunks of 2 rows, PAGIdentity: 2 chunks of 3
    blocks = m.transformer_blocks
    blocks[0].attn1.set_processor(PAGCFGSanaLinearAttnProcessor2_0())
    blocks[1].attn1.set_processor(PAGIdentitySanaLinearAttnProcessor2_0())
    ref = _run(m, *inputs)
    with jetdet.patch(m, mode="fast", budget=0.0, sana_linear_attention=True) as h:
        got = _run(m, *inputs)
        assert h.stats()["sana_linear_attention"]["routed"] == {"PAGCFGSanaLinearAttnProcessor2_0": 1,
                                                                "PAGIdentitySanaLinearAttnProcessor2_0": 1}
        assert _rel(got, ref) <= FP32_TOL
        # another processor set after the patch runs as diffusers runs it
        blocks[0].attn1.set_processor(AttnProcessor2_0())
        blocks[1].attn1.set_processor(SanaLinearAttnProcessor2_0())
        inputs = _inputs(2)
        got = _run(m, *inputs)
        assert h.stats()["sana_linear_attention"]["routed"]["SanaLinearAttnProcessor2_0"] == 1
    assert _rel(got, _run(m, *inputs)) <= FP32_TOL


def test_tiny_denominators_use_the_processors_eps():
    """The processors add 1e-15 to the denominator, jetdet.ops.linear_attention 1e-6 by default: with q and k near
    zero (denominators ~1e-7) only the processors' eps gives their result."""
    m = _sana()
    with torch.no_grad():
        for b in m.transformer_blocks:
            b.attn1.to_q.weight.mul_(1e-4)
            b.attn1.to_k.weight.mul_(1e-4)
    inputs = _inputs(2)
    ref = _run(m, *inputs)
    with jetdet.patch(m, mode="fast", budget=0.0, sana_linear_attention=True):
        assert _rel(_run(m, *inputs), ref) <= FP32_TOL


def test_failed_patch_and_bad_option_leave_the_model_as_it_was(monkeypatch):
    m = _sana()
    inputs = _inputs(2)
    snap = _snapshot(m)
    ref = _run(m, *inputs)
    with pytest.raises(ValueError, match="sana_linear_attention: expected True or False"):
        jetdet.patch(m, mode="fast", sana_linear_attention="yes")
    _assert_as_before(m, snap, ref, inputs)

    def boom(*a, **k):  # fails after the attention modules got their forwards
        raise RuntimeError("boom")

    monkeypatch.setattr(torch.compiler, "disable", boom)
    with pytest.raises(RuntimeError, match="boom"):
        jetdet.patch(m, mode="fast", sana_linear_attention=True)
    monkeypatch.undo()
    _assert_as_before(m, snap, ref, inputs)


def test_deterministic_mode_stays_batch_invariant():
    m = _sana()
    x, e, t = _inputs(3)
    with jetdet.patch(m, mode="fast", budget=0.0, sana_linear_attention=True) as h, jetdet.mode("deterministic"):
        full = _run(m, x, e, t)
        alone = torch.cat([_run(m, x[i:i + 1], e[i:i + 1], t[i:i + 1]) for i in range(3)])
        assert h.stats()["sana_linear_attention"]["routed"] == {"SanaLinearAttnProcessor2_0": 8}
    assert torch.equal(full, alone)


def test_off_by_default_and_warns_when_nothing_to_route():
    m = _sana()
    with jetdet.patch(m, mode="fast") as h:  # the default: diffusers' processor runs, no attention forward
        assert "sana_linear_attention" not in h.stats()
        assert [n for n, mod in m.named_modules() if "forward" in mod.__dict__] == [""]
    m.set_attn_processor(AttnProcessor2_0())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        jetdet.patch(m, mode="fast", sana_linear_attention=True).remove()
    assert any("sana_linear_attention=True, but no attention module" in str(x.message) for x in w)


def test_calls_the_op_does_not_take_run_as_diffusers_runs_them():
    """The processor broadcasts a one-row ``encoder_hidden_states`` over the batch and takes empty token lists
    (no keys: out is ``to_out`` of zeros); the route raised on both (the op's ValueError "k: expected shape (3, 2,
    M, 16)", its torch path's RuntimeError on 0 tokens). They are left to diffusers and counted by why; so are
    fewer rows than a PAG processor's chunks (counted as "head dim > 128" before). Control: the same module routes
    a call of matching batch sizes."""
    m = _sana()
    attn = m.transformer_blocks[0].attn1
    g = torch.Generator().manual_seed(3)
    calls = [(torch.randn(3, 7, 32, generator=g), torch.randn(1, 5, 32, generator=g)),
             (torch.randn(2, 4, 32, generator=g), torch.randn(2, 0, 32, generator=g)),
             (torch.randn(2, 0, 32, generator=g), None),
             (torch.randn(3, 7, 32, generator=g), torch.randn(3, 5, 32, generator=g))]
    with torch.no_grad():
        refs = [attn(hs, encoder_hidden_states=e) for hs, e in calls]
        with jetdet.patch(m, mode="fast", budget=0.0, sana_linear_attention=True) as h:
            for (hs, e), ref in zip(calls, refs):
                got = attn(hs, encoder_hidden_states=e)
                assert got.shape == ref.shape and (not ref.numel() or _rel(got, ref) <= FP32_TOL)
            st = h.stats()["sana_linear_attention"]
            assert st["routed"] == {"SanaLinearAttnProcessor2_0": 1}
            assert st["left_to_diffusers"] == {"encoder_hidden_states of another batch size": 1, "no tokens": 2}
            attn.set_processor(PAGCFGSanaLinearAttnProcessor2_0())
            with pytest.raises(ValueError):  # diffusers' own error: 2 rows make 2 chunks, not 3
                attn(torch.randn(2, 4, 32, generator=g))
            assert h.stats()["sana_linear_attention"]["left_to_diffusers"]["fewer rows than PAG chunks"] == 1
