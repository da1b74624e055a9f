"""Which torch functions ComfyUI's models call in deterministic mode, found by running them (SD3's MMDiT, Wan 2.1,
the SD1.5 UNet, HunyuanVideo): every one is routed to a batch-invariant op or is exact per element (elementwise
math, views, shape and creation ops). A function outside both lists fails the test, so a ComfyUI update that brings
in, say, an unrouted reduction is caught here instead of silently breaking the guarantee."""

from __future__ import annotations

import collections
import sys

import pytest
import torch
from conftest import require_comfyui
from torch.overrides import TorchFunctionMode

require_comfyui()
import comfy.sample
import tiny_models as tm

import jetdet.mode  # noqa: F401
from jetdet.comfy import shapes_model as sm
from jetdet.comfy import wrappers as wr

ROUTER = sys.modules["jetdet.mode"]

# exact per element whatever the batch: elementwise arithmetic and activations, views and layout, creation,
# indexing, comparisons, dtype/device moves, and Python-level tensor protocol calls (pow is not: on an AMD EPYC
# most exponents computed a tensor's last elements another way, so it is routed now, as rsqrt and exp2 are)
EXACT = {
    "Tensor.__len__", "Tensor.__rsub__", "Tensor.__rdiv__", "Tensor.unflatten",
    "TensorBase.__bool__", "TensorBase.__float__", "TensorBase.__getitem__", "TensorBase.__setitem__",
    "TensorBase.add", "TensorBase.add_", "TensorBase.addcmul_", "TensorBase.sub", "TensorBase.mul", "TensorBase.div",
    "TensorBase.div_", "TensorBase.neg", "TensorBase.abs", "TensorBase.log", "TensorBase.gt",
    "TensorBase.argmin", "TensorBase.chunk", "TensorBase.unbind", "TensorBase.narrow", "TensorBase.contiguous",
    "TensorBase.detach", "TensorBase.element_size", "TensorBase.flatten", "TensorBase.float", "TensorBase.type",
    "TensorBase.type_as", "TensorBase.is_floating_point", "TensorBase.movedim", "TensorBase.new_ones",
    "TensorBase.numel", "TensorBase.permute", "TensorBase.repeat", "TensorBase.reshape", "TensorBase.size",
    "TensorBase.to", "TensorBase.transpose", "TensorBase.unsqueeze", "TensorBase.view",
    "_VariableFunctionsClass._has_compatible_shallow_copy_type", "_VariableFunctionsClass.addcmul",
    "_VariableFunctionsClass.arange", "_VariableFunctionsClass.cat", "_VariableFunctionsClass.stack",
    "_VariableFunctionsClass.cos", "_VariableFunctionsClass.sin", "_VariableFunctionsClass.exp",
    "_VariableFunctionsClass.sqrt", "_VariableFunctionsClass.outer",
    "_VariableFunctionsClass.linspace", "_VariableFunctionsClass.count_nonzero", "_VariableFunctionsClass.empty",
    "_VariableFunctionsClass.ones_like", "_VariableFunctionsClass.zeros", "_VariableFunctionsClass.zeros_like",
    "_VariableFunctionsClass.randn", "_parse_to", "_set_grad_enabled", "device", "dropout", "gelu", "silu", "pad",
    "getset_descriptor.__get__", "getset_descriptor.__set__",
    "TensorBase.dim", "TensorBase.expand", "_VariableFunctionsClass.unsqueeze",
    "_VariableFunctionsClass.is_floating_point", "split",
    # LTX-Video's positions and RoPE frequencies (the method forms of sin/cos: the same kernels as torch.sin/cos, exact
    # per element on an AMD EPYC with AVX-512, items of sizes 1-79 alone and after 1-64 other elements, fp32/bf16/fp16)
    "meshgrid", "_VariableFunctionsClass.tensor", "TensorBase.cos", "TensorBase.sin", "TensorBase.repeat_interleave",
}


def _name(func) -> str:
    """A custom op by its namespace and name (``comfy_kitchen.apply_rope``), anything else by its qualified name."""
    if isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(func).removesuffix(".default")
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", str(func))


def _exact(name: str) -> bool:
    """In :data:`EXACT`, or one of comfy_kitchen's ops that jetdet lets pass as exact per element (newer ComfyUI calls
    them from its models: Flux's and HunyuanVideo's RoPE through ``apply_rope``)."""
    from jetdet.comfy import kitchen

    ns, _, op = name.partition(".")
    return name in EXACT or (ns == "comfy_kitchen" and op.split(".")[0] in kitchen._ALLOWED)


class Spy(TorchFunctionMode):
    """Records every torch function the router does not route (pushed inside the router, so it sees them first)."""

    def __init__(self):
        super().__init__()
        self.seen = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func not in ROUTER._HANDLERS:
            self.seen[_name(func)] += 1
        return func(*args, **(kwargs or {}))


class SpyWrapper:
    def __init__(self):
        self.spy = Spy()

    def __call__(self, executor, *args, **kwargs):
        with self.spy:
            return executor(*args, **kwargs)


def audit(model, shape, pos, neg) -> collections.Counter:
    import comfy.patcher_extension as pe

    m = wr.with_deterministic(model)
    sw = SpyWrapper()
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "jetdet.test.spy", sw)  # inside the deterministic wrapper
    comfy.sample.sample(m, torch.randn(shape), 2, 4.0, "euler", "simple", pos, neg, torch.zeros(shape),
                        disable_pbar=True, seed=1)
    return sw.spy.seen


CASES = {
    "sd3": (lambda: sm.load_model(), (2, 16, 32, 32), lambda: (sm.class_conditioning(1), sm.null_conditioning())),
    "wan21": (lambda: tm.load(tm.wan21_state_dict()), (1, 16, 1, 8, 8),
              lambda: ([[torch.randn(1, 6, 4096) * 0.1, {}]], [[torch.zeros(1, 6, 4096), {}]])),
    "sd15": (lambda: tm.load(tm.sd15_state_dict()), (1, 4, 8, 8),
             lambda: ([[torch.randn(1, 77, 768) * 0.1, {}]], [[torch.zeros(1, 77, 768), {}]])),
    "wan22": (lambda: tm.load(tm.wan22_state_dict()), (1, 48, 2, 4, 4),
              lambda: ([[torch.randn(1, 6, 4096) * 0.1, {}]], [[torch.zeros(1, 6, 4096), {}]])),
    # its blocks' RMS-norm adaptive layer norm is comfy_kitchen's fused rms_adaln in newer ComfyUI (0.33)
    "ltxv": (lambda: tm.load(tm.ltxv_state_dict()), (1, 128, 2, 4, 4),
             lambda: ([[torch.randn(1, 6, 4096) * 0.1, {"attention_mask": torch.ones(1, 6, dtype=torch.long)}]],
                      [[torch.zeros(1, 6, 4096), {"attention_mask": torch.ones(1, 6, dtype=torch.long)}]])),
    # pools its text tokens with sum (routed since; an unrouted reduction inside one item before)
    "hunyuan_video": (lambda: tm.load(tm.hunyuan_video_state_dict()), (1, 16, 2, 4, 4),
                      lambda: ([[torch.randn(1, 8, 32) * 0.5, {"pooled_output": torch.randn(1, 768) * 0.1}]],
                               [[torch.zeros(1, 8, 32), {"pooled_output": torch.zeros(1, 768)}]])),
}


@pytest.mark.filterwarnings("error:jetdet deterministic mode")  # a fallback is a failure here
@pytest.mark.parametrize("name", sorted(CASES))
def test_every_call_is_routed_or_exact_per_element(comfy_dir, name):
    make, shape, conds = CASES[name]
    seen = audit(make(), shape, *conds())
    unknown = {f: n for f, n in seen.items() if not _exact(f)}
    assert not unknown, (f"{name}: torch functions neither routed by jetdet nor known to be exact per element: "
                         f"{unknown}; route them (jetdet/mode.py) or, if exact per element, add them to EXACT")


def test_the_audit_catches_an_unrouted_reduction(comfy_dir):
    # negative control: a model call that integrates over a row with torch.trapezoid (a sum jetdet neither routes
    # nor names in a warning) is reported
    spy = Spy()
    with jetdet_det(), spy:
        torch.trapezoid(torch.randn(4, 8), dim=-1)
    name = "_VariableFunctionsClass.trapezoid"
    assert name in spy.seen and name not in EXACT


def jetdet_det():
    import jetdet

    return jetdet.mode("deterministic")
