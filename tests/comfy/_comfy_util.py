"""Helpers shared by the ComfyUI tests (imported after ComfyUI is set up by the ``comfy_dir`` fixture)."""

from __future__ import annotations

import contextlib
import inspect

import torch

from jetdet.comfy import shapes_model as sm


def empty_latent(batch: int) -> dict:
    return {"samples": torch.zeros(batch, sm.LATENT_CHANNELS, sm.LATENT_SIZE, sm.LATENT_SIZE)}


def det_sample(model, pos, neg, batch, sampler="euler", steps=4, seed=7, offset=0, cfg=4.0, scheduler="simple",
               denoise=1.0):
    from jetdet.comfy.nodes import JetDetDeterministicSampler

    out, sums, fp = JetDetDeterministicSampler.execute(model, seed, steps, cfg, sampler, scheduler, pos, neg,
                                                       empty_latent(batch), denoise, offset).args
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


class FakeServer:
    """What ComfyUI's PromptExecutor needs of its server when it runs in-process: it records the messages."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))


_NODES_READY = False


def load_node_packs(repo_root) -> None:
    """ComfyUI's built-in extra nodes and jetdet loaded as a custom node (from the repository's root __init__.py),
    once per session."""
    global _NODES_READY
    if _NODES_READY:
        return
    import asyncio

    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    assert asyncio.run(nodes.load_custom_node(str(repo_root))), "ComfyUI failed to load jetdet as a custom node"
    _NODES_READY = True


class Engine:
    """ComfyUI's execution engine in-process, with one ``PromptExecutor`` kept across prompts (its output cache
    included, as the server keeps one): ``cache_type`` ``execution.CacheType.LRU`` with ``cache_size`` is the
    server's ``--cache-lru``."""

    def __init__(self, cache_type=False, cache_size=None):
        import execution

        self.server = FakeServer()
        if "cache_args" in inspect.signature(execution.PromptExecutor.__init__).parameters:  # newer ComfyUI (0.33)
            args = {"cache_args": {"lru": cache_size or 0, "ram": 0, "ram_inactive": 0}}
        else:
            args = {"cache_size": cache_size}
        self.executor = execution.PromptExecutor(self.server, cache_type=cache_type, **args)

    def run(self, prompt: dict) -> dict:
        """Validate and execute an API-format prompt (a copy: ComfyUI writes into the prompt it runs).

        Returns ``{"valid", "error", "node_errors", "success", "messages", "outputs", "cached", "sent"}``; a failed
        validation is returned the way the server's ``/prompt`` answers it (``error`` + ``node_errors``), a runtime
        failure as ComfyUI's ``execution_error`` message. ``cached``: the nodes served from the cache; ``sent``:
        what went to the browser only (such as a node blocked by an ``ExecutionBlocker``)."""
        import asyncio
        import copy
        import uuid

        import execution

        prompt = copy.deepcopy(prompt)
        pid = str(uuid.uuid4())
        valid = asyncio.run(execution.validate_prompt(pid, prompt, None))
        if not valid[0]:
            return {"valid": False, "error": valid[1], "node_errors": valid[3], "success": False, "messages": [],
                    "outputs": {}, "cached": [], "sent": []}
        ex, start = self.executor, len(self.server.messages)
        ex.success = True
        ex.execute(prompt, pid, {}, valid[2])
        msgs = ex.status_messages
        cached = [n for event, data in msgs if event == "execution_cached" for n in data["nodes"]]
        return {"valid": True, "error": None, "node_errors": {}, "success": ex.success, "messages": msgs,
                "outputs": getattr(ex, "history_result", {}).get("outputs", {}), "cached": cached,
                "sent": self.server.messages[start:]}


def run_prompt(prompt: dict) -> dict:
    """Validate and execute an API-format prompt with ComfyUI's own execution engine, in-process, with a fresh
    cache (see :meth:`Engine.run`)."""
    return Engine().run(prompt)


def execution_error(result: dict) -> dict | None:
    for event, data in result["messages"]:
        if event == "execution_error":
            return data
    return None


@contextlib.contextmanager
def counting_kitchen_calls(op_name: str, counts: dict):
    """Count the calls that jetdet's router hands to its handler of ``torch.ops.comfy_kitchen.<op_name>``."""
    import sys

    from jetdet.comfy import kitchen

    kitchen.install()
    table = sys.modules["jetdet.mode"]._HANDLERS
    packet = getattr(torch.ops.comfy_kitchen, op_name)
    saved = {f: table[f] for f in (packet, *(getattr(packet, o) for o in packet.overloads())) if f in table}
    assert saved, f"comfy_kitchen's {op_name} is not routed"

    def counted(handler):
        def run(func, args, kwargs):
            counts[op_name] = counts.get(op_name, 0) + 1
            return handler(func, args, kwargs)
        return run

    table.update({f: counted(h) for f, h in saved.items()})
    try:
        yield
    finally:
        table.update(saved)
