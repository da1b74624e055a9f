"""Render job specs: parsing and validation, the item list, the model entry point and the spec hash.

A spec is a JSON object (or a dict). Every key is optional except ``items``::

    {
      "model": "bundled",                 # or "package.module:factory" (see load_model)
      "items": {"count": 12, "start": 0, "classes": "all", "seed": 0},
      "seed": 0,                          # default seed of items that give none
      "steps": 30, "sampler": "euler", "cfg": 4.0, "shift": 1.0,
      "mode": "deterministic",            # "deterministic" | "off" | "fast" (step cache, with "budget")
      "budget": 0.06,                     # fast mode only
      "dtype": "float32",                 # float32 | float16 | bfloat16
      "batch_size": 4,                    # items per sampling call, per worker
      "device": "auto"                    # auto (CUDA when there is one) | cpu | cuda
    }

``items`` is one of:

* a count (``12``): items ``0 .. 11``, classes cycled, the job seed;
* a range: ``{"count": N, "start": S, "classes": [...] | "all", "seed": s}``; item ``index`` (``S .. S+N-1``)
  gets class ``classes[index % len(classes)]`` (ints or class names);
* a list of ``{"class": int}`` or ``{"prompt": "circle"}`` objects, each with an optional ``"seed"`` and
  ``"stream"``; item ``index`` is the position in the list.

Noise rule: item ``index`` starts from ``jetdet.randn(seed, item_offset=stream)``, where ``seed`` is the item's
seed (default: the range's, then the job's) and ``stream`` defaults to ``index``. So a range with one seed draws
exactly what ``jetdet.models.sampling.sample(model, labels, seed=seed)`` draws for the whole list in one batch,
and an item's noise never depends on which batch or worker it lands in. An item given ``"stream": 0`` depends on
its (class, seed) alone, wherever it sits in the list.

``prompt`` names a class of a class-conditional model (the bundled model's are ``jetdet.models.BUNDLED_CLASSES``;
a user model lists its own in ``class_names``). Free text needs a text-conditioned model, which the bundled
sampler contract does not take.

The spec hash covers what decides the bytes of an item: the model (name and a digest of its state dict), the
expanded items, steps, sampler, cfg, shift, mode (and budget) and dtype. Batch size, device and worker count are
how the job runs, not what it makes: they are recorded per item in the manifest but not hashed. In deterministic
mode batch size and worker count do not change the bytes (in mode ``off`` they do, and the manifest shows which
batch size made what). The machine can: the CPU path and the GPU kernels round differently, and two GPU models may
take different launch tables (the H100 and H200 tables tile attention differently), so each item's manifest entry
names the fingerprint (device, driver, software) of the worker that made it, and items from different
fingerprints are not expected to match bit for bit.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import numbers
from dataclasses import dataclass

import torch

from ..models.sampling import DEFAULT_CFG, SAMPLERS

__all__ = ["RenderError", "JobSpec", "Item", "load_spec", "load_model", "spec_hash", "model_digest"]

MODES = ("deterministic", "off", "fast")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_BUDGET = 0.06
SPEC_KEYS = ("model", "items", "seed", "steps", "sampler", "cfg", "shift", "mode", "budget", "dtype", "batch_size",
             "device")
_RANGE_KEYS = ("count", "start", "classes", "seed")
_ITEM_KEYS = ("class", "prompt", "seed", "stream")
_U64 = 2**64
HASH_FORMAT = "jetdet.render.spec/1"


class RenderError(ValueError):
    """Bad input to a render job (the message names the argument and what was expected), or a folder that
    cannot take the job. Raised before anything in the output folder is changed."""


class ManifestDamaged(RenderError):
    """A render folder's manifest that cannot be read, or is not whole: ``verify`` reports it as a problem found
    (exit status 1), not as bad input."""


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _int(name: str, v, lo: int, hi: int | None = None) -> int:
    if not _is_int(v):
        raise RenderError(f"{name}: expected an int, got {v!r}")
    v = int(v)
    if v < lo or (hi is not None and v >= hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi})"
        raise RenderError(f"{name}: expected an int {rng}, got {v}")
    return v


def _float(name: str, v, *, positive: bool = False) -> float:
    if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(float(v)):
        raise RenderError(f"{name}: expected a finite number, got {v!r}")
    v = float(v)
    if positive and not v > 0:
        raise RenderError(f"{name}: expected a number > 0, got {v}")
    return v


def _choice(name: str, v, options) -> str:
    if not isinstance(v, str) or v not in options:
        raise RenderError(f"{name}: expected one of {', '.join(repr(o) for o in options)}, got {v!r}")
    return v


def _model_name(v) -> str:
    if not isinstance(v, str) or not v:
        raise RenderError(f"model: expected 'bundled' or an entry point 'package.module:factory', got {v!r}")
    return v


def _is_entry_point(name: str) -> bool:
    return name.count(":") == 1 and all(name.split(":"))


@dataclass(frozen=True)
class Item:
    """One item of a job: its index (file name, place in the manifest), class label, seed and noise stream."""

    index: int
    label: int
    seed: int
    stream: int


@dataclass
class JobSpec:
    """A validated render job. Build it with :func:`load_spec` (from a dict or a JSON file)."""

    items: object
    model: str = "bundled"
    seed: int = 0
    steps: int = 30
    sampler: str = "euler"
    cfg: float = DEFAULT_CFG
    shift: float = 1.0
    mode: str = "deterministic"
    budget: float | None = None
    dtype: str = "float32"
    batch_size: int = 4
    device: str = "auto"

    def to_dict(self) -> dict:
        """The spec as a JSON-ready dict (what the manifest stores)."""
        d = {k: getattr(self, k) for k in SPEC_KEYS}
        if d["budget"] is None:
            del d["budget"]
        return d

    @property
    def count(self) -> int:
        return _count(self.items)

    def expand(self, class_names: list[str] | None, num_classes: int) -> list[Item]:
        """The items with their labels resolved against the model's classes."""
        return _expand(self.items, self.seed, class_names, num_classes)


def _count(items) -> int:
    return items["count"] if isinstance(items, dict) else len(items)


def _parse_class(name: str, v):
    if isinstance(v, str):
        if not v:
            raise RenderError(f"{name}: expected a class index or a class name, got ''")
        return v
    return _int(name, v, 0)


def _parse_items(v, job_seed: int):
    if _is_int(v):
        v = {"count": int(v)}
    if isinstance(v, dict):
        unknown = sorted(set(v) - set(_RANGE_KEYS))
        if unknown:
            raise RenderError(f"items: unknown key(s) {unknown} in the range form; expected {list(_RANGE_KEYS)}")
        if "count" not in v:
            raise RenderError("items: the range form needs 'count' (the number of items)")
        count = v["count"]
        if _is_int(count) and int(count) < 1:
            raise RenderError(f"items: expected at least one item, got count {int(count)}")
        out = {"count": _int("items.count", count, 1), "start": _int("items.start", v.get("start", 0), 0)}
        classes = v.get("classes", "all")
        if classes != "all":
            if not isinstance(classes, (list, tuple)) or not classes:
                raise RenderError(f"items.classes: expected 'all' or a non-empty list of class indices or names, "
                                  f"got {classes!r}")
            classes = [_parse_class(f"items.classes[{i}]", c) for i, c in enumerate(classes)]
        out["classes"] = classes
        out["seed"] = _int("items.seed", v.get("seed", job_seed), 0, _U64)
        if out["start"] + out["count"] > _U64 - 1:
            raise RenderError("items: start + count must stay below 2^64 (the noise stream index)")
        return out
    if isinstance(v, (list, tuple)):
        if not v:
            raise RenderError("items: expected at least one item, got an empty list")
        out = []
        for i, it in enumerate(v):
            name = f"items[{i}]"
            if not isinstance(it, dict):
                raise RenderError(f"{name}: expected an object with 'class' or 'prompt' (and optional 'seed', "
                                  f"'stream'), got {it!r}")
            unknown = sorted(set(it) - set(_ITEM_KEYS))
            if unknown:
                raise RenderError(f"{name}: unknown key(s) {unknown}; expected {list(_ITEM_KEYS)}")
            if ("class" in it) == ("prompt" in it):
                raise RenderError(f"{name}: expected exactly one of 'class' (an index) or 'prompt' (a class name)")
            e = {}
            if "class" in it:
                e["class"] = _int(f"{name}.class", it["class"], 0)
            else:
                p = it["prompt"]
                if not isinstance(p, str) or not p:
                    raise RenderError(f"{name}.prompt: expected a class name, got {p!r}")
                e["prompt"] = p
            if "seed" in it:
                e["seed"] = _int(f"{name}.seed", it["seed"], 0, _U64)
            if "stream" in it:
                e["stream"] = _int(f"{name}.stream", it["stream"], 0, _U64 - 1)
            out.append(e)
        return out
    raise RenderError(f"items: expected a count, a range object {{'count': N, ...}} or a list of items, got {v!r}")


def _label(name: str, c, class_names, num_classes: int) -> int:
    if isinstance(c, str):
        if not class_names or c not in class_names:
            known = f"one of {list(class_names)}" if class_names else "a class index (the model lists no class names)"
            raise RenderError(f"{name}: unknown class name {c!r}; expected {known}")
        return list(class_names).index(c)
    if not 0 <= c < num_classes:
        raise RenderError(f"{name}: expected a class index in [0, {num_classes}), got {c}")
    return c


def _expand(items, job_seed: int, class_names, num_classes: int) -> list[Item]:
    if isinstance(items, dict):
        classes = items["classes"]
        if classes == "all":
            labels = list(range(num_classes))
        else:
            labels = [_label(f"items.classes[{i}]", c, class_names, num_classes) for i, c in enumerate(classes)]
        start, seed = items["start"], items["seed"]
        return [Item(i, labels[i % len(labels)], seed, i) for i in range(start, start + items["count"])]
    out = []
    for i, it in enumerate(items):
        c = it["class"] if "class" in it else it["prompt"]
        key = "class" if "class" in it else "prompt"
        out.append(Item(i, _label(f"items[{i}].{key}", c, class_names, num_classes), it.get("seed", job_seed),
                        it.get("stream", i)))
    return out


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list) -> dict:
    """``json.load``'s object hook: a key given twice in one object is an error (a spec file edited by hand, a
    ``"steps"`` added at the end while one was already there: json keeps the last one and the job ran with it)."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k, "{" + ", ".join(json.dumps(key) + ": ..." for key, _ in pairs) + "}")
        out[k] = v
    return out


def read_spec_file(path) -> dict:
    """The JSON object in a spec file, not yet validated."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f, object_pairs_hook=_no_duplicate_keys)
    except OSError as e:
        raise RenderError(f"spec: cannot read {str(path)!r}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise RenderError(f"spec: {str(path)!r} is not valid JSON: {e}") from None
    except _DuplicateKey as e:
        raise RenderError(f"spec: {str(path)!r} gives the key {e.args[0]!r} twice (in {e.args[1]}); expected each "
                          "key once (JSON readers keep one of the two silently)") from None
    if not isinstance(raw, dict):
        raise RenderError(f"spec: expected a JSON object in {str(path)!r}, got {type(raw).__name__}")
    return raw


def load_spec(spec, **overrides) -> JobSpec:
    """A :class:`JobSpec` from a dict, a JSON file path or a JobSpec; ``overrides`` (spec keys, ``None`` skipped)
    replace the spec's values. Raises :class:`RenderError` naming the key on bad input."""
    if isinstance(spec, JobSpec):
        raw = spec.to_dict()
    elif isinstance(spec, dict):
        raw = dict(spec)
    elif spec is None:
        raw = {}
    else:
        raw = read_spec_file(spec)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        raise RenderError(f"spec: unknown key(s) {unknown}; expected some of {list(SPEC_KEYS)}")
    if "items" not in raw:
        raise RenderError("items: required (a count, a range object or a list of items)")
    seed = _int("seed", raw.get("seed", 0), 0, _U64)
    mode = _choice("mode", raw.get("mode", "deterministic"), MODES)
    budget = raw.get("budget")
    if mode == "fast":
        budget = _float("budget", DEFAULT_BUDGET if budget is None else budget)
        if budget < 0:
            raise RenderError(f"budget: expected a number >= 0, got {budget}")
    elif budget is not None:
        raise RenderError(f"budget: only used with mode 'fast' (the step cache's error budget), got mode {mode!r}")
    return JobSpec(
        items=_parse_items(raw["items"], seed),
        model=_model_name(raw.get("model", "bundled")),
        seed=seed,
        steps=_int("steps", raw.get("steps", 30), 1),
        sampler=_choice("sampler", raw.get("sampler", "euler"), SAMPLERS),
        cfg=_float("cfg", raw.get("cfg", DEFAULT_CFG)),
        shift=_float("shift", raw.get("shift", 1.0), positive=True),
        mode=mode,
        budget=budget,
        dtype=_choice("dtype", raw.get("dtype", "float32"), tuple(DTYPES)),
        batch_size=_int("batch_size", raw.get("batch_size", 4), 1),
        device=_choice("device", raw.get("device", "auto"), DEVICES),
    )


# ------------------------------------------------------------------------------------------------- model


def _resolve_entry_point(name: str):
    mod_name, attr = name.split(":")
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as e:
        raise RenderError(f"model: cannot import module {mod_name!r} of entry point {name!r}: {e}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise RenderError(f"model: module {mod_name!r} has no attribute {attr!r} (entry point {name!r})") from None
    if not callable(obj):
        raise RenderError(f"model: entry point {name!r} is a {type(obj).__name__}, expected a callable factory")
    return obj


def check_model_contract(model, name: str) -> None:
    """The contract :func:`jetdet.models.sampling.sample` needs (what the bundled model has)."""
    what = ("an nn.Module called as model(x [B, C, S, S], t [B] in [0, 1], y [B] long) -> velocity [B, C, S, S], "
            "with model.config holding int 'in_channels', 'sample_size' and 'num_classes'")
    if not isinstance(model, torch.nn.Module):
        raise RenderError(f"model: {name} gave a {type(model).__name__}; expected {what}")
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, dict) or not all(_is_int(cfg.get(k)) for k in ("in_channels", "sample_size",
                                                                            "num_classes")):
        raise RenderError(f"model: {name} gave a {type(model).__name__} without a usable config; expected {what}")
    if next(model.parameters(), None) is None:
        raise RenderError(f"model: {name} gave a module with no parameters (the sampler reads the device and dtype "
                          "from them); expected " + what)


def probe_model(model, name: str, guided: bool = True) -> None:
    """One forward as the sampler calls it: a class row, and with ``guided`` (cfg != 1) an unconditional-label row
    too. A model that breaks the contract (channels, label range, output shape or dtype) fails here, before the
    job writes anything."""
    cfg = model.config
    p = next(model.parameters())
    null = getattr(model, "null_label", None)
    null = cfg["num_classes"] if null is None else null
    labels = [0, null] if guided else [0]
    s, c, n = cfg["sample_size"], cfg["in_channels"], len(labels)
    what = f"x [{n}, {c}, {s}, {s}] {str(p.dtype).replace('torch.', '')} from its config, labels {labels}" + (
        f" (the unconditional label is {null})" if guided else "")
    x = torch.zeros(n, c, s, s, device=p.device, dtype=p.dtype)
    t = torch.full((n,), 0.5, device=p.device)
    y = torch.tensor(labels, dtype=torch.long, device=p.device)
    try:
        with torch.no_grad():
            v = model(x, t, y)
    except Exception as e:  # noqa: BLE001 - the user's model: its failure is named, not a traceback of ours
        raise RenderError(f"model: {name}: a trial forward failed ({what}): {type(e).__name__}: {e}") from e
    if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(x.shape) or v.dtype != x.dtype:
        got = (f"{tuple(v.shape)} {str(v.dtype).replace('torch.', '')}" if isinstance(v, torch.Tensor) else
               type(v).__name__)
        raise RenderError(f"model: {name}: a trial forward ({what}) returned {got}; expected a velocity of the "
                          "latent's shape and dtype")


def load_model(name: str, device, dtype: torch.dtype, guided: bool = True):
    """``(model, class_names)`` for a spec's ``model``.

    ``"bundled"``: :func:`jetdet.models.load_bundled`, classes :data:`jetdet.models.BUNDLED_CLASSES`.
    ``"package.module:factory"``: ``factory()`` is called with no arguments and must return a ``torch.nn.Module``
    with the bundled model's contract: ``model(x [B, C, S, S], t [B] float32 in [0, 1] (1 = noise),
    y [B] long) -> velocity [B, C, S, S]`` (rectified flow, ``x_t = (1 - t) x0 + t noise``, ``v = noise - x0``),
    ``model.config`` with ``in_channels``, ``sample_size`` and ``num_classes``, label ``num_classes`` (or
    ``model.null_label``) the unconditional label for CFG, and optionally ``model.class_names`` (for prompts).
    It is moved to ``device``/``dtype`` and put in eval mode.
    """
    if name == "bundled":
        from safetensors import SafetensorError

        from ..models import BUNDLED_CLASSES, bundled, load_bundled

        try:
            return load_bundled(device=device, dtype=dtype), list(BUNDLED_CLASSES)
        except (OSError, ValueError, SafetensorError) as e:  # its weights file missing or unreadable: on the command
            # line this read as a failed write mid-job ("the job stopped. The items listed in the manifest are kept"),
            # exit status 1; a truncated or empty one (SafetensorError) or another model's was a traceback
            why = str(e) if str(bundled.DIT_FILE) in str(e) else f"{bundled.DIT_FILE}: {e}"
            raise RenderError(f"model: 'bundled': cannot load its weights ({why})") from None
    if not _is_entry_point(name):
        raise RenderError(f"model: expected 'bundled' or an entry point 'package.module:factory', got {name!r} "
                          "(any other name is only a label, for a model object passed to render(model=...))")
    factory = _resolve_entry_point(name)
    try:
        with torch.random.fork_rng(devices=[]):  # a factory's random init leaves the caller's RNG alone
            model = factory()
    except Exception as e:  # noqa: BLE001 - the user's factory: its failure is named, not a traceback of ours
        raise RenderError(f"model: entry point {name!r} raised {type(e).__name__}: {e}") from e
    check_model_contract(model, f"entry point {name!r}")
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    probe_model(model, f"entry point {name!r}", guided)
    return model, class_names(model, f"entry point {name!r}")


def class_names(model, name: str) -> list[str] | None:
    """``model.class_names`` as a list, checked against ``model.config["num_classes"]``: a name past the last class
    would be the unconditional (CFG) label, which rendered silently as an unguided image (or, further on, failed
    mid-job with the folder already written)."""
    names = getattr(model, "class_names", None)
    if names is None:
        return None
    n = model.config["num_classes"]
    if isinstance(names, (str, bytes)) or not hasattr(names, "__iter__"):
        raise RenderError(f"model: {name} has class_names {names!r}; expected a list of {n} class names (strings)")
    names = list(names)
    if len(names) > n or not all(isinstance(c, str) and c for c in names):
        raise RenderError(f"model: {name} has {len(names)} class_names {_short(names)} but num_classes {n} in its "
                          f"config (label {n} is the unconditional one); expected at most {n} non-empty strings, "
                          "name i for label i")
    return names


def model_digest(model) -> str:
    """SHA-256 over the names and :func:`jetdet.checksum` of every tensor in ``model.state_dict()``."""
    from ..verify import checksum

    h = hashlib.sha256(b"jetdet.render.model/1|")
    for k, v in model.state_dict().items():
        h.update(f"{k}|{checksum(v)}|".encode())
    return h.hexdigest()


def spec_hash(spec: JobSpec, items: list[Item], digest: str) -> str:
    """SHA-256 of what decides an item's bytes (see the module docstring)."""
    ident = {
        "format": HASH_FORMAT, "model": spec.model, "model_digest": digest, "steps": spec.steps,
        "sampler": spec.sampler, "cfg": spec.cfg, "shift": spec.shift, "mode": spec.mode, "budget": spec.budget,
        "dtype": spec.dtype, "items": [[it.index, it.label, it.seed, it.stream] for it in items],
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def spec_differences(old: dict, new: dict, where: tuple[str, str] = ("in the folder", "now")) -> list[str]:
    """Human-readable ``key: old vs new`` lines between two stored specs (batch size and device left out), each
    value followed by its label in ``where``."""
    out = []
    for k in SPEC_KEYS:
        if k in ("batch_size", "device"):
            continue
        a, b = old.get(k), new.get(k)
        if a != b:
            key, a, b = _first_difference(k, a, b)
            out.append(f"{key}: {_short(a)} {where[0]}, {_short(b)} {where[1]}")
    return out


def _first_difference(key: str, a, b):
    """Where ``a`` and ``b`` first differ, down through lists and dicts: (``key[3].seed``-style path, a's value there,
    b's). A list that only grew or shrank is named by its length."""
    while True:
        if isinstance(a, list) and isinstance(b, list):
            i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
            if i is None:
                return f"{key} (length)", len(a), len(b)
            key, a, b = f"{key}[{i}]", a[i], b[i]
        elif isinstance(a, dict) and isinstance(b, dict):
            diff = sorted(k for k in set(a) | set(b) if a.get(k, _NONE) != b.get(k, _NONE))
            if len(diff) != 1 or diff[0] not in a or diff[0] not in b:
                return key, {k: a[k] for k in sorted(a)}, {k: b[k] for k in sorted(b)}
            key, a, b = f"{key}.{diff[0]}", a[diff[0]], b[diff[0]]
        else:
            return key, a, b


_NONE = object()


def _short(v) -> str:
    text = json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."
