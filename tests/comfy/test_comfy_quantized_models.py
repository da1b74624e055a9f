"""Small real models end to end through the Deterministic Sampler, as newer ComfyUI (0.7, 0.33) loads and runs them:
a Flux (RoPE through comfy_kitchen's ``apply_rope``) and a Lumina 2 (q/k norms + RoPE through comfy_kitchen's fused
``rms_rope``), from safetensors files ComfyUI's own loader reads, plain or quantized (``_quantization_metadata``:
fp8, nvfp4, int8 layers, built as ``mixed_precision_ops``), also under ComfyUI's torch.compile wrapper. Each item of a
batch of 3 against the same item sampled alone (``batch_offset``), by its own SHA-256; ComfyUI's KSampler on the same
model is the control (its items differ alone and in a batch on this CPU).

The quantized and comfy_kitchen cases skip where ComfyUI has no ``mixed_precision_ops`` (0.3.64, CI's); the compiled
plain Flux runs there too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings

import pytest
import torch
from _comfy_util import counting_kitchen_calls
from conftest import require_comfyui

require_comfyui()

BATCH = 3


def _newer_comfyui():
    import comfy.ops

    if not hasattr(comfy.ops, "mixed_precision_ops"):
        pytest.skip("this ComfyUI has no mixed_precision_ops (newer than 0.3.64)")
    pytest.importorskip("comfy_kitchen")


def _quantized(sd: dict, fmt: str) -> tuple[dict, dict]:
    """The blocks' linear weights quantized to ``fmt`` by comfy_kitchen's layouts (as ComfyUI's own quantizing nodes
    store them), with the safetensors metadata that tells ComfyUI's loader which layers are quantized."""
    import comfy.quant_ops as q

    if fmt not in q.QUANT_ALGOS:
        pytest.skip(f"this ComfyUI has no {fmt} layers (0.7.0: fp8 and nvfp4 only)")
    layout = q.get_layout_class(q.QUANT_ALGOS[fmt]["comfy_tensor_layout"])
    out, layers = {}, {}
    for k, v in sd.items():
        in_blocks = "blocks." in k or k.startswith(("layers.", "noise_refiner.", "context_refiner."))
        if in_blocks and k.endswith(".weight") and v.dim() == 2 and v.shape[1] % 32 == 0 and v.shape[0] % 16 == 0:
            kw = {"scale": "recalculate"} if fmt in ("float8_e4m3fn", "int8_tensorwise") else {}
            qdata, params = layout.quantize(v.to(torch.bfloat16), **kw)
            name = k[:-len(".weight")]
            out[k], out[f"{name}.weight_scale"] = qdata, params.block_scale if fmt == "nvfp4" else params.scale
            if fmt == "nvfp4":
                out[f"{name}.weight_scale_2"] = params.scale
            layers[name] = {"format": fmt}
        else:
            out[k] = v
    assert layers
    return out, {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}


def _load(tmp_path, family: str, fmt: str, compute: bool = False):
    """The tiny model written as a safetensors file and loaded by ComfyUI's ``load_diffusion_model`` (what the
    "Load Diffusion Model" node calls). ``compute``: the device reported as computing in every quantized format (as a
    GPU that has them), so the layers take their quantized path, not the full-precision one a CPU gets."""
    from unittest import mock

    import comfy.model_management as mm
    import comfy.sd
    import safetensors.torch
    import tiny_models as tm

    sd = tm.flux_state_dict() if family == "flux" else tm.lumina2_state_dict()
    meta = None
    if fmt != "fp32":
        sd, meta = _quantized(sd, fmt)
    path = str(tmp_path / f"{family}_{fmt}.safetensors")
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata=meta)
    with contextlib.ExitStack() as stack:
        stack.enter_context(tm.small_detection())
        if compute:
            for name in ("supports_fp8_compute", "supports_nvfp4_compute", "supports_mxfp8_compute"):
                if hasattr(mm, name):
                    stack.enter_context(mock.patch.object(mm, name, lambda *a, **k: True))
        model = comfy.sd.load_diffusion_model(path)
    if fmt != "fp32":
        quantized = [m for m in model.model.diffusion_model.modules() if getattr(m, "quant_format", None) == fmt]
        assert quantized, "ComfyUI did not load quantized layers"
    return model


def _conds(family: str):
    g = torch.Generator().manual_seed(3)
    if family == "flux":
        c = torch.randn(1, 8, 32, generator=g)
        return ([[c, {"pooled_output": torch.randn(1, 32, generator=g), "guidance": 3.5}]],
                [[torch.zeros_like(c), {"pooled_output": torch.zeros(1, 32), "guidance": 3.5}]])
    c = torch.randn(1, 8, 64, generator=g)
    return [[c, {}]], [[torch.zeros_like(c), {}]]


def _latent(batch: int) -> dict:
    return {"samples": torch.zeros(batch, 16, 8, 8)}


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().contiguous().numpy().tobytes()).hexdigest()


def _det(model, pos, neg, batch, offset=0):
    from jetdet.comfy.nodes import JetDetDeterministicSampler

    return JetDetDeterministicSampler.execute(model, 7, 2, 2.0, "euler", "simple", pos, neg, _latent(batch), 1.0,
                                              offset).args[0]["samples"]


def _stock(model, pos, neg, batch, index=None):
    import nodes

    lat = _latent(batch)
    if index is not None:
        lat["batch_index"] = [index]  # the item's own noise, as in the batch
    return nodes.KSampler().sample(model, 7, 2, 2.0, "euler", "simple", pos, neg, lat, 1.0)[0]["samples"]


def _det_items(model, pos, neg):
    """The batch and, per item, whether its hash equals that of the item sampled alone; no jetdet warning (a
    comfy_kitchen op or a layer not routed would name itself in one)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        full = _det(model, pos, neg, BATCH)
        items = [_sha(full[i]) == _sha(_det(model, pos, neg, 1, offset=i)[0]) for i in range(BATCH)]
    jetdet_warnings = [str(w.message) for w in caught if "jetdet" in str(w.message)]
    assert not jetdet_warnings
    assert torch.isfinite(full).all()
    return full, items


def _stock_items(model, pos, neg):
    full = _stock(model, pos, neg, BATCH)
    return [_sha(full[i]) == _sha(_stock(model, pos, neg, 1, index=i)[0]) for i in range(BATCH)]


@pytest.mark.parametrize("fmt", ["fp32", "float8_e4m3fn", "nvfp4", "int8_tensorwise"])
@pytest.mark.parametrize("family", ["flux", "lumina2"])
def test_small_models_from_quantized_checkpoints_give_each_item_alone_and_in_a_batch(comfy_dir, tmp_path, family,
                                                                                     fmt):
    """ComfyUI 0.33 (and 0.7.0, which has no int8 layers), CPU, fp32 compute: 3 of 3 items equal alone and in the
    batch, no jetdet warning; Lumina 2's fused ``rms_rope`` (0.33) is computed by jetdet's handler. ComfyUI's
    KSampler: 0 of 3 (the control)."""
    import inspect

    import comfy.ldm.lumina.model

    _newer_comfyui()
    model = _load(tmp_path, family, fmt)
    pos, neg = _conds(family)
    counts = {}
    fused = family == "lumina2" and "ck.rms_rope(" in inspect.getsource(comfy.ldm.lumina.model)  # 0.33; not 0.7.0
    with counting_kitchen_calls("rms_rope", counts) if fused else contextlib.nullcontext():
        _, items = _det_items(model, pos, neg)
    assert items == [True] * BATCH
    if fused:
        assert counts.get("rms_rope", 0) > 0
    assert _stock_items(model, pos, neg) != [True] * BATCH  # the control


@pytest.mark.parametrize("fmt", ["nvfp4", "int8_tensorwise"])
def test_quantized_flux_computing_in_its_format_gives_each_item_alone_and_in_a_batch(comfy_dir, tmp_path, fmt):
    """As on a GPU that computes in the format (its layers quantize their input; nvfp4 by the whole batch's maximum):
    in the Deterministic Sampler the layers take ComfyUI's full-precision path, so the items equal alone and in the
    batch, with the same bits as the CPU's own load of the file."""
    _newer_comfyui()
    model = _load(tmp_path, "flux", fmt, compute=True)
    assert not any(m._full_precision_mm for m in model.model.diffusion_model.modules()
                   if getattr(m, "quant_format", None) == fmt)  # ComfyUI's quantized path outside jetdet's calls
    pos, neg = _conds("flux")
    full, items = _det_items(model, pos, neg)
    assert items == [True] * BATCH
    assert torch.equal(full, _det(_load(tmp_path, "flux", fmt), pos, neg, BATCH))
    assert _stock_items(model, pos, neg) != [True] * BATCH  # the control


@pytest.mark.parametrize("fmt", ["fp32", "int8_tensorwise"])
def test_flux_under_comfyuis_torch_compile_gives_each_item_alone_and_in_a_batch(comfy_dir, tmp_path, fmt):
    """ComfyUI's torch.compile wrapper (what its TorchCompileModel node sets; here the ``aot_eager`` backend, which
    needs no C++ compiler) on the tiny Flux. Before: Dynamo failed on Flux's ``theta ** scale`` ("Guard failed on the
    same frame it was created"), and with int8 layers on the ContextVar read of ``_full_precision_mm``. Now the same
    bits as the eager Deterministic Sampler, items equal alone and in a batch; afterwards ComfyUI's KSampler on the
    same compiled model is its own path again (equal to the eager KSampler). The plain Flux runs on 0.3.64 too."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    if fmt != "fp32":
        _newer_comfyui()
    torch._dynamo.reset()
    eager = _load(tmp_path, "flux", fmt)
    compiled = eager.clone()
    set_torch_compile_wrapper(model=compiled, backend="aot_eager")
    pos, neg = _conds("flux")
    try:
        full, items = _det_items(compiled, pos, neg)
        assert items == [True] * BATCH
        assert torch.equal(full, _det(eager, pos, neg, BATCH))
        assert torch.equal(_stock(compiled, pos, neg, BATCH), _stock(eager, pos, neg, BATCH))
    finally:
        torch._dynamo.reset()
