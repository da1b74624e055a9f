"""JetDetDeterministicSampler in real ComfyUI: item i of a batch is bit-identical to a batch-1 run of that item
with batch_offset=i, for every sampler that draws noise, under memory-driven cond/uncond batching and across
thread counts; ComfyUI's own KSampler is not (negative control)."""

from __future__ import annotations

import contextlib
import threading
import warnings

import pytest
import torch
from conftest import require_comfyui

require_comfyui()
from _comfy_util import det_sample, items_equal_to_singles, no_free_memory, stock_ksampler, with_call_log

ACCEPTANCE_SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m_sde", "dpmpp_sde", "heun", "lms"]


@pytest.mark.parametrize("sampler", ACCEPTANCE_SAMPLERS)
def test_items_equal_their_batch1_runs(shapes_patcher, shapes_conds, sampler):
    assert items_equal_to_singles(shapes_patcher, *shapes_conds, sampler, batch=4, steps=6) == [True] * 4


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_2m_sde"])
def test_stock_ksampler_differs_negative_control(shapes_patcher, shapes_conds, sampler):
    # the measurement: batch 4 against batch-1 runs of each item with the same initial noise (noise_inds)
    from _comfy_util import empty_latent

    full = stock_ksampler(shapes_patcher, *shapes_conds, empty_latent(4), sampler, steps=6)
    same = []
    for i in range(4):
        lat = empty_latent(1)
        lat["batch_index"] = [i]
        same.append(torch.equal(full[i], stock_ksampler(shapes_patcher, *shapes_conds, lat, sampler, steps=6)[0]))
    assert not all(same), f"{sampler}: ComfyUI's KSampler happened to be batch invariant here: {same}"
    if sampler != "euler":  # ancestral/SDE step noise is drawn for the whole batch: items 1-3 are other images
        assert same[1:] == [False] * 3


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_sde"])
def test_cond_uncond_run_separately_give_the_same_bits(shapes_patcher, shapes_conds, sampler):
    logged, log = with_call_log(shapes_patcher)
    together, _ = det_sample(logged, *shapes_conds, 3, sampler, steps=4)
    assert set(log.sizes) == {6}  # [cond; uncond] of 3 items in one call
    log.sizes.clear()
    with no_free_memory():  # ComfyUI then runs cond and uncond as separate calls (and would chunk its attention)
        apart, _ = det_sample(logged, *shapes_conds, 3, sampler, steps=4)
        single, _ = det_sample(logged, *shapes_conds, 1, sampler, steps=4, offset=2)
    assert set(log.sizes) == {3, 1}
    assert torch.equal(together, apart)
    assert torch.equal(together[2], single[0])


def test_texts_of_different_lengths_give_the_same_bits_batched_or_apart(comfy_dir, monkeypatch):
    """A 154-token prompt with a 77-token negative on an SD1.5 UNet: ComfyUI batches cond and uncond when it expects
    the free memory for it, repeating the shorter text to 154 tokens, and runs them apart (each at its own length)
    when not; on a GPU a batch of items may not fit where one item does. The deterministic wrapper gives every text
    the common length first, so item 1 of a batch sampled with the memory (cond and uncond in one call) equals item 1
    sampled alone with none free (apart). Negative control: without that step the two differ."""
    import tiny_models as tm

    from jetdet.comfy import wrappers as wr
    from jetdet.comfy.nodes import JetDetDeterministicSampler

    logged, log = with_call_log(tm.load(tm.sd15_state_dict()))
    g = torch.Generator().manual_seed(0)
    pos = [[torch.randn(1, 154, 768, generator=g), {}]]
    neg = [[torch.randn(1, 77, 768, generator=g), {}]]

    def sample(batch, offset):
        latent = {"samples": torch.zeros(batch, 4, 8, 8)}
        out = JetDetDeterministicSampler.execute(logged, 3, 2, 5.0, "euler", "simple", pos, neg, latent, 1.0, offset)
        return out.args[0]["samples"]

    def batched_and_alone():
        log.sizes.clear()
        full = sample(2, 0)
        with no_free_memory():
            alone = sample(1, 1)
        assert log.sizes == [4, 4, 1, 1, 1, 1]  # two steps of [cond; uncond] together, then apart
        return full[1], alone[0]

    full, alone = batched_and_alone()
    assert torch.equal(full, alone)
    assert pos[0][0].shape == (1, 154, 768) and neg[0][0].shape == (1, 77, 768)  # the user's conditioning unchanged

    texts = []  # texts that ComfyUI never batches (common multiple past 4x: 77 and 78 tokens) keep their lengths
    real = wr.equal_text_lengths
    monkeypatch.setattr(wr, "equal_text_lengths", lambda *a: texts.extend(
        {v.cond.shape[1] for c in real(*a) for x in c or () for v in x["model_conds"].values()
         if type(v).__name__ == "CONDCrossAttn"}) or real(*a))
    pos[0][0] = pos[0][0][:, :78]
    sample(1, 0)
    assert sorted(set(texts)) == [77, 78] and log.sizes[-2:] == [1, 1]
    pos[0][0] = torch.randn(1, 154, 768, generator=g)

    monkeypatch.setattr(wr, "equal_text_lengths", lambda conds, *a: conds)
    full, alone = batched_and_alone()
    assert not torch.equal(full, alone)


def test_an_attention_override_set_by_another_node_is_not_used_in_deterministic_calls(shapes_patcher, shapes_conds,
                                                                                     monkeypatch):
    """A node may set ``transformer_options["optimized_attention_override"]`` (Sage Attention patches do); ComfyUI
    then hands every attention call to it, in place of the attention jetdet swapped in. Deterministic calls leave it
    out, with a warning once, and the model's options keep it. Negative control: the stock KSampler calls it."""
    from _comfy_util import empty_latent

    from jetdet.comfy import wrappers as wr

    calls = []

    def override(func, *args, **kwargs):
        calls.append(func.__name__)
        return func(*args, **kwargs)

    m = shapes_patcher.clone()
    m.model_options.setdefault("transformer_options", {})[wr.OVERRIDE] = override
    monkeypatch.setattr(wr, "_warned_override", [False])
    with pytest.warns(UserWarning, match="optimized_attention_override.* not used in deterministic model calls"):
        det, _ = det_sample(m, *shapes_conds, 2, "euler", steps=2)
    assert calls == []
    assert m.model_options["transformer_options"][wr.OVERRIDE] is override
    plain, _ = det_sample(shapes_patcher, *shapes_conds, 2, "euler", steps=2)
    assert torch.equal(det, plain)
    stock_ksampler(m, *shapes_conds, empty_latent(1), "euler", steps=1)
    assert calls  # without jetdet, ComfyUI uses it


def _stand_in_attention(monkeypatch):
    """ComfyUI's ``attention_pytorch`` and the process's ``optimized_attention`` replaced by stand-ins that name
    themselves ("sdpa", "chosen": the user's xformers, sage or sub-quadratic attention)."""
    import comfy.ldm.modules.attention as attn

    monkeypatch.setattr(attn, "attention_pytorch", lambda *a, **k: "sdpa")
    monkeypatch.setattr(attn, "optimized_attention", lambda *a, **k: "chosen")
    return attn


def test_custom_nodes_bindings_of_comfyuis_attention_are_swapped_and_put_back(comfy_dir, monkeypatch):
    """While a deterministic call runs, ComfyUI's attention bindings are its SDPA path, and so is a custom node's own
    import of ``optimized_attention`` (IPAdapter's attention patch calls it); a function of the node's own under that
    name is left alone. Everything is put back afterwards."""
    import sys
    import types

    from jetdet.comfy.attention import sdpa_attention

    attn = _stand_in_attention(monkeypatch)
    before = attn.optimized_attention
    node = types.ModuleType("custom_nodes.jetdet_test_ipadapter")
    exec("from comfy.ldm.modules.attention import optimized_attention", node.__dict__)
    own = types.ModuleType("custom_nodes.jetdet_test_own")
    exec("def optimized_attention(q, k, v, heads):\n    return q", own.__dict__)
    own_fn = own.optimized_attention
    sys.modules[node.__name__], sys.modules[own.__name__] = node, own
    try:
        with sdpa_attention():
            assert attn.optimized_attention() == "sdpa"
            assert node.optimized_attention() == "sdpa"
            assert own.optimized_attention is own_fn
        assert attn.optimized_attention is before and node.optimized_attention is before
        reloaded = types.ModuleType(node.__name__)  # a reload: a new module under the same name, as many modules
        exec("from comfy.ldm.modules.attention import optimized_attention", reloaded.__dict__)
        sys.modules[node.__name__] = reloaded
        with sdpa_attention():
            assert reloaded.optimized_attention() == "sdpa"
            assert node.optimized_attention is before  # the old module object is not the one in use any more
        assert reloaded.optimized_attention is before
    finally:
        del sys.modules[node.__name__], sys.modules[own.__name__]


@pytest.mark.parametrize("b_mode", [None, "fast"])
@pytest.mark.filterwarnings("ignore:jetdet. mode 'fast' changes nothing by itself")
def test_attention_on_another_thread_is_the_users_while_a_deterministic_call_runs(comfy_dir, monkeypatch, b_mode):
    """The swap of the attention bindings is process-wide, and another thread outside the call (no mode, fast mode)
    got SDPA too, in place of the attention the user chose (a review: "sdpa" there, for ComfyUI's binding and a
    custom node's import of it alike). Now each binding is ComfyUI's SDPA on a thread inside ``sdpa_attention`` and
    what it was elsewhere; a thread that opens ``sdpa_attention`` of its own (fast mode's attention swap and cache,
    which intercept SDPA) gets SDPA, whatever the other thread does."""
    import sys
    import types

    from jetdet.comfy.attention import sdpa_attention

    attn = _stand_in_attention(monkeypatch)
    node = types.ModuleType("custom_nodes.jetdet_test_ipadapter")
    exec("from comfy.ldm.modules.attention import optimized_attention", node.__dict__)
    sys.modules[node.__name__] = node
    try:
        assert _on_another_thread(lambda: (attn.optimized_attention(), node.optimized_attention()),
                                  b_mode) == ("chosen", "chosen")

        def in_a_block():
            with sdpa_attention():
                return attn.optimized_attention(), node.optimized_attention()

        assert _on_another_thread(in_a_block, b_mode) == ("sdpa", "sdpa")
    finally:
        del sys.modules[node.__name__]


def _on_another_thread(f, b_mode):
    """``f()`` on another thread, in jetdet mode ``b_mode`` (None: no mode), while this thread's deterministic call
    (``jetdet.mode("deterministic")`` and the span of :func:`sdpa_attention`) is open; its result."""
    import jetdet
    from jetdet.comfy.attention import sdpa_attention

    out, errors = [], []

    def b():
        try:
            with torch.no_grad(), (jetdet.mode(b_mode) if b_mode else contextlib.nullcontext()):
                out.append(f())
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    with torch.no_grad(), jetdet.mode("deterministic"), sdpa_attention():
        other = threading.Thread(target=b)
        other.start()
        other.join(60)
    assert not errors and out, errors
    return out[0]


def test_a_patch_another_extension_makes_during_the_span_is_kept(comfy_dir, monkeypatch):
    """The swaps are put back where they still hold jetdet's replacement only. An extension that sets ComfyUI's
    attention binding or ``fp8_linear`` while a deterministic call runs (another thread, a wrapper inside the call)
    keeps its patch afterwards, and one that takes its patch off during the call does not get it back (a review: the
    saved functions were set back over the extension's, both times)."""
    import comfy.ops

    from jetdet.comfy.attention import sdpa_attention

    attn = _stand_in_attention(monkeypatch)
    monkeypatch.setattr(comfy.ops, "fp8_linear", lambda *a, **k: None)
    before = attn.optimized_attention

    def sage(*a, **k):
        return "sage"

    def fp8(*a, **k):
        return None

    with sdpa_attention():
        attn.optimized_attention, comfy.ops.fp8_linear = sage, fp8
    assert attn.optimized_attention is sage and comfy.ops.fp8_linear is fp8
    with sdpa_attention():
        attn.optimized_attention = before  # the extension takes its patch off
    assert attn.optimized_attention is before


@pytest.mark.parametrize("b_mode", [None, "fast"])
@pytest.mark.filterwarnings("ignore:jetdet. mode 'fast' changes nothing by itself")
def test_comfyuis_fp8_matrix_multiply_is_off_in_deterministic_calls(comfy_dir, monkeypatch, b_mode):
    """ComfyUI's fp8 layers (``--fast fp8_matrix_mult``, fp8-optimised checkpoints) multiply through
    ``torch._scaled_mm``, which jetdet does not route. While a deterministic call runs they take ComfyUI's own
    cast-weight ``F.linear`` path instead, which it routes; afterwards ``_scaled_mm`` again. Negative control: outside
    the call the layer does call ``_scaled_mm`` (it runs on this CPU). On another thread outside deterministic mode
    (no mode, fast mode) while the call runs, ComfyUI's own path (a review: the process-wide swap took it away there,
    0 calls)."""
    import comfy.ops

    import jetdet
    from jetdet.comfy.attention import sdpa_attention

    calls = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    if hasattr(comfy.ops, "mixed_precision_ops"):  # newer ComfyUI (0.7, 0.33): fp8_linear multiplies through
        # comfy_kitchen's QuantizedTensor, so count the calls of fp8_linear itself
        real_fp8 = comfy.ops.fp8_linear
        monkeypatch.setattr(comfy.ops, "fp8_linear", lambda *a, **k: calls.append(1) or real_fp8(*a, **k))
    layer = comfy.ops.fp8_ops.Linear(32, 16, bias=True, dtype=torch.float8_e4m3fn).eval()
    with torch.no_grad():
        layer.weight.copy_((torch.randn(16, 32) * 0.1).to(torch.float8_e4m3fn))
        layer.bias = torch.nn.Parameter(torch.randn(16, dtype=torch.bfloat16) * 0.1, requires_grad=False)
    x = torch.randn(2, 3, 32, dtype=torch.bfloat16)
    before = comfy.ops.fp8_linear
    layer(x.clone())
    assert calls  # ComfyUI's fp8 path
    calls.clear()
    with jetdet.mode("deterministic"):
        with sdpa_attention():
            out = layer(x.clone())
        w = layer.weight.to(torch.bfloat16)
        assert torch.equal(out, torch.nn.functional.linear(x, w, layer.bias))
    assert calls == [] and comfy.ops.fp8_linear is before
    _on_another_thread(lambda: layer(x.clone()), b_mode)
    assert calls == [1]


@pytest.mark.parametrize("fp8_matrix_mult", [False, True])
def test_scaled_fp8_linears_round_the_same_alone_and_in_a_batch(comfy_dir, fp8_matrix_mult):
    """The linears of scaled fp8 checkpoints (``*_fp8_scaled``) multiply the scale into the weight or into the input,
    whichever has fewer elements, and the input's count includes the batch: an item alone and in a batch of 8 were
    rounded differently (a review measured 9.8e-4). During deterministic calls they always scale the weight.
    Negative control: the same layer in deterministic mode without the swap differs (without fp8 matrix multiply);
    afterwards the layer is ComfyUI's again."""
    import comfy.ops

    import jetdet
    from jetdet.comfy.attention import sdpa_attention

    if not hasattr(comfy.ops, "scaled_fp8_ops"):
        pytest.skip("this ComfyUI loads scaled fp8 checkpoints as mixed_precision_ops layers (tested above)")
    g = torch.Generator().manual_seed(0)
    layer = comfy.ops.scaled_fp8_ops(fp8_matrix_mult=fp8_matrix_mult).Linear(32, 16, dtype=torch.float8_e4m3fn).eval()
    own = vars(type(layer))["forward_comfy_cast_weights"]
    with torch.no_grad():
        layer.weight.copy_(torch.randn(16, 32, generator=g).to(torch.float8_e4m3fn))
        layer.scale_weight.fill_(0.0123)
        layer.bias = torch.nn.Parameter(torch.randn(16, generator=g).to(torch.bfloat16) * 0.1, requires_grad=False)
    x = torch.randn(8, 3, 32, generator=g).to(torch.bfloat16)  # one item: 96 elements < 512 weights < 768: batch
    with torch.no_grad(), jetdet.mode("deterministic"):
        with sdpa_attention():
            alone, batch = layer(x[:1].clone()), layer(x.clone())
        assert torch.equal(alone[0], batch[0])
        if not fp8_matrix_mult:  # (with it, ComfyUI's own path is torch._scaled_mm, for both, on this CPU)
            assert not torch.equal(layer(x[:1].clone())[0], layer(x.clone())[0])
    assert vars(type(layer))["forward_comfy_cast_weights"] is own
    # another thread outside deterministic mode while a deterministic call runs: ComfyUI's own choice, the input
    # scaled for an item alone (a review: the process-wide swap scaled the weight there too)
    if not fp8_matrix_mult:
        with torch.no_grad():
            w, s = layer.weight.to(torch.bfloat16), layer.scale_weight.to(torch.bfloat16)
            by_input = torch.nn.functional.linear(x[:1] * s, w, layer.bias)
            by_weight = torch.nn.functional.linear(x[:1], w * s, layer.bias)
        assert not torch.equal(by_input, by_weight)
        assert torch.equal(layer(x[:1].clone()), by_input)  # ComfyUI's own, no call open
        assert torch.equal(_on_another_thread(lambda: layer(x[:1].clone()), None), by_input)


def _stand_in_mixed_precision_ops():
    """A small stand-in of newer ComfyUI's ``comfy.ops.mixed_precision_ops`` (0.7, 0.33; not in 0.3.64): layer classes
    defined inside a ``MixedPrecisionOps`` class, ``CastWeightBiasOp`` among their bases, that read their instance
    attribute ``_full_precision_mm`` where ComfyUI's do: ``Linear.forward`` and ``Experts._expert_linear_impl`` (0.33's
    MoEExperts, which model code calls through ``expert_linear``). Off, they round their input on a grid scaled by the
    absolute maximum of the whole input (what an nvfp4 layer without an ``input_scale`` does); on, the plain F.linear.
    ``load`` keeps a checkpoint's ``full_precision_matrix_mult`` as ComfyUI's loader does, in
    ``_load_from_state_dict`` (``if not module._full_precision_mm: module._full_precision_mm = config``).
    ``Linear.forward`` first calls this thread's gate in ``_GATES``, if any (what 0.33's ``run_every_op()`` is to its
    layers: a point before the flag is read, where a test holds one thread while another runs)."""
    import comfy.ops

    def rounded(x):
        scale = x.abs().amax() / 6.0  # the whole input's maximum: the batch's
        return (x / scale).round().clamp(-6, 6) * scale

    class MixedPrecisionOps(comfy.ops.manual_cast):
        class Linear(torch.nn.Module, comfy.ops.CastWeightBiasOp):
            def __init__(self, w, b):
                super().__init__()
                self.weight, self.bias = torch.nn.Parameter(w, False), torch.nn.Parameter(b, False)
                self._full_precision_mm = False  # ComfyUI sets it per instance, at init and at load

            def load(self, full_precision_matrix_mult):
                self.load_state_dict({"full_precision_matrix_mult": torch.tensor(full_precision_matrix_mult)},
                                     strict=False)

            def _load_from_state_dict(self, state_dict, prefix, *args):
                conf = state_dict.pop(prefix + "full_precision_matrix_mult", None)
                if conf is not None:
                    self._full_precision_mm_config = bool(conf)
                    if not self._full_precision_mm:
                        self._full_precision_mm = self._full_precision_mm_config
                super()._load_from_state_dict(state_dict, prefix, *args)

            def forward(self, x):
                gate = None if torch.compiler.is_compiling() else _GATES.get(threading.current_thread().name)
                if gate is not None:
                    gate()
                if not self._full_precision_mm:
                    x = rounded(x)
                return torch.nn.functional.linear(x, self.weight, self.bias)

        class Experts(torch.nn.Module, comfy.ops.CastWeightBiasOp):
            def __init__(self, w):
                super().__init__()
                self.weight = torch.nn.Parameter(w, False)  # (experts, out, in)
                self._full_precision_mm = False

            def expert_linear(self, x, i):
                return self._expert_linear_impl(x, self.weight, i)

            def _expert_linear_impl(self, x, weight, i):
                if not self._full_precision_mm:
                    x = rounded(x)
                return torch.nn.functional.linear(x, weight[i])

    return MixedPrecisionOps


_GATES: dict = {}  # thread name -> what the stand-in's Linear.forward calls first on that thread


def _items_alone(f, x):
    """For each item of ``x``: whether ``f`` of the batch holds the same bits as ``f`` of the item alone."""
    full = f(x)
    return [torch.equal(full[i], f(x[i:i + 1])[0]) for i in range(x.shape[0])]


def _standin_layers(ops):
    g = torch.Generator().manual_seed(0)
    layer = ops.Linear(torch.randn(16, 32, generator=g) * 0.1, torch.randn(16, generator=g) * 0.1)
    experts = ops.Experts(torch.randn(2, 16, 32, generator=g) * 0.1)
    x = torch.randn(4, 3, 32, generator=g)
    x[3] *= 50  # one item with a large range sets the batch's scale
    return layer, experts, x


def test_mixed_precision_layers_take_the_full_precision_path_in_deterministic_calls(comfy_dir):
    """Newer ComfyUI loads quantized checkpoints as ``mixed_precision_ops`` layers, which quantize their input where
    the device computes in that format; nvfp4 without an ``input_scale`` scales it by the whole batch's maximum, so an
    item alone and in a batch were rounded differently, silently (a trial on 0.33 and 0.7: 3 of 4 items). During
    deterministic calls the layers read ``_full_precision_mm`` as True (in ``forward``, and 0.33's
    ``_expert_linear_impl``) and take ComfyUI's full-precision path, here on a stand-in of that API; the layer's own
    value is not touched. Negative controls: in deterministic mode without the swap the items differ; within the span
    but outside deterministic mode (this thread does not route) the layer is ComfyUI's. Afterwards each layer reads
    its own setting again and its class is as it was."""
    import jetdet
    from jetdet.comfy.attention import sdpa_attention

    ops = _stand_in_mixed_precision_ops()
    own = (vars(ops.Linear)["forward"], vars(ops.Experts)["_expert_linear_impl"],
           vars(ops.Linear)["_load_from_state_dict"])
    layer, experts, x = _standin_layers(ops)
    expert = lambda t: experts.expert_linear(t, 1)  # noqa: E731
    with torch.no_grad():
        with jetdet.mode("deterministic"):
            plain = _items_alone(layer, x), _items_alone(expert, x)
            with sdpa_attention():
                swapped = _items_alone(layer, x), _items_alone(expert, x)
                full = layer(x)
                assert layer._full_precision_mm is True and vars(layer)["_full_precision_mm"] is False
        with sdpa_attention():  # this thread does not route: ComfyUI's own (rounded) path
            other = torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert plain == ([False, False, False, True],) * 2  # the negative control
    assert other is False
    assert swapped == ([True] * 4,) * 2
    assert torch.equal(full, torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert layer._full_precision_mm is False and "_full_precision_mm" not in vars(layer.__class__)
    assert (vars(ops.Linear)["forward"], vars(ops.Experts)["_expert_linear_impl"],
            vars(ops.Linear)["_load_from_state_dict"]) == own


def test_mixed_precision_layers_compiled_in_deterministic_calls_take_the_full_precision_path(comfy_dir):
    """``torch.compile`` of a mixed-precision layer (ComfyUI's "TorchCompileModel" compiles the diffusion model) inside
    a deterministic call: the traced read of ``_full_precision_mm`` cannot read the mode's ContextVar. It broke the
    graph there (``fullgraph=True`` refused; on 0.33's compiled Flux with int8 layers the frame resumed after the
    break then failed in Dynamo: "Cannot access accelerator device"). Now it reads whether the router is on the
    mode stack, as traced routed calls do: one graph, the full-precision path, items equal alone and in a batch; the
    same compiled layer outside deterministic mode is ComfyUI's (rounded) path again (Dynamo guards on the stack)."""
    import jetdet
    from jetdet.comfy.attention import sdpa_attention

    torch._dynamo.reset()
    ops = _stand_in_mixed_precision_ops()
    layer, _, x = _standin_layers(ops)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    try:
        with torch.no_grad():
            with jetdet.mode("deterministic"), sdpa_attention():
                swapped = _items_alone(compiled, x)
                full = compiled(x)
            with sdpa_attention():  # outside deterministic mode
                other = torch.equal(compiled(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    finally:
        torch._dynamo.reset()
    assert swapped == [True] * 4
    torch.testing.assert_close(full, torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert other is False


def test_the_per_thread_swaps_compile_in_one_graph(comfy_dir):
    """The swaps that decide per thread (``fp8_linear``, ``linear_input_act``, the scaled fp8 and VAE ones) asked the
    mode's ContextVar, which code ``torch.compile`` traces cannot read: a compiled model reaching them broke its graph
    there (``fullgraph=True`` refused: "ContextVar.get"), as ``_full_precision_mm`` did. Traced, they ask whether the
    router is on the mode stack: inside deterministic mode the swapped answer, outside it ComfyUI's own."""
    import jetdet
    from jetdet.comfy import attention

    own = lambda layer, x: 2 * x  # noqa: E731  stands in for ComfyUI's fp8_linear
    fp8 = attention._per_thread(own, attention._no_fp8_linear)

    def fn(x):
        y = fp8(None, x)
        return x + 1 if y is None else y

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="eager", fullgraph=True)
    x = torch.ones(2)
    try:
        with jetdet.mode("deterministic"):
            inside = compiled(x)
        outside = compiled(x)
    finally:
        torch._dynamo.reset()
    assert torch.equal(inside, x + 1) and torch.equal(outside, 2 * x)


def test_a_mixed_precision_layer_loaded_in_a_deterministic_call_keeps_its_checkpoints_setting(comfy_dir, monkeypatch):
    """ComfyUI's loader keeps a checkpoint's ``full_precision_matrix_mult`` with ``if not module._full_precision_mm:
    module._full_precision_mm = config``. A layer loaded while the span is active (a model loaded during sampling, or
    on another thread while one samples) must store it: once the span ends the layer runs its checkpoint's
    full-precision path. With the class-wide descriptor of 90d68bb that read returned True, so the layer stored
    nothing and took the quantized path afterwards (this test failed there: ``_full_precision_mm`` False). The class
    descriptor is back, so the load code (``_load_from_state_dict``) is marked for the span and reads the layer's own
    value there. Negative control: without that mark (``_LOADERS`` empty) the layer stores nothing again. On the
    stand-in; ``test_real_...`` below on ComfyUI's own layer."""
    import jetdet
    from jetdet.comfy import attention
    from jetdet.comfy.attention import sdpa_attention

    def load_in_span():
        ops = _stand_in_mixed_precision_ops()
        with torch.no_grad(), jetdet.mode("deterministic"), sdpa_attention():
            (on, _, x), (off, _, _), (off2, _, _) = (_standin_layers(ops) for _ in range(3))
            on.load(True)
            off.load(False)
            with sdpa_attention():  # nested: the same
                off2.load(False)
            during = _items_alone(on, x), _items_alone(off, x)
        return on, off, off2, x, during

    on, off, off2, x, during = load_in_span()
    assert during == ([True] * 4,) * 2  # the span's full-precision path
    assert on._full_precision_mm is True and (off._full_precision_mm, off2._full_precision_mm) == (False, False)
    with torch.no_grad(), jetdet.mode("deterministic"):  # outside the span: each its checkpoint's path
        after = _items_alone(on, x), _items_alone(off, x)
    assert after == ([True] * 4, [False, False, False, True])
    monkeypatch.setattr(attention, "_LOADERS", ())
    on, *_ = load_in_span()
    assert on._full_precision_mm is False  # the negative control: the loader read True and stored nothing


@pytest.mark.parametrize("nested", [False, True])
def test_mixed_precision_classes_created_during_the_span_are_swapped(comfy_dir, monkeypatch, nested):
    """A quantized model built while a deterministic call runs (a node or patch that loads one during sampling) has
    layer classes of its own, created after the outermost entry's scan: they were not swapped, so its layers kept the
    quantized path in deterministic calls, silently. Now a class created during the span is swapped as Python creates
    it (``__init_subclass__`` on ``CastWeightBiasOp``), and every entry, nested ones included, scans again.
    ``nested=False``: the layer called in the same call that built it; ``nested=True``: through a nested
    deterministic call. Negative control: without the ``__init_subclass__`` hook the same call's items differ, while
    the nested call's rescan alone still covers the nested case."""
    import comfy.ops

    import jetdet
    from jetdet.comfy import attention
    from jetdet.comfy.attention import sdpa_attention

    def run():
        with torch.no_grad(), jetdet.mode("deterministic"), sdpa_attention():
            ops = _stand_in_mixed_precision_ops()
            layer, experts, x = _standin_layers(ops)
            if nested:
                with jetdet.mode("deterministic"), sdpa_attention():
                    return _items_alone(layer, x), _items_alone(lambda t: experts.expert_linear(t, 0), x), ops

            return _items_alone(layer, x), _items_alone(lambda t: experts.expert_linear(t, 0), x), ops

    *items, ops = run()
    assert items == [[True] * 4] * 2
    assert "__init_subclass__" not in vars(comfy.ops.CastWeightBiasOp)  # the hook is taken off with the rest
    assert "_full_precision_mm" not in vars(ops.Linear) and "_full_precision_mm" not in vars(ops.Experts)
    assert not hasattr(vars(ops.Linear)["_load_from_state_dict"], "_jetdet_own")
    monkeypatch.setattr(attention, "_hook_new_classes", lambda: None)
    *items, ops = run()
    assert items == ([[True] * 4] * 2 if nested else [[False, False, False, True]] * 2)  # the negative control


def test_a_mixed_precision_layer_with_its_own_forward_takes_the_full_precision_path(comfy_dir):
    """ComfyUI's "Load LoRA (Bypass)" (0.33's ``BypassForwardHook.inject``, at model load, outside any deterministic
    call) does ``original_forward = module.forward; module.forward = bypass_forward``: the layer then runs the class's
    forward through a bound method taken before the span. With a481b2a's wrapped class methods that forward was the
    unwrapped one, so the layer read its own False in deterministic calls: items ``[False, False, False, True]``,
    silently (this test failed there). The flag is read through the class's descriptor whatever forward runs. On the
    stand-in; ``test_real_..._bypass_lora_...`` on ComfyUI's own hook. Negative control: without the swap the
    items differ."""
    import jetdet
    from jetdet.comfy.attention import sdpa_attention

    ops = _stand_in_mixed_precision_ops()
    layer, _, x = _standin_layers(ops)
    original_forward = layer.forward  # as the bypass hook holds it

    def bypass_forward(t, *args, **kwargs):
        return original_forward(t, *args, **kwargs) + 0.0  # a LoRA whose delta is zero

    layer.forward = bypass_forward
    with torch.no_grad(), jetdet.mode("deterministic"):
        plain = _items_alone(layer, x)
        with sdpa_attention():
            swapped = _items_alone(layer, x)
    assert plain == [False, False, False, True]  # the negative control
    assert swapped == [True] * 4


def test_a_mixed_precision_class_with_its_own_full_precision_mm_property_keeps_it(comfy_dir):
    """A layer class that defines ``_full_precision_mm`` itself as a property with a setter (a data descriptor, which
    Python reads before the instance's ``__dict__``). During the span jetdet's descriptor stands in for it; a write
    then (load code storing a checkpoint's ``full_precision_matrix_mult``) went to the instance's ``__dict__``, not
    through the setter, so once the property was back the layer read its old value: the checkpoint's setting lost,
    silently (this test failed there: False after the span). Now writes and reads go through the class's own data
    descriptor; in the span the flag still reads True; afterwards the class is as it was."""
    import comfy.ops

    import jetdet
    from jetdet.comfy.attention import sdpa_attention

    class MixedPrecisionOps(comfy.ops.manual_cast):
        class Linear(torch.nn.Module, comfy.ops.CastWeightBiasOp):
            def __init__(self):
                super().__init__()
                self._fpmm = False

            @property
            def _full_precision_mm(self):
                return self._fpmm

            @_full_precision_mm.setter
            def _full_precision_mm(self, v):
                self._fpmm = v

            def _load_from_state_dict(self, *args):
                if not self._full_precision_mm:
                    self._full_precision_mm = True  # the checkpoint's full_precision_matrix_mult

    own = vars(MixedPrecisionOps.Linear)["_full_precision_mm"]
    with jetdet.mode("deterministic"), sdpa_attention():
        layer = MixedPrecisionOps.Linear()
        layer._load_from_state_dict({}, "", {}, True, [], [], [])
        during = layer._full_precision_mm
        other = MixedPrecisionOps.Linear()  # its setter ran in __init__, not written to its __dict__
    assert during is True and other._fpmm is False and "_full_precision_mm" not in vars(other)
    assert vars(MixedPrecisionOps.Linear)["_full_precision_mm"] is own
    assert layer._full_precision_mm is True and "_full_precision_mm" not in vars(layer)
    assert other._full_precision_mm is False


def _two_threads(layer, x, b_mode, gates):
    """``layer(x)`` on thread A (a deterministic call) and on thread B (``b_mode``: "off", no jetdet mode;
    "deterministic", a deterministic call of its own), interleaved by events at the point where the layer's forward
    is about to read ``_full_precision_mm`` (``gates``: thread name -> what runs there, installed by the caller).
    "off": A enters first and waits there while B runs its whole forward. "deterministic": B enters while A waits
    there, then waits there itself until A's forward has returned. A's span stays open until B is through. Returns
    (A's output, B's output)."""
    import jetdet
    from jetdet.comfy.attention import sdpa_attention

    a_in, b_in, a_done, b_done = (threading.Event() for _ in range(4))
    waited, out, errors = [], {}, []

    def wait(e):
        waited.append(e.wait(30))

    names = ("jetdet-test-A", "jetdet-test-B")
    if b_mode == "off":
        gates.update({names[0]: lambda: (a_in.set(), wait(b_done))})
    else:
        gates.update({names[0]: lambda: (a_in.set(), wait(b_in)), names[1]: lambda: (b_in.set(), wait(a_done))})

    def a():
        try:
            with torch.no_grad(), jetdet.mode("deterministic"), sdpa_attention():
                out["A"] = layer(x)
                a_done.set()
                wait(b_done)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            a_in.set(), a_done.set()

    def b():
        try:
            wait(a_in)
            det = b_mode != "off"
            with torch.no_grad(), (jetdet.mode("deterministic") if det else contextlib.nullcontext()), (
                    sdpa_attention() if det else contextlib.nullcontext()):
                out["B"] = layer(x)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            b_in.set(), b_done.set()

    threads = [threading.Thread(target=f, name=n) for f, n in zip((a, b), names)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        for n in names:
            gates.pop(n, None)
    assert not errors, errors
    assert all(waited) and not any(t.is_alive() for t in threads), "the interleaving did not happen"
    return out["A"], out["B"]


@pytest.mark.parametrize("b_mode", ["off", "deterministic"])
def test_mixed_precision_layers_read_their_flag_per_thread(comfy_dir, b_mode):
    """Two threads in one layer during the span. a481b2a wrote ``_full_precision_mm = True`` on the shared layer for
    a deterministic call's duration: a thread outside deterministic mode running the layer meanwhile took the
    full-precision path (jetdet changed a call it does not own), and of two overlapping deterministic calls the
    first one's ``finally`` put back False while the second was inside, which then took the quantized, batch-dependent
    path, silently (both cases failed there). Now each thread reads its own answer and nothing shared is written.
    Forced interleavings (events, at the point before the flag is read); on the stand-in, ``test_real_...`` on
    ComfyUI's own layer."""
    ops = _stand_in_mixed_precision_ops()
    layer, _, x = _standin_layers(ops)
    with torch.no_grad():
        quantized = layer(x)  # ComfyUI's own path
        full = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert not torch.equal(quantized, full)
    a, b = _two_threads(layer, x, b_mode, _GATES)
    assert torch.equal(a, full)
    assert torch.equal(b, quantized if b_mode == "off" else full)
    assert vars(layer)["_full_precision_mm"] is False


def test_mixed_precision_readers_of_full_precision_mm_are_load_code_or_see_the_descriptor(comfy_dir):
    """Every reader of ``_full_precision_mm`` in ComfyUI's own ``comfy.ops`` (0.7.0: ``Linear.__init__``,
    ``_load_from_state_dict``, ``forward``; 0.33: also ``MoEExperts._expert_linear_impl`` and the module-level
    ``_load_quantized_module``) is one of: ``__init__`` (which only sets it); load code, which must read the layer's
    own value and runs under a method jetdet marks as loading for the span (``_LOADERS``), module-level helpers
    included (called from those methods alone); or compute code, which reads the class's descriptor (installed on
    every such class, inherited by subclasses). A newer ComfyUI that reads it in load code elsewhere fails here.
    Skipped on 0.3.64 (no such layers)."""
    import inspect
    import types

    import comfy.ops

    import jetdet
    from jetdet.comfy import attention
    from jetdet.comfy.attention import sdpa_attention

    if not hasattr(comfy.ops, "mixed_precision_ops"):
        pytest.skip("this ComfyUI has no mixed_precision_ops (newer than 0.3.64)")

    def names(code):
        return set(code.co_names).union(*(names(c) for c in code.co_consts if isinstance(c, types.CodeType)))

    ops = comfy.ops.mixed_precision_ops({}, torch.bfloat16, disabled=set())
    classes = [c for c in vars(ops).values() if isinstance(c, type)]
    methods = {(c.__name__, n): f for c in classes for n, f in vars(c).items() if hasattr(f, "__code__")}
    readers = {k for k, f in methods.items() if "_full_precision_mm" in names(f.__code__)}
    helpers = {n for n, f in vars(comfy.ops).items() if isinstance(f, types.FunctionType)
               and n != "mixed_precision_ops" and "_full_precision_mm" in names(f.__code__)}  # (its classes: above)
    assert ("Linear", "forward") in readers
    load = {k for k in readers if "load" in k[1] or "state_dict" in k[1]}
    assert {n for _, n in load} <= set(attention._LOADERS), load
    for h in helpers:  # module-level readers (0.33's _load_quantized_module): called from load methods alone
        callers = {k for k, f in methods.items() if h in names(f.__code__)}
        callers |= {n for n, f in vars(comfy.ops).items() if isinstance(f, types.FunctionType) and n != h
                    and n != "mixed_precision_ops" and h in names(f.__code__)}
        assert callers and {c[1] if isinstance(c, tuple) else c for c in callers} <= set(attention._LOADERS), (
            h, callers)
    with jetdet.mode("deterministic"), sdpa_attention():
        for c in {c for c in classes for k in readers if k[0] == c.__name__}:
            assert isinstance(inspect.getattr_static(c, "_full_precision_mm"), attention._FullPrecisionFlag), c


def _real_nvfp4_layer(full_precision_matrix_mult=None, layer=None):
    """Newer ComfyUI's own ``mixed_precision_ops`` Linear (``layer``, else a new one of a new ops class) with an
    nvfp4 weight (compute enabled, as on a GPU that has it; comfy_kitchen computes it on the CPU too), loaded through
    ComfyUI's loader; skips on 0.3.64."""
    import json

    import comfy.ops

    if not hasattr(comfy.ops, "mixed_precision_ops"):
        pytest.skip("this ComfyUI has no mixed_precision_ops (newer than 0.3.64)")
    import comfy.quant_ops as q

    g = torch.Generator().manual_seed(0)
    if layer is None:
        layer = comfy.ops.mixed_precision_ops({}, torch.bfloat16, disabled=set()).Linear(64, 32, dtype=torch.bfloat16)
    qdata, params = q.get_layout_class(q.QUANT_ALGOS["nvfp4"]["comfy_tensor_layout"]).quantize(
        (torch.randn(32, 64, generator=g) * 0.1).to(torch.bfloat16))
    conf = {"format": "nvfp4"}
    if full_precision_matrix_mult is not None:
        conf["full_precision_matrix_mult"] = full_precision_matrix_mult
    conf = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
    layer.load_state_dict({"weight": qdata, "weight_scale": params.block_scale, "weight_scale_2": params.scale,
                           "comfy_quant": conf, "bias": torch.randn(32, generator=g).to(torch.bfloat16)}, strict=False)
    return layer


def _real_x():
    x = torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    x[3] *= 50
    return x


def test_real_mixed_precision_nvfp4_layer_items_equal_alone_and_in_a_batch(comfy_dir):
    """The same on newer ComfyUI's own ``mixed_precision_ops`` with an nvfp4 weight. Skipped on ComfyUI 0.3.64, which
    has no such layers."""
    import jetdet
    from jetdet.comfy.attention import sdpa_attention

    layer = _real_nvfp4_layer()
    x = _real_x()
    with torch.no_grad(), jetdet.mode("deterministic"):
        plain = _items_alone(layer, x)
        with sdpa_attention():
            swapped = _items_alone(layer, x)
    assert plain == [False, False, False, True]  # ComfyUI's own quantized path (the negative control)
    assert swapped == [True] * 4


def test_real_mixed_precision_layer_loaded_in_a_deterministic_call_keeps_its_checkpoints_setting(comfy_dir):
    """ComfyUI's own loader, run inside a deterministic call, on a checkpoint layer that says
    ``full_precision_matrix_mult: true``: afterwards the layer holds it and takes the full-precision path (on 90d68bb
    it held False). One without it keeps the quantized path."""
    import comfy.ops

    import jetdet
    from jetdet.comfy.attention import sdpa_attention

    if not hasattr(comfy.ops, "mixed_precision_ops"):
        pytest.skip("this ComfyUI has no mixed_precision_ops (newer than 0.3.64)")
    x = _real_x()
    ops = comfy.ops.mixed_precision_ops({}, torch.bfloat16, disabled=set())  # the class exists before the span
    on, off = (ops.Linear(64, 32, dtype=torch.bfloat16) for _ in range(2))
    with torch.no_grad(), jetdet.mode("deterministic"), sdpa_attention():
        _real_nvfp4_layer(True, on)
        _real_nvfp4_layer(None, off)
    assert (on._full_precision_mm, on._full_precision_mm_config, off._full_precision_mm) == (True, True, False)
    with torch.no_grad(), jetdet.mode("deterministic"):  # outside the span: each its checkpoint's path
        assert (_items_alone(on, x), _items_alone(off, x)) == ([True] * 4, [False, False, False, True])


@pytest.mark.parametrize("nested", [False, True])
def test_real_mixed_precision_layer_built_during_the_span_is_swapped(comfy_dir, nested):
    """ComfyUI's own nvfp4 layer whose ops class was created inside a deterministic call, called in that call or in
    a nested one: items equal alone and in a batch (on 90d68bb, ``[False, False, False, True]`` in the nested case,
    silently)."""
    import jetdet
    from jetdet.comfy.attention import sdpa_attention

    x = _real_x()
    with torch.no_grad(), jetdet.mode("deterministic"), sdpa_attention():
        layer = _real_nvfp4_layer()
        if nested:
            with jetdet.mode("deterministic"), sdpa_attention():
                items = _items_alone(layer, x)
        else:
            items = _items_alone(layer, x)
    assert items == [True] * 4


def test_real_mixed_precision_layer_with_a_bypass_lora_takes_the_full_precision_path(comfy_dir):
    """ComfyUI's own LoRA bypass hook (0.33's ``comfy.weight_adapter.bypass.BypassForwardHook``, what "Load LoRA
    (Bypass)" injects at model load) on its own nvfp4 layer, here with a LoRA whose delta is zero: in a deterministic
    call the items equal alone and in a batch (on a481b2a ``[False, False, False, True]``, silently: the hook holds the
    class's unwrapped forward). Skipped where ComfyUI has no bypass hook (0.3.64, 0.7.0)."""
    bypass = pytest.importorskip("comfy.weight_adapter.bypass")
    from comfy.weight_adapter.base import WeightAdapterBase

    import jetdet
    from jetdet.comfy.attention import sdpa_attention

    class ZeroLora(WeightAdapterBase):
        name = "jetdet_zero"

        def __init__(self):
            self.weights = ()

        def h(self, x, base_out):
            return torch.zeros_like(base_out)

        def g(self, y):
            return y

    layer, x = _real_nvfp4_layer(), _real_x()
    hook = bypass.BypassForwardHook(layer, ZeroLora())
    hook.inject()
    try:
        assert "forward" in vars(layer)  # the hook's own forward, on the instance
        with torch.no_grad(), jetdet.mode("deterministic"):
            plain = _items_alone(layer, x)
            with sdpa_attention():
                swapped = _items_alone(layer, x)
    finally:
        hook.eject()
    assert plain == [False, False, False, True]  # the negative control
    assert swapped == [True] * 4


@pytest.mark.parametrize("b_mode", ["off", "deterministic"])
def test_real_mixed_precision_layer_reads_its_flag_per_thread(comfy_dir, monkeypatch, b_mode):
    """The two-thread cases of ``test_mixed_precision_layers_read_their_flag_per_thread`` on ComfyUI's own nvfp4
    layer, held at ``run_every_op()`` (the first thing its forward does, before it reads the flag): a thread outside
    deterministic mode keeps ComfyUI's quantized path, and two overlapping deterministic calls both take the
    full-precision path (on a481b2a: full-precision, and quantized for the second deterministic thread)."""
    import comfy.ops

    import jetdet
    from jetdet.comfy.attention import sdpa_attention

    layer, x = _real_nvfp4_layer(), _real_x()
    if not hasattr(comfy.ops, "run_every_op"):
        pytest.skip("this ComfyUI's layers call no run_every_op")
    with torch.no_grad():
        quantized = layer(x)
        with jetdet.mode("deterministic"), sdpa_attention():
            full = layer(x)
    assert not torch.equal(quantized, full)
    gates, run_every_op = {}, comfy.ops.run_every_op

    def gated():
        gate = gates.get(threading.current_thread().name)
        if gate is not None:
            gate()
        return run_every_op()

    monkeypatch.setattr(comfy.ops, "run_every_op", gated)
    a, b = _two_threads(layer, x, b_mode, gates)
    assert torch.equal(a, full)
    assert torch.equal(b, quantized if b_mode == "off" else full)


def test_stock_sampling_under_memory_pressure_differs_negative_control(shapes_patcher, shapes_conds):
    from _comfy_util import empty_latent

    a = stock_ksampler(shapes_patcher, *shapes_conds, empty_latent(3), "euler", steps=4)
    with no_free_memory():
        b = stock_ksampler(shapes_patcher, *shapes_conds, empty_latent(3), "euler", steps=4)
    assert not torch.equal(a, b)


def test_one_and_two_threads_give_the_same_bits(shapes_patcher, shapes_conds, restore_threads):
    torch.set_num_threads(1)
    one, _ = det_sample(shapes_patcher, *shapes_conds, 4, "dpmpp_2m_sde", steps=4)
    single, _ = det_sample(shapes_patcher, *shapes_conds, 1, "dpmpp_2m_sde", steps=4, offset=3)
    torch.set_num_threads(2)
    two, _ = det_sample(shapes_patcher, *shapes_conds, 4, "dpmpp_2m_sde", steps=4)
    assert torch.equal(one, two)
    assert torch.equal(one[3], single[0])


def _noise_samplers():
    import comfy.samplers

    from jetdet.comfy.runtime import import_comfyui  # noqa: F401 - the fixture has imported ComfyUI by now
    from jetdet.comfy.sampling import draws_noise

    return [s for s in comfy.samplers.KSampler.SAMPLERS if draws_noise(s)]


def test_every_noise_drawing_sampler_is_per_item(shapes_patcher, shapes_conds):
    names = _noise_samplers()
    assert {"euler_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde", "er_sde", "sa_solver", "lcm",
            "ddpm", "seeds_2", "seeds_3"} <= set(names)
    bad = {}
    for s in names:
        eq = items_equal_to_singles(shapes_patcher, *shapes_conds, s, batch=2, steps=3)
        if eq != [True, True]:
            bad[s] = eq
    assert not bad, f"samplers whose items differ from their batch-1 runs: {bad}"



@pytest.mark.parametrize("sampler", ["dpmpp_sde", "ddpm", "lcm"])
def test_a_schedule_that_repeats_a_sigma(shapes_patcher, shapes_conds, sampler, caplog):
    """ComfyUI's "simple" scheduler repeats a sigma when steps / denoise > 1000 (20 steps at denoise 0.01): a step
    of length 0. The per-item noise sampler raised for it ("sigma and sigma_next are equal", an input the artist
    does not have: a review's find); it now gives a fresh standard normal there, which the samplers scale by 0.
    Finite output, every item equal to its batch-1 run, and a warning naming the repeat once (dpmpp_2m_sde, er_sde
    and, on flow models, euler_ancestral divide by the step's length in ComfyUI's own code and give NaN there, with
    ComfyUI's KSampler too; ComfyUI's dpmpp_sde stops in a RecursionError)."""
    import comfy.samplers

    sig = comfy.samplers.KSampler(shapes_patcher, 20, "cpu", sampler, "simple", 0.01).sigmas.tolist()
    assert any(a == b for a, b in zip(sig, sig[1:])), sig  # the case under test is really there
    from jetdet.comfy import sampling

    sampling._warned_repeat.clear()
    with caplog.at_level("WARNING"):
        full, _ = det_sample(shapes_patcher, *shapes_conds, 2, sampler, steps=20, denoise=0.01)
    said = [r.getMessage() for r in caplog.records if "repeats sigma" in r.getMessage()]
    assert len(said) == 1 and "simple schedule at steps=20, denoise=0.01" in said[0], said
    assert torch.isfinite(full).all()
    for i in range(2):
        alone, _ = det_sample(shapes_patcher, *shapes_conds, 1, sampler, steps=20, denoise=0.01, offset=i)
        assert torch.equal(full[i], alone[0]), i


def test_noise_over_a_zero_length_step_is_a_fresh_standard_normal():
    from jetdet.comfy.sampling import ItemNoiseSampler

    ns = ItemNoiseSampler(torch.zeros(2, 4, 64, 64), seed=3, ids=[0, 1])
    z = ns(0.5, 0.5)
    assert z.shape == (2, 4, 64, 64) and torch.isfinite(z).all() and ns.points == []  # no point on the path
    assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02
    again = ItemNoiseSampler(torch.zeros(1, 4, 64, 64), seed=3, ids=[1])
    assert torch.equal(again(0.5, 0.5)[0], z[1])  # per item, as every other draw

def test_batch_index_keeps_an_items_noise(shapes_patcher, shapes_conds):
    # an item picked out of a batch (LatentFromBatch sets batch_index) samples as it did inside the batch
    from _comfy_util import empty_latent

    from jetdet.comfy.nodes import JetDetDeterministicSampler

    full, _ = det_sample(shapes_patcher, *shapes_conds, 3, "euler_ancestral", steps=4, offset=10)
    lat = empty_latent(1)
    lat["batch_index"] = [2]
    out = JetDetDeterministicSampler.execute(shapes_patcher, 7, 4, 4.0, "euler_ancestral", "simple", *shapes_conds,
                                             lat, 1.0, 10).args[0]
    assert torch.equal(out["samples"][0], full[2])


@pytest.mark.parametrize("sampler", ["euler", "dpm_adaptive"])
def test_inpainting_with_fewer_masks_than_latents_items_equal_singles(shapes_patcher, shapes_conds, sampler):
    """2 masks for 3 latents: ComfyUI repeats the masks over the batch (item 2 gets mask 0). dpm_adaptive, which the
    Deterministic Sampler runs item by item, gave every item mask 0 (a review's find); euler runs the batch."""
    import nodes

    from jetdet.comfy import shapes_model as sm
    from jetdet.comfy.nodes import JetDetDeterministicSampler

    size = sm.LATENT_SIZE * 8
    mask = torch.zeros(2, size, size)
    mask[0, :, : size // 2] = 1
    mask[1, :, size // 2:] = 1
    src = {"samples": torch.randn(3, sm.LATENT_CHANNELS, sm.LATENT_SIZE, sm.LATENT_SIZE,
                                  generator=torch.Generator().manual_seed(3))}
    lat = nodes.SetLatentNoiseMask().set_mask(src, mask)[0]

    def run(latent):
        return JetDetDeterministicSampler.execute(shapes_patcher, 7, 4, 4.0, sampler, "simple", *shapes_conds, latent,
                                                  0.7, 0).args[0]["samples"]

    full = run(lat)
    for i in range(3):
        alone = run(nodes.LatentFromBatch().frombatch(lat, i, 1)[0])
        assert torch.equal(full[i], alone[0]), i


def _extras_as_comfyui_loads(comfy_dir, name: str):
    """A ``comfy_extras`` module loaded as ComfyUI loads it, by file path (its functions' ``__module__`` is then the
    path, not ``comfy_extras.<name>``)."""
    import importlib.util
    import os

    path = os.path.join(str(comfy_dir), "comfy_extras", name + ".py")
    spec = importlib.util.spec_from_file_location(os.path.splitext(path)[0], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("patch, steps", [("LazyCache", 12), ("Perp-Neg", 6), ("Mahiro", 6)])
def test_patches_that_couple_the_batch_are_sampled_one_item_at_a_time(comfy_dir, shapes_patcher, shapes_conds, patch,
                                                                      steps, caplog, monkeypatch):
    """ComfyUI's LazyCache decides a skip from the whole batch's change, Perp-Neg takes a sum and a norm over the
    whole batch, Mahiro one cosine similarity for it: an item's result depended on its batch-mates (reviews: up to 2.2,
    1.7 and 0.96, with no warning). The Deterministic Sampler now samples such a model's items one at a time, and says
    so once. The nodes are loaded by file path, as ComfyUI loads them (a first check read the dotted module name,
    which only a direct import gives)."""
    import logging

    from jetdet.comfy import sampling as smp
    from jetdet.comfy import shapes_model as sm

    conds = (shapes_conds[0], sm.class_conditioning(5))  # a negative prompt other than Perp-Neg's empty one
    if patch == "LazyCache":
        node = _extras_as_comfyui_loads(comfy_dir, "nodes_easycache").LazyCacheNode
        model = node.execute(shapes_patcher, 0.2, 0.15, 0.95, False).args[0]
    elif patch == "Perp-Neg":
        node = _extras_as_comfyui_loads(comfy_dir, "nodes_perpneg").PerpNeg
        model = node.execute(shapes_patcher, shapes_conds[1], 1.0).args[0]
    else:
        model = _extras_as_comfyui_loads(comfy_dir, "nodes_mahiro").Mahiro.execute(shapes_patcher).args[0]
    assert smp.batch_coupled_patches(model) == [patch]
    assert smp.batch_coupled_patches(shapes_patcher) == []
    smp._warned_coupled.clear()
    with caplog.at_level(logging.WARNING):
        assert items_equal_to_singles(model, *conds, "euler", batch=4, steps=steps) == [True] * 4
    assert sum("couples the items of a batch" in r.getMessage() for r in caplog.records) == 1
    monkeypatch.setattr(smp, "batch_coupled_patches", lambda m: [])  # the negative control: sampled as one batch
    assert items_equal_to_singles(model, *conds, "euler", batch=4, steps=steps) != [True] * 4


def test_split_coupled_false_samples_the_batch_as_one(comfy_dir, shapes_patcher, shapes_conds):
    """bench/comfy_peers.py times EasyCache and LazyCache as ComfyUI's KSampler runs them, one batch: sampled one item
    at a time (the deterministic sampler's default for them) they ran 8x the forwards (240 per batch of 8 at 30
    steps, in a rerun after the item-by-item rule came in), and the table would have charged them for it."""
    from jetdet.comfy import sampling as smp
    from jetdet.comfy import shapes_model as sm
    from jetdet.comfy import wrappers as wr

    node = _extras_as_comfyui_loads(comfy_dir, "nodes_easycache").LazyCacheNode
    lazy = node.execute(shapes_patcher, 0.2, 0.15, 0.95, False).args[0]
    latent = {"samples": torch.zeros(4, sm.LATENT_CHANNELS, sm.LATENT_SIZE, sm.LATENT_SIZE)}
    rows = {}
    for split in (True, False):
        counted, counter = wr.with_counter(lazy)
        smp.sample(counted, 3, 4, 4.0, "euler", "simple", *shapes_conds, latent, split_coupled=split)
        rows[split] = counter.rows / counter.calls
    assert rows == {True: 2.0, False: 8.0}, rows  # [cond; uncond] of one item, or of all four


def test_coupling_patches_are_told_apart_from_per_item_ones(comfy_dir, shapes_patcher):
    """Skip Layer Guidance DiT couples the batch only with a rescaling_scale (one std over the batch); Video Linear
    CFG Guidance is named (a cfg per batch row by design); RescaleCFG (per-item std) is neither."""
    from jetdet.comfy import sampling as smp

    slg = _extras_as_comfyui_loads(comfy_dir, "nodes_slg").SkipLayerGuidanceDiT
    plain = slg.execute(shapes_patcher, 3.0, 0.01, 0.15, double_layers="1", rescaling_scale=0.0).args[0]
    rescaled = slg.execute(shapes_patcher, 3.0, 0.01, 0.15, double_layers="1", rescaling_scale=0.5).args[0]
    assert smp.batch_coupled_patches(plain) == []
    assert smp.batch_coupled_patches(rescaled) == ["Skip Layer Guidance DiT (rescaling_scale)"]
    video = _extras_as_comfyui_loads(comfy_dir, "nodes_video_model").VideoLinearCFGGuidance().patch(shapes_patcher,
                                                                                                   1.0)[0]
    assert smp.batch_position_patches(video) and not smp.batch_coupled_patches(video)
    rescale = _extras_as_comfyui_loads(comfy_dir, "nodes_model_advanced").RescaleCFG().patch(shapes_patcher, 0.7)[0]
    assert not smp.batch_coupled_patches(rescale) and not smp.batch_position_patches(rescale)


def test_checksums_and_fingerprint_outputs(shapes_patcher, shapes_conds, monkeypatch):
    """The fingerprint describes the model's device (ComfyUI's ``--cpu`` on a CUDA machine, or a model on
    ``cuda:1``, is not the current CUDA device, which ``jetdet.fingerprint()`` reports by default)."""
    import json

    from _comfy_util import empty_latent

    import jetdet
    from jetdet.comfy.nodes import JetDetDeterministicSampler

    asked = []
    real = jetdet.fingerprint
    monkeypatch.setattr(jetdet, "fingerprint", lambda device=None: asked.append(device) or real(device))
    out, sums, fp = JetDetDeterministicSampler.execute(shapes_patcher, 5, 3, 4.0, "euler", "simple", *shapes_conds,
                                                       empty_latent(2), 1.0, 4).args
    lines = sums.splitlines()
    assert lines == [f"item {4 + i}: {jetdet.checksum(out['samples'][i:i + 1])}" for i in range(2)]
    assert json.loads(fp)["torch"] == torch.__version__
    assert asked == [shapes_patcher.load_device] and json.loads(fp)["device_type"] == shapes_patcher.load_device.type
    from jetdet.comfy.nodes import _fingerprint_json  # a device it cannot describe (DirectML's): the default's

    assert json.loads(_fingerprint_json(torch.device("privateuseone", 0)))["device_type"] == json.loads(
        _fingerprint_json())["device_type"]


def test_a_cfg_function_runs_in_deterministic_mode_and_rescale_cfg_items_equal_singles(shapes_patcher, shapes_conds,
                                                                                       monkeypatch):
    """The CFG combination around the model calls runs in deterministic mode too (a ``PREDICT_NOISE`` wrapper):
    ComfyUI's RescaleCFG takes ``torch.std`` over each item there, which jetdet now routes (on a GPU torch's own
    reduction may depend on the batch; on this CPU it happens not to, so the spy below is what can fail). Items of a
    RescaleCFG run equal their batch-1 runs. Negative control: the stock KSampler's CFG function runs in mode off."""
    import sys

    from comfy_extras.nodes_model_advanced import RescaleCFG

    import jetdet

    router = sys.modules["jetdet.mode"]
    routed = []
    for f in (torch.std, torch.Tensor.std):
        h = router._HANDLERS[f]
        monkeypatch.setitem(router._HANDLERS, f, lambda func, a, k, _h=h: routed.append(func) or _h(func, a, k))
    rescaled = RescaleCFG().patch(shapes_patcher, 0.7)[0]
    assert items_equal_to_singles(rescaled, *shapes_conds, "euler_ancestral", batch=3, steps=4) == [True] * 3
    assert routed, "RescaleCFG's torch.std did not reach jetdet's router"

    modes = []
    probe = shapes_patcher.clone()
    probe.set_model_sampler_cfg_function(lambda args: modes.append(jetdet.get_mode().value)
                                         or args["uncond"] + (args["cond"] - args["uncond"]) * args["cond_scale"])
    det_sample(probe, *shapes_conds, 2, "euler", steps=2)
    assert modes and set(modes) == {"deterministic"}
    modes.clear()
    from _comfy_util import empty_latent

    stock_ksampler(probe, *shapes_conds, empty_latent(2), "euler", steps=2)
    assert modes and set(modes) == {"off"}


@pytest.mark.parametrize("weights, compute", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                              (torch.float8_e4m3fn, torch.bfloat16)], ids=["bf16", "fp16", "fp8-bf16"])
def test_half_precision_models_items_equal_singles(shapes_conds, weights, compute, monkeypatch):
    """On a GPU ComfyUI runs models in 16 bits: fp16 or bf16 weights computed in their own dtype, or fp8 weights
    cast per layer to bf16 ("manual cast"). A CPU computes in fp32, so ComfyUI's choice of compute dtype is
    replaced here by the GPU's, and the shapes model is loaded with 16- or 8-bit weights. Items equal their batch-1
    runs; the model did compute in the 16-bit dtype. This guards the 16-bit path (it runs, it stays per item); it
    cannot show that jetdet is what keeps it per item: on this CPU stock euler in 16 bits happens to be per item as
    well (a review's check). The negative control only shows the comparison can fail: the stock KSampler's ancestral
    steps draw noise for the whole batch, so its items differ from their batch-1 runs with the same starting noise."""
    import comfy.model_management
    import comfy.sd
    import comfy.utils
    from _comfy_util import empty_latent

    from jetdet.comfy import shapes_model as sm

    monkeypatch.setattr(comfy.model_management, "unet_manual_cast",
                        lambda *a, **k: None if compute == weights else compute)
    sd = comfy.utils.load_torch_file(str(sm.MODEL_FILE), safe_load=True)
    with torch.inference_mode():
        model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": weights})
    dm = model.model.diffusion_model
    assert next(dm.parameters()).dtype == weights
    seen = set()
    dm.register_forward_pre_hook(lambda m, a, k: seen.add((a[0] if a else k["x"]).dtype), with_kwargs=True)
    assert items_equal_to_singles(model, *shapes_conds, "euler_ancestral", batch=3, steps=5) == [True] * 3
    assert seen == {compute}

    full = stock_ksampler(model, *shapes_conds, empty_latent(3), "euler_ancestral", steps=5)
    lat = empty_latent(1)
    lat["batch_index"] = [1]
    assert not torch.equal(full[1], stock_ksampler(model, *shapes_conds, lat, "euler_ancestral", steps=5)[0])


def test_a_partial_load_with_weight_patches_is_named_once(monkeypatch):
    """On a GPU, ComfyUI may load a model only partly (low VRAM), and then adds weight patches (a LoRA) in the
    weight's dtype at every call instead of in fp32 at load; whether it loads fully depends on the batch size and
    free memory, so an item could differ from its run alone. The deterministic wrapper says so, once. A CPU always
    loads fully, so the state is faked here on the executor's model."""
    from jetdet.comfy import wrappers as wr

    class Executor:
        def __init__(self, lowvram, patches):
            self.class_obj = type("BaseModel", (), {"model_lowvram": lowvram, "lowvram_patch_counter": patches})()

        def __call__(self, x):
            return x + 1

    monkeypatch.setattr(wr, "_warned_partial_load", [False])
    w = wr.DeterministicWrapper()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert w(Executor(True, 0), torch.zeros(1)) == 1  # partial load, no patches: nothing to say
        assert w(Executor(False, 3), torch.zeros(1)) == 1  # full load
    with pytest.warns(UserWarning, match="loaded this model partially .* --highvram"):
        w(Executor(True, 3), torch.zeros(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w(Executor(True, 3), torch.zeros(1))  # once


def test_one_item_at_a_time_gives_each_item_its_own_conditioning_rows(shapes_patcher, shapes_conds):
    """With dpm_adaptive (sampled item by item) every item got the first of a conditioning's batch of masks, as a
    batch-1 run takes it, where the batch gives row i mask i (a user trial: ConditioningSetMask with 3 masks; the same
    for ControlNet hints). Row i of the batch now equals row i of a run with mask i everywhere, as with euler."""
    import nodes

    from jetdet.comfy import shapes_model as sm

    size = sm.LATENT_SIZE
    masks = torch.zeros(3, size, size)
    masks[0, :, : size // 2] = 1
    masks[1, :, size // 2:] = 1
    masks[2, : size // 2, :] = 1

    def cond(m):
        return nodes.ConditioningSetMask().append(shapes_conds[0], m, "default", 1.0)[0]

    def run(m, sampler):
        return det_sample(shapes_patcher, cond(m), shapes_conds[1], 3, sampler, steps=6)[0]

    for sampler in ("euler", "dpm_adaptive"):
        full = run(masks, sampler)
        for i in (1, 2):
            assert torch.equal(full[i], run(masks[i:i + 1].repeat(3, 1, 1), sampler)[i]), (sampler, i)
            assert not torch.equal(full[i], run(masks[:1].repeat(3, 1, 1), sampler)[i]), (sampler, i)


def test_item_conditioning_cuts_hints_masks_and_embeddings_by_comfyuis_rules(comfy_dir):
    """Row i of an n-item batch: ControlNet hints r mod their count (a chain copied, the original left alone, one copy
    shared by positive and negative), masks cut to the batch, concat images resized as ComfyUI resizes them, text
    embeddings and pooled outputs repeated."""
    import comfy.controlnet
    import comfy.utils

    from jetdet.comfy.sampling import item_conditioning

    hints, first = torch.rand(2, 3, 8, 8), torch.rand(1, 3, 8, 8)

    def controlnet():  # ComfyUI's ControlNet around a stand-in control model (never run here)
        return comfy.controlnet.ControlNet(torch.nn.Linear(1, 1), load_device=torch.device("cpu"))

    prev = controlnet().set_cond_hint(first)
    cn = controlnet().set_cond_hint(hints).set_previous_controlnet(prev)
    emb, pooled, mask, concat = torch.rand(2, 4, 8), torch.rand(2, 8), torch.rand(3, 8, 8), torch.rand(2, 4, 8, 8)
    pos = [[emb, {"control": cn, "pooled_output": pooled, "mask": mask, "concat_latent_image": concat}]]
    neg = [[emb[:1], {"control": cn}]]
    for i in range(3):
        memo: dict = {}
        p, q = item_conditioning(pos, i, 3, memo), item_conditioning(neg, i, 3, memo)
        c = p[0][1]["control"]
        assert c is not cn and q[0][1]["control"] is c
        assert torch.equal(c.cond_hint_original, hints[i % 2:i % 2 + 1])
        assert c.previous_controlnet is prev  # its single hint needs no copy
        assert torch.equal(p[0][0], emb[i % 2:i % 2 + 1]) and torch.equal(q[0][0], emb[:1])
        assert torch.equal(p[0][1]["pooled_output"], pooled[i % 2:i % 2 + 1])
        assert torch.equal(p[0][1]["mask"], mask[i:i + 1])
        assert torch.equal(p[0][1]["concat_latent_image"], comfy.utils.resize_to_batch_size(concat, 3)[i:i + 1])
    assert cn.cond_hint_original is hints and pos[0][1]["mask"] is mask  # the user's conditioning is unchanged


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m_sde"])
def test_advanced_sampler_handoff_is_per_item(shapes_patcher, shapes_conds, sampler):
    """A two-stage handoff (steps 0-6 with the leftover noise, then 6-12 with no new noise), as KSamplerAdvanced runs
    one: with ancestral and SDE samplers ComfyUI draws the step noise for the whole batch, so a deterministic model in
    KSamplerAdvanced gave an item other bits than alone (a user trial: up to 1.7), and the Deterministic Sampler had no
    start or end step. The Advanced node's two stages give item i the bits of item i run alone (batch_offset i); one
    stage over the whole schedule is the Deterministic Sampler's output."""
    import nodes

    from jetdet.comfy.nodes import JetDetDeterministicSampler as DS
    from jetdet.comfy.nodes import JetDetDeterministicSamplerAdvanced as ADV
    from jetdet.comfy.nodes import JetDetModeSwitch

    def stage(latent, offset, add, start, end, leftover):
        return ADV.execute(shapes_patcher, add, 7, 12, 4.0, sampler, "simple", *shapes_conds, latent, start, end,
                           leftover, offset).args[0]

    def handoff(latent, offset):
        mid = stage(latent, offset, "enable", 0, 6, "enable")
        return stage(mid, offset, "disable", 6, 10000, "disable")["samples"]

    from _comfy_util import empty_latent

    full = handoff(empty_latent(3), 0)
    for i in range(3):
        assert torch.equal(full[i], handoff(empty_latent(1), i)[0]), i
    one = stage(empty_latent(3), 0, "enable", 0, 10000, "disable")["samples"]
    ref = DS.execute(shapes_patcher, 7, 12, 4.0, sampler, "simple", *shapes_conds, empty_latent(3), 1.0, 0).args[0]
    assert torch.equal(one, ref["samples"])
    # the negative control: KSamplerAdvanced on the deterministic model, the same two stages
    det = JetDetModeSwitch.execute(shapes_patcher, "deterministic", 0.05, False).args[0]

    def stock(latent):
        mid = nodes.KSamplerAdvanced().sample(det, "enable", 7, 12, 4.0, sampler, "simple", *shapes_conds, latent, 0,
                                              6, "enable")[0]
        return nodes.KSamplerAdvanced().sample(det, "disable", 7, 12, 4.0, sampler, "simple", *shapes_conds, mid, 6,
                                               10000, "disable")[0]["samples"]

    batch = stock(empty_latent(3))
    lat = empty_latent(3)
    lat["batch_index"] = [0, 1, 2]
    assert not all(torch.equal(batch[i], stock(nodes.LatentFromBatch().frombatch(lat, i, 1)[0])[0]) for i in range(3))


def test_item_conditioning_reference_latents_attention_masks_and_extra_concats(comfy_dir, caplog):
    """A review's cases: Flux Kontext's reference latents (a list, each repeated over the rows), an attention mask
    paired with its embedding row, a ControlNet's extra concat images repeated to the hint's batch first (one hint:
    every row gets the first), a 2-D mask left whole, and a batched tensor inside another entry named in the log."""
    import logging

    import comfy.controlnet

    from jetdet.comfy import sampling as smp

    emb, am = torch.rand(2, 4, 8), torch.ones(2, 4)
    refs = [torch.rand(2, 4, 8, 8), torch.rand(1, 4, 8, 8)]
    cn = comfy.controlnet.ControlNet(torch.nn.Linear(1, 1), load_device=torch.device("cpu"))
    cn.set_cond_hint(torch.rand(1, 3, 8, 8), extra_concat=[torch.rand(2, 1, 8, 8)])
    mask2d = torch.rand(8, 8)
    out = type("Output", (), {})()  # ComfyUI's CLIP vision output object
    out.image_embeds = torch.rand(2, 8)
    unclip = [{"clip_vision_output": out, "strength": 1.0}]
    cond = [[emb, {"attention_mask": am, "reference_latents": refs, "control": cn, "mask": mask2d,
                   "unclip_conditioning": unclip}]]
    smp._warned_item_cond.clear()
    with caplog.at_level(logging.WARNING):
        for i in range(2):
            t, d = smp.item_conditioning(cond, i, 2)[0]
            assert torch.equal(d["attention_mask"], am[i:i + 1]) and torch.equal(t, emb[i:i + 1])
            assert torch.equal(d["reference_latents"][0], refs[0][i:i + 1]) and d["reference_latents"][1] is refs[1]
            assert torch.equal(d["control"].extra_concat_orig[0], cn.extra_concat_orig[0][:1])  # one hint: row 0's
            assert d["mask"] is mask2d
    assert sum("'unclip_conditioning' holds a batch of rows" in r.getMessage() for r in caplog.records) == 1


def test_an_item_taken_out_of_a_batch_with_batch_wide_conditioning_is_named(shapes_patcher, shapes_conds, caplog):
    """A user trial: an inpainting batch (3 images and masks through InpaintModelConditioning), one item taken out with
    LatentFromBatch, did not match its row of the batch: the conditioning still held 3 rows, and a batch-1 run reads
    the first. ComfyUI's rule, so it stays; the run now says so, naming the entries, once. Here with a batch of 3
    conditioning masks; the batch itself, and item 0 alone, say nothing."""
    import logging

    import nodes
    from _comfy_util import empty_latent

    from jetdet.comfy import sampling as smp
    from jetdet.comfy.nodes import JetDetDeterministicSampler as DS

    pos, neg = shapes_conds
    masks = torch.zeros(3, 16, 16)
    for i in range(3):
        masks[i, :, i * 5:i * 5 + 6] = 1
    pos = [[t, dict(d, mask=masks, set_area_to_bounds=False, mask_strength=1.0)] for t, d in pos]
    batch = empty_latent(3)
    batch["batch_index"] = [0, 1, 2]

    def run(latent):
        return DS.execute(shapes_patcher, 7, 4, 4.0, "euler", "simple", pos, neg, latent, 1.0, 0).args[0]["samples"]

    smp._warned_item_cond.clear()
    with caplog.at_level(logging.WARNING):
        full = run(batch)
        run(nodes.LatentFromBatch().frombatch(batch, 0, 1)[0])
        assert not [r for r in caplog.records if "item 0 of a batch" in r.getMessage()]
        alone = run(nodes.LatentFromBatch().frombatch(batch, 2, 1)[0])
        run(nodes.LatentFromBatch().frombatch(batch, 2, 1)[0])
    said = [r.getMessage() for r in caplog.records if "of a batch, alone" in r.getMessage()]
    assert len(said) == 1 and "item 2" in said[0] and "'mask' (3 rows)" in said[0], said
    assert not torch.equal(alone[0], full[2])  # what the line warns of: the first mask, not the third


def _stand_in_kitchen():
    """A small stand-in of comfy_kitchen's custom ops (``torch.ops.comfy_kitchen.*``; newer ComfyUI requires that
    package, CI's 0.3.64 does not) under a namespace of its own: ``rms_adaln`` whose result depends on the batch size
    (as a fused kernel's may), ``apply_rope1`` (elementwise, on the allow-list), ``na3d`` (an op jetdet names) and
    ``mystery_mm`` (a matrix multiply under a name jetdet has never seen)."""
    ns = "jetdet_test_kitchen"
    if not hasattr(torch.ops, ns) or not hasattr(getattr(torch.ops, ns), "rms_adaln"):
        @torch.library.custom_op(f"{ns}::rms_adaln", mutates_args=())
        def rms_adaln(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
            n = torch.nn.functional.rms_norm(x, x.shape[-1:], eps=eps * x.shape[0] * 1e4)  # batch dependent
            return n * (1 + scale) + shift

        @torch.library.custom_op(f"{ns}::apply_rope1", mutates_args=())
        def apply_rope1(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
            t = x.reshape(*x.shape[:-1], -1, 1, 2).to(freqs_cis.dtype)
            return (freqs_cis[..., 0] * t[..., 0] + freqs_cis[..., 1] * t[..., 1]).reshape(x.shape).type_as(x)

        @torch.library.custom_op(f"{ns}::na3d", mutates_args=())
        def na3d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: int) -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

        @torch.library.custom_op(f"{ns}::mystery_mm", mutates_args=())
        def mystery_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a @ b
    return getattr(torch.ops, ns)


def test_comfy_kitchen_fused_norms_are_routed_and_its_other_ops_warned(comfy_dir):
    """Newer ComfyUI's models call comfy_kitchen's fused ops (LTX's ``rms_adaln``, Lumina's ``rms_rope1``, ...),
    custom ops that the router saw as one unknown call and ran as they are, silently outside the guarantee.
    ``jetdet.comfy.kitchen.install`` computes the fused norms from their definitions with jetdet's routed norms,
    leaves an allow-list of elementwise ops as they are, and names every other op in the fallback warning, including
    one it has never heard of and one registered after the first ``install``. Here on a stand-in namespace whose
    ``rms_adaln`` depends on the batch size. Negative controls: in deterministic mode before ``install`` its items
    differ alone and in a batch, with no warning; the allow-listed ``apply_rope1`` does not warn."""
    import jetdet
    from jetdet.comfy import kitchen

    ns = _stand_in_kitchen()
    g = torch.Generator().manual_seed(0)
    x, scale, shift = (torch.randn(4, 8, 64, generator=g) for _ in range(3))
    freqs = torch.randn(1, 8, 32, 2, 2, generator=g)
    q = torch.randn(4, 8, 64, generator=g)

    def items(f, *ts):
        full = f(*ts)
        return [torch.equal(full[i], f(*(t[i:i + 1] for t in ts))[0]) for i in range(4)]

    def said(caught, name):
        return [str(w.message) for w in caught if f" {name} falls back" in str(w.message)]

    adaln = lambda a, b, c: ns.rms_adaln(a, b, c, 1e-6)  # noqa: E731
    with warnings.catch_warnings(record=True) as caught, jetdet.mode("deterministic"):
        warnings.simplefilter("always")
        before = items(adaln, x, scale, shift)
        ns.mystery_mm(q[0], q[0].T)
    assert before == [False] * 4 and not caught  # the negative control: silently batch dependent
    assert kitchen.install(ns) == ["mystery_mm", "na3d", "rms_adaln"]
    assert kitchen.install(ns) == []  # once
    with warnings.catch_warnings(record=True) as caught, jetdet.mode("deterministic"):
        warnings.simplefilter("always")
        after = items(adaln, x, scale, shift)
        out = adaln(x, scale, shift)
        ns.na3d(q[:, None], q[:, None], q[:, None], 3)
        ns.mystery_mm(q[0], q[0].T)
        assert ns.apply_rope1(q, freqs).shape == q.shape  # elementwise: left as it is
    assert after == [True] * 4
    ref = torch.nn.functional.rms_norm(x, (64,), eps=1e-6) * (1 + scale) + shift
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert said(caught, "na3d") and said(caught, "mystery_mm") and not said(caught, "apply_rope1"), [
        str(w.message) for w in caught]
    assert "does not know to be elementwise" in said(caught, "mystery_mm")[0]
    if not hasattr(ns, "later_mm"):  # an op registered after install: handled at the next install
        @torch.library.custom_op("jetdet_test_kitchen::later_mm", mutates_args=())
        def later_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a @ b
    assert kitchen.install(ns) == ["later_mm"]
    with warnings.catch_warnings(record=True) as caught, jetdet.mode("deterministic"):
        warnings.simplefilter("always")
        ns.later_mm(q[0], q[0].T)
    assert said(caught, "later_mm")


_LAZY_LIBS: list = []  # the library of the op below, kept alive for the session


def test_comfy_kitchen_ops_not_looked_up_yet_are_handled(comfy_dir):
    """``install`` listed the namespace's ops from its attributes (``vars(torch.ops.comfy_kitchen)``), which hold only
    the ops looked up so far: torch makes an op's packet on its first attribute access. An op defined with
    ``Library.define`` (or in C++) and first called inside a deterministic call ran unrouted and unwarned that once
    (this test failed there: ``install`` returned ``[]``). Now the names come from torch's dispatcher, listed again
    when an op may have been registered since. Negative control: the op is not among the namespace's attributes when
    ``install`` runs."""
    import jetdet
    from jetdet.comfy import kitchen

    name = "jetdet_test_kitchen_lazy"
    ns = getattr(torch.ops, name)
    kitchen.install(ns)
    if not _LAZY_LIBS:
        lib = torch.library.Library(name, "FRAGMENT")
        lib.define("lazy_mm(Tensor a, Tensor b) -> Tensor")
        lib.impl("lazy_mm", lambda a, b: a @ b, "CompositeExplicitAutograd")
        _LAZY_LIBS.append(lib)
    assert "lazy_mm" not in vars(ns)  # the negative control: invisible to a scan of the attributes
    assert kitchen.install(ns) == ["lazy_mm"]
    assert kitchen.install(ns) == []  # once
    q = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught, jetdet.mode("deterministic"):
        warnings.simplefilter("always")
        ns.lazy_mm(q, q.T)
    assert [w for w in caught if " lazy_mm falls back" in str(w.message)], [str(w.message) for w in caught]


def test_real_comfy_kitchen_ops_are_routed_allowed_or_warned(comfy_dir):
    """On comfy_kitchen itself (newer ComfyUI; skipped where it is not installed): after ``install`` every op of the
    namespace is routed, warned, or on the allow-list; the contractions that passed silently before
    (``int8_linear``, ``int8_attention*``, ``quantize_svdquant_w4a4``, whose low-rank branch is a matrix multiply of
    the input) now warn, in a deterministic call too. The routed ``rms_adaln`` returns ``x``'s dtype, as the op's
    registered fake does, while comfy_kitchen's eager CPU backend promotes a bf16 ``x`` with fp32 modulation to fp32
    (what the README says)."""
    ck = pytest.importorskip("comfy_kitchen")
    assert ck is not None
    import jetdet
    from jetdet.comfy import kitchen
    from jetdet.mode import handler_for

    kitchen.install()
    ns = torch.ops.comfy_kitchen
    names = kitchen._ops(ns)  # every op registered, looked up or not
    unhandled = [n for n in names if handler_for(getattr(ns, n)) is None]
    assert sorted(unhandled) == sorted(n for n in names if n in kitchen._ALLOWED)
    for n in ("int8_linear", "int8_attention", "int8_attention_masked", "quantize_svdquant_w4a4",
              "quantize_int8_tensorwise", "scaled_mm_nvfp4"):
        if n in names:
            assert getattr(handler_for(getattr(ns, n)), "torch_itself", False), n
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g).bfloat16()
    smooth = torch.rand(256, generator=g).bfloat16() + 0.5
    down = torch.randn(256, 32, generator=g).bfloat16()
    with warnings.catch_warnings(record=True) as caught, jetdet.mode("deterministic"):
        warnings.simplefilter("always")
        ns.quantize_svdquant_w4a4(x, smooth, down, 256, False, None)
    assert [w for w in caught if "quantize_svdquant_w4a4 falls back" in str(w.message)]
    xb, sc, sh = torch.randn(2, 5, 64, generator=g).bfloat16(), torch.randn(2, 1, 64), torch.randn(2, 1, 64)
    with jetdet.mode("deterministic"):
        ours = ns.rms_adaln(xb, sc, sh, 1e-6)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as fm:
        fake = ns.rms_adaln(fm.from_tensor(xb), fm.from_tensor(sc), fm.from_tensor(sh), 1e-6)
    assert ours.dtype == fake.dtype == torch.bfloat16
    assert ns.rms_adaln(xb, sc, sh, 1e-6).dtype == torch.float32  # the eager CPU backend: promoted


def test_linear_input_act_takes_the_plain_path_in_deterministic_calls(comfy_dir, monkeypatch):
    """Newer ComfyUI's Wan and LTX MLPs call ``comfy.ops.linear_input_act(linear, x, act)``, which hands an int8
    layer's input straight to comfy_kitchen's int8 kernel (``int8_linear``), unseen by the router. During
    deterministic calls it is ComfyUI's plain path, ``linear(act(x))``, and the kernel is not called; outside the span
    ComfyUI's again, and the kernel is called (the negative control; a test that compared outputs on a plain
    ``nn.Linear`` could not fail on 0.33, where both paths give ``linear(act(x))``); and on another thread outside
    deterministic mode while the span is open (it failed there before: 0 calls). On 0.33/0.7 a real int8
    ``mixed_precision_ops`` layer with comfy_kitchen's ``int8_linear`` counted; on 0.3.64 (no such function) a
    stand-in ``linear_input_act`` whose "kernel" is counted the same way."""
    import comfy.ops

    import jetdet
    from jetdet.comfy.attention import sdpa_attention

    calls = []
    g = torch.Generator().manual_seed(0)
    if hasattr(comfy.ops, "linear_input_act") and hasattr(comfy.ops, "mixed_precision_ops"):
        import json

        import comfy.quant_ops as q

        real = q.ck.int8_linear
        monkeypatch.setattr(q.ck, "int8_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
        lin = comfy.ops.mixed_precision_ops({}, torch.bfloat16, disabled=set()).Linear(64, 32, dtype=torch.bfloat16)
        qdata, params = q.get_layout_class(q.QUANT_ALGOS["int8_tensorwise"]["comfy_tensor_layout"]).quantize(
            (torch.randn(32, 64, generator=g) * 0.1).to(torch.bfloat16), scale="recalculate")
        conf = torch.tensor(list(json.dumps({"format": "int8_tensorwise"}).encode()), dtype=torch.uint8)
        lin.load_state_dict({"weight": qdata, "weight_scale": params.scale, "comfy_quant": conf,
                             "bias": torch.randn(32, generator=g).to(torch.bfloat16)}, strict=False)
        x = torch.randn(4, 8, 64, generator=g).to(torch.bfloat16)
    else:
        monkeypatch.setattr(comfy.ops, "INPUT_ACT_EAGER", {"gelu_tanh": lambda t: torch.nn.functional.gelu(
            t, approximate="tanh")}, raising=False)

        def kernel(linear, t, act):  # stands for int8_linear: the activation fused, the router does not see it
            calls.append(1)
            return linear(comfy.ops.INPUT_ACT_EAGER[act](t)).round()

        monkeypatch.setattr(comfy.ops, "linear_input_act", kernel, raising=False)
        lin = torch.nn.Linear(64, 32)
        x = torch.randn(4, 8, 64, generator=g)
    own = comfy.ops.linear_input_act
    with torch.no_grad(), jetdet.mode("deterministic"):
        with sdpa_attention():
            out = comfy.ops.linear_input_act(lin, x, "gelu_tanh")
            plain = lin(comfy.ops.INPUT_ACT_EAGER["gelu_tanh"](x))
        inside = len(calls)
        comfy.ops.linear_input_act(lin, x, "gelu_tanh")  # outside the span: ComfyUI's (the negative control)
    assert inside == 0 and len(calls) == 1
    assert torch.equal(out, plain)
    assert comfy.ops.linear_input_act is own
    # another thread, in no jetdet mode, while this thread's deterministic call runs: ComfyUI's own, the kernel
    # called (a review: the process-wide swap gave it the plain path, 0 calls, as the per-thread flag no longer does)
    with torch.no_grad(), jetdet.mode("deterministic"), sdpa_attention():
        other = threading.Thread(target=lambda: comfy.ops.linear_input_act(lin, x, "gelu_tanh"))
        other.start()
        other.join(60)
    assert len(calls) == 2
