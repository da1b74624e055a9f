"""Helpers shared by the ComfyUI tests (imported after ComfyUI is set up by the ``comfy_dir`` fixture)."""

from __future__ import annotations

import contextlib

import torch

from jetdet.comfy import shapes_model as sm


def empty_latent(batch: int) -> dict:
    return {"samples": torch.zeros(batch, sm.LATENT_CHANNELS, sm.LATENT_SIZE, sm.LATENT_SIZE)}


def det_sample(model, pos, neg, batch, sampler="euler", steps=4, seed=7, offset=0, cfg=4.0, scheduler="simple"):
    from jetdet.comfy.nodes import JetDetDeterministicSampler

    out, sums, fp = JetDetDeterministicSampler.execute(model, seed, steps, cfg, sampler, scheduler, pos, neg,
                                                       empty_latent(batch), 1.0, offset).args
    return out["samples"], sums


def items_equal_to_singles(model, pos, neg, sampler, batch=4, **kw) -> list[bool]:
    """Item i of a batch against a batch-1 run with batch_offset=i, bitwise."""
    full, _ = det_sample(model, pos, neg, batch, sampler, **kw)
    return [torch.equal(full[i], det_sample(model, pos, neg, 1, sampler, offset=i, **kw)[0][0]) for i in range(batch)]


def stock_ksampler(model, pos, neg, latent, sampler="euler", steps=4, seed=7, cfg=4.0, scheduler="simple"):
    """ComfyUI's own KSampler node (noise from comfy.sample.prepare_noise, honouring latent['batch_index'])."""
    import nodes

    return nodes.KSampler().sample(model, seed, steps, cfg, sampler, scheduler, pos, neg, latent, 1.0)[0]["samples"]


@contextlib.contextmanager
def no_free_memory():
    """ComfyUI sees no free memory: cond and uncond run as separate model calls, and its CPU attention would cut
    keys into the smallest chunks."""
    import comfy.model_management as mm

    orig = mm.get_free_memory

    def none_free(dev=None, torch_free_too=False):
        return (0, 0) if torch_free_too else 0

    mm.get_free_memory = none_free
    try:
        yield
    finally:
        mm.get_free_memory = orig


class CallLog:
    """An APPLY_MODEL wrapper recording the batch size of every model call."""

    def __init__(self):
        self.sizes = []

    def __call__(self, executor, *args, **kwargs):
        self.sizes.append(int(args[0].shape[0]))
        return executor(*args, **kwargs)


def with_call_log(model):
    import comfy.patcher_extension as pe

    m = model.clone()
    log = CallLog()
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test.calllog", log)
    return m, log
