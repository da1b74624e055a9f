"""Block-level access to a model for the step cache: find a model's block list, and run its forward with the
*body* (the blocks between the first ``head`` and the last ``tail`` blocks) computed on some rows only.

The interface (what an adapter gives the controller)
----------------------------------------------------
A :class:`~jetdet.patch.call.ModelCall` may carry ``blocks``, an object with

* ``num_blocks`` (``L``), ``head`` and ``tail``: the split, in blocks (for the work count);
* ``residual`` (forecast the body's residual where shapes allow) and ``describe`` (a string for ``stats()``);
* ``run(rows, plan) -> (output, split_done)``: evaluate the model on ``rows`` (as ``ModelCall.run``) while
  ``plan`` steers the body; ``split_done`` says whether the split point was reached. During that forward the
  runner calls

  - ``plan.split(state) -> (body_rows, forecast)`` once, when the last head block has returned. ``state``
    is that block's output flattened to a list of leaves (tensors ``[R, ...]`` or ``None``; ``R`` = rows of
    this run). ``body_rows`` are the positions (``0..R-1``) whose body is computed; ``forecast`` is the body
    output for the other rows, as a leaf list like the last body block's output (``[R - len(body_rows), ...]``
    tensors, in row order), or ``None`` when every row is computed;
  - ``plan.body_done(state)`` once, with the last body block's output on the ``body_rows`` (leaf list);
  - ``plan.token(key, x, fn) -> Tensor`` for every call of a token-wise submodule (a feed-forward network) of a
    body block on the body rows: ``x [R_body, N, D]``; ``fn(x_sub)`` evaluates the module on any subset of the
    tokens (``[1, n, D]``); the plan returns the module output ``[R_body, N, D']``, computing only what it
    chooses (token-level reuse).

A model whose forward never calls the last head block (the block list is not on its path) is detected after
the run (``plan.split`` was not called): the rows were computed in full and the controller stops using the
blocks, saying why in ``stats()``.

:class:`BlockHooks` implements this for any model whose forward calls its blocks as modules (``block(...)``)
in list order, by setting instance ``forward`` attributes on the blocks (restored by ``handle.remove()``):

* head and tail blocks run unchanged on every row of the run;
* a body block runs on the body rows only: its batch-aligned tensor arguments (first dim ``R``; also inside
  tuples, lists and dicts) are sliced to those rows, except arguments named in :data:`NO_BATCH_ARGS`
  (positional tables shared by the batch); its output is scattered back into an ``[R, ...]`` output whose other
  rows hold zeros (they are never read: every body block's output feeds only later body blocks) and, at the
  last body block, the plan's forecast. A body block that no body row needs is not called at all; the zeros
  then take the shapes the block returned the last time it ran.

So the model's own loop, its code between blocks (ControlNet residuals, U-Net skip lists) and its tail run as
written, and so do wrappers that call the block modules themselves (ComfyUI's ``patches_replace`` block hooks
call the original block, so a ComfyUI adapter can build a :class:`BlockSplit` on ``diffusion_model.joint_blocks``
or ``double_blocks`` + ``single_blocks`` and hand ``BlockHooks(...).runner(run)`` to its ``ModelCall``).
The requirement is that the tail reads only the head's outputs and the last body block's output: true
for chains of transformer blocks and, with ``tail = 1``, for U-Nets (the last up block reads the skip
connections of ``conv_in`` and the first down block, both in the head, as DeepCache uses them).

Which blocks (:func:`find_blocks`)
----------------------------------
``blocks="auto"`` (the default) looks, in order, for: a U-Net's ``down_blocks`` / ``mid_block`` /
``up_blocks`` (head: the first down block, tail: the last up block; the body output is forecast directly);
Flux's ``transformer_blocks`` + ``single_transformer_blocks``; ComfyUI's ``double_blocks`` + ``single_blocks``;
``joint_blocks`` (MMDiT); ``transformer_blocks`` (DiT, PixArt, SD3); ``blocks`` (Wan, the bundled DiT);
``layers``. Chains forecast the body's *residual* ``h_out − h_in`` where a leaf of the last body block's output
has the shape of the same leaf of the head's output, else the output itself. A name or a list of names of
``nn.ModuleList`` attributes picks the list by hand (``blocks="transformer_blocks"``); an unknown name is an
error that lists the ModuleLists the model has. ``blocks=None`` turns block-level reuse off. A model with no
recognisable list (or fewer than ``head + tail + 1`` blocks) runs whole-call skipping only;
``stats()["cache"]["blocks"]`` says which list was used or why none was.

Token-wise modules: inside each body block, submodules named ``ff``, ``ff_context``, ``mlp``, ``ffn`` or
``feed_forward`` whose parameterised layers are all ``nn.Linear`` / ``nn.LayerNorm`` / ``nn.RMSNorm`` (no
convolutions, which would mix neighbouring tokens) are offered to ``plan.token`` when called with one
``[R, N, D]`` tensor. The controller checks once per module that evaluating a token subset gives the same values
as the full call before it reuses any token of it.
"""

from __future__ import annotations

import threading

import torch
import torch.nn as nn

#: Attribute names tried by ``blocks="auto"``, in order (a tuple is one chain of several lists).
CHAIN_NAMES = (("transformer_blocks", "single_transformer_blocks"), ("double_blocks", "single_blocks"),
               ("joint_blocks",), ("transformer_blocks",), ("blocks",), ("layers",))
#: Block arguments never sliced by rows (positional tables shared by every row).
NO_BATCH_ARGS = ("image_rotary_emb", "rotary_emb", "freqs_cis", "pe", "rope", "attention_kwargs",
                 "joint_attention_kwargs", "cross_attention_kwargs", "transformer_options", "img_ids", "txt_ids")
#: Submodule names of token-wise feed-forward networks.
TOKEN_MODULE_NAMES = ("ff", "ff_context", "mlp", "ffn", "feed_forward")
_TOKENWISE_LEAVES = (nn.Linear, nn.LayerNorm, nn.Dropout, nn.Identity, nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh,
                     nn.Sigmoid, nn.Mish)
if hasattr(nn, "RMSNorm"):
    _TOKENWISE_LEAVES = (*_TOKENWISE_LEAVES, nn.RMSNorm)


class BlockSplit:
    """A model's blocks in execution order and where the body starts and ends.

    Attributes: ``modules``/``names`` (the blocks and their qualified names), ``head``/``tail`` (blocks run for
    every row at the start / end), ``residual`` (forecast the body's residual where shapes allow, for chains;
    False for U-Nets), ``kind`` (``"chain"`` or ``"unet"``), ``token_modules`` (per body block index, a list of
    ``(key, module)`` token-wise submodules), ``source`` (how it was found, for stats)."""

    def __init__(self, modules, names, head, tail, residual, kind, source):
        self.modules = list(modules)
        self.names = list(names)
        self.head, self.tail = head, tail
        self.residual, self.kind, self.source = residual, kind, source
        self.token_modules: dict[int, list[tuple[str, nn.Module]]] = {}
        for i in range(head, len(self.modules) - tail):
            found = []
            for sub_name, sub in self.modules[i].named_modules():
                if sub_name and sub_name.split(".")[-1] in TOKEN_MODULE_NAMES and _tokenwise(sub):
                    if not any(sub_name.startswith(n + ".") for n, _ in found):
                        found.append((sub_name, sub))
            if found:
                self.token_modules[i] = [(f"{self.names[i]}.{n}", m) for n, m in found]

    @property
    def num_blocks(self) -> int:
        return len(self.modules)

    def describe(self) -> str:
        tok = sum(len(v) for v in self.token_modules.values())
        return (f"{self.source}: {len(self.modules)} blocks ({self.kind}), head {self.head}, tail {self.tail}, "
                f"body {len(self.modules) - self.head - self.tail}, {tok} token-wise modules")


def _tokenwise(module: nn.Module) -> bool:
    leaves = [m for m in module.modules() if not list(m.children())]
    has_linear = any(isinstance(m, nn.Linear) for m in leaves)
    for m in leaves:
        if isinstance(m, _TOKENWISE_LEAVES):
            continue
        if any(True for _ in m.parameters(recurse=False)):  # a parameterised layer we cannot vouch for
            return False
    return has_linear


def _module_lists(model: nn.Module) -> dict[str, nn.ModuleList]:
    return {n: m for n, m in model.named_children() if isinstance(m, nn.ModuleList)}


def _check_int(name, value, lo):
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {value!r}")
    return value


def find_blocks(model: nn.Module, blocks="auto", head_blocks: int = 1, tail_blocks: int | None = None):
    """``(BlockSplit or None, reason)`` for ``model`` (see the module docstring for ``blocks``).

    ``head_blocks`` (>= 1): blocks run for every row the model runs, whose output is the first-block signal;
    ``tail_blocks``: blocks run for every row at the end (default 0 for chains, 1 for U-Nets)."""
    head = _check_int("head_blocks", head_blocks, 1)
    if tail_blocks is not None:
        _check_int("tail_blocks", tail_blocks, 0)
    if blocks is None or blocks is False:
        return None, "off (blocks=None)"
    lists = _module_lists(model)
    if blocks == "auto" or blocks is True:
        down, up = getattr(model, "down_blocks", None), getattr(model, "up_blocks", None)
        if isinstance(down, nn.ModuleList) and isinstance(up, nn.ModuleList) and len(down) and len(up):
            mods, names = list(down), [f"down_blocks.{i}" for i in range(len(down))]
            mid = getattr(model, "mid_block", None)
            if isinstance(mid, nn.Module):
                mods.append(mid)
                names.append("mid_block")
            mods += list(up)
            names += [f"up_blocks.{i}" for i in range(len(up))]
            return _make(mods, names, head, 1 if tail_blocks is None else tail_blocks, False, "unet",
                         "down_blocks + mid_block + up_blocks")
        for chain in CHAIN_NAMES:
            if all(n in lists and len(lists[n]) for n in chain):
                return _chain(lists, chain, head, tail_blocks)
        found = sorted(lists) or "none"
        return None, (f"no recognisable block list (looked for a U-Net's down/mid/up blocks and ModuleLists "
                      f"named {[' + '.join(c) for c in CHAIN_NAMES]}; the model's ModuleLists: {found}): "
                      "whole-call skipping only")
    names = [blocks] if isinstance(blocks, str) else blocks
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"blocks: expected 'auto', None, the name of an nn.ModuleList attribute or a list of "
                         f"names, got {blocks!r}")
    for n in names:
        if n not in lists:
            raise ValueError(f"blocks: {type(model).__name__} has no nn.ModuleList named {n!r}; its ModuleLists: "
                             f"{sorted(lists) or 'none'}")
    return _chain(lists, tuple(names), head, tail_blocks)


def _chain(lists, chain, head, tail_blocks):
    mods, names = [], []
    for n in chain:
        mods += list(lists[n])
        names += [f"{n}.{i}" for i in range(len(lists[n]))]
    return _make(mods, names, head, 0 if tail_blocks is None else tail_blocks, True, "chain", " + ".join(chain))


def _make(mods, names, head, tail, residual, kind, source):
    if len(mods) < head + tail + 1:
        return None, (f"{source} has {len(mods)} blocks, fewer than head {head} + tail {tail} + 1: whole-call "
                      "skipping only")
    return BlockSplit(mods, names, head, tail, residual, kind, source), "ok"


# ------------------------------------------------------------------------------------------- pytrees
def flatten(value):
    """Leaves (tensors, None and other objects, depth first) and a structure to rebuild ``value``."""
    leaves: list = []

    def go(v):
        if isinstance(v, (tuple, list)) and not hasattr(v, "_fields"):
            return (type(v), [go(e) for e in v])
        leaves.append(v)
        return None

    return leaves, go(value)


def unflatten(leaves, structure):
    it = iter(leaves)

    def go(s):
        if s is None:
            return next(it)
        kind, items = s
        return kind(go(e) for e in items)

    return go(structure)


class _Meta:
    """A tensor leaf's per-row shape, dtype and device (a template for rows that did not run)."""

    __slots__ = ("shape", "dtype", "device")

    def __init__(self, v: torch.Tensor):
        self.shape, self.dtype, self.device = tuple(v.shape[1:]), v.dtype, v.device

    def zeros(self, rows: int) -> torch.Tensor:
        return torch.zeros((rows, *self.shape), dtype=self.dtype, device=self.device)


def _meta(v):
    return _Meta(v) if isinstance(v, torch.Tensor) and v.dim() >= 1 else v


def _slice(v, R, idx, name=None):
    if name in NO_BATCH_ARGS:
        return v
    if isinstance(v, torch.Tensor):
        return v.index_select(0, idx.to(v.device)) if v.dim() >= 1 and v.shape[0] == R else v
    if isinstance(v, (tuple, list)) and not hasattr(v, "_fields"):
        return type(v)(_slice(e, R, idx) for e in v)
    if isinstance(v, dict):
        return {k: _slice(e, R, idx, k) for k, e in v.items()}
    return v


# ------------------------------------------------------------------------------------------- hooks
class BlockHooks:
    """Instance-level ``forward`` wrappers on a :class:`BlockSplit`'s blocks (and their token-wise modules),
    inert unless a run is active. ``set_forward(module, body)`` installs one reversibly (the patch handle's
    ``_set_forward``: ``body(this, inner, *args, **kwargs)``)."""

    def __init__(self, split: BlockSplit, set_forward):
        self.split = split
        self._local = threading.local()  # the run and templates of the calling thread (each has its step cache)
        for i, mod in enumerate(split.modules):
            set_forward(mod, self._wrap(i, mod))
        for i, mods in split.token_modules.items():
            for key, mod in mods:
                set_forward(mod, self._wrap_token(i, key, mod))

    @property
    def _active(self) -> _Run | None:
        return getattr(self._local, "active", None)

    @_active.setter
    def _active(self, run: _Run | None) -> None:
        self._local.active = run

    @property
    def _templates(self) -> dict[int, tuple]:
        """Block index -> (structure, [_Meta or non-tensor leaf]) of the calling thread's last run of it."""
        t = getattr(self._local, "templates", None)
        if t is None:
            t = self._local.templates = {}
        return t

    @property
    def num_blocks(self) -> int:
        return self.split.num_blocks

    def runner(self, run):
        """A per-call runner for ``ModelCall.blocks`` around ``run(rows)`` (the adapter's row-compacting
        forward)."""
        return BlockRunner(self, run)

    # the bodies ``set_forward`` installs: ``this`` is the module called, ``inner`` its forward from before; a copy of
    # the model (copy.deepcopy) calls its own blocks' ``inner``, never a run of the original's
    def _wrap(self, i, mod):
        def forward(this, inner, *args, **kwargs):
            act = self._active
            if act is None or this is not mod:
                return inner(*args, **kwargs)
            return act.block(i, inner, args, kwargs)

        return forward

    def _wrap_token(self, i, key, mod):
        def forward(this, inner, *args, **kwargs):
            act = self._active
            x = args[0] if args else None
            if (act is None or this is not mod or act.in_body != i or len(args) != 1 or kwargs
                    or not isinstance(x, torch.Tensor) or x.dim() != 3):
                return inner(*args, **kwargs)
            return act.plan.token(key, x, inner)

        return forward


class BlockRunner:
    """``ModelCall.blocks`` for one call (see the module docstring)."""

    def __init__(self, hooks: BlockHooks, run):
        self.hooks = hooks
        self._run = run
        s = hooks.split
        self.num_blocks, self.head, self.tail = s.num_blocks, s.head, s.tail
        self.residual = s.residual
        self.describe = s.describe()

    def run(self, rows, plan):
        if self.hooks._active is not None:
            raise RuntimeError("blocks: a block-level run is already active on this model (re-entrant forward)")
        act = _Run(self.hooks, plan)
        self.hooks._active = act
        try:
            out = self._run(rows)
        finally:
            self.hooks._active = None
        return out, act.split_done


class _Run:
    def __init__(self, hooks: BlockHooks, plan):
        self.hooks = hooks
        self.plan = plan
        s = hooks.split
        self.first_body, self.last_body = s.head, s.num_blocks - s.tail - 1
        self.split_done = False
        self.R = None
        self.body_idx = None  # LongTensor of body rows, None = all rows
        self.body_rows: list[int] = []
        self.forecast = None
        self.rest_idx = None
        self.in_body = None

    def block(self, i, inner, args, kwargs):
        if i < self.first_body or i > self.last_body or not self.split_done:
            out = inner(*args, **kwargs)
            if i == self.first_body - 1 and not self.split_done:
                self._split(out)
            return out
        nb = len(self.body_rows)
        if nb == self.R:
            self.in_body = i
            try:
                out = inner(*args, **kwargs)
            finally:
                self.in_body = None
            self._record(i, out)
            if i == self.last_body:
                self.plan.body_done(flatten(out)[0])
            return out
        if nb == 0:
            if i == self.last_body:
                return self._assemble(i, None)
            return self._zeros(i, inner, args, kwargs)
        sub_args = tuple(_slice(a, self.R, self.body_idx) for a in args)
        sub_kwargs = {k: _slice(v, self.R, self.body_idx, k) for k, v in kwargs.items()}
        self.in_body = i
        try:
            sub = inner(*sub_args, **sub_kwargs)
        finally:
            self.in_body = None
        self._record(i, sub)
        if i == self.last_body:
            self.plan.body_done(flatten(sub)[0])
        return self._assemble(i, sub)

    def _split(self, out):
        leaves, _ = flatten(out)
        rows = [v.shape[0] for v in leaves if isinstance(v, torch.Tensor) and v.dim() >= 1]
        if not rows:
            raise RuntimeError("blocks: the last head block returned no tensor")
        self.R = rows[0]
        body_rows, forecast = self.plan.split(leaves)
        self.split_done = True
        self.body_rows = list(body_rows)
        self.forecast = forecast
        dev = next(v.device for v in leaves if isinstance(v, torch.Tensor))
        if 0 < len(self.body_rows) < self.R:
            self.body_idx = torch.tensor(self.body_rows, dtype=torch.long).to(dev)
        rest = [r for r in range(self.R) if r not in set(self.body_rows)]
        if rest:
            self.rest_idx = torch.tensor(rest, dtype=torch.long).to(dev)

    def _record(self, i, out):
        leaves, struct = flatten(out)
        self.hooks._templates[i] = (struct, [_meta(v) for v in leaves])

    def _zeros(self, i, inner, args, kwargs):
        tpl = self.hooks._templates.get(i)
        if tpl is None:  # never ran: run it on every row (correct, no saving)
            out = inner(*args, **kwargs)
            self._record(i, out)
            return out
        struct, metas = tpl
        return unflatten([m.zeros(self.R) if isinstance(m, _Meta) else m for m in metas], struct)

    def _assemble(self, i, sub):
        """The [R, ...] output of body block i: body rows from ``sub``, the others zeros (or, at the last body
        block, the forecast)."""
        if sub is None:
            struct, metas = self.hooks._templates[i]
            sub_leaves = [None if isinstance(m, _Meta) else m for m in metas]
        else:
            sub_leaves, struct = flatten(sub)
            metas = [_meta(v) for v in sub_leaves]
        fc = self.forecast if i == self.last_body else None
        out = []
        for j, (v, m) in enumerate(zip(sub_leaves, metas)):
            if not isinstance(m, _Meta):
                out.append(v)
                continue
            full = m.zeros(self.R)
            if fc is not None and fc[j] is not None:
                full.index_copy_(0, self.rest_idx, fc[j].to(m.dtype))
            if v is not None and self.body_idx is not None:
                full.index_copy_(0, self.body_idx, v)
            out.append(full)
        return unflatten(out, struct)

