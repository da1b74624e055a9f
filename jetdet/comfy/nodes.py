"""jetdet's ComfyUI nodes (V3 schema). Loaded by ComfyUI through :func:`jetdet.comfy.comfy_entrypoint`.

Every node is in category ``jetdet``, every input has a tooltip, and no node changes the MODEL it is given (they
clone it). Errors are raised as exceptions with the argument named, which ComfyUI shows in its error dialog.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import stat
import statistics
import time

import torch
from comfy_api.latest import ComfyExtension, io

from ..verify import psnr_db  # noqa: F401 - the Benchmark node's figure, and the tests'
from . import sampling as smp
from . import shapes_model as sm
from . import vae as dvae
from . import wrappers as wr

CATEGORY = "jetdet"
SEED_MAX = 0xFFFFFFFFFFFFFFFF
TOLERANCES = ("exact", "1e-6", "1e-4", "structural")
MODES = ("off", "fast", "deterministic")
FORECASTS = ("order1", "order2", "none")
LINEAR_ATTENTION = ("off", "relu", "elu1", "identity")
PASSES = ("coarse", "refine", "detail")


def _samplers():
    import comfy.samplers

    return comfy.samplers.KSampler.SAMPLERS, comfy.samplers.KSampler.SCHEDULERS


def _ksampler_inputs(offset: bool = True) -> list:
    """KSampler's inputs; ``offset``: the node has a ``batch_offset`` (the seed's tooltip names it)."""
    samplers, schedulers = _samplers()
    item = "batch_offset + i" if offset else "i, or batch_index[i] for a latent from ComfyUI's batch nodes"
    return [
        io.Model.Input("model", tooltip="The model to sample (it is not changed)."),
        io.Int.Input("seed", default=0, min=0, max=SEED_MAX, control_after_generate=True,
                     tooltip=f"Seed of the noise. Item i's noise depends only on (seed, {item}, step)."),
        io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Sampler steps."),
        io.Float.Input("cfg", default=4.0, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="Classifier-free guidance scale."),
        io.Combo.Input("sampler_name", options=samplers, default="euler", tooltip="ComfyUI's sampler."),
        io.Combo.Input("scheduler", options=schedulers, default="simple", tooltip="ComfyUI's sigma schedule."),
        io.Conditioning.Input("positive", tooltip="The conditioning to move towards."),
        io.Conditioning.Input("negative", tooltip="The conditioning to move away from (the CFG uncond branch)."),
        io.Latent.Input("latent_image", tooltip="The latent batch to denoise."),
        io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="How much of the schedule to run (1 = from pure noise)."),
    ]


def _callback(model, steps: int):
    import latent_preview

    return latent_preview.prepare_callback(model, steps)


def _disable_pbar() -> bool:
    import comfy.utils

    return not comfy.utils.PROGRESS_BAR_ENABLED


def _a(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def _det_sample(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, denoise, batch_offset,
                progress=True, note_fast=True, **advanced):
    """One deterministic sampling run; returns a new LATENT dict. ``advanced``: KSamplerAdvanced's options, as
    :func:`jetdet.comfy.sampling.sample` takes them."""
    model = wr.check_model(model)
    if note_fast and wr.fast_state(model) is not None:
        logging.warning("jetdet: the model given to a deterministic sampling node is in fast mode; this node runs "
                        "every model call deterministically (no step cache), so fast mode has no effect here")
    det = wr.with_deterministic(model)
    samples = smp.sample(det, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, denoise,
                         batch_offset, callback=_callback(det, steps) if progress else None,
                         disable_pbar=_disable_pbar(), **advanced)
    out = {k: v for k, v in latent.items() if k != "samples" and k not in smp.LATENT_SIZING_KEYS}
    out["samples"] = samples
    return out


def _item_checksums(t: torch.Tensor, ids: list[int]) -> list[str]:
    """``item <id>: <sha256>`` for every row of ``t``, row ``r`` labelled ``ids[r]``."""
    import jetdet

    return [f"item {i}: {jetdet.checksum(t[r:r + 1])}" for r, i in enumerate(ids)]


def _ids_of(t: torch.Tensor, batch_offset: int, latent=None) -> list[int]:
    """The item id of every row of ``t``: ``batch_offset + batch_index[r]`` for a LATENT with a ``batch_index``
    (set by ComfyUI's batch nodes), else ``batch_offset + r``; the rule of the Deterministic Sampler's labels."""
    index = latent.get("batch_index") if isinstance(latent, dict) else None
    return smp.item_ids(t.shape[0], batch_offset, index)


def _fingerprint_json(device=None) -> str:
    """``jetdet.fingerprint`` of ``device`` (the model's: ``--cpu`` on a CUDA machine, or a model on ``cuda:1``, is
    not the current CUDA device), as JSON."""
    import jetdet

    try:
        fp = jetdet.fingerprint(device)
    except ValueError:  # a device jetdet.fingerprint cannot describe (DirectML's privateuseone): the default's
        fp = jetdet.fingerprint()
    return json.dumps(fp, sort_keys=True)


def _latent_tensor(latent, name: str) -> torch.Tensor:
    why = smp.latent_problem(latent, name)
    if why:
        raise ValueError(why)
    return latent["samples"]


# ------------------------------------------------------------------------------------------------- mode switch


def _fast_options(budget, start_percent, end_percent, forecast, max_consecutive_skips, linear_attention="off",
                  attention_cache=False) -> dict:
    return dict(budget=budget, start_percent=start_percent, end_percent=end_percent, forecast=forecast,
                max_consecutive_skips=max_consecutive_skips,
                linear_attention=None if linear_attention == "off" else linear_attention,
                attention_cache=bool(attention_cache))


def _combos_valid(cls, input_types=None, **values) -> bool | str:
    """A node's ``validate_inputs`` for its combo inputs: ComfyUI 0.3.64 checks a V3 combo's options only when the
    node runs, after everything upstream; this runs when the prompt is queued. A linked input (None here) is
    checked when the node runs. Declaring these inputs skips ComfyUI's own checks for them only (its range checks
    of the other inputs stay).

    ``input_types`` (the output type of each linked input, which ComfyUI passes because the node's
    ``validate_inputs`` names it) turns off ComfyUI's type check of the node's links: :func:`_links_valid` does it
    here, and also lets a combo take a link from an output whose type is a list of choices, as the stock KSampler
    does (a sampler or scheduler selector from another node pack). ComfyUI 0.3.64 refuses such a link into a V3
    combo ("Return type mismatch", input type ``COMBO``)."""
    options = {i.id: list(i.options) for i in cls.define_schema().inputs if isinstance(i, io.Combo.Input)}
    for name, value in values.items():
        if value is not None and value not in options[name]:
            return f"{name}: expected one of {options[name]}, got {value!r}"
    return _links_valid(cls, input_types or {}, options)


def _links_valid(cls, received: dict, options: dict) -> bool | str:
    """ComfyUI's check that each linked input gets an output of its type (``validate_node_input``, the function
    ComfyUI itself uses), except that a combo input also takes an output whose type is a list (or tuple) of
    choices sharing at least one with the input's options; the value that arrives is checked against the options
    when the node runs."""
    from comfy_execution.validation import validate_node_input

    declared = {}
    for group in ("required", "optional"):
        declared.update({k: v[0] for k, v in cls.INPUT_TYPES().get(group, {}).items()})
    for name, got in received.items():
        want = declared.get(name)
        # before ComfyUI's rule, which in newer ComfyUI (0.33) takes any list into a combo: a list sharing no
        # choice then failed only when the node ran, after everything upstream
        if name in options and isinstance(got, (list, tuple)):
            if any(o in options[name] for o in got):
                continue
            return (f"{name}: the linked output's choices {_short(got)} share none with this input's "
                    f"{_short(options[name])}")
        if want is None or validate_node_input(got, want):
            continue
        if name in options:
            want = "COMBO (an output that lists choices, such as a sampler selector's)"
        return f"{name}: the linked output's type is {_short(got)}, expected {want}"
    return True


def _short(values) -> str:
    if isinstance(values, (list, tuple)):
        return str(list(values)) if len(values) <= 8 else f"{list(values)[:8]} (and {len(values) - 8} more)"
    return str(values)


def _note_replaced(model, node: str, new: str) -> None:
    """Log when a node's output mode replaces a jetdet mode the input model already had: jetdet's modes do not
    combine (a step cache's per-row choices are not batch invariant), so a chain of these nodes keeps the last."""
    had = "deterministic" if wr.is_deterministic(model) else "fast" if wr.fast_state(model) is not None else None
    if had is None:
        return
    if had == new:
        what = f"its {had} mode's settings (strict, budget, ...) are replaced by this node's"
    else:
        what = f"the output model is in {new} mode only (jetdet's modes do not combine)"
        if had == "deterministic":
            what += ": its model calls are no longer batch invariant"
    logging.warning(f"jetdet {node}: the model it was given is already in jetdet's {had} mode; {what}")


class JetDetModeSwitch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="JetDetModeSwitch", display_name="jetdet Mode Switch", category=CATEGORY,
            description="Returns a clone of the model in jetdet's mode: off (plain ComfyUI), fast (step cache) or "
                        "deterministic (batch-invariant ops and attention). The input model is not changed.",
            inputs=[
                io.Model.Input("model", tooltip="The model to switch (it is not changed; the output is a clone)."),
                io.Combo.Input("mode", options=MODES, default="deterministic",
                               tooltip="off: remove jetdet from the model. fast: skip model calls within the error "
                                       "budget. deterministic: model calls whose bits do not depend on the batch. "
                                       "With ComfyUI's KSampler, ancestral and SDE samplers still draw their step "
                                       "noise for the whole batch: for the same bits per item whatever the batch, "
                                       "sample with the jetdet Deterministic Sampler (its Advanced node for the "
                                       "stages of a handoff)."),
                io.Float.Input("budget", default=0.05, min=0.0, max=wr.MAX_BUDGET, step=0.005, round=0.0001,
                               tooltip="fast: largest predicted relative L1 error of a skipped model call "
                                       "(0 = never skip)."),
                io.Boolean.Input("strict", default=True,
                                 tooltip="deterministic: raise on a torch op with no deterministic implementation "
                                         "(off: warn instead)."),
            ],
            outputs=[io.Model.Output(tooltip="A clone of the model in the chosen mode.")],
        )

    @classmethod
    def validate_inputs(cls, mode=None, input_types=None):
        return _combos_valid(cls, input_types, mode=mode)

    @classmethod
    def execute(cls, model, mode, budget, strict):
        wr.check_model(model)
        smp.check_choice("mode", mode, MODES)
        if mode == "off":
            return io.NodeOutput(wr.without_jetdet(model))
        _note_replaced(model, "Mode Switch", mode)
        if mode == "deterministic":
            return io.NodeOutput(wr.with_deterministic(model, warn_only=not strict))
        m, _ = wr.with_fast(model, budget=budget)
        return io.NodeOutput(m)


class JetDetFastOptimizer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="JetDetFastOptimizer", display_name="jetdet Fast Optimizer", category=CATEGORY,
            description="jetdet's step cache: per batch row and CFG branch, skip a model call when its output can be "
                        "forecast within the error budget. State resets for every sampling run. Saves most with "
                        "deterministic samplers (euler, dpmpp_2m); with ancestral and SDE samplers it forecasts the "
                        "denoised image and saves less (README: 1.1-1.3x at the default budget on the shapes model at "
                        "30 steps, nothing at 20, against 2.3x with euler); with CFG++ samplers and lcm it computes "
                        "every call (a forecast's error goes into their latent whole), with a warning.",
            inputs=[
                io.Model.Input("model", tooltip="The model to speed up (it is not changed; the output is a clone)."),
                io.Float.Input("budget", default=0.05, min=0.0, max=wr.MAX_BUDGET, step=0.005, round=0.0001,
                               tooltip="Largest predicted relative L1 error of a forecast model output "
                                       "(0 = never skip, bit-identical to the model)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=0.99, step=0.01,
                               tooltip="Always compute the first fraction of the schedule."),
                io.Float.Input("end_percent", default=0.0, min=0.0, max=0.99, step=0.01,
                               tooltip="Always compute the last fraction of the schedule."),
                io.Combo.Input("forecast", options=FORECASTS, default="order1",
                               tooltip="How a skipped output is forecast: linear (order1) or quadratic (order2) "
                                       "extrapolation of the last computed outputs, or reuse of the last (none)."),
                io.Int.Input("max_consecutive_skips", default=8, min=0, max=1000,
                             tooltip="Most model calls in a row a stream may skip (0 = never skip)."),
                io.Combo.Input("linear_attention", options=LINEAR_ATTENTION, default="off",
                               tooltip="Opt-in, approximate: replace softmax attention by linear attention with this "
                                       "feature map (exact only for models trained with it)."),
                io.Boolean.Input("attention_cache", default=False,
                                 tooltip="Opt-in, approximate: reuse attention block masks across steps and CFG "
                                         "branches, running block-sparse attention between refreshes."),
            ],
            outputs=[io.Model.Output(tooltip="A clone of the model with the step cache.")],
        )

    @classmethod
    def validate_inputs(cls, forecast=None, linear_attention=None, start_percent=None, end_percent=None,
                        input_types=None):
        """The combos, and the two percents together (each is checked alone by ComfyUI's range checks, which
        declaring them here turns off for them, so their ranges are checked here too): a prompt whose guards
        cover more than the whole schedule is refused when it is queued, not when the node runs."""
        ok = _combos_valid(cls, input_types, forecast=forecast, linear_attention=linear_attention)
        if ok is not True:
            return ok
        for name, value in (("start_percent", start_percent), ("end_percent", end_percent)):
            if value is not None and not 0.0 <= value <= 0.99:
                return f"{name}: expected a value in [0, 0.99], got {value}"
        if start_percent is not None and end_percent is not None and start_percent + end_percent > 1.0:
            return f"start_percent + end_percent: expected at most 1, got {start_percent} + {end_percent}"
        return True

    @classmethod
    def execute(cls, model, budget, start_percent, end_percent, forecast, max_consecutive_skips,
                linear_attention="off", attention_cache=False):
        wr.check_model(model)
        smp.check_choice("forecast", forecast, FORECASTS)
        smp.check_choice("linear_attention", linear_attention, LINEAR_ATTENTION)
        _note_replaced(model, "Fast Optimizer", "fast")
        m, _ = wr.with_fast(model, **_fast_options(budget, start_percent, end_percent, forecast,
                                                   max_consecutive_skips, linear_attention, attention_cache))
        return io.NodeOutput(m)


# ---------------------------------------------------------------------------------------- deterministic sampler


class JetDetDeterministicSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="JetDetDeterministicSampler", display_name="jetdet Deterministic Sampler", category=CATEGORY,
            description="KSampler whose item i is bit-identical to a batch-1 run of that item with batch_offset=i: "
                        "per-item noise (start and step noise), batch-invariant model ops and attention.",
            inputs=_ksampler_inputs() + [
                io.Int.Input("batch_offset", default=0, min=0, max=SEED_MAX,
                             tooltip="Item id of the first latent in the batch (item i uses id batch_offset + i). A "
                                     "latent from Latent From Batch or Repeat Latent Batch carries its items' ids "
                                     "(batch_index): item i then uses batch_offset + batch_index[i], so leave 0 "
                                     "there."),
            ],
            outputs=[
                io.Latent.Output(display_name="LATENT",
                                 tooltip="The denoised latents (decode them with the jetdet Deterministic VAE Decode "
                                         "for pixels that do not depend on the batch either)."),
                io.String.Output(display_name="checksums", tooltip="SHA-256 of every item's latent, one per line."),
                io.String.Output(display_name="fingerprint", tooltip="What produced it (device, versions), JSON."),
            ],
        )

    @classmethod
    def validate_inputs(cls, sampler_name=None, scheduler=None, input_types=None):
        return _combos_valid(cls, input_types, sampler_name=sampler_name, scheduler=scheduler)

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
                batch_offset):
        out = _det_sample(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                          denoise, batch_offset)
        return _sampled(out, model, batch_offset, latent_image)


def _sampled(out: dict, model, batch_offset: int, latent_image: dict) -> io.NodeOutput:
    """A deterministic sampler node's outputs: the LATENT, its items' checksums, the fingerprint."""
    lines = _item_checksums(out["samples"], _ids_of(out["samples"], batch_offset, latent_image))
    return io.NodeOutput(out, "\n".join(lines), _fingerprint_json(model.load_device))


class JetDetDeterministicSamplerAdvanced(io.ComfyNode):
    """KSamplerAdvanced's inputs with the Deterministic Sampler's guarantee: the stages of a handoff (a base model's
    first steps with the leftover noise, a refiner's last steps with no new noise) each per item."""

    @classmethod
    def define_schema(cls):
        base = _ksampler_inputs()  # model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, ...
        return io.Schema(
            node_id="JetDetDeterministicSamplerAdvanced", display_name="jetdet Deterministic Sampler (Advanced)",
            category=CATEGORY,
            description="KSampler (Advanced) whose item i is bit-identical to a batch-1 run of that item with "
                        "batch_offset=i: a stage of a two-stage handoff (start/end step, leftover noise, no added "
                        "noise) with per-item noise, also with ancestral and SDE samplers.",
            inputs=[
                base[0],
                io.Combo.Input("add_noise", options=["enable", "disable"], default="enable",
                               tooltip="Add the starting noise (disable for the second stage of a handoff, whose "
                                       "latent carries the first stage's leftover noise)."),
                io.Int.Input("noise_seed", default=0, min=0, max=SEED_MAX, control_after_generate=True,
                             tooltip="Seed of the noise. Item i's noise (the starting noise and every step's) depends "
                                     "only on (seed, batch_offset + i, step)."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Sampler steps of the whole schedule."),
                *base[3:9],  # cfg .. latent_image, as the Deterministic Sampler's
                io.Int.Input("start_at_step", default=0, min=0, max=10000,
                             tooltip="First step of the schedule this stage runs."),
                io.Int.Input("end_at_step", default=10000, min=0, max=10000,
                             tooltip="Step where this stage stops (10000: the end)."),
                io.Combo.Input("return_with_leftover_noise", options=["disable", "enable"], default="disable",
                               tooltip="enable: stop at end_at_step's noise level, for a next stage to finish; "
                                       "disable: denoise fully at end_at_step."),
                io.Int.Input("batch_offset", default=0, min=0, max=SEED_MAX,
                             tooltip="Item id of the first latent in the batch (item i uses id batch_offset + i); give "
                                     "every stage of a handoff the same one. A latent from Latent From Batch carries "
                                     "its items' ids (batch_index): leave 0 there."),
            ],
            outputs=[
                io.Latent.Output(display_name="LATENT", tooltip="The latents after this stage."),
                io.String.Output(display_name="checksums", tooltip="SHA-256 of every item's latent, one per line."),
                io.String.Output(display_name="fingerprint", tooltip="What produced it (device, versions), JSON."),
            ],
        )

    @classmethod
    def validate_inputs(cls, sampler_name=None, scheduler=None, add_noise=None, return_with_leftover_noise=None,
                        input_types=None):
        return _combos_valid(cls, input_types, sampler_name=sampler_name, scheduler=scheduler, add_noise=add_noise,
                             return_with_leftover_noise=return_with_leftover_noise)

    @classmethod
    def execute(cls, model, add_noise, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
                latent_image, start_at_step, end_at_step, return_with_leftover_noise, batch_offset):
        smp.check_choice("add_noise", add_noise, ("enable", "disable"))
        smp.check_choice("return_with_leftover_noise", return_with_leftover_noise, ("disable", "enable"))
        out = _det_sample(model, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                          1.0, batch_offset, add_noise=add_noise == "enable", start_step=start_at_step,
                          last_step=end_at_step, force_full_denoise=return_with_leftover_noise == "disable")
        return _sampled(out, model, batch_offset, latent_image)


# ------------------------------------------------------------------------------------------- checksum, matcher


def _one_input(latent, image, what: str) -> tuple[str, torch.Tensor]:
    given = [(n, t) for n, t in (("latent", latent), ("image", image)) if t is not None]
    if len(given) != 1:
        raise ValueError(f"{what}: connect exactly one of latent or image (got {len(given)})")
    name, v = given[0]
    return name, (_latent_tensor(v, "latent") if name == "latent" else v)


ITEM_IDS = ("row i is item batch_offset + i (batch_offset + batch_index[i] for a latent from ComfyUI's batch nodes), "
            "the ids the Deterministic Sampler labels its checksums with")


class JetDetChecksum(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="JetDetChecksum", display_name="jetdet Checksum", category=CATEGORY,
            description="SHA-256 of every item (dtype, shape and bytes), the same for the same bits on any machine.",
            inputs=[
                io.Latent.Input("latent", optional=True, tooltip="A latent batch to checksum (or connect an image)."),
                io.Image.Input("image", optional=True, tooltip="An image batch to checksum (or connect a latent)."),
                io.Int.Input("batch_offset", default=0, min=0, max=SEED_MAX, optional=True,
                             tooltip=f"Item id of the first row, for the labels: {ITEM_IDS}."),
            ],
            outputs=[io.String.Output(display_name="checksums",
                                      tooltip="One line per item: 'item i: sha256', the SHA-256 of "
                                              "'jetdet.checksum.v1|<dtype>|<shape>|' and the item's bytes (its "
                                              "row, shape (1, ...)): not of the bytes alone; see the README.")],
        )

    @classmethod
    def execute(cls, latent=None, image=None, batch_offset=0):
        name, t = _one_input(latent, image, "JetDetChecksum")
        return io.NodeOutput("\n".join(_item_checksums(t, _ids_of(t, batch_offset, latent if name == "latent"
                                                                                else None))))


_CHECKSUM_LINE = re.compile(r"^\s*(?:item\s+(\d+)\s*:\s*)?([0-9a-fA-F]{64})\s*$")


def parse_checksums(text: str) -> dict[int, list[str]]:
    """Checksum lines -> ``{item id: [digest, ...]}``. An ``item i: <sha256>`` line is item ``i``; bare hex digests
    (one per line) are items 0, 1, ... in line order. Labelled and bare lines cannot be mixed. An id may repeat: a
    batch from ComfyUI's Latent Batch node holds two items of each batch_index, and the sampler labels both alike;
    the digests of an id are kept in line order."""
    out: dict[int, list[str]] = {}
    labelled = bare = 0
    for n, line in enumerate(text.strip().splitlines(), 1):
        if not line.strip():
            continue
        m = _CHECKSUM_LINE.match(line)
        if m is None:
            raise ValueError(f"reference_checksums: line {n} is not 'item i: <64 hex digits>' or a bare digest: "
                             f"{line.strip()[:80]!r}")
        if m.group(1) is None:
            item, bare = bare, bare + 1
        else:
            item, labelled = int(m.group(1)), labelled + 1
        if labelled and bare:
            raise ValueError(f"reference_checksums: line {n} mixes 'item i:' lines with bare digests; label every "
                             "line or none (bare digests are items 0, 1, ... in line order)")
        out.setdefault(item, []).append(m.group(2).lower())
    if not out:
        raise ValueError("reference_checksums: no checksum given")
    return out


def _id_list(ids, limit: int = 12) -> str:
    ids = sorted(ids)
    return ", ".join(map(str, ids[:limit])) + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def _nth(ids: list[int]) -> list[int]:
    """For each position of ``ids``, how many times its id came before it: where an id repeats (Latent Batch's
    batches), the k-th row with an id goes with the reference's k-th row or line of it."""
    seen: dict[int, int] = {}
    out = []
    for i in ids:
        out.append(seen.get(i, 0))
        seen[i] = out[-1] + 1
    return out


def match_checksums(t: torch.Tensor, ids: list[int], want: dict[int, list[str]]) -> tuple[bool, list[str]]:
    """Row ``r`` of ``t`` (item ``ids[r]``) against the reference digest of the same item; where an id repeats, the
    k-th row with that id against the k-th line with it. Reference items the input does not hold are listed, not
    compared. Returns (every row matches, report lines)."""
    import jetdet

    ok, lines, missing = bool(ids), [], []
    owner = {d: j for j, ds in sorted(want.items(), reverse=True) for d in ds}
    for r, (i, k) in enumerate(zip(ids, _nth(ids))):
        refs = want.get(i, [])
        a, b = jetdet.checksum(t[r:r + 1]), refs[k] if k < len(refs) else None
        which = f" (line {k + 1} of {len(refs)} for item {i})" if len(refs) > 1 else ""
        if b is None:
            missing.append(i)
            lines.append(f"item {i}: MISMATCH {a[:16]}, no reference checksum for item {i}"
                         + (f" (the reference has {len(refs)} for it, the input more)" if refs else ""))
        else:
            lines.append(f"item {i}: match {a[:16]}{which}" if a == b else
                         f"item {i}: MISMATCH {a[:16]} != {b[:16]}{which}")
        if a != b and a in owner:
            if owner[a] != i:
                lines[-1] += f" (it is the reference's item {owner[a]}: is batch_offset right?)"
            elif b is None:
                lines[-1] += (f" (the same bits as the reference's item {i}: the input holds item {i} more times "
                              "than the reference)")
            else:
                lines[-1] += f" (the same bits as another line for item {i}: its rows are in another order)"
        ok = ok and b is not None and a == b
    if not ids:
        lines.append("no items to compare")
    if missing:
        lines.append(f"the reference has items {_id_list(want)}; batch_offset sets the input's item ids ({ITEM_IDS})")
    rest = set(want) - set(ids)
    if rest:
        lines.append(f"reference items not in the input (not compared): {_id_list(rest)}")
    return ok, lines


def _n(k: int, word: str, what=None) -> str:
    """``3 rows`` / ``1 row``; with ``what``: ``items 3, 4`` / ``item 3``."""
    return f"{word}{'' if k == 1 else 's'} {what}" if what is not None else f"{k} {word}{'' if k == 1 else 's'}"


def _ranges(rows) -> str:
    """``5 to 9, 15 to 19``: sorted row numbers as runs."""
    rows, runs = sorted(rows), []
    for j in rows:
        if runs and j == runs[-1][1] + 1:
            runs[-1][1] = j
        else:
            runs.append([j, j])
    return ", ".join(str(x) if x == y else f"{x} to {y}" for x, y in runs)


def match_rows(t: torch.Tensor, ids: list[int], r: torch.Tensor, tolerance: str, batch_offset: int, where: str,
               ref_index=None, frames: int = 1) -> tuple[bool, str]:
    """Compare ``t`` (its item ``k``, rows ``k*frames`` to ``k*frames + frames - 1``, is item ``ids[k]``) with the
    reference tensor ``r``. ``frames`` > 1: an IMAGE decoded from a video, whose rows are each item's frames, item
    after item (VAE Decode's layout); 1: a row is an item. With as many rows as the input, the reference holds
    the same items: row against row (``batch_offset`` only labels them). With more rows, it is a batch whose item
    ``j`` (rows ``j*frames`` on) is item ``j`` (its ``batch_index[j]`` when a reference latent has one: a batch
    sampled with batch_offset 0), and each input item is compared with the reference rows of its item id, the
    k-th item of an id with the k-th reference item of it; an input item the reference does not hold is a
    mismatch that names batch_offset and both row counts. An input with no rows (or no elements) has no items to
    compare: a mismatch, as with a checksum reference (before, 0 rows against a batch compared two empty tensors:
    'MATCH exact: 0 of 0 differ', and stop_on_mismatch did not stop). Returns (every compared row matches,
    report)."""
    import jetdet

    if t.dim() and (t.shape[0] == 0 or t.numel() == 0):
        rows = f"{t.shape[0]} rows" if t.shape[0] == 0 else f"no elements in its {_n(t.shape[0], 'row')}"
        return False, (f"MISMATCH {tolerance}: no items to compare: the input has {rows} (shape {tuple(t.shape)}), "
                       f"the reference {_n(r.shape[0], 'row') if r.dim() else 'no rows'} (reference: {where})")
    F = frames
    n, m = (t.shape[0], r.shape[0]) if t.dim() and r.dim() else (0, 0)

    def part(x, k):  # item k's rows
        return x[k * F:(k + 1) * F]

    def rows_of(js):  # reference rows of the reference items js
        return [j * F + f for j in js for f in range(F)]

    def at(js):
        return f"row {js[0]}" if F == 1 else f"rows {_ranges(rows_of(js))}"

    each = "" if F == 1 else f" of {F} frames (frames_per_item)"
    if m <= n or tuple(t.shape[1:]) != tuple(r.shape[1:]):
        res = jetdet.match(t, r, tolerance)
        lines = [f"{res} (reference: {where})"]
        if t.shape == r.shape:
            lines += [f"item {i}: {'match' if jetdet.match(part(t, k), part(r, k), tolerance) else 'MISMATCH'}"
                      + ("" if F == 1 else f" (rows {k * F} to {k * F + F - 1})") for k, i in enumerate(ids)]
        elif m < n and tuple(t.shape[1:]) == tuple(r.shape[1:]):
            lines.append(f"the input has {n} rows, the reference {m}: a reference must hold every item of the input "
                         "(a reference with more rows than the input is a batch, compared by item id: batch_offset)")
        return res.ok, "\n".join(lines)
    if m % F:
        return False, (f"MISMATCH {tolerance}: frames_per_item {F}: the reference's {m} rows are not whole items of "
                       f"{F} frames, the input's {n} rows are {_n(len(ids), 'item', _id_list(ids))} (reference: "
                       f"{where})")
    try:
        ref_ids = smp.item_ids(m // F, 0, ref_index)
    except ValueError as e:
        raise ValueError(f"reference_latent: {e}") from e
    rows: dict[int, list[int]] = {}
    for j, i in enumerate(ref_ids):
        rows.setdefault(i, []).append(j)
    pick = [rows[i][k] if k < len(rows.get(i, [])) else None for i, k in zip(ids, _nth(ids))]
    N_ = len(ids)
    found = [k for k, j in enumerate(pick) if j is not None]
    same = [k for k in found if jetdet.match(part(t, k), part(r, pick[k]), tolerance)]
    per = [f"item {ids[k]}: " + ("MISMATCH, not in the reference" if pick[k] is None else
                                 f"{'match' if k in same else 'MISMATCH'} (reference {at([pick[k]])})")
           for k in range(N_)]
    M = m // F
    held = (f"items {_id_list(ref_ids)}" if ref_index is not None else f"items 0 to {M - 1}") + (
        "" if F == 1 else f", {F} frames each")
    unused = sorted(set(range(M)) - set(pick))
    rest = [f"reference rows not compared: {_id_list(unused) if F == 1 else _ranges(rows_of(unused))}"] if unused \
        else []
    if len(found) < N_:
        out = sorted({ids[k] for k in range(N_) if pick[k] is None})
        head = (f"MISMATCH {tolerance}: batch_offset {batch_offset} makes the input's {_n(n, 'row')} "
                f"{_n(N_, 'item', _id_list(ids))}{each}, but the reference's {_n(m, 'row')} hold {held} (a batch "
                f"sampled with batch_offset 0), not {_n(len(out), 'item', _id_list(out))}: is batch_offset right?"
                f" (reference: {where})")
        return False, "\n".join([head, *per, *rest])
    res = jetdet.match(t, r[rows_of(pick)], tolerance)
    picked = _id_list(pick) if F == 1 else _ranges(rows_of(pick))
    head = (f"{res} (reference: {where}; the input's {_n(n, 'row')}, {_n(N_, 'item', _id_list(ids))}{each} at "
            f"batch_offset {batch_offset}, against reference {_n(len(pick) * F, 'row', picked)} of {m}, which "
            f"hold {held})")
    return res.ok, "\n".join([head, *per, *rest])


def _frames_hint(t: torch.Tensor, r: torch.Tensor, batch_offset: int, tolerance: str) -> str:
    """For an IMAGE that did not match a larger reference by row (frames_per_item 1), batch_offset > 0: a line
    saying that rows may be frames (an image decoded from a video), and, when the input's n rows match reference
    rows batch_offset*n to batch_offset*n + n - 1 (item batch_offset's frames if each item has n), that they do."""
    import jetdet

    n, m = t.shape[0], r.shape[0]
    if not batch_offset or n < 2 or m <= n or tuple(t.shape[1:]) != tuple(r.shape[1:]):
        return ""
    a = batch_offset * n
    if a + n <= m and jetdet.match(t, r[a:a + n], tolerance):
        return (f"\nthe input's {n} rows match reference rows {a} to {a + n - 1}: item {batch_offset}'s rows if "
                f"each item has {n} frames. An IMAGE decoded from a video has a row per frame, not per item: set "
                f"frames_per_item to the frames per video ({n} if the input is one video)")
    return ("\nif this IMAGE was decoded from a video, its rows are frames, not items (VAE Decode gives each video's "
            "frames as rows, item after item): set frames_per_item to the frames per video")


def _resolve_path(path: str) -> str:
    p = os.path.expanduser(path.strip())
    if not os.path.isabs(p):
        import folder_paths

        p = os.path.join(folder_paths.get_output_directory(), p)
    return p


_FILE_STATES: dict = {}


def file_state(path: str) -> str:
    """A file's path and the SHA-256 of its bytes (or why there is none): what ``fingerprint_inputs`` returns for
    a node that reads the file, so ComfyUI reruns the node whenever the file's content changes. The digest is
    reused while the file's inode, size, mtime and ctime stay the same and were already 2 s old when it was taken
    (so a rewrite within the file system's timestamp granularity is never missed)."""
    try:
        st = os.stat(path)
    except OSError:
        return f"{path}: missing"
    if not stat.S_ISREG(st.st_mode):
        return f"{path}: not a file"
    key = (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _FILE_STATES:
        return _FILE_STATES[key]
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        return f"{path}: unreadable ({e.strerror or e})"
    out = f"{path}: {st.st_size} bytes, sha256 {h.hexdigest()}"
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > 2_000_000_000:
        if len(_FILE_STATES) > 256:
            _FILE_STATES.clear()
        _FILE_STATES[key] = out
    return out


def load_reference(path: str) -> tuple[str, torch.Tensor]:
    """A reference saved as safetensors: a ``samples`` tensor (latent; the Cache Manager's ``store``), a
    ``latent_tensor`` (ComfyUI's Save Latent, as saved: bit for bit) or an ``image`` tensor."""
    from safetensors import safe_open

    p = _resolve_path(path)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"reference_file: no file at {p} (a path relative to ComfyUI's output folder, or "
                                "absolute; a safetensors file with a 'samples' or 'latent_tensor' or 'image' tensor)")
    try:
        with safe_open(p, framework="pt") as f:
            keys = list(f.keys())
            key = next((k for k in ("samples", "image", "latent", "latent_tensor") if k in keys), None)
            t = f.get_tensor(key) if key is not None else None
    except Exception as e:  # safetensors raises its own SafetensorError (not an OSError) for a file that is not one
        raise ValueError(f"reference_file: {p} is not a readable safetensors file ({type(e).__name__}: "
                         f"{str(e).strip()[:200]}); expected a safetensors file with a 'samples' (latent) or 'image' "
                         "tensor") from e
    if key is None:
        raise ValueError(f"reference_file: {p} holds {keys}; expected a 'samples' or 'latent_tensor' (latent) or "
                         "'image' tensor")
    if key == "latent_tensor" and "latent_format_version_0" not in keys:
        raise ValueError(f"reference_file: {p} is a latent in ComfyUI's old format (no 'latent_format_version_0'), "
                         "which Load Latent rescales by 1/0.18215; save the reference again with Save Latent or the "
                         "Cache Manager's store")
    return ("image" if key == "image" else "latent"), t


class JetDetOutputMatcher(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="JetDetOutputMatcher", display_name="jetdet Output Matcher", category=CATEGORY,
            description="Compares a latent or image with a reference (checksums, a latent/image input, or a "
                        "safetensors file) at a tolerance; can stop the workflow on a mismatch.",
            is_output_node=True,
            inputs=[
                io.Latent.Input("latent", optional=True, tooltip="The latent to check (or connect an image)."),
                io.Image.Input("image", optional=True, tooltip="The image to check (or connect a latent)."),
                io.Combo.Input("tolerance", options=TOLERANCES, default="exact",
                               tooltip="exact: same dtype and bits. 1e-6 / 1e-4: |a-b| <= tol*(1+|b|) per element "
                                       "(the dtypes may differ). structural: the same dtype and NaN/Inf positions, "
                                       "and RMS difference <= 1% of the reference's RMS, so stricter than 1e-4 "
                                       "about dtype (a float16 output against a float32 reference fails "
                                       "structural). Checksums match exactly only."),
                io.String.Input("reference_checksums", default="", multiline=True, optional=True,
                                tooltip="Reference checksums ('item i: sha256' lines from jetdet Checksum or the "
                                        "Deterministic Sampler): each row is compared with the line labelled with "
                                        "its item id (see batch_offset); bare digests are items 0, 1, ... in line "
                                        "order. Reference items the input does not hold are listed, not compared."),
                io.Latent.Input("reference_latent", optional=True, tooltip="A reference latent."),
                io.Image.Input("reference_image", optional=True, tooltip="A reference image."),
                io.String.Input("reference_file", default="", optional=True,
                                tooltip="A safetensors file with a 'samples' or 'image' tensor (the Cache Manager's "
                                        "store), or a Save Latent .latent file; absolute, or relative to ComfyUI's "
                                        "output folder. Read again whenever its content changes."),
                io.Boolean.Input("stop_on_mismatch", default=False,
                                 tooltip="Raise an error (stopping the workflow) when the output does not match."),
                io.Int.Input("batch_offset", default=0, min=0, max=SEED_MAX, optional=True,
                             tooltip=f"Item id of the input's first row, the batch_offset it was sampled with "
                                     f"({ITEM_IDS}). reference_checksums: each row against the line of its id. A "
                                     "reference latent, image or file with more rows than the input is a batch "
                                     "sampled with batch_offset 0 (row j is item j, or its batch_index): each row "
                                     "against the reference row of its id; with as many rows, row against row. A "
                                     "batch-1 run of item 3 with batch_offset 3 is checked here with batch_offset 3 "
                                     "against the batch's checksums, latent, image or file. An IMAGE decoded from a "
                                     "video has a row per frame: see frames_per_item."),
                io.Int.Input("frames_per_item", default=1, min=1, max=1 << 20, optional=True,
                             tooltip="For an IMAGE decoded from a video: VAE Decode gives each video's frames as "
                                     "rows, item after item (2 videos of 5 frames: 10 rows), so a row is a frame, "
                                     "not an item. Set the frames per video (5): rows k*5 to k*5+4 are item "
                                     "batch_offset + k, and a larger reference's item j is its rows j*5 to j*5+4 "
                                     "(checksum lines: the batch's row labels, batch_offset*5 + row). 1: a row is "
                                     "an item (images, and latents, whose frames are in dim 2)."),
            ],
            outputs=[
                io.Boolean.Output(display_name="match", tooltip="True when every item matches."),
                io.String.Output(display_name="report", tooltip="What was compared and how it differs."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, reference_file="", **kwargs):
        """ComfyUI reruns the node when this changes: with a reference file, the file's content."""
        if reference_file is None:  # wired from another node: known only at run time
            return float("nan")
        return file_state(_resolve_path(reference_file)) if reference_file.strip() else ""

    @classmethod
    def validate_inputs(cls, tolerance=None, input_types=None):
        return _combos_valid(cls, input_types, tolerance=tolerance)

    @classmethod
    def execute(cls, latent=None, image=None, tolerance="exact", reference_checksums="", reference_latent=None,
                reference_image=None, reference_file="", stop_on_mismatch=False, batch_offset=0, frames_per_item=1):
        smp.check_choice("tolerance", tolerance, TOLERANCES)
        kind, t = _one_input(latent, image, "JetDetOutputMatcher")
        F = frames_per_item
        if isinstance(F, bool) or not isinstance(F, int) or F < 1:
            raise ValueError(f"frames_per_item: expected an int >= 1, got {F!r}")
        if F > 1 and kind == "latent":
            raise ValueError(f"frames_per_item: {F} is for an IMAGE decoded from a video (a row per frame); a "
                             "latent's rows are items (a video latent holds its frames in dim 2): set it to 1")
        if F > 1 and t.shape[0] % F:
            raise ValueError(f"frames_per_item: the image's {t.shape[0]} rows are not whole items of {F} frames "
                             f"(VAE Decode gives each video's frames as rows, item after item)")
        refs = [n for n, v in (("reference_checksums", (reference_checksums or "").strip()),
                               ("reference_latent", reference_latent), ("reference_image", reference_image),
                               ("reference_file", (reference_file or "").strip())) if v is not None and v != ""]
        if len(refs) != 1:
            raise ValueError(f"JetDetOutputMatcher: give exactly one reference (reference_checksums, reference_latent, "
                             f"reference_image or reference_file); got {refs or 'none'}")
        ref = refs[0]
        if ref == "reference_checksums":
            if tolerance != "exact":
                raise ValueError(f"tolerance: a checksum reference can only be matched exactly, got {tolerance!r}")
            want = parse_checksums(reference_checksums)
            # an image's checksum lines are labelled by row (jetdet Checksum): frames_per_item F makes input row r
            # the batch's row batch_offset*F + r
            ids = _ids_of(t, batch_offset, latent if kind == "latent" else None) if F == 1 else \
                smp.item_ids(t.shape[0], batch_offset * F)
            ok, lines = match_checksums(t, ids, want)
            n = sum(len(v) for v in want.values())  # lines: an id repeats in a batch from Latent Batch
            report = f"{'MATCH' if ok else 'MISMATCH'} exact against {n} checksums\n" + "\n".join(lines)
        else:
            if ref == "reference_file":
                rkind, r = load_reference(reference_file)
                where = _resolve_path(reference_file)
            else:
                rkind = "latent" if ref == "reference_latent" else "image"
                r = _latent_tensor(reference_latent, "reference_latent") if rkind == "latent" else reference_image
                where = ref
            if rkind != kind:
                raise ValueError(f"{ref}: the reference is {_a(rkind)}, the input {_a(kind)}; compare like with like")
            ref_index = reference_latent.get("batch_index") if ref == "reference_latent" else None
            ids = _ids_of(t, batch_offset, latent if kind == "latent" else None) if F == 1 else \
                smp.item_ids(t.shape[0] // F, batch_offset)
            ok, report = match_rows(t, ids, r, tolerance, batch_offset, where, ref_index, F)
            if not ok and kind == "image" and F == 1:
                report += _frames_hint(t, r, batch_offset, tolerance)
        if not ok and stop_on_mismatch:
            raise RuntimeError(f"jetdet Output Matcher: output does not match the reference\n{report}")
        return io.NodeOutput(ok, report.strip(), ui={"text": [report.strip()]})


# -------------------------------------------------------------------------------------------- cache manager

ACTIONS = ("stats", "set_budget", "clear", "store", "recall")
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def recall_dir(folder: str = "") -> str:
    if folder and folder.strip():
        return _resolve_path(folder)
    import folder_paths

    return os.path.join(folder_paths.get_output_directory(), "jetdet_recall")


def recall_path(key: str, folder: str = "") -> str:
    """The file ``key`` is stored in."""
    if not isinstance(key, str) or not _KEY.match(key):
        raise ValueError(f"key: expected 1-128 characters of letters, digits, '.', '_' or '-' (starting with a letter "
                         f"or digit), got {key!r}")
    return os.path.join(recall_dir(folder), f"{key}.safetensors")


def _mb(name: str, v) -> int | None:
    if v is None or v == -1:
        return None
    if not math.isfinite(v) or v < 0:  # -0.5 read as unlimited before: only -1 says that
        raise ValueError(f"{name}: expected megabytes >= 0, or -1 for unlimited, got {v!r}")
    return int(v * 1024 * 1024)


def recall_store(key: str, kind: str, tensor: torch.Tensor, folder: str = "") -> str:
    """Write ``tensor`` under ``key`` (atomically: temp file, fsync, rename); returns the path."""
    from safetensors.torch import save_file

    import jetdet

    path = recall_path(key, folder)
    d = os.path.dirname(path)
    if os.path.exists(d) and not os.path.isdir(d):
        raise ValueError(f"folder: {d} is a file, not a folder; give the folder to store in (empty: "
                         "output/jetdet_recall)")
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise ValueError(f"folder: cannot create the folder {d} to store in ({e.strerror or e})") from e
    t = tensor.detach().to("cpu").contiguous()
    meta = {"jetdet_recall": "1", "kind": kind, "checksum": jetdet.checksum(t),
            "fingerprint": _fingerprint_json(tensor.device)}
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file({"samples" if kind == "latent" else "image": t}, tmp, metadata=meta)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise ValueError(f"folder: cannot write {path} ({e.strerror or e})") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def recall_load(key: str, folder: str = "") -> tuple[str, torch.Tensor, dict]:
    from safetensors import safe_open

    import jetdet

    path = recall_path(key, folder)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"key: nothing stored under {key!r} ({path} does not exist); store it first")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            name = "samples" if meta.get("kind") == "latent" else "image"
            t = f.get_tensor(name)
    except Exception as e:  # safetensors raises its own SafetensorError (not an OSError) for a damaged file
        raise ValueError(f"key: {path}, stored under {key!r}, is no longer a readable jetdet recall file "
                         f"({type(e).__name__}: {str(e).strip()[:200]}); it was changed or damaged after it was "
                         "stored: store it again") from e
    if jetdet.checksum(t) != meta.get("checksum"):
        raise ValueError(f"key: {path} does not match the checksum it was stored with (the file changed)")
    return meta.get("kind", "latent"), t, meta


def _linked_outputs(hidden) -> dict[int, list[str]]:
    """``{output index: ids of the nodes that take it}`` for the running node, from the prompt ComfyUI runs,
    counting only nodes that run (whose results reach an output node); empty when the node is called outside
    ComfyUI's executor."""
    uid, dyn = getattr(hidden, "unique_id", None), getattr(hidden, "dynprompt", None)
    if uid is None or dyn is None:
        return {}
    import nodes

    graph = {str(n): dyn.get_node(n) for n in dyn.all_node_ids()}
    links = [(str(v[0]), v[1], n) for n, node in graph.items() for v in (node.get("inputs") or {}).values()
             if isinstance(v, (list, tuple)) and len(v) == 2 and isinstance(v[1], int)]
    users: dict[str, set] = {}
    for src, _, n in links:
        users.setdefault(src, set()).add(n)

    def runs(n, seen):
        if n in seen:
            return False
        seen.add(n)
        cls = nodes.NODE_CLASS_MAPPINGS.get(graph[n].get("class_type"))
        return getattr(cls, "OUTPUT_NODE", False) is True or any(runs(u, seen) for u in users.get(n, ()))

    out: dict[int, list[str]] = {}
    for src, i, n in sorted(links):
        if src == str(uid) and runs(n, set()):
            out.setdefault(i, []).append(n)
    return out


class JetDetCacheManager(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="JetDetCacheManager", display_name="jetdet Cache Manager", category=CATEGORY,
            description="The step cache's memory: statistics (hits, bytes per tier), clear, and byte budgets for the "
                        "tiers device -> CPU -> disk. Recall: store a latent/image under a key and get it back "
                        "bit-exact in a later run. An output with nothing to give (the LATENT of an image key, the "
                        "MODEL with no model connected, ...) is an error naming it when connected.",
            is_output_node=True,
            inputs=[
                io.Combo.Input("action", options=ACTIONS, default="stats",
                               tooltip="stats: report the fast model's cache. set_budget: a clone with these byte "
                                       "budgets. clear: drop its cached tensors. store / recall: the latent or image "
                                       "under key (the stored file is read again whenever it changes)."),
                io.Model.Input("model", optional=True,
                               tooltip="A model from jetdet Fast Optimizer / Mode Switch (fast)."),
                io.Float.Input("device_budget_mb", default=-1.0, min=-1.0, max=1e7, step=1.0,
                               tooltip="set_budget: MB of cached outputs on the model's device (-1 = unlimited)."),
                io.Float.Input("cpu_budget_mb", default=-1.0, min=-1.0, max=1e7, step=1.0,
                               tooltip="set_budget: MB in host memory once the device tier is full (-1 = unlimited, "
                                       "0 = no CPU tier)."),
                io.Float.Input("disk_budget_mb", default=0.0, min=-1.0, max=1e7, step=1.0,
                               tooltip="set_budget: MB on disk (safetensors) once the CPU tier is full "
                                       "(-1 = unlimited, 0 = no disk tier: nothing is written, streams past the CPU "
                                       "tier are dropped)."),
                io.String.Input("key", default="", optional=True,
                                tooltip="store / recall: the name to store under (letters, digits, . _ -)."),
                io.Latent.Input("latent", optional=True, tooltip="store: the latent to store."),
                io.Image.Input("image", optional=True, tooltip="store: the image to store."),
                io.String.Input("folder", default="", optional=True,
                                tooltip="store / recall: folder of the store (default: output/jetdet_recall)."),
                io.Latent.Input("after", optional=True,
                                tooltip="Connect the sampler's output here so stats are read after sampling."),
            ],
            outputs=[
                io.Model.Output(tooltip="set_budget: the clone with the new budgets; otherwise the input model."),
                io.Latent.Output(tooltip="recall: the stored latent; store: the latent stored."),
                io.Image.Output(tooltip="recall: the stored image; store: the image stored."),
                io.String.Output(display_name="report", tooltip="What was done, with the statistics."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.dynprompt],  # which outputs are connected (_linked_outputs)
        )

    @classmethod
    def fingerprint_inputs(cls, action="stats", key="", folder="", **kwargs):
        """ComfyUI reruns the node when this changes. store / recall: the stored file's content, so a changed
        file is never served from ComfyUI's cache, and a store runs again once another prompt overwrote its
        key."""
        if action not in ("store", "recall"):
            return float("nan") if action is None else ""
        if key is None or folder is None:  # wired from another node: known only at run time
            return float("nan")
        try:
            return file_state(recall_path(key, folder))
        except ValueError:  # a bad key: run, and raise the node's error
            return float("nan")

    @classmethod
    def _outputs(cls, action, key, model, latent, image, kind=None, shape=None):
        """The MODEL, LATENT and IMAGE outputs. One with nothing to give is a ValueError naming it when another
        node takes it, else ComfyUI's ExecutionBlocker with that message (so a node connected to it later, while
        this result is served from ComfyUI's cache, is blocked with the message, never handed None)."""
        from comfy_execution.graph_utils import ExecutionBlocker

        held = f"key {key!r} holds {'an' if kind == 'image' else 'a'} {kind} {shape}" if kind else ""
        why = {
            0: "no model is connected to the model input (store and recall pass it through)",
            1: (f"{held}, not a latent; take the IMAGE output" if action == "recall" else
                f"store got an image {shape}, not a latent; take the IMAGE output" if action == "store" else
                f"action {action!r} gives no latent (store and recall do)"),
            2: (f"{held}, not an image; take the LATENT output" if action == "recall" else
                f"store got a latent {shape}, not an image; take the LATENT output" if action == "store" else
                f"action {action!r} gives no image (store and recall do)"),
        }
        out, linked = [model, latent, image], _linked_outputs(cls.hidden)
        for i, name in enumerate(("MODEL", "LATENT", "IMAGE")):
            if out[i] is None:
                msg = f"jetdet Cache Manager: {name} output is empty: {why[i]}"
                if i in linked:
                    raise ValueError(f"{msg} (connected to node {', '.join(linked[i])})")
                out[i] = ExecutionBlocker(msg)
        return out

    @classmethod
    def validate_inputs(cls, action=None, input_types=None):
        return _combos_valid(cls, input_types, action=action)

    @classmethod
    def execute(cls, action, model=None, device_budget_mb=-1.0, cpu_budget_mb=-1.0, disk_budget_mb=0.0, key="",
                latent=None, image=None, folder="", after=None):
        smp.check_choice("action", action, ACTIONS)
        if action in ("store", "recall"):
            if action == "store":
                kind, t = _one_input(latent, image, "JetDetCacheManager store")
                path = recall_store(key, kind, t, folder)
                report = f"stored {kind} {tuple(t.shape)} under {key!r}: {path}"
            else:
                kind, t, meta = recall_load(key, folder)
                report = (f"recalled {kind} {tuple(t.shape)} from {key!r}, checksum verified "
                          f"{meta.get('checksum', '')[:16]}")
            outs = cls._outputs(action, key, model, {"samples": t} if kind == "latent" else None,
                                t if kind == "image" else None, kind, tuple(t.shape))
            return io.NodeOutput(*outs, report, ui={"text": [report]})
        if model is None:
            raise ValueError(f"model: action {action!r} needs a model from jetdet Fast Optimizer")
        state = wr.fast_state(wr.check_model(model))
        if state is None:
            how = " (it is in jetdet's deterministic mode, which caches nothing)" if wr.is_deterministic(model) else ""
            raise ValueError(f"model: {type(model.model).__name__} has no jetdet step cache{how}; connect the output "
                             "of jetdet Fast Optimizer (or Mode Switch in fast mode)")
        out_model = model
        if action == "set_budget":
            budgets = dict(device=_mb("device_budget_mb", device_budget_mb), cpu=_mb("cpu_budget_mb", cpu_budget_mb),
                           disk=_mb("disk_budget_mb", disk_budget_mb))
            opts = dict(state.options, linear_attention=state.linear_attention, attention_cache=state.attention_cache)
            out_model, new_state = wr.with_fast(model, **opts)
            new_state.set_budgets(**budgets)
            report = "budgets (bytes, None = unlimited): " + json.dumps(budgets)
        elif action == "clear":
            state.clear()
            report = "cleared; " + _stats_text(state.stats(), state.held_bytes())
        else:
            report = _stats_text(state.stats(), state.held_bytes())
        return io.NodeOutput(*cls._outputs(action, key, out_model, None, None), report, ui={"text": [report]})


def _stats_text(s: dict, held: dict | None = None) -> str:
    """``runs N (so far); last run: calls ...``: the counts are those of the model's last sampling run (the step
    cache starts each run afresh), ``runs`` counts every run of the model; its ``bytes per tier`` are what that run
    held at its end, and ``held now`` what is held when the report is made (nothing between runs: a run frees its
    cache when it ends)."""
    head = f"runs {s['runs']} (so far); last run: " if "runs" in s else ""
    keys = ("calls", "calls_run", "calls_saved", "calls_partial", "rows", "rows_run", "rows_saved", "hits",
            "call_ratio", "row_ratio", "syncs", "budget", "forecast_space", "piggyback")
    parts = [f"{k} {s[k]:.3g}" if isinstance(s.get(k), float) else f"{k} {s[k]}" for k in keys if k in s]
    if "bytes" in s:
        parts.append("bytes per tier at its end " + json.dumps(s["bytes"]))
    m = s.get("manager") or {}
    for k in ("spilled_to_cpu", "spilled_to_disk", "evicted", "peak_device_bytes"):
        if k in m:
            parts.append(f"{k} {m[k]}")
    text = head + ", ".join(parts)
    return text if held is None else f"{text}; held now {json.dumps(held)}"


# ------------------------------------------------------------------------------------------------ benchmark


_warned_plot = False


def _plot_ys(points: list[dict]) -> tuple[list[float], float]:
    """The height of every point, and where PSNR inf (bit-identical to off) is drawn: at 100 dB, or on a round
    number at least 10 dB above the highest finite PSNR when that is above 90 dB (a deterministic run can be at
    130 dB), so bit-identical runs are always drawn on top."""
    finite = [p["psnr"] for p in points if math.isfinite(p["psnr"])]
    top = max(100.0, 10.0 * math.ceil((max(finite) + 10.0) / 10.0)) if finite else 100.0
    return [p["psnr"] if math.isfinite(p["psnr"]) else top for p in points], top


def _plot_pil(points: list[dict]) -> torch.Tensor:
    """The same scatter drawn with PIL (ComfyUI always has it), when matplotlib is not installed."""
    import numpy as np
    from PIL import Image, ImageDraw

    w, h, m = 500, 360, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xs = [p["speedup"] for p in points]
    ys, top = _plot_ys(points)
    x0, x1 = min(0.0, min(xs)), max(xs) * 1.1 or 1.0
    y0, y1 = min(ys) - 5, max(ys) + 5

    def px(x, y):
        return m + (x - x0) / (x1 - x0) * (w - 2 * m), h - m - (y - y0) / (y1 - y0) * (h - 2 * m)

    d.rectangle([m, m, w - m, h - m], outline="black")
    d.text((m, h - m + 15), f"wall-time speed-up against off ({x0:.2g}..{x1:.2g})", fill="black")
    d.text((5, 5), f"PSNR against off, dB ({y0:.3g}..{y1:.3g}; inf drawn at {top:g})", fill="black")
    for p, x, y in zip(points, xs, ys):
        cx, cy = px(x, y)
        d.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=(31, 119, 180))
        d.text((cx + 6, cy - 12), p["label"], fill="black")
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


def _plot(points: list[dict]) -> torch.Tensor:
    """PSNR against speed-up as an IMAGE ``[1, H, W, 3]``: matplotlib, or PIL with a one-time warning."""
    global _warned_plot
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        if not _warned_plot:
            _warned_plot = True
            import logging

            logging.warning("jetdet Benchmark: matplotlib is not installed; drawing a plain plot with PIL instead "
                            "(pip install matplotlib for the full plot)")
        return _plot_pil(points)
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=100)
    ys, top = _plot_ys(points)
    for p, y in zip(points, ys):
        ax.scatter([p["speedup"]], [y], s=40)
        ax.annotate(p["label"], (p["speedup"], y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("wall-time speed-up against off")
    ax.set_ylabel(f"PSNR against off, dB (inf drawn at {top:g})")
    ax.set_title("jetdet: quality against speed")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    plt.close(fig)
    return torch.from_numpy(rgba[..., :3].copy()).float().div(255.0)[None]


class _StepBar:
    """One progress bar over every sampling run of a node, moved by the samplers' per-step callback. The callback
    also checks ComfyUI's interrupt flag: a run with no callback could be cancelled only between runs."""

    def __init__(self, total: int):
        import comfy.utils

        self.total, self.done = total, 0
        self.pbar = comfy.utils.ProgressBar(total)

    def step(self, *_) -> None:
        import comfy.model_management

        comfy.model_management.throw_exception_if_processing_interrupted()
        self.done = min(self.done + 1, self.total)
        self.pbar.update_absolute(self.done, self.total)


class JetDetBenchmark(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="JetDetBenchmark", display_name="jetdet Benchmark", category=CATEGORY,
            description="Samples the latent with the model in off, fast (each budget) and deterministic mode, from "
                        "the same per-item noise; reports wall time, model calls, PSNR against off and checksums. "
                        "Every setting first runs once untimed (2 steps; the fast setting with the largest budget all "
                        "its steps, so the step cache's own first calls are warm too), so model loading and "
                        "first-call costs are in no timed run.",
            is_output_node=True,
            inputs=[io.Model.Input("model", tooltip="The model to sample (it is not changed). A model from the Fast "
                                                    "Optimizer keeps its settings in the fast runs (only the budget "
                                                    "is each of fast_budgets).")]
            + _ksampler_inputs(offset=False)[1:] + [
                io.String.Input("fast_budgets", default="0.05, 0.1",
                                tooltip="Comma-separated step-cache budgets to run in fast mode (empty: only off "
                                        "and deterministic)."),
                io.Int.Input("repeats", default=1, min=1, max=20, optional=True,
                             tooltip="Timed runs per setting, interleaved (off, fast..., deterministic, then again); "
                                     "the table gives the median wall time. One run's wall time moves with the "
                                     "machine's load; the model-call counts do not."),
            ],
            outputs=[
                io.String.Output(display_name="table", tooltip="One row per run: mode, wall, calls, PSNR, checksums."),
                io.Image.Output(display_name="plot", tooltip="PSNR against speed-up (matplotlib)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, sampler_name=None, scheduler=None, input_types=None):
        return _combos_valid(cls, input_types, sampler_name=sampler_name, scheduler=scheduler)

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
                fast_budgets, repeats=1):
        import jetdet

        wr.check_model(model)
        try:
            # + 0.0: a budget typed "-0" is 0 (labelled "fast 0", not "fast -0")
            budgets = [float(b) + 0.0 for b in str(fast_budgets).replace(";", ",").split(",") if b.strip()]
        except ValueError:
            raise ValueError(f"fast_budgets: expected comma-separated numbers, got {fast_budgets!r}") from None
        for b in budgets:
            if not 0.0 <= b <= 1.0:
                raise ValueError(f"fast_budgets: every budget must be in [0, 1], got {b}")
        runs = [("off", wr.without_jetdet(model))]
        # a model from the Fast Optimizer keeps its settings (forecast, max_consecutive_skips, start/end_percent,
        # attention options) in the fast runs, only the budget is each of fast_budgets; before, they were dropped
        # for the defaults, and a model set never to skip skipped calls here (a user trial)
        given = wr.fast_state(model)
        fast_opts = {} if given is None else {
            k: v for k, v in dict(given.options, linear_attention=given.linear_attention,
                                  attention_cache=given.attention_cache).items() if k != "budget"}
        for b in budgets:
            runs.append((f"fast {b:g}", wr.with_fast(model, **fast_opts, budget=b)[0]))
            wr.fast_state(runs[-1][1]).note_nothing_saved = False  # its table shows the calls
        runs.append(("deterministic", wr.with_deterministic(model)))
        # an untimed warm-up of every setting before any timed run: ComfyUI loads the model on the first sampling
        # call (and a GPU compiles kernels on the first call of each op), which would otherwise land in the first
        # timed run and make the others look faster. Two steps each, but the fast setting with the largest budget runs
        # all its steps: the step cache launches its own kernels (forecast, relative change) only after a few calls,
        # and at budget 0 never
        repeats = int(repeats)
        if repeats < 1:
            raise ValueError(f"repeats: expected at least 1, got {repeats}")
        full = 1 + budgets.index(max(budgets)) if budgets else -1  # runs[1 + b]: budget b's setting
        warm = [steps if i == full else min(steps, 2) for i in range(len(runs))]
        bar = _StepBar(sum(warm) + len(runs) * repeats * steps)
        with wr.conditionings_named(model, positive, negative):  # the off run samples first, outside jetdet
            for (_, m), n in zip(runs, warm):
                smp.sample(m, seed, n, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise, 0,
                           callback=bar.step, disable_pbar=True)
        rows = [dict(label=label, walls=[]) for label, _ in runs]
        for rep in range(repeats):  # interleaved: a slow spell of the machine lands on every setting alike
            for row, (_, m) in zip(rows, runs):
                counted, counter = wr.with_counter(m)
                t0 = time.perf_counter()
                samples = smp.sample(counted, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                     latent_image, denoise, 0, callback=bar.step, disable_pbar=True)
                if samples.is_cuda:  # ComfyUI --gpu-only keeps the result on the GPU: its work may still be queued
                    torch.cuda.synchronize(samples.device)
                row["walls"].append(time.perf_counter() - t0)
                if rep == 0:
                    row.update(samples=samples, calls=counter.calls, rows=counter.rows)
        ref, points = rows[0]["samples"], []
        for r in rows:
            r["wall"] = statistics.median(r["walls"])
            r["psnr"] = psnr_db(r["samples"], ref)
            r["sums"] = [jetdet.checksum(r["samples"][j:j + 1])[:16] for j in range(r["samples"].shape[0])]
        base = rows[0]
        lines = [f"{'run':<16} {'wall s':>8} {'speed-up':>9} {'fewer calls':>11} {'model calls':>11} {'rows':>6} "
                 f"{'PSNR dB':>8}  checksums"]
        for r in rows:
            r["speedup"] = base["wall"] / r["wall"] if r["wall"] else math.inf
            fewer = base["calls"] / r["calls"] if r["calls"] else math.inf
            points.append({"label": r["label"], "speedup": r["speedup"], "psnr": r["psnr"]})
            lines.append(f"{r['label']:<16} {r['wall']:>8.3f} {r['speedup']:>8.2f}x {fewer:>10.2f}x {r['calls']:>11} "
                         f"{r['rows']:>6} {r['psnr']:>8.2f}  {' '.join(r['sums'])}")
        how = (f"the median of {repeats} interleaved runs per setting" if repeats > 1 else
               "one run per setting; it moves with the machine's load (raise repeats), the model calls do not")
        lines.append(f"wall s: {how}" + ("" if budgets else ". No fast budgets given (fast_budgets is empty)"))
        if budgets and given is not None:
            shown = {k: v for k, v in fast_opts.items() if v is not None and v is not False}  # 0 is shown
            lines.append("fast: the given model's Fast Optimizer settings at each budget: "
                         + ", ".join(f"{k} {v}" for k, v in sorted(shown.items())))
        table = "\n".join(lines)
        return io.NodeOutput(table, _plot(points), ui={"text": [table]})


# ----------------------------------------------------------------------------------------- expert selector


def stable_index(key: str, n: int) -> int:
    """``int(SHA-256(key)) mod n``: the same on every machine and Python (never ``hash()``)."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest(), 16) % n


def conditioning_checksum(cond) -> str:
    import jetdet

    if not isinstance(cond, list) or not cond:
        raise ValueError("conditioning: expected a CONDITIONING (a list of [tensor, dict] entries)")
    h = hashlib.sha256()
    for entry in cond:
        h.update(jetdet.checksum(entry[0]).encode())
        for k in sorted(entry[1]) if len(entry) > 1 and isinstance(entry[1], dict) else []:
            v = entry[1][k]
            if isinstance(v, torch.Tensor):
                h.update(f"{k}={jetdet.checksum(v)}".encode())
            elif _plain_value(v):  # an area, a strength, a timestep range, Flux's guidance: they change the image
                h.update(f"{k}={v!r}".encode())
    return h.hexdigest()


def _plain_value(v) -> bool:
    """A number, string, bool or None, or a tuple/list of them: hashed by ``repr`` (objects such as a ControlNet or
    hooks are not: their ``repr`` holds a memory address)."""
    if isinstance(v, (tuple, list)):
        return all(_plain_value(e) for e in v)
    return v is None or isinstance(v, (bool, int, float, str))


class JetDetExpertSelector(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="JetDetExpertSelector", display_name="jetdet Expert Selector", category=CATEGORY,
            description="Chooses one of up to 4 models by SHA-256 of the prompt text (or of the conditioning's "
                        "checksum): the same input picks the same expert on every machine.",
            inputs=[
                io.Model.Input("model_1", tooltip="Expert 1."),
                io.Model.Input("model_2", optional=True, tooltip="Expert 2 (optional)."),
                io.Model.Input("model_3", optional=True, tooltip="Expert 3 (optional)."),
                io.Model.Input("model_4", optional=True, tooltip="Expert 4 (optional)."),
                io.String.Input("prompt", default="", multiline=True, optional=True,
                                tooltip="Text to hash (used when not empty)."),
                io.Conditioning.Input("conditioning", optional=True,
                                      tooltip="Conditioning whose checksum is hashed (used when the prompt is empty)."),
            ],
            outputs=[
                io.Model.Output(tooltip="The chosen expert."),
                io.Int.Output(display_name="index", tooltip="Which input was chosen (1-4)."),
            ],
        )

    @classmethod
    def execute(cls, model_1, model_2=None, model_3=None, model_4=None, prompt="", conditioning=None):
        slots = [(i + 1, m) for i, m in enumerate((model_1, model_2, model_3, model_4)) if m is not None]
        if prompt and prompt.strip():
            key = "text:" + prompt
        elif conditioning is not None:
            key = "cond:" + conditioning_checksum(conditioning)
        else:
            raise ValueError("prompt, conditioning: give a prompt text or connect a conditioning to choose by")
        slot, model = slots[stable_index(key, len(slots))]
        return io.NodeOutput(model, slot)


# ---------------------------------------------------------------------------------------- multi-pass refiner


def pass_seed(seed: int, name: str) -> int:
    """The seed of pass ``name``: 64 bits of SHA-256 of (seed, pass)."""
    return int.from_bytes(hashlib.sha256(f"jetdet.multipass|{seed}|{name}".encode()).digest()[:8], "little")


class JetDetMultiPassRefiner(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="JetDetMultiPassRefiner", display_name="jetdet Multi-Pass Refiner", category=CATEGORY,
            description="coarse -> refine -> detail as chained partial denoising, each pass deterministic with a seed "
                        "derived from (seed, pass); running one pass alone on its input reproduces it bit-exact.",
            inputs=_ksampler_inputs()[:9] + [
                io.Float.Input("coarse_denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Denoise of the coarse pass (1 = from noise)."),
                io.Float.Input("refine_denoise", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Denoise of the refine pass."),
                io.Float.Input("detail_denoise", default=0.25, min=0.0, max=1.0, step=0.01,
                               tooltip="Denoise of the detail pass."),
                io.Combo.Input("start_pass", options=PASSES, default="coarse",
                               tooltip="First pass to run (its input is latent_image)."),
                io.Combo.Input("end_pass", options=PASSES, default="detail", tooltip="Last pass to run."),
                io.Int.Input("batch_offset", default=0, min=0, max=SEED_MAX,
                             tooltip="Item id of the first latent in the batch (item i uses batch_offset + i, or "
                                     "batch_offset + batch_index[i] for a latent from Latent From Batch or Repeat "
                                     "Latent Batch, which carries its items' ids: leave 0 there)."),
            ],
            outputs=[
                io.Latent.Output(tooltip="The latent after end_pass."),
                io.String.Output(display_name="report", tooltip="Per pass: seed, denoise and item checksums."),
            ],
        )

    @classmethod
    def validate_inputs(cls, sampler_name=None, scheduler=None, start_pass=None, end_pass=None, input_types=None):
        return _combos_valid(cls, input_types, sampler_name=sampler_name, scheduler=scheduler, start_pass=start_pass,
                             end_pass=end_pass)

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                coarse_denoise, refine_denoise, detail_denoise, start_pass, end_pass, batch_offset):
        smp.check_choice("start_pass", start_pass, PASSES)
        smp.check_choice("end_pass", end_pass, PASSES)
        a, b = PASSES.index(start_pass), PASSES.index(end_pass)
        if a > b:
            raise ValueError(f"end_pass: {end_pass!r} comes before start_pass {start_pass!r}")
        denoise = {"coarse": coarse_denoise, "refine": refine_denoise, "detail": detail_denoise}
        latent, lines = latent_image, []
        for name in PASSES[a:b + 1]:
            s = pass_seed(seed, name)
            latent = _det_sample(model, s, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                 denoise[name], batch_offset, note_fast=name == PASSES[a])
            lines.append(f"{name}: seed {s}, denoise {denoise[name]:g}")
            lines += ["  " + x for x in _item_checksums(latent["samples"], _ids_of(latent["samples"], batch_offset,
                                                                                     latent))]
        return io.NodeOutput(latent, "\n".join(lines))


# ------------------------------------------------------------------------------------------ the shapes model


class JetDetShapesModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="JetDetShapesModelLoader", display_name="jetdet Shapes Model Loader", category=CATEGORY,
            description="Loads jetdet's small trained SD3-architecture model (10 classes of shapes, 32x32) through "
                        "ComfyUI's own model detection. The same file also loads with Load Diffusion Model.",
            inputs=[io.String.Input("path", default="", optional=True,
                                    tooltip="Another weights file of the same model, e.g. from "
                                            "bench/train_comfy_native.py (empty: the one shipped with jetdet): "
                                            "absolute, or a name in ComfyUI's models/diffusion_models folder; "
                                            "checked to be this architecture before it is loaded.")],
            outputs=[io.Model.Output(tooltip="The shapes model (ComfyUI detects it as SD3).")],
        )

    @classmethod
    def execute(cls, path=""):
        return io.NodeOutput(sm.load_model(_shapes_model_path(path)))


def _shapes_model_path(path: str):
    """The loader's ``path`` as a file to open (None: the shipped one). A relative path that exists from the
    process's folder is taken as before; otherwise it is looked up in ComfyUI's ``diffusion_models`` folders, where
    the README copies the file for Load Diffusion Model (a user trial typed that name and got "no shapes model at
    <the name>": it had been looked for only relative to the folder the server was started in). Found nowhere: an
    error naming each absolute place tried."""
    p = os.path.expanduser(path.strip())
    if not p or os.path.isabs(p) or os.path.exists(p):
        return p or None
    import folder_paths

    found = folder_paths.get_full_path("diffusion_models", p)
    if found:
        return found
    name = os.path.relpath(os.path.join("/", p), "/")  # as get_full_path joins it
    tried = [os.path.join(d, name) for d in folder_paths.get_folder_paths("diffusion_models")] + [os.path.abspath(p)]
    raise FileNotFoundError(f"path: no shapes model {p!r}: not at " + ", ".join(tried)
                            + " (a name in ComfyUI's models/diffusion_models folder, or an absolute path; empty: the "
                              "one jetdet ships; train another with bench/train_comfy_native.py)")


class JetDetClassConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        names = ", ".join(f"{i}={n}" for i, n in enumerate(sm.CLASSES))
        return io.Schema(
            node_id="JetDetClassConditioning", display_name="jetdet Class Conditioning", category=CATEGORY,
            description=f"Class index -> CONDITIONING for the shapes model ({names}); negative is the null class.",
            inputs=[io.Int.Input("class_index", default=0, min=0, max=len(sm.CLASSES) - 1,
                                 tooltip=f"Which shape: {names}.")],
            outputs=[io.Conditioning.Output(display_name="positive", tooltip="The class."),
                     io.Conditioning.Output(display_name="negative", tooltip="The null class (all zeros).")],
        )

    @classmethod
    def execute(cls, class_index):
        return io.NodeOutput(sm.class_conditioning(class_index), sm.null_conditioning())


class JetDetShapesDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="JetDetShapesDecode", display_name="jetdet Shapes Decode", category=CATEGORY,
            description="Shapes-model latent -> IMAGE (there is no VAE: the latent holds the pixels).",
            inputs=[io.Latent.Input("samples", tooltip="A latent from the shapes model."),
                    io.Int.Input("scale", default=4, min=1, max=32, tooltip="Nearest-neighbour upscale factor.")],
            outputs=[io.Image.Output(tooltip="The images.")],
        )

    @classmethod
    def execute(cls, samples, scale):
        img = sm.latent_to_image(_latent_tensor(samples, "samples"))
        if scale > 1:
            img = img.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
        return io.NodeOutput(sm.to_comfy_image(img))


# ---------------------------------------------------------------------------------------------- VAE decode, encode

def _vae_inputs(verb: str) -> list:
    """The VAE and ``strict`` inputs of the Deterministic VAE Decode and Encode nodes."""
    return [io.Vae.Input("vae", tooltip=f"The VAE to {verb} with (it is not changed)."),
            io.Boolean.Input("strict", default=True,
                             tooltip="Raise on a torch op with no deterministic implementation (off: warn instead).")]


class JetDetDeterministicVAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="JetDetDeterministicVAEDecode", display_name="jetdet Deterministic VAE Decode", category=CATEGORY,
            description="VAE Decode whose item i is bit-identical to decoding that item alone: batch-invariant ops and "
                        "attention, whatever the batch size or free memory. It stops with an error rather than fall "
                        "back to tiled decoding (which changes the pixels) when memory runs out.",
            inputs=[io.Latent.Input("samples", tooltip="The latent to decode (e.g. the Deterministic Sampler's)."),
                    *_vae_inputs("decode")],
            outputs=[io.Image.Output(tooltip="The decoded images, each independent of the batch around it.")],
        )

    @classmethod
    def execute(cls, samples, vae, strict):
        return io.NodeOutput(dvae.decode(vae, _latent_tensor(samples, "samples"), warn_only=not strict))


class JetDetDeterministicVAEEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="JetDetDeterministicVAEEncode", display_name="jetdet Deterministic VAE Encode", category=CATEGORY,
            description="VAE Encode whose item i is bit-identical to encoding that image alone (for img2img with "
                        "the Deterministic Sampler). It stops with an error rather than fall back to tiled encoding "
                        "when memory runs out.",
            inputs=[io.Image.Input("pixels", tooltip="The images to encode (an alpha channel is dropped)."),
                    *_vae_inputs("encode")],
            outputs=[io.Latent.Output(tooltip="The latents, each independent of the batch around it.")],
        )

    @classmethod
    def execute(cls, pixels, vae, strict):
        return io.NodeOutput({"samples": dvae.encode(vae, pixels, warn_only=not strict)})


class JetDetDeterministicVAEDecodeAudio(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="JetDetDeterministicVAEDecodeAudio", display_name="jetdet Deterministic VAE Decode (Audio)",
            category=CATEGORY,
            description="VAE Decode Audio whose item i is bit-identical to decoding that item alone (Stable Audio, "
                        "ACE-Step): batch-invariant convolutions, whatever the batch size or free memory.",
            inputs=[io.Latent.Input("samples", tooltip="The audio latent to decode."), *_vae_inputs("decode")],
            outputs=[io.Audio.Output(tooltip="The decoded audio, each item independent of the batch around it.")],
        )

    @classmethod
    def execute(cls, samples, vae, strict):
        return io.NodeOutput(dvae.decode_audio(vae, _latent_tensor(samples, "samples"), warn_only=not strict,
                                               latent=samples))


NODES = [
    JetDetModeSwitch, JetDetDeterministicSampler, JetDetChecksum, JetDetOutputMatcher, JetDetFastOptimizer,
    JetDetCacheManager, JetDetBenchmark, JetDetExpertSelector, JetDetMultiPassRefiner, JetDetClassConditioning,
    JetDetShapesModelLoader, JetDetShapesDecode, JetDetDeterministicVAEDecode, JetDetDeterministicVAEEncode,
    JetDetDeterministicVAEDecodeAudio, JetDetDeterministicSamplerAdvanced,
]


class JetDetExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
