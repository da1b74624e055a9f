"""Per-item sampling for ComfyUI: item ``i`` of a batch depends only on (seed, item id, the model, the settings).

ComfyUI's ``KSampler`` is not batch invariant even with invariant ops (``../shared/COMFYUI.md``):

* ``comfy.sample.prepare_noise`` draws the whole batch's starting noise from one generator, so item ``k`` of a
  batch is not a batch-1 run with any seed;
* ancestral and SDE samplers draw their step noise for the whole batch (``default_noise_sampler``, or one
  ``BrownianTreeNoiseSampler`` over the batch).

Here the starting noise of item ``i`` is ``jetdet.randn`` at (seed, item id, step 0), and the step noise comes
from :class:`ItemNoiseSampler`, passed to every sampler that takes a ``noise_sampler``. The item id of row ``r``
is ``batch_offset + r``, or ``batch_offset + latent["batch_index"][r]`` when ComfyUI's batch nodes set one (so an
item picked out of a batch with ``LatentFromBatch`` keeps its noise, as ComfyUI's own ``noise_inds`` intends).

:class:`ItemNoiseSampler` is a Brownian motion ``W(σ)`` per item, revealed point by point, so samplers that query
overlapping intervals (``dpmpp_sde`` asks for ``(σ_i, σ_s)`` and then ``(σ_i, σ_{i+1})``) get consistent
increments, as from ComfyUI's ``BrownianTreeNoiseSampler``; each query returns
``(W(σ_next) − W(σ)) / sqrt(|σ_next − σ|)``, a standard normal per element. A new point beyond the revealed ones
is ``W(e) + sqrt(|σ − e|) z`` from the nearest revealed point ``e``; one between two revealed points ``a < σ < b``
is the Brownian bridge ``W(a) + (σ − a)/(b − a) (W(b) − W(a)) + sqrt((σ − a)(b − σ)/(b − a)) z``. The ``k``-th
point revealed draws ``z = jetdet.randn(..., seed, item id, step=k)``, ``k >= 1``; the sequence of queries is the
same for every batch size, so every item gets the same bits alone or in any batch. For the samplers that query
disjoint consecutive intervals (the ancestral ones) this is a fresh standard normal per step.

``dpm_adaptive`` picks its steps by an error norm over the whole batch, so an item's steps depend on its
neighbours; :func:`sample` runs the items of such a sampler (:data:`BATCH_COUPLED`) one at a time.
"""

from __future__ import annotations

import inspect
import logging
import math
import re

import torch

import jetdet

__all__ = ["ItemNoiseSampler", "item_ids", "item_noise", "make_sampler", "draws_noise", "sample"]


def item_ids(batch: int, batch_offset: int, batch_index=None) -> list[int]:
    """The item id of every row (see the module docstring)."""
    if isinstance(batch_offset, bool) or not isinstance(batch_offset, int) or batch_offset < 0:
        raise ValueError(f"batch_offset: expected an int >= 0 (the item id of the first row), got {batch_offset!r}")
    if batch_index is None:
        ids = [batch_offset + r for r in range(batch)]
    else:
        idx = [int(i) for i in batch_index]
        if len(idx) != batch or any(i < 0 for i in idx):
            raise ValueError(f"latent batch_index: expected {batch} non-negative ints (one per row), got {idx}")
        ids = [batch_offset + i for i in idx]
    if ids and max(ids) >= 2**64:  # jetdet.randn's item ids are 64-bit
        last = max(ids) - batch_offset
        raise ValueError(f"batch_offset: item ids (batch_offset + {'batch_index' if batch_index is not None else 'row'}"
                         f") must stay below 2^64; batch_offset {batch_offset} + {last} is past it (largest "
                         f"batch_offset for this batch: {2**64 - 1 - last})")
    return ids


def item_noise(shape, seed: int, ids: list[int], step: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """``[len(ids), *shape[1:]]`` standard normal noise, row ``r`` = ``jetdet.randn`` of item ``ids[r]`` at ``step``.
    Consecutive ids are drawn in one call (the bits are the same either way)."""
    per_item = tuple(shape[1:])
    parts, start = [], 0
    for r in range(1, len(ids) + 1):
        if r == len(ids) or ids[r] != ids[r - 1] + 1:
            parts.append(jetdet.randn((r - start, *per_item), seed, item_offset=ids[start], step=step, device=device))
            start = r
    if not parts:
        return torch.empty((0, *per_item), dtype=dtype, device=device)
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out.to(dtype)


class ItemNoiseSampler:
    """``noise_sampler(sigma, sigma_next)`` for ComfyUI's samplers, per item (see the module docstring)."""

    def __init__(self, x: torch.Tensor, seed: int, ids: list[int]):
        self.shape, self.dtype, self.device = tuple(x.shape), x.dtype, x.device
        self.seed, self.ids = seed, list(ids)
        self.points: list[tuple[float, torch.Tensor]] = []  # (sigma, W) sorted by sigma
        self.draws = 0

    def _z(self) -> torch.Tensor:
        self.draws += 1
        return item_noise(self.shape, self.seed, self.ids, self.draws, torch.float32, self.device)

    def _reveal(self, s: float) -> torch.Tensor:
        pts = self.points
        for t, w in pts:
            if t == s:
                return w
        if not pts:
            w = torch.zeros(self.shape, dtype=torch.float32, device=self.device)
        elif s < pts[0][0] or s > pts[-1][0]:
            e, we = pts[0] if s < pts[0][0] else pts[-1]
            w = we + math.sqrt(abs(s - e)) * self._z()
        else:
            i = next(j for j in range(1, len(pts)) if pts[j][0] > s)
            (a, wa), (b, wb) = pts[i - 1], pts[i]
            w = wa + ((s - a) / (b - a)) * (wb - wa) + math.sqrt((s - a) * (b - s) / (b - a)) * self._z()
        pts.append((s, w))
        pts.sort(key=lambda p: p[0])
        return w

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        s0, s1 = float(sigma), float(sigma_next)
        if s0 == s1:
            # a schedule that repeats a sigma (ComfyUI's "simple" at steps / denoise > 1000): a step of length 0.
            # The normalised increment over a vanishing interval is a fresh standard normal, independent of the
            # path. The ancestral and SDE samplers scale it by 0 there (euler_ancestral's sigma_up, the SDE
            # samplers' sqrt(1 - e^(-2h))); LCM, which draws fresh noise every step, adds it at sigma_next.
            # k-diffusion's Brownian tree divides 0 by 0 instead, and those steps give NaN.
            return self._z().to(self.dtype)
        w0, w1 = self._reveal(s0), self._reveal(s1)
        return ((w1 - w0) / math.sqrt(abs(s1 - s0))).to(self.dtype)


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(str, choices))}; got {value!r}")


def check_latent(model, samples: torch.Tensor) -> torch.Tensor:
    """``samples`` if ``model`` can sample it, else a ValueError naming the model class and what it expects."""
    fmt = model.get_model_object("latent_format")
    name = type(model.model).__name__
    dims = 2 + getattr(fmt, "latent_dimensions", 2)
    if samples.dim() != dims or samples.shape[1] != fmt.latent_channels:
        want = ", ".join(["B", str(fmt.latent_channels)] + ["T", "H", "W"][5 - dims:])
        raise ValueError(f"latent_image: {name} samples latents [{want}] ({dims}-D, {fmt.latent_channels} channels); "
                         f"got shape {tuple(samples.shape)}")
    dm = getattr(model.model, "diffusion_model", None)
    limit, patch = getattr(dm, "pos_embed_max_size", None), getattr(getattr(dm, "x_embedder", None), "patch_size", None)
    if limit and patch:  # MMDiT: a learned position table of limit x limit patches
        p = patch[0] if isinstance(patch, (tuple, list)) else patch
        if max((samples.shape[-2] + 1) // p, (samples.shape[-1] + 1) // p) > limit:
            raise ValueError(f"latent_image: {name} samples latents up to {limit * p} x {limit * p} (its position "
                             f"table; {limit * p * 8} x {limit * p * 8} pixels through its VAE); got "
                             f"{samples.shape[-2]} x {samples.shape[-1]} ({samples.shape[-2] * 8} x "
                             f"{samples.shape[-1] * 8} pixels)")
    return samples


def item_mask(mask: torch.Tensor, latent_dims: int, row: int) -> torch.Tensor:
    """The noise mask of batch row ``row`` alone, as ComfyUI gives that row in the batch: ``comfy.utils.reshape_mask``
    reads an image latent's mask as ``[n, 1, H, W]`` and a video latent's 5-D mask as ``[n, ...]`` (any other as one
    mask for all rows), resizes each mask alone, and repeats the n masks over the batch (row r gets mask r mod n)."""
    if latent_dims == 4:
        mask = mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1])
    elif mask.dim() != latent_dims:
        return mask
    n = mask.shape[0]
    return mask[row % n:row % n + 1]


#: conditioning entries ComfyUI fits to the latent batch with ``resize_to_batch_size`` (an inpainting or pix2pix model's
#: concat inputs, in ``BaseModel.concat_cond`` and its kin); the cross-attention tensor, ``pooled_output`` and the
#: entries ComfyUI wraps as model conds are repeated (``repeat_to_batch_size``); ``mask`` is cut to the batch
_RESIZED = frozenset({"concat_latent_image", "concat_mask", "concat_image"})
_REPEATED = frozenset({"pooled_output", "attention_mask"})
#: entries holding a list of batched tensors, each repeated (Flux Kontext's and Qwen's reference latents: CONDList)
_REPEATED_LISTS = frozenset({"reference_latents"})
_warned_item_cond: set = set()


def _nrows(t) -> int:
    """The rows of a batched tensor; 1 for anything else (shared by every row)."""
    return t.shape[0] if isinstance(t, torch.Tensor) and t.dim() >= 1 else 1


def _item_rows(t, i: int, n: int, resize: bool = False):
    """Row ``i`` (kept 1-D batch) of tensor ``t`` as ComfyUI fits it to an ``n``-row batch."""
    import comfy.utils

    if _nrows(t) <= 1:
        return t
    if resize:
        return comfy.utils.resize_to_batch_size(t, n)[i:i + 1]
    return comfy.utils.repeat_to_batch_size(t, n)[i:i + 1]


def _item_control(control, i: int, n: int, memo: dict):
    """A copy of a control chain (ControlNet, T2I adapter, ...) whose hint images are those row ``i`` gets in an
    ``n``-row batch: ComfyUI broadcasts a batch of hints over the rows (row r gets hint r mod the hint count)."""
    if control is None:
        return None
    if id(control) in memo:
        return memo[id(control)]
    hint = getattr(control, "cond_hint_original", None)
    extra = list(getattr(control, "extra_concat_orig", None) or [])
    prev = _item_control(getattr(control, "previous_controlnet", None), i, n, memo)
    nh = _nrows(hint)
    if nh == 1 and all(_nrows(e) == 1 for e in extra) and prev is getattr(control, "previous_controlnet", None):
        memo[id(control)] = control
        return control
    c = control.copy()
    if nh > 1:
        c.cond_hint_original = hint[i % nh:i % nh + 1]
    # ComfyUI repeats each extra concat image to the hint's batch, then broadcasts the whole hint over the rows
    c.extra_concat_orig = [e[(i % nh) % _nrows(e):(i % nh) % _nrows(e) + 1] if _nrows(e) > 1 else e for e in extra]
    c.set_previous_controlnet(prev)
    memo[id(control)] = c
    return c


def _batched(v, n: int, depth: int = 0) -> bool:
    """Whether ``v`` holds a tensor of ``n`` or ``2n`` rows (n > 1), also inside lists, dicts and objects' attributes
    (unCLIP's list of dicts around a CLIP vision output), a few levels deep."""
    if isinstance(v, torch.Tensor):
        return n > 1 and v.dim() >= 1 and v.shape[0] in (n, 2 * n)
    if depth >= 3:
        return False
    if isinstance(v, (list, tuple)):
        return any(_batched(e, n, depth + 1) for e in v)
    if isinstance(v, dict):
        return any(_batched(e, n, depth + 1) for e in v.values())
    attrs = getattr(v, "__dict__", None)
    return isinstance(attrs, dict) and any(_batched(e, n, depth + 1) for e in attrs.values()
                                           if isinstance(e, (torch.Tensor, list, tuple, dict)))


def item_conditioning(conditioning, i: int, n: int, memo: dict | None = None):
    """What batch row ``i`` of an ``n``-item run gets of a CONDITIONING, as a conditioning for that item alone.

    A batch-1 run takes the first of every batch of per-item tensors (masks, ControlNet hints, an inpainting model's
    concat image, a batch of text embeddings), where the batch gives row ``i`` its own: each is cut to row ``i`` by
    ComfyUI's own rule for it (see :data:`_RESIZED`). A batched tensor under another key is passed whole, with a
    one-time log line naming it (a batch-1 run then reads it as ComfyUI's model code does for one row)."""
    memo = {} if memo is None else memo
    out = []
    for entry in conditioning:
        t, d = entry[0], dict(entry[1])
        t = _item_rows(t, i, n)
        for k, v in entry[1].items():
            if k == "control":
                d[k] = _item_control(v, i, n, memo)
            elif k == "mask" and isinstance(v, torch.Tensor) and v.dim() >= 3 and v.shape[0] > 1:
                d[k] = v[:n][i % min(n, v.shape[0]):i % min(n, v.shape[0]) + 1]
                if entry[1].get("set_area_to_bounds") and "mask bounds" not in _warned_item_cond:
                    _warned_item_cond.add("mask bounds")  # ComfyUI takes the area around all the masks at once
                    logging.warning("jetdet: a conditioning sets its area to the bounds of a batch of %d masks; an "
                                    "item sampled alone gets the bounds of its own mask", v.shape[0])
            elif k in _RESIZED or k in _REPEATED:
                d[k] = _item_rows(v, i, n, resize=k in _RESIZED)
            elif k in _REPEATED_LISTS and isinstance(v, (list, tuple)):
                d[k] = type(v)(_item_rows(e, i, n) for e in v)
            elif _batched(v, n) and k not in _warned_item_cond:
                _warned_item_cond.add(k)
                logging.warning("jetdet: the conditioning's %r holds a batch of rows; sampling one item at a time "
                                "passes it whole, and ComfyUI's model code decides which row an item alone reads", k)
        out.append([t, d])
    return out


def per_item_entries(conditioning) -> dict[str, int]:
    """The entries of a CONDITIONING that hold one row per item (text embeddings, masks, concat images, ControlNet
    hints, the repeated ones) with more than one row: name -> rows."""
    found: dict[str, int] = {}
    for entry in conditioning or []:
        if _nrows(entry[0]) > 1:
            found["the text embeddings"] = _nrows(entry[0])
        for k, v in entry[1].items():
            if k == "control":
                c, rows = v, 1
                while c is not None:
                    rows = max(rows, _nrows(getattr(c, "cond_hint_original", None)))
                    c = getattr(c, "previous_controlnet", None)
            elif k == "mask":
                rows = _nrows(v) if isinstance(v, torch.Tensor) and v.dim() >= 3 else 1
            elif k in _RESIZED or k in _REPEATED:
                rows = _nrows(v)
            else:
                continue
            if rows > 1:
                found[repr(k)] = rows
    return found


def _warn_item_of_a_batch(item: int, positive, negative) -> None:
    """A one-row latent that is item ``item`` > 0 of a batch (``batch_index`` from LatentFromBatch, or
    ``batch_offset``) sampled with conditioning made for the whole batch: ComfyUI gives a batch-1 run the first row of
    each per-item entry, not row ``item``, so the item does not get what its row got in the batch."""
    if item == 0:
        return
    found = {**per_item_entries(negative), **per_item_entries(positive)}
    key = ("item of a batch", tuple(sorted(found)))
    if not found or key in _warned_item_cond:
        return
    _warned_item_cond.add(key)
    what = ", ".join(f"{k} ({n} rows)" for k, n in found.items())
    logging.warning("jetdet: the latent is item %d of a batch, alone, and the conditioning holds a row per item: %s. "
                    "A batch-1 run reads their first row, not row %d, so this item does not match its row of the "
                    "batch; make the conditioning from this item's inputs alone (ImageFromBatch before the node that "
                    "builds it), and keep the item id %d (a LatentFromBatch latent keeps it; a latent made anew from "
                    "the item needs batch_offset %d)", item, what, item, item, item)


def _origin(f) -> str:
    """The base name of the module that defined ``f``: ComfyUI loads ``comfy_extras`` by file path, so a node's
    function there has the path as its ``__module__`` (``.../comfy_extras/nodes_perpneg``), not the dotted name."""
    return re.split(r"[\\/.]", getattr(f, "__module__", None) or "")[-1]


def _closure_value(f, name: str):
    code, cells = getattr(f, "__code__", None), getattr(f, "__closure__", None)
    if code is None or not cells or name not in code.co_freevars:
        return None
    try:
        return cells[code.co_freevars.index(name)].cell_contents
    except ValueError:  # an empty cell
        return None


def batch_coupled_patches(model) -> list[str]:
    """The model patches on ``model`` known to couple the items of a batch in their own math, which jetdet's
    deterministic mode cannot make per item (each measured on the shapes model, item != alone by up to): ComfyUI's
    Perp-Neg (a sum and a norm over the whole batch, 1.7), Mahiro (one cosine similarity for the batch, 0.96), Skip
    Layer Guidance DiT with a rescaling_scale (one std for the batch, 0.37), EasyCache and LazyCache (a skip decided
    from the whole batch's change, 2.2). Other patches of ComfyUI 0.3.64's own nodes were measured per item."""
    opts = getattr(model, "model_options", None) or {}
    cfg = opts.get("sampler_cfg_function")
    post = list(opts.get("sampler_post_cfg_function", []))
    found = []
    if _origin(cfg) == "nodes_perpneg":
        found.append("Perp-Neg")
    if any(_origin(f) == "nodes_mahiro" for f in post):
        found.append("Mahiro")
    if any(_origin(f) == "nodes_slg" and _closure_value(f, "rescaling_scale") not in (None, 0, 0.0) for f in post):
        found.append("Skip Layer Guidance DiT (rescaling_scale)")
    holder = (opts.get("transformer_options") or {}).get("easycache")
    if holder is not None:
        found.append("LazyCache" if "Lazy" in type(holder).__name__ else "EasyCache")
    return found


def batch_position_patches(model) -> list[str]:
    """Patches whose output depends on the item's position in the batch by design: ComfyUI's Video Linear / Triangle
    CFG Guidance give each frame of a video (a batch row) its own cfg. Sampling items alone would change what they do,
    so they are only named."""
    opts = getattr(model, "model_options", None) or {}
    return ["Video Linear/Triangle CFG Guidance"] if _origin(opts.get("sampler_cfg_function")) == "nodes_video_model" \
        else []


_warned_coupled: set = set()
_warned_repeat: set = set()


def _warn_repeated_sigma(sigmas: torch.Tensor, scheduler: str, steps: int, denoise) -> None:
    """Once per (scheduler, steps, denoise): the schedule repeats a sigma, a step of length 0 (ComfyUI's "simple" at
    steps / denoise > 1000). The per-item noise is defined there; some samplers' own step math is not."""
    vals = sigmas.reshape(-1).tolist()  # Python floats
    same = next((a for a, b in zip(vals, vals[1:]) if a == b and a > 0), None)
    key = (scheduler, steps, float(denoise))
    if same is None or key in _warned_repeat:
        return
    _warned_repeat.add(key)
    logging.warning("jetdet: the %s schedule at steps=%d, denoise=%s repeats sigma %.6g (a step of length 0). Samplers "
                    "whose step divides by its length (dpmpp_2m_sde, dpmpp_3m_sde, er_sde; the ancestral samplers on "
                    "flow models) give NaN there, as ComfyUI's KSampler does; fewer steps, a higher denoise or another "
                    "scheduler avoid it", scheduler, steps, denoise, same)
_COUPLED_WHY = ("whose math couples the items of a batch; the deterministic sampler samples the items one at a time so "
                "that each is what it is alone (slower)")
_POSITION_WHY = ("which gives each batch row (a video frame) a cfg of its own: an item sampled in this batch is not "
                 "what it is alone, whatever the sampler")


#: Samplers whose steps depend on the whole batch (``dpm_adaptive`` accepts or rejects a step by the error norm
#: over the batch): :func:`sample` runs their items one at a time.
BATCH_COUPLED = frozenset({"dpm_adaptive"})


def _sampler_function(name: str):
    import comfy.k_diffusion.sampling as kds

    return getattr(kds, f"sample_{name}", None)


def draws_noise(name: str) -> bool:
    """Whether ComfyUI's sampler ``name`` takes a ``noise_sampler`` (and so draws step noise with its defaults)."""
    if name == "dpm_adaptive":
        return True  # wrapped by comfy.samplers.ksampler, which passes noise_sampler through
    fn = _sampler_function(name)
    return fn is not None and "noise_sampler" in inspect.signature(fn).parameters


def make_sampler(name: str, seed: int, ids: list[int], like: torch.Tensor):
    """A ComfyUI ``KSAMPLER`` for ``name`` whose step noise is per item, for latents shaped like ``like`` (on its
    device). ``ddim``'s inpainting noise (ComfyUI draws it from one generator for the whole batch) is the per-item
    starting noise instead. Returns ``(sampler, noise_sampler or None)``."""
    import comfy.samplers

    check_choice("sampler_name", name, comfy.samplers.KSampler.SAMPLERS)
    if name == "ddim":
        return comfy.samplers.ksampler("euler"), None
    if name == "dpm_fast" or not draws_noise(name):  # dpm_fast's wrapper takes no options (and eta is 0)
        return comfy.samplers.sampler_object(name), None
    ns = ItemNoiseSampler(like, seed, ids)
    return comfy.samplers.ksampler(name, {"noise_sampler": ns}), ns


# What an empty-latent node tells the sampler about the latent it made, for ComfyUI to size an empty latent for the
# model (newer ComfyUI: "Empty Latent Image" says its downscale ratio, and a 16x or 32x model's sampler makes the
# latent that many times smaller); KSampler drops them from its output, and so do jetdet's samplers.
LATENT_SIZING_KEYS = ("downscale_ratio_spacial", "downscale_ratio_temporal")


def fix_empty_latent(model, latent_image: torch.Tensor, latent: dict) -> torch.Tensor:
    """``comfy.sample.fix_empty_latent_channels`` as KSampler calls it: with the LATENT's downscale ratios where this
    ComfyUI takes them (ComfyUI 0.3.64 takes none; a trial on a newer one found jetdet's samplers sampling a 16x
    model's empty latent at twice the width and height KSampler did)."""
    import comfy.sample

    fn = comfy.sample.fix_empty_latent_channels
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    extra = {k: latent[k] for k in LATENT_SIZING_KEYS if k in params and latent.get(k) is not None}
    return fn(model, latent_image, **extra)


def latent_problem(latent, name: str) -> str | None:
    """Why ``latent`` is not a LATENT these nodes take, naming ``name``; None when it is. Newer ComfyUI's nested
    latents (several latents in one, as LTX-2's video + audio: ``samples`` a ``comfy.nested_tensor.NestedTensor``)
    are named as such: no jetdet node takes them yet."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if samples is not None and getattr(samples, "is_nested", False) and hasattr(samples, "tensors"):
        return (f"{name}: a nested LATENT (several latents in one, as LTX-2's video + audio latent) is not supported "
                "by jetdet's nodes; sample it with ComfyUI's own sampler (no per-item guarantee)")
    if not isinstance(samples, torch.Tensor):
        return f"{name}: expected a LATENT (a dict with a 'samples' tensor)"
    return None


def sample(model, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str, positive, negative,
           latent: dict, denoise: float = 1.0, batch_offset: int = 0, callback=None, disable_pbar: bool = True,
           noise_seed_step: int = 0, *, split_coupled: bool = True, add_noise: bool = True,
           start_step: int | None = None, last_step: int | None = None,
           force_full_denoise: bool = False) -> torch.Tensor:
    """ComfyUI's ``KSampler`` with per-item noise: returns the sampled ``samples`` (see the module docstring).

    ``add_noise``, ``start_step``, ``last_step`` and ``force_full_denoise`` are ``KSamplerAdvanced``'s, with ComfyUI's
    rules for them (``comfy.samplers.KSampler.sample``): the schedule's steps from ``start_step`` to ``last_step``, the
    last sigma set to 0 with ``force_full_denoise``, no starting noise without ``add_noise`` (the second stage of a
    handoff); a ``start_step`` at or past the last step returns the latent as it is.

    ``model`` is sampled as given (wrap it with :func:`jetdet.comfy.wrappers.with_deterministic` for
    batch-invariant model calls). ``noise_seed_step`` is the ``jetdet.randn`` step of the starting noise (0).
    ``split_coupled=False`` samples the batch as one even when the sampler or a patch of the model couples its items
    (then an item depends on the others, as in ComfyUI's own KSampler): for benchmarks that time such patches as
    ComfyUI runs them."""
    import comfy.sample
    import comfy.samplers

    from .wrappers import check_model

    check_model(model)
    check_choice("sampler_name", sampler_name, comfy.samplers.KSampler.SAMPLERS)
    check_choice("scheduler", scheduler, comfy.samplers.KSampler.SCHEDULERS)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed: expected an int in [0, 2^64), got {seed!r}")
    for name, v in (("start_step", start_step), ("last_step", last_step)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError(f"{name}: expected an int >= 0 or None, got {v!r}")
    if not isinstance(denoise, (int, float)) or not 0.0 <= denoise <= 1.0:
        raise ValueError(f"denoise: expected a number in [0, 1], got {denoise!r}")
    why = latent_problem(latent, "latent_image")
    if why:
        raise ValueError(why)
    latent_image = latent["samples"]
    if latent_image.dim() < 3 or latent_image.shape[0] < 1:
        raise ValueError(f"latent_image: expected a batch of latents [B, C, ...] with B >= 1, got shape "
                         f"{tuple(latent_image.shape)}")
    latent_image = check_latent(model, fix_empty_latent(model, latent_image, latent))
    ids = item_ids(latent_image.shape[0], batch_offset, latent.get("batch_index"))
    coupled = position = []
    if len(ids) > 1 and split_coupled:
        coupled, position = batch_coupled_patches(model), batch_position_patches(model)
    for name, why in [(n, _COUPLED_WHY) for n in coupled] + [(n, _POSITION_WHY) for n in position]:
        if name not in _warned_coupled:
            _warned_coupled.add(name)
            logging.warning("jetdet: the model carries %s, %s", name, why)
    if (sampler_name in BATCH_COUPLED or coupled) and len(ids) > 1 and split_coupled:
        # dpm_adaptive's step-size control measures the error over the whole batch, so the steps an item gets depend
        # on the other items, and so does a coupled patch's output: only a batch-1 run is per item
        # each item alone gets what its row gets in the batch: its noise mask, and its rows of the conditionings'
        # per-item tensors (a batch-1 run would give every item the first mask or ControlNet hint)
        mask = latent.get("noise_mask")
        outs = []
        for i, item in enumerate(ids):
            one = {"samples": latent["samples"][i:i + 1], **{k: latent[k] for k in LATENT_SIZING_KEYS if k in latent}}
            if isinstance(mask, torch.Tensor):
                one["noise_mask"] = item_mask(mask, latent_image.dim(), i)
            memo: dict = {}
            pos_i = item_conditioning(positive, i, len(ids), memo)
            neg_i = item_conditioning(negative, i, len(ids), memo)
            outs.append(sample(model, seed, steps, cfg, sampler_name, scheduler, pos_i, neg_i, one, denoise,
                               item, callback, disable_pbar, noise_seed_step, split_coupled=split_coupled,
                               add_noise=add_noise, start_step=start_step, last_step=last_step,
                               force_full_denoise=force_full_denoise))
        return torch.cat(outs)
    if len(ids) == 1:
        _warn_item_of_a_batch(ids[0], positive, negative)
    noise = item_noise(latent_image.shape, seed, ids, noise_seed_step, latent_image.dtype)
    if not add_noise:
        noise = torch.zeros_like(noise)
    ks = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                 scheduler=scheduler, denoise=denoise, model_options=model.model_options)
    sigmas = ks.sigmas
    if last_step is not None and last_step < len(sigmas) - 1:  # KSampler.sample's rules
        sigmas = sigmas[:last_step + 1]
        if force_full_denoise:
            sigmas = sigmas.clone()
            sigmas[-1] = 0
    if start_step is not None:
        if start_step >= len(sigmas) - 1:
            return latent_image.to(comfy.model_management.intermediate_device())
        sigmas = sigmas[start_step:]
    _warn_repeated_sigma(sigmas, scheduler, steps, denoise)
    like = torch.empty(noise.shape, dtype=torch.float32, device=model.load_device)
    sampler, _ = make_sampler(sampler_name, seed, ids, like)
    samples = comfy.samplers.sample(model, noise, positive, negative, cfg, model.load_device, sampler, sigmas,
                                    model_options=model.model_options, latent_image=latent_image,
                                    denoise_mask=latent.get("noise_mask"), callback=callback,
                                    disable_pbar=disable_pbar, seed=seed)
    return samples.to(comfy.model_management.intermediate_device())
