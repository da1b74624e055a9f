"""Adapters: how jetdet finds the latent and timestep in a model's forward, runs it on a subset of rows,
and packs an output back into the model's own return type.

* :class:`TorchAdapter` for plain ``nn.Module`` denoisers ``forward(x, t, ...)``.
* :class:`DiffusersAdapter` for diffusers ``ModelMixin`` models (``FluxTransformer2DModel``,
  ``SD3Transformer2DModel``, ``UNet2DConditionModel``, ``DiTTransformer2DModel``, ...), which return a
  ``Transformer2DModelOutput``/``UNet2DConditionOutput`` or a tuple when ``return_dict=False``.

ComfyUI models are not patched here: the jetdet ComfyUI nodes wrap a ``ModelPatcher``'s ``apply_model``
(:meth:`jetdet.comfy.wrappers.FastState.apply_model`), which produces the same :class:`ModelCall`. It sets no
``ModelCall.blocks``, so the controller skips whole calls only there; block-level reuse would need a
:class:`jetdet.patch.blocks.BlockHooks` built on the model's block list (``BlockSplit`` takes any list of modules
in execution order, e.g. ComfyUI's ``joint_blocks`` or ``double_blocks`` + ``single_blocks``).
"""

from __future__ import annotations

import inspect
import sys
import warnings

import torch

from .._paths import user_stacklevel
from .call import ModelCall

LATENT_NAMES = ("x", "sample", "hidden_states", "latent", "latents", "x_t", "noisy", "z")
TIMESTEP_NAMES = ("t", "timestep", "timesteps", "sigma", "sigmas", "time")
COND_NAMES = ("y", "class_labels", "labels", "pooled_projections", "encoder_hidden_states", "context", "cond")
#: arguments whose batch is their second dim: HiDream's per-layer Llama features ``[layers, B, L, D]``
BATCH_DIM1_ARGS = ("encoder_hidden_states_llama3",)
_warned_layout: set = set()


class UnsupportedModelError(TypeError):
    """Raised by ``jetdet.patch`` when it cannot find what it needs in a model; the message lists what it found."""


def _is_diffusers(model) -> bool:
    return any(c.__module__.startswith("diffusers.") and c.__name__ == "ModelMixin" for c in type(model).__mro__)


class TorchAdapter:
    kind = "torch"
    #: argument names that are never batch-aligned even if their first dim equals the batch size
    no_batch: tuple[str, ...] = ()

    def __init__(self, model, forward, latent_arg=None, timestep_arg=None):
        self.model = model
        self.forward = forward
        self.sig = inspect.signature(forward)
        params = [p for p in self.sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        names = [p.name for p in params]
        self.latent = self._pick("latent_arg", latent_arg, names, LATENT_NAMES, default=names[0] if names else None)
        self.timestep = self._pick("timestep_arg", timestep_arg, names, TIMESTEP_NAMES)
        if self.latent is None or self.timestep is None:
            raise UnsupportedModelError(
                f"jetdet.patch(mode='fast'): cannot find the latent and timestep arguments of "
                f"{type(model).__name__}.forward{self.sig}; found parameters {names}. Expected a latent named "
                f"one of {LATENT_NAMES} (or the first parameter) and a timestep named one of {TIMESTEP_NAMES}; "
                f"pass latent_arg=/timestep_arg= to name them."
            )
        self.cond_names = [n for n in COND_NAMES if n in names]
        self._container = None
        self._output_cls = None  # the output class of the last call that returned one (diffusers' return_dict=True)
        self.hooks = None  # jetdet.patch.blocks.BlockHooks when block-level reuse is on
        self.param = None  # jetdet.patch.prediction.VPParametrization for a VP (eps/v/sample) model
        self.blocks_reason = "no block list"

    @staticmethod
    def _pick(option, given, names, candidates, default=None):
        if given is not None:
            if given not in names:
                raise ValueError(f"{option}: {given!r} is not a parameter of forward; parameters are {names}")
            return given
        for c in candidates:
            if c in names:
                return c
        return default

    # ----------------------------------------------------------------------------------- binding
    def bind(self, args, kwargs):
        """``(call, finish)``: the :class:`ModelCall` of one forward, and ``finish(output)``, which turns the
        controller's ``[B, ...]`` output into the model's (the identity unless :attr:`param` maps it)."""
        ba = self.sig.bind(*args, **kwargs)
        a = ba.arguments
        x = a.get(self.latent)
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise TypeError(f"{self.latent}: expected the latent as a batch-first tensor, got {type(x).__name__}")
        bsz = x.shape[0]
        t = self._timestep_tensor(a.get(self.timestep), bsz, x.device)
        cond = None
        for n in self.cond_names:
            c = a.get(n)
            if isinstance(c, torch.Tensor) and c.dim() >= 1 and c.shape[0] == bsz:
                cond = c
                break

        whole = bsz > 1 and self._unsliceable(a, bsz)  # no call on some rows only (see _unsliceable)

        def run(rows):
            if rows is not None and whole:  # every row runs; the asked-for ones are returned
                out = self._unpack(self.forward(*ba.args, **ba.kwargs))
                return out.index_select(0, rows.to(out.device))
            sub = inspect.BoundArguments(self.sig, self._slice_arguments(dict(a), bsz, rows))
            return self._unpack(self.forward(*sub.args, **sub.kwargs))

        finish = _identity
        if self.param is not None:  # a VP model: the controller sees the flow model it is equivalent to
            x, t, run, finish = self.param.wrap(x, t, run)
        reason = ("an argument's batch is not its first dim: whole calls only" if whole and self.hooks is not None
                  else self.blocks_reason)
        extra = {"latent_arg": self.latent, "timestep_arg": self.timestep, "blocks": reason,
                 "needs_grad": torch.is_grad_enabled() and (any(_needs_grad(v) for v in a.values())
                                                             or _params_need_grad(self.model))}
        call = ModelCall(x=x, t=t, run=run, model_id=id(self.model), cond=cond, extra=extra,
                         # block-level reuse plans per row, which a call that must run every row cannot follow
                         blocks=self.hooks.runner(run) if self.hooks is not None and not whole else None,
                         flow_x=x if self.param is not None else None)  # a VP model's call is in flow form
        return call, finish

    def _timestep_tensor(self, t, bsz, device):
        if isinstance(t, torch.Tensor):
            t = t.to(device=device, dtype=torch.float32)
            if t.dim() == 0 or t.numel() == 1:
                return t.reshape(1).expand(bsz)
            if t.shape[0] != bsz:
                raise ValueError(f"{self.timestep}: expected a scalar or {bsz} values (one per row), "
                                 f"got shape {tuple(t.shape)}")
            return t.reshape(bsz)
        if isinstance(t, (int, float)):
            return torch.full((bsz,), float(t), device=device)
        raise TypeError(f"{self.timestep}: expected a tensor or a number, got {type(t).__name__}")

    def _slice_arguments(self, a, bsz, rows):
        if rows is None:
            return a
        for k, v in a.items():
            if k in self.no_batch:
                continue
            if k in BATCH_DIM1_ARGS and isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == bsz:
                a[k] = v.index_select(1, rows.to(v.device))
            else:
                a[k] = _slice(v, bsz, rows)
        return a

    def _unsliceable(self, a, bsz) -> bool:
        """Whether an argument holds a tensor of 3 or more dims whose first dim is neither the batch nor 1 (shared by
        the rows) and a later one is the batch (per-layer features stacked in front of the batch, say): which dim is
        the batch is not known, so such a call cannot run on some rows only, nor partly (block-level reuse); once per
        argument name, a warning says why it saves less."""
        for k, v in a.items():
            if k in self.no_batch or k in BATCH_DIM1_ARGS or k == self.latent:
                continue
            for leaf in _tensor_leaves(v):
                if leaf.dim() >= 3 and leaf.shape[0] not in (1, bsz) and bsz in leaf.shape[1:]:
                    key = (type(self.model).__name__, k)
                    if key not in _warned_layout:
                        _warned_layout.add(key)
                        warnings.warn(
                            f"jetdet.patch(mode='fast'): {type(self.model).__name__}'s argument {k!r} has shape "
                            f"{tuple(leaf.shape)}, whose batch ({bsz}) is not its first dim; a call that must compute "
                            "some rows computes all of them (correct, but it saves only whole calls)",
                            stacklevel=user_stacklevel(sys.modules.get("diffusers")))
                    return True
        return False

    # ----------------------------------------------------------------------------------- outputs
    def _unpack(self, out):
        if isinstance(out, torch.Tensor):
            self._container = ("tensor", None)
            return out
        if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor) and not hasattr(out, "keys"):
            self._container = ("tuple", len(out))
            if len(out) != 1:
                raise UnsupportedModelError(
                    f"jetdet.patch(mode='fast'): forward returned a tuple of {len(out)} items; the step cache "
                    "handles one output tensor"
                )
            return out[0]
        sample = getattr(out, "sample", None)
        if isinstance(sample, torch.Tensor):
            self._container = ("output", type(out))
            self._output_cls = type(out)
            return sample
        raise UnsupportedModelError(
            f"jetdet.patch(mode='fast'): forward returned {type(out).__name__}; expected a tensor, a 1-tuple or "
            "an output object with a .sample tensor"
        )

    def pack(self, tensor, call_kwargs):
        """The model's own return type for this call: what its last computed call returned, except that a forward
        with ``return_dict`` (diffusers) returns what this call's ``return_dict`` asks for, also when every row was
        forecast."""
        kind, info = self._container or ("tensor", None)
        p = self.sig.parameters.get("return_dict")
        if p is not None and kind != "tensor":
            if not call_kwargs.get("return_dict", p.default is not False):
                return (tensor,)
            if self._output_cls is not None:
                return self._output_cls(sample=tensor)
        if kind == "tensor":
            return tensor
        if kind == "tuple":
            return (tensor,)
        return info(sample=tensor)


def _params_need_grad(model) -> bool:
    """Whether a parameter of ``model`` requires grad: with gradients on, its output's graph then reaches the weights
    (a loss through sampling that trains the model), which a forecast output would cut."""
    return isinstance(model, torch.nn.Module) and any(p.requires_grad for p in model.parameters())


def _needs_grad(v) -> bool:
    """Whether an argument holds a tensor that requires grad (also inside lists, tuples and dicts)."""
    if isinstance(v, torch.Tensor):
        return v.requires_grad
    if isinstance(v, (list, tuple)):
        return any(_needs_grad(e) for e in v)
    if isinstance(v, dict):
        return any(_needs_grad(e) for e in v.values())
    return False


def _identity(out):
    return out


def _slice(v, bsz, rows):
    if isinstance(v, torch.Tensor):
        if v.dim() >= 1 and v.shape[0] == bsz:
            return v.index_select(0, rows.to(v.device))
        return v
    if isinstance(v, (list, tuple)) and v and all(isinstance(e, torch.Tensor) for e in v):
        return type(v)(_slice(e, bsz, rows) for e in v)
    if isinstance(v, dict):  # e.g. SDXL's added_cond_kwargs {"text_embeds": [B, D], "time_ids": [B, 6]}
        return {k: _slice(e, bsz, rows) for k, e in v.items()}
    return v


def _tensor_leaves(v):
    if isinstance(v, torch.Tensor):
        yield v
    elif isinstance(v, (list, tuple)):
        for e in v:
            yield from _tensor_leaves(e)
    elif isinstance(v, dict):
        for e in v.values():
            yield from _tensor_leaves(e)


class DiffusersAdapter(TorchAdapter):
    kind = "diffusers"
    # positional ids shared by all rows ([N, 3] in current diffusers) are never sliced
    no_batch = ("img_ids", "txt_ids", "attention_kwargs", "joint_attention_kwargs", "cross_attention_kwargs")

    def __init__(self, model, forward, latent_arg=None, timestep_arg=None):
        super().__init__(model, forward, latent_arg, timestep_arg)


def make_adapter(model, forward, latent_arg=None, timestep_arg=None):
    cls = DiffusersAdapter if _is_diffusers(model) else TorchAdapter
    return cls(model, forward, latent_arg=latent_arg, timestep_arg=timestep_arg)
