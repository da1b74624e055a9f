"""Opt-in, exact: a SANA model's own linear attention through :func:`jetdet.ops.linear_attention`.

``jetdet.patch(model, mode="fast", sana_linear_attention=True)`` gives every diffusers ``Attention`` module whose
processor is diffusers' ``SanaLinearAttnProcessor2_0`` (or one of its PAG variants, which ``SanaPAGPipeline`` sets
for the length of a call) an instance ``forward`` that computes what that processor computes, with the attention
itself (``relu`` feature map, fp32 math, ``1e-15`` added to the denominator) as one ``jetdet.ops.linear_attention``
call: the Triton kernel on CUDA, its torch path on CPU. It is not an approximation: the same math, summed in
another order (``tests/test_patch_sana.py`` compares it with diffusers' processor).

What the processor does, and so what this does (diffusers 0.42, ``attention_processor.py``):
q, k, v from ``to_q``/``to_k``/``to_v`` (k and v from ``encoder_hidden_states`` when given), ``norm_q``/``norm_k``
where the module has them (not in the PAG variants), split into ``attn.heads`` heads, relu on q and k, everything
in fp32, ``out = relu(q)(relu(k)ᵀv) / (relu(q)·Σrelu(k) + 1e-15)``, cast to the input's dtype, ``to_out[0]``,
``to_out[1]``, and for fp16 a clip to ±65504. The attention mask is ignored, as the processor ignores it.

The processor is looked up at every call, so a processor set after the patch (``set_attn_processor``, a PAG
pipeline's) is what runs: one of the three classes above through jetdet, anything else as diffusers runs it.
Calls it does not take run diffusers' own code unchanged and are counted in ``stats()["sana_linear_attention"]``:
extra keyword arguments (diffusers warns about and drops them), head dims over ``jetdet.ops.fast.MAX_HEAD_DIM``,
query and key head dims that differ, an ``encoder_hidden_states`` of another batch size (one row for all, which
the processor broadcasts), no tokens, fewer rows than a PAG processor's chunks.

Off by default: on CPU the op's torch path (row-tiled for batch invariance) is not faster than the processor's two
``torch.matmul`` calls (``python bench/sana_linear_attention.py``), and no GPU has timed the kernel on SANA's
shapes yet.
"""

from __future__ import annotations

import threading

import torch

from ..ops.fast import MAX_HEAD_DIM

#: diffusers' processors for SANA's linear attention, by class name (diffusers.models.attention_processor)
PROCESSORS = ("SanaLinearAttnProcessor2_0", "PAGCFGSanaLinearAttnProcessor2_0", "PAGIdentitySanaLinearAttnProcessor2_0")
EPS = 1e-15  # what the processors add to the denominator


def parse_option(value) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"sana_linear_attention: expected True or False (route SANA's own linear attention, diffusers' "
                     f"SanaLinearAttnProcessor2_0, through jetdet.ops.linear_attention), got {value!r}")


def _classes() -> dict:
    """The processor classes by type (exact types: a subclass may compute something else)."""
    try:
        from diffusers.models import attention_processor as ap
    except Exception:  # noqa: BLE001 - no diffusers (or a broken one): no model of it to route
        return {}
    return {getattr(ap, n): n for n in PROCESSORS if isinstance(getattr(ap, n, None), type)}


def _attention(attn, hidden_states: torch.Tensor, encoder_hidden_states, norms: bool):
    """The processors' linear attention through ``to_out``, or why the call does not fit the op (a str)."""
    original_dtype = hidden_states.dtype
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    query = attn.to_q(hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)
    if norms and attn.norm_q is not None:
        query = attn.norm_q(query)
    if norms and attn.norm_k is not None:
        key = attn.norm_k(key)
    out = attend(query, key, value, attn.heads, original_dtype)
    if isinstance(out, str):
        return out
    out = attn.to_out[0](out)
    return attn.to_out[1](out)


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int, dtype: torch.dtype):
    """The processors' attention between their projections and ``to_out``: ``[B, N, heads * D]`` query, key, value
    to ``[B, N, heads * Dv]`` in ``dtype``, through one :func:`jetdet.ops.linear_attention` call; or why the call
    does not fit the op (a str). ``bench/gpu_check.py`` times this against the processor's torch ops."""
    from ..ops import linear_attention

    # [B, N, heads * D] -> [B, heads, N, D]: the channel split the processor's transpose(1, 2).unflatten(1, ...) makes
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (query, key, value))
    if q.shape[-1] != k.shape[-1] or q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return f"head dim > {MAX_HEAD_DIM} or q/k head dims differ"
    # the processor's matmuls broadcast a batch-1 encoder_hidden_states over the rows and take no tokens (0 keys:
    # out 0); the op takes neither (a ValueError, a RuntimeError)
    if k.shape[0] != q.shape[0]:
        return "encoder_hidden_states of another batch size"
    if not (q.shape[2] and k.shape[2]):
        return "no tokens"
    # the processor upcasts q, k, v to fp32 (after its relu, which commutes with the exact upcast): so does this, and
    # the kernel then runs its fp32 dots (no TF32, which it uses for fp16/bf16 inputs)
    out = linear_attention(q.float(), k.float(), v.float(), feature_map="relu", eps=EPS)
    # [B, heads, N, Dv] -> [B, N, heads * Dv] laid out as the processor's is ([B, heads * Dv, N] in memory): to_out's
    # matmul then sums in the order it sums the processor's in (a contiguous input took another kernel, other bits)
    B, H, N, DV = out.shape
    return out.transpose(2, 3).reshape(B, H * DV, N).transpose(1, 2).to(dtype)


def _plain(attn, hidden_states, encoder_hidden_states):
    out = _attention(attn, hidden_states, encoder_hidden_states, norms=True)
    if not isinstance(out, str) and hidden_states.dtype == torch.float16:
        out = out.clip(-65504, 65504)
    return out


def _pag(n_chunks: int):
    """PAGCFG (uncond, cond, perturbed rows: 3 chunks) and PAGIdentity (cond, perturbed: 2): linear attention on
    the first rows, ``to_out(to_v(x))`` (identity attention) on the perturbed ones; no ``norm_q``/``norm_k``."""

    def route(attn, hidden_states, encoder_hidden_states):
        original_dtype = hidden_states.dtype
        parts = hidden_states.chunk(n_chunks)
        if len(parts) != n_chunks:
            return "fewer rows than PAG chunks"  # the processor's own unpacking error
        org, ptb = torch.cat(parts[:-1]) if n_chunks == 3 else parts[0], parts[-1]
        out = _attention(attn, org, None, norms=False)
        if isinstance(out, str):
            return out
        ptb = attn.to_out[1](attn.to_out[0](attn.to_v(ptb).to(original_dtype)))
        out = torch.cat([out, ptb])
        return out.clip(-65504, 65504) if original_dtype == torch.float16 else out

    return route


_ROUTES = {"SanaLinearAttnProcessor2_0": _plain, "PAGCFGSanaLinearAttnProcessor2_0": _pag(3),
           "PAGIdentitySanaLinearAttnProcessor2_0": _pag(2)}


class SanaRoute:
    """The modules routed by one patch and its counters."""

    def __init__(self):
        self.classes = _classes()
        self.modules = 0
        self.routed: dict[str, int] = {}
        self.left: dict[str, int] = {}
        self._lock = threading.Lock()

    def _count(self, d: dict, key: str) -> None:
        with self._lock:
            d[key] = d.get(key, 0) + 1

    def stats(self) -> dict:
        with self._lock:
            return {"modules": self.modules, "approximate": False, "routed": dict(self.routed),
                    "left_to_diffusers": dict(self.left)}

    def install(self, model, set_forward) -> int:
        """Give each ``Attention`` module of ``model`` with one of :data:`PROCESSORS` the routing forward (through
        ``set_forward``, the patch handle's, so ``remove()`` takes it out); how many there were."""
        if not self.classes:
            return 0
        for module in model.modules():
            if type(getattr(module, "processor", None)) in self.classes and hasattr(module, "to_out"):
                set_forward(module, self.forward)
                self.modules += 1
        return self.modules

    def forward(self, this, inner, *args, **kwargs):
        name = self.classes.get(type(getattr(this, "processor", None)))
        if name is None:
            return inner(*args, **kwargs)  # another processor now: diffusers runs it
        names = ("hidden_states", "encoder_hidden_states", "attention_mask")
        extra = set(kwargs) - set(names[len(args):])
        if len(args) > 3 or extra or (not args and "hidden_states" not in kwargs):
            self._count(self.left, "other arguments")
            return inner(*args, **kwargs)
        bound = dict(zip(names, args), **kwargs)
        hs, ehs = bound["hidden_states"], bound.get("encoder_hidden_states")
        if not isinstance(hs, torch.Tensor) or hs.dim() != 3 or not (ehs is None or isinstance(ehs, torch.Tensor)):
            self._count(self.left, "not a [B, N, C] tensor")
            return inner(*args, **kwargs)
        out = _ROUTES[name](this, hs, ehs)
        if isinstance(out, str):  # why the op does not take it
            self._count(self.left, out)
            return inner(*args, **kwargs)
        self._count(self.routed, name)
        return out
