"""One model evaluation, as the step-cache controller sees it.

The patcher's adapters (plain torch, diffusers) turn a ``forward(*args, **kwargs)`` call, and the ComfyUI
nodes' wrapper (:mod:`jetdet.comfy.wrappers`) an ``apply_model`` call, into a :class:`ModelCall`: the latent,
the per-row timestep, and a ``run(rows)`` function that evaluates the original model on a subset of the batch
rows (row compaction). The controller decides per row whether to
run the model or forecast the output, calls ``run`` once with the rows that need it, and returns the full
``[B, ...]`` output; the adapter packs it into the model's own return type. An adapter that knows the model's
block list also passes ``blocks`` (:mod:`jetdet.patch.blocks`), through which the controller runs rows *partly*:
the first block(s) and the tail for every row it runs, the rest only where its forecast would miss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class ModelCall:
    x: torch.Tensor
    """The latent / noisy sample, batch first ``[B, ...]``."""
    t: torch.Tensor
    """Per-row timestep or sigma, float ``[B]`` on ``x.device`` (a scalar timestep is broadcast)."""
    run: Callable[[torch.Tensor | None], torch.Tensor]
    """``run(rows)`` evaluates the original model on ``rows`` (a LongTensor of row indices, or None for
    all rows) and returns its output tensor for those rows, ``[len(rows), ...]``."""
    model_id: int = 0
    """Identity of the model being evaluated (``id`` of the module): a change resets cached state."""
    cond: torch.Tensor | None = None
    """Optional per-row conditioning summary ``[B, ...]`` (e.g. class labels, or a pooled text embedding)
    that lets the controller tell CFG branches apart when they share a batch. May be None."""
    extra: dict = field(default_factory=dict)
    """Adapter-specific facts for logs (e.g. which argument was the latent; ``"blocks"``: why there is no block
    runner)."""
    flow_x: torch.Tensor | None = None
    """Optional: the latent in flow form ``[B, ...]``, for a call whose ``t`` is flow time in ``[0, 1]`` (the latent
    is ``(1 − t)·x0 + t·noise``) and whose output is the flow velocity ``noise − x0``, so that the model's denoised
    estimate is ``flow_x − t·output``. Read only by a controller with ``forecast_space="x0"``, which forecasts that
    estimate instead of the output (for samplers that add noise every step)."""
    blocks: object | None = None
    """Optional block-level access for partial rows (block-level and token-level reuse): an object with
    ``num_blocks``, ``head``, ``tail``, ``residual``, ``describe`` and ``run(rows, plan) -> (output, split_done)``;
    :mod:`jetdet.patch.blocks` documents the protocol and implements it for any model whose forward calls a
    list of block modules (``jetdet.patch.blocks.BlockHooks``). ``None``: the controller skips whole calls
    only."""

    @property
    def batch(self) -> int:
        return self.x.shape[0]
