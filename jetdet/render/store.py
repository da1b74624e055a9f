"""The output folder of a render job: item files, the manifest, atomic writes and the resume scan.

Layout of ``OUT/``:

* ``item-000017.safetensors``: one tensor ``image`` (``[C, S, S]``, the sampler's output in ``[-1, 1]``) and
  metadata ``index``, ``label``, ``seed``, ``stream``, ``spec_hash`` (header keys sorted, so equal images of one
  job give equal files byte for byte; another job's header has its own spec hash);
* ``manifest.json``: the spec and its hash, and per item its file, ``checksum`` (:func:`jetdet.checksum` of
  the image), ``sha256`` (of the file's bytes), the worker's fingerprint id (the fingerprints themselves are
  listed once under ``fingerprints``), rank, world size and batch size, and one record per run.

Every file is written to ``NAME.tmp-<pid>-<random>``, fsynced, renamed over ``NAME`` and the folder fsynced, so
a reader (or a resumed job) sees either the old file or the new one, never a partial one. Temp names left by a
killed process are removed by the next run's scan and never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from pathlib import Path

import torch

from .spec import ManifestDamaged, RenderError

MANIFEST = "manifest.json"
#: The current run's token, written by rank 0 after the manifest and read back by every rank (one shared folder): a
#: few bytes, where the manifest grows with the job (332 MB at a million items)
RUN_TOKEN = ".jetdet-run"
#: default least time between two saves of the manifest while a job renders (``jetdet.render.run._render_rounds``)
MANIFEST_EVERY_S = 10.0
MANIFEST_FORMAT = "jetdet.render.manifest/1"
_ITEM_RE = re.compile(r"^item-(\d+)\.safetensors$")
_TMP_RE = re.compile(r"^(item-\d+\.safetensors|manifest\.json|\.jetdet-run)\.tmp-[0-9]+-[0-9a-f]+$")


def item_name(index: int) -> str:
    return f"item-{index:06d}.safetensors"


def is_temp_name(name: str) -> bool:
    return _TMP_RE.match(name) is not None


def fsync_dir(path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder at all: nothing to sync there; the renames are still atomic
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the renames are still atomic
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder: write, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):  # a failed write (a full disk) names no file: name the one being written
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
    if sync_dir:
        fsync_dir(path.parent)


def _canonical_header(data: bytes) -> bytes:
    """safetensors writes ``__metadata__`` in hash-map order, which changes from run to run; rewrite the header
    with sorted keys (re-padded to the same length, so the tensor data does not move)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    if len(text) > n:  # cannot happen: same content, no whitespace
        raise RuntimeError("safetensors header grew when sorted")
    return data[:8] + text + b" " * (n - len(text)) + data[8 + n :]


def item_bytes(image: torch.Tensor, meta: dict) -> bytes:
    """The bytes of one item file (deterministic for equal ``image`` and ``meta``)."""
    from safetensors.torch import save

    data = save({"image": image.detach().to("cpu").contiguous()}, metadata={k: str(v) for k, v in meta.items()})
    return _canonical_header(data)


def parse_item(data: bytes) -> tuple[torch.Tensor, dict]:
    """``(image, metadata)`` from an item file's bytes; ``ValueError`` if they cannot be parsed."""
    from safetensors.torch import load

    try:
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + n]).get("__metadata__", {})
        tensors = load(data)
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"not a readable safetensors file ({type(e).__name__}: {e})") from None
    if set(tensors) != {"image"}:
        raise ValueError(f"expected one tensor 'image', found {sorted(tensors)}")
    return tensors["image"], meta


def read_item(path) -> tuple[torch.Tensor, dict]:
    """``(image, metadata)`` of an item file; ``ValueError`` if it cannot be parsed."""
    return parse_item(Path(path).read_bytes())


# ---------------------------------------------------------------------------------------------- manifest


def new_manifest(spec: dict, spec_hash: str, total: int) -> dict:
    return {"format": MANIFEST_FORMAT, "spec_hash": spec_hash, "spec": spec, "total": total, "complete": False,
            "fingerprints": {}, "items": {}, "runs": []}


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def load_manifest(folder, what: str = "out") -> dict | None:
    """The folder's manifest, ``None`` if it has none; :class:`RenderError` naming the argument ``what`` if it is
    not one of ours."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    return read_manifest(path, what, "move it away or choose another folder" if what == "out" else "")


def read_manifest(path, what: str, advice: str = "") -> dict:
    """The manifest in the file ``path``; :class:`RenderError` naming the argument ``what`` if it cannot be read, is
    not a render manifest or is damaged."""
    advice = f"; {advice}" if advice else ""
    try:
        m = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestDamaged(f"{what}: {str(path)!r} cannot be read as a render manifest ({e}){advice}") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise ManifestDamaged(f"{what}: {str(path)!r} is not a jetdet render manifest (format "
                          f"{MANIFEST_FORMAT!r}){advice}")
    items = m.get("items")
    if not isinstance(items, dict) or not isinstance(m.get("spec"), dict):
        raise ManifestDamaged(f"{what}: {str(path)!r} is damaged (no item table or no spec){advice}")
    bad = [k for k, v in items.items() if not (k.isascii() and k.isdigit() and isinstance(v, dict))]
    if bad:
        raise ManifestDamaged(f"{what}: {str(path)!r} is damaged (item keys {bad[:3]}){advice}")
    listed = m["spec"].get("items")
    if not (_count(m.get("total")) and isinstance(m.get("spec_hash"), str)
            and (isinstance(listed, list) or isinstance(listed, dict) and _count(listed.get("start"))
                 and _count(listed.get("count")))):
        raise ManifestDamaged(f"{what}: {str(path)!r} is damaged (its total, spec hash or item list){advice}")
    fps, runs = m.setdefault("fingerprints", {}), m.setdefault("runs", [])
    if not (isinstance(fps, dict) and all(isinstance(v, dict) for v in fps.values())) or not isinstance(runs, list):
        raise ManifestDamaged(f"{what}: {str(path)!r} is damaged (its fingerprints or runs){advice}")
    return m


def save_manifest(folder, manifest: dict) -> None:
    data = json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n"
    atomic_write(Path(folder) / MANIFEST, data)


def fingerprint_id(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ checks


def check_item(folder, index: int, entry: dict) -> str | None:
    """``None`` if the item's file matches its manifest entry (image checksum and file sha256), else what is
    wrong with it."""
    from ..verify import checksum

    path = Path(folder) / item_name(index)  # never a name read from the manifest: it stays inside the folder
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return "file missing"
    except OSError as e:
        return f"file unreadable: {e.strerror or e}"
    try:
        image, _ = parse_item(data)
    except ValueError as e:
        return f"file corrupt: {e}"
    if checksum(image) != entry.get("checksum"):
        return "file corrupt: image checksum differs from the manifest"
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        return "file corrupt: bytes differ from the manifest (sha256) although the image checksum matches"
    return None


def scan_folder(folder) -> tuple[list[str], dict[int, str], list[str]]:
    """``(temp files, {index: item file name}, other names)`` in ``folder`` (which must exist)."""
    temps, items, other = [], {}, []
    for name in sorted(os.listdir(folder)):
        if is_temp_name(name):
            temps.append(name)
        elif (m := _ITEM_RE.match(name)) is not None:
            items[int(m.group(1))] = name
        elif name not in (MANIFEST, RUN_TOKEN):
            other.append(name)
    return temps, items, other


def acquire_lock(folder):
    """Hold an exclusive lock on ``folder`` (``flock`` on the folder itself: no file is made, and the lock ends with
    the process that holds it, however it ends), or raise RenderError if another job holds it. Returns what
    :func:`release_lock` takes; None where the platform or the file system has no such locks (the folder is then not
    guarded)."""
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RenderError(f"out: another render job is writing in {str(folder)!r} (it holds the folder's lock); wait "
                          "for it to end, or choose another folder") from None
    except OSError:  # a file system without locks
        os.close(fd)
        return None
    return fd


def release_lock(fd) -> None:
    """End a lock :func:`acquire_lock` took."""
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
