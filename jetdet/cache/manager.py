"""The step cache's memory: a byte budget per tier, least-recently-used eviction, and spill/reload across
device → host → disk.

Every cached stream (one batch row of one CFG branch, see :mod:`jetdet.cache.controller`) owns a short list
of latent-sized tensors. The manager keeps them on the compute device while the device tier is within
``memory_budget_bytes``; past it, the least recently used streams move to the host tier (pinned memory when
the device is CUDA), past ``cpu_budget_bytes`` to the disk tier (one safetensors file per stream in a
private temporary directory), and past ``disk_budget_bytes`` they are dropped. A dropped stream simply has
no history: the controller recomputes it. :meth:`CacheManager.get` brings a stream back to its device,
bit for bit (raw bytes are copied, never converted).

``peak_device_bytes`` is the most bytes held on the device tier after a ``set``/``get`` has enforced the
budgets (the tensors being stored exist anyway; the budget bounds what the cache keeps alive).

Host syncs: none on the device tier. Moving to the host tier issues an asynchronous copy into pinned memory
(no sync); moving a stream from the host tier to disk waits for the copies in flight first
(``torch.cuda.synchronize``), so over-budget configurations with a disk tier pay a sync per spill to disk.
Reading a stream back from disk is a file read plus a host-to-device copy.

On a CPU device the "device" and "host" tiers are both host memory; the host tier then holds compact
copies (so views of a larger batch output no longer keep the whole batch alive) and exists mainly so that
the same budgets work everywhere.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

TIERS = ("device", "cpu", "disk")


def _check_budget(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: expected None (unlimited) or an int number of bytes >= 0, got {value!r}")
    return value


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class _Entry:
    tensors: list[torch.Tensor] | None  # on the device or host tier; None on disk
    device: torch.device  # where get() returns the tensors
    tier: str
    nbytes: int
    path: str | None = None
    meta: list[tuple[torch.Size, torch.dtype]] = field(default_factory=list)


class CacheManager:
    """Byte-budgeted, tiered storage of per-stream tensor lists.

    Args:
        memory_budget_bytes: most bytes kept on the compute device; ``None`` = unlimited.
        cpu_budget_bytes: most bytes kept in host memory (the spill tier); ``None`` = unlimited.
        disk_budget_bytes: most bytes kept in the temporary directory; ``None`` = unlimited.
        spill: the tiers a stream may move to when a budget is exceeded, a subset of ``("cpu", "disk")``.
            A stream that has nowhere left to go is dropped (evicted).
        pin_memory: host tier in pinned memory; default: when the device is CUDA.

    Keys are any hashable. :meth:`set` replaces a stream's tensors; :meth:`get` returns them on their
    device (reloading if spilled) and marks the stream most recently used; eviction and spilling take the
    least recently used stream first.
    """

    def __init__(self, memory_budget_bytes: int | None = None, cpu_budget_bytes: int | None = None,
                 disk_budget_bytes: int | None = None, spill=("cpu", "disk"), pin_memory: bool | None = None):
        self.memory_budget_bytes = _check_budget("memory_budget_bytes", memory_budget_bytes)
        self.cpu_budget_bytes = _check_budget("cpu_budget_bytes", cpu_budget_bytes)
        self.disk_budget_bytes = _check_budget("disk_budget_bytes", disk_budget_bytes)
        if isinstance(spill, str):
            spill = (spill,)
        try:
            spill = tuple(spill)
        except TypeError:
            raise ValueError(f"spill: expected a subset of ('cpu', 'disk'), got {spill!r}") from None
        bad = [s for s in spill if s not in ("cpu", "disk")]
        if bad:
            raise ValueError(f"spill: expected a subset of ('cpu', 'disk'), got {spill!r}")
        self.spill = spill
        if pin_memory is not None and not isinstance(pin_memory, bool):
            raise ValueError(f"pin_memory: expected None, True or False, got {pin_memory!r}")
        self.pin_memory = pin_memory
        self._entries: OrderedDict = OrderedDict()  # key -> _Entry, least recently used first
        self._bytes = dict.fromkeys(TIERS, 0)
        self._dir: str | None = None
        self._file_no = 0
        self._counts = {"sets": 0, "gets": 0, "hits": 0, "misses": 0, "spilled_to_cpu": 0, "spilled_to_disk": 0,
                        "reloaded_from_cpu": 0, "reloaded_from_disk": 0, "evicted": 0, "peak_device_bytes": 0}

    # ------------------------------------------------------------------------------------------ public
    def set(self, key, tensors) -> None:
        """Store ``tensors`` (a list, all on one device) as stream ``key``'s cache, replacing what it had,
        then enforce the budgets. The tensors are kept as given (no copy) while on the device tier, except views of a
        larger storage under a device budget, which are copied so that the budget counts what they hold."""
        # detach only what autograd tracks: the controller stores detached outputs already, and a detach per
        # history tensor per stream was ~24 of the ~110 tensor ops it dispatched per call (each a launch-sized
        # host cost on a GPU)
        tensors = [t.detach() if t.requires_grad else t for t in tensors]
        if not tensors:
            raise ValueError("tensors: expected at least one tensor")
        if self.memory_budget_bytes is not None:
            # Under a device budget, keep only what is counted: a row of a whole batch's output (the controller's
            # history) is a view that holds the whole batch's storage, which spilling this stream would not free, so
            # the budget did not bound the device's memory. Such views are copied to their own storage.
            tensors = [t.clone() if t.untyped_storage().nbytes() > t.numel() * t.element_size() else t
                       for t in tensors]
        device = tensors[0].device
        self.drop(key)
        e = _Entry(tensors=tensors, device=device, tier="device", nbytes=_nbytes(tensors))
        self._entries[key] = e
        self._bytes["device"] += e.nbytes
        self._counts["sets"] += 1
        self._enforce()
        self._counts["peak_device_bytes"] = max(self._counts["peak_device_bytes"], self._bytes["device"])

    def get(self, key) -> list[torch.Tensor] | None:
        """Stream ``key``'s tensors on their device, or None if it has none (never set, dropped or
        evicted). Reloads a spilled stream to the device tier (then enforces the budgets, which may spill
        other, older streams)."""
        self._counts["gets"] += 1
        e = self._entries.get(key)
        if e is None:
            self._counts["misses"] += 1
            return None
        self._counts["hits"] += 1
        self._entries.move_to_end(key)
        if e.tier == "device":
            return list(e.tensors)
        if e.tier == "cpu":
            out = [t.to(e.device, non_blocking=t.is_pinned()) if t.device != e.device else t.clone()
                   for t in e.tensors]
            self._counts["reloaded_from_cpu"] += 1
        else:
            out = self._read_disk(e)
            self._counts["reloaded_from_disk"] += 1
        self._move(e, "device", out)
        self._enforce(protect=key)
        self._counts["peak_device_bytes"] = max(self._counts["peak_device_bytes"], self._bytes["device"])
        return list(out)

    def tier(self, key) -> str | None:
        e = self._entries.get(key)
        return None if e is None else e.tier

    def drop(self, key) -> None:
        e = self._entries.pop(key, None)
        if e is not None:
            self._release(e)

    def keys(self) -> list:
        """Stored keys, least recently used first."""
        return list(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def bytes_by_tier(self) -> dict[str, int]:
        return dict(self._bytes)

    def stats(self) -> dict:
        streams = dict.fromkeys(TIERS, 0)
        for e in self._entries.values():
            streams[e.tier] += 1
        return {"bytes": self.bytes_by_tier(), "streams": streams, **self._counts,
                "budgets": {"device": self.memory_budget_bytes, "cpu": self.cpu_budget_bytes,
                            "disk": self.disk_budget_bytes}}

    def clear(self) -> None:
        """Drop every stream and delete the temporary directory."""
        for e in self._entries.values():
            self._release(e)
        self._entries.clear()
        self._bytes = dict.fromkeys(TIERS, 0)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    close = clear

    def __del__(self):  # pragma: no cover - interpreter shutdown order varies
        try:
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
        except Exception:
            pass

    @property
    def directory(self) -> str | None:
        """The disk tier's temporary directory while it exists."""
        return self._dir

    # ----------------------------------------------------------------------------------------- internals
    def _release(self, e: _Entry) -> None:
        self._bytes[e.tier] -= e.nbytes
        if e.path is not None:
            try:
                os.remove(e.path)
            except OSError:
                pass
            e.path = None
        e.tensors = None

    def _move(self, e: _Entry, tier: str, tensors: list[torch.Tensor] | None, path: str | None = None) -> None:
        old_path = e.path
        self._bytes[e.tier] -= e.nbytes
        e.tier, e.tensors, e.path = tier, tensors, path
        self._bytes[tier] += e.nbytes
        if old_path is not None and old_path != path:
            try:
                os.remove(old_path)
            except OSError:
                pass

    def _budget(self, tier: str) -> int | None:
        return {"device": self.memory_budget_bytes, "cpu": self.cpu_budget_bytes,
                "disk": self.disk_budget_bytes}[tier]

    def _next_tier(self, tier: str) -> str | None:
        later = TIERS[TIERS.index(tier) + 1:]
        for t in later:
            if t in self.spill:
                return t
        return None

    def _enforce(self, protect=None) -> None:
        """Spill or drop least recently used streams until every tier is within its budget. ``protect``
        (the stream just reloaded) moves last, so a reload is not immediately undone unless it alone
        exceeds the budget."""
        for tier in TIERS:
            budget = self._budget(tier)
            if budget is None:
                continue
            while self._bytes[tier] > budget:
                victim = None
                for k, e in self._entries.items():
                    if e.tier == tier and k != protect:
                        victim = k
                        break
                if victim is None:
                    e = self._entries.get(protect)
                    if e is None or e.tier != tier:
                        break
                    victim = protect
                self._demote(victim)

    def _demote(self, key) -> None:
        e = self._entries[key]
        dest = self._next_tier(e.tier)
        if dest is None:
            self._entries.pop(key)
            self._release(e)
            self._counts["evicted"] += 1
            return
        if dest == "cpu":
            self._move(e, "cpu", [self._to_host(t) for t in e.tensors])
            self._counts["spilled_to_cpu"] += 1
        else:
            self._write_disk(e)
            self._counts["spilled_to_disk"] += 1

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        pin = self.pin_memory if self.pin_memory is not None else t.is_cuda
        if t.device.type == "cpu":
            return t.contiguous().clone()
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
        host.copy_(t, non_blocking=pin)
        return host

    def _write_disk(self, e: _Entry) -> None:
        from safetensors.torch import save_file

        if e.tier == "device":
            host = [self._to_host(t) for t in e.tensors]
        else:
            host = e.tensors
        if any(t.is_pinned() for t in host) and e.device.type == "cuda":
            # the host copies (these, or an earlier spill to the CPU tier) may still be in flight on the stream of
            # the entry's GPU, which need not be the current one (a model on cuda:1)
            torch.cuda.synchronize(e.device)
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="jetdet-stepcache-")
        self._file_no += 1
        path = os.path.join(self._dir, f"stream{self._file_no:08d}.safetensors")
        save_file({f"t{i}": t.contiguous() for i, t in enumerate(host)}, path)
        e.meta = [(t.shape, t.dtype) for t in host]
        self._move(e, "disk", None, path)

    def _read_disk(self, e: _Entry) -> list[torch.Tensor]:
        from safetensors.torch import load_file

        data = load_file(e.path, device="cpu")
        out = []
        for i, (shape, dtype) in enumerate(e.meta):
            t = data[f"t{i}"]
            if t.shape != shape or t.dtype != dtype:  # pragma: no cover - a corrupted temp file
                raise RuntimeError(f"step cache: spilled stream file {e.path} does not match what was written")
            out.append(t.to(e.device) if e.device.type != "cpu" else t)
        return out
