"""The op this folder serves, ``jetdet::gelu_gate``, and its public wrapper ``jetdet.ops.gelu_gate``."""

from __future__ import annotations

import torch

from jetdet.ops._checks import check_tensor
from jetdet.ops.spec import OpSpec

from . import reference as R
from . import torch_path as T

APPROXIMATIONS = ("none", "tanh")


def gelu_gate(input: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """Gated GELU (GEGLU): ``x * F.gelu(gate, approximate=approximate)`` with ``x, gate = input.chunk(2, -1)``.

    ``input [..., 2H]`` (fp32/fp16/bf16) -> ``[..., H]`` in ``input.dtype``, computed in fp32 and rounded once.
    Batch invariant: an element's result depends only on its own ``x`` and ``gate``."""
    check_tensor("input", input, min_ndim=1)
    if input.shape[-1] % 2:
        raise ValueError(f"input: expected an even last dim ([..., 2H]: x then gate), got shape "
                         f"{tuple(input.shape)}")
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate: expected one of {APPROXIMATIONS}, got {approximate!r}")
    if input.numel() == 0:
        return input.new_empty(*input.shape[:-1], input.shape[-1] // 2)
    return _op()(input, approximate)


def _op():
    from jetdet.ops import registry

    return registry.get("gelu_gate")


def _triton(h, approximate):
    from . import launch

    return launch.gelu_gate(h, approximate)


def _sample(batch, dtype, gen):
    return (torch.randn(batch, 5, 2 * 72, generator=gen).to(dtype) * 3, "tanh")


SPECS = (
    OpSpec(name="gelu_gate", schema="(Tensor h, str approximate) -> Tensor",
           fake=lambda h, approximate: h.new_empty(*h.shape[:-1], h.shape[-1] // 2), torch_path=T.gelu_gate,
           launcher=_triton, reference=R.gelu_gate_reference, folder="gelu_gate", sample=_sample,
           public="gelu_gate", wrapper=gelu_gate),
)
