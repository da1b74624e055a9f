"""Deterministic forwards for the supported leaf layers, installed per instance by ``jetdet.patch``."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _call(func, *args):
    """The torch call ``func(*args)`` as deterministic mode's router takes it: jetdet's op where it takes the
    arguments, else torch's ``func`` with the router's one-time fallback warning (a float64 model, say); under
    ``torch.autocast``, the inputs cast by autocast's policy for ``func`` first. A patched layer calls it directly,
    inside or outside a deterministic context. Inside one, the call goes through this thread's router, so that the
    body's own torch calls run below it, as for the model's functional calls."""
    from ..mode import _route, _routes_here

    if not torch.compiler.is_compiling() and _routes_here():
        return func(*args)
    return _route(func, args, {})


def _linear(self, input):
    return _call(F.linear, input, self.weight, self.bias)


def _conv2d(self, input):
    return _call(F.conv2d, input, self.weight, self.bias, self.stride, self.padding, self.dilation,
                 self.groups)


def _layer_norm(self, input):
    return _call(F.layer_norm, input, self.normalized_shape, self.weight, self.bias, self.eps)


def _group_norm(self, input):
    return _call(F.group_norm, input, self.num_groups, self.weight, self.bias, self.eps)


def _rms_norm(self, input):
    return _call(F.rms_norm, input, self.normalized_shape, self.weight, self.eps)


def deterministic_forward(module: nn.Module):
    """The jetdet forward for ``module``, or None when it is not a supported layer (the reason is then
    given by :func:`unsupported_reason`)."""
    if unsupported_reason(module) is not None:
        return None
    if type(module) is nn.Linear:
        return _linear
    if type(module) is nn.Conv2d:
        return _conv2d
    if type(module) is nn.LayerNorm:
        return _layer_norm
    if type(module) is nn.GroupNorm:
        return _group_norm
    if hasattr(nn, "RMSNorm") and type(module) is nn.RMSNorm:
        return _rms_norm
    return None


SUPPORTED = ("Linear", "Conv2d", "LayerNorm", "GroupNorm", "RMSNorm")


def unsupported_reason(module: nn.Module) -> str | None:
    cls = type(module)
    if cls.__name__ in SUPPORTED and cls is not getattr(nn, cls.__name__, None):
        # a class of the same name from elsewhere (ComfyUI's comfy.ops layers, a library's own Linear): its forward
        # may cast or patch weights, so it keeps it, and the router takes its torch calls
        return f"{cls.__module__}.{cls.__qualname__}, not torch's: its own forward runs under the router"
    if type(module) is nn.Conv2d:
        if module.groups != 1:
            return f"groups={module.groups}"
        if tuple(module.dilation) != (1, 1):
            return f"dilation={module.dilation}"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
        if isinstance(module.padding, str) and module.padding == "same" and (
            tuple(module.stride) != (1, 1) or any(k % 2 == 0 for k in module.kernel_size)
        ):
            return "padding='same' with stride > 1 or an even kernel"
    return None
