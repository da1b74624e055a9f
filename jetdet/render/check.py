"""Verify a render folder against its manifest, and compare two manifests item by item."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from . import store
from .spec import RenderError, spec_differences

__all__ = ["verify", "compare", "VerifyReport", "Comparison"]


def _indices(items) -> list[int]:
    """The item indices of a stored spec's ``items`` (normalised form: a range object or a list)."""
    if isinstance(items, dict):
        return list(range(items["start"], items["start"] + items["count"]))
    return list(range(len(items)))


def _load(path, what: str) -> tuple[dict, Path | None]:
    """A manifest from a folder or a manifest file; ``(manifest, folder or None)``."""
    p = Path(path)
    try:
        is_dir = p.is_dir()
    except OSError as e:  # a name too long, a parent that cannot be searched
        raise RenderError(f"{what}: {str(p)!r}: {e.strerror or e}") from None
    if is_dir:
        m = store.load_manifest(p, what)
        if m is None:
            raise RenderError(f"{what}: {str(p)!r} holds no render manifest ({store.MANIFEST})")
        return m, p
    if p.is_file():
        return store.read_manifest(p, what), None
    raise RenderError(f"{what}: {str(p)!r} is neither a render folder nor a manifest file")


#: up to this many items that differ are listed one a line; more are listed as ranges on one line
_ONE_LINE_EACH = 10


@dataclass
class Comparison:
    """Two manifests, item by item (by index): checksums equal, different, or the items themselves differ."""

    here: str
    other: str
    same_spec: bool
    spec_notes: list[str]
    equal: list[int]
    differ: list[int]
    not_same_item: list[int]  # label, seed or stream differ: not the same item
    only_here: list[int]
    only_other: list[int]
    fingerprint_notes: list[str]

    @property
    def ok(self) -> bool:
        return not (self.differ or self.not_same_item or self.only_here or self.only_other)

    def lines(self) -> list[str]:
        n = len(self.equal) + len(self.differ) + len(self.not_same_item)
        head = (f"compare: {self.here} vs {self.other}: {n} items in both, {len(self.equal)} identical checksums, "
                f"{len(self.differ)} differ")
        if self.not_same_item:  # (the head said "0 differ" of two jobs whose items all differ)
            head += f", {len(self.not_same_item)} not the same item"
        out = [head]
        out.append("  spec: the same job (same spec hash)" if self.same_spec else
                   "  spec: different spec hashes" + (": " + "; ".join(self.spec_notes) if self.spec_notes else ""))
        for xs, what in ((self.differ, "checksum differs"),
                         (self.not_same_item, "not the same item (label, seed or stream differ)")):
            if len(xs) <= _ONE_LINE_EACH:
                out += [f"  item {i}: {what}" for i in xs]
            else:  # two jobs of 100k items: one line, not 100k
                out.append(f"  items {_ranges(xs)}: {what}")
        if self.only_here:
            out.append(f"  only in {self.here}: items {_ranges(self.only_here)}")
        if self.only_other:
            out.append(f"  only in {self.other}: items {_ranges(self.only_other)}")
        out += [f"  workers: {s}" for s in self.fingerprint_notes]
        return out


@dataclass
class VerifyReport:
    """:func:`verify`'s findings. ``bool(report)``: every item of the job is there and matches the manifest (and
    the comparison, if any, found no difference)."""

    out: str
    total: int
    ok: list[int]
    problems: dict[int, str]
    temp_files: list[str] = field(default_factory=list)
    comparison: Comparison | None = None
    not_of_the_job: list[int] = field(default_factory=list)  # item files whose index the job does not have
    against_problems: dict = field(default_factory=dict)  # ``against`` a folder: its item files that fail its manifest

    def __bool__(self) -> bool:
        return (not self.problems and not self.not_of_the_job and not self.against_problems
                and (self.comparison is None or self.comparison.ok))

    def lines(self) -> list[str]:
        out = [f"verify: {self.out}: {self.total} items, {len(self.ok)} ok, {len(self.problems)} with problems"]
        out += _problem_lines(self.problems, "  ")
        if self.not_of_the_job:
            out.append(f"  {len(self.not_of_the_job)} item file(s) not of this job (the manifest's item list has no "
                       f"such index): items {_ranges(self.not_of_the_job)}; move them away")
        if self.temp_files:
            out.append(f"  {len(self.temp_files)} temp file(s) of an interrupted run (ignored; the next run removes "
                       "them)")
        if self.comparison is not None:
            out += self.comparison.lines()
            if self.against_problems:
                out.append(f"  {len(self.against_problems)} item file(s) of {self.comparison.other} do not match its "
                           "manifest (the comparison read its checksums from there):")
            out += _problem_lines(self.against_problems, "    ")  # (a half-copied folder: a line each, 1000 lines)
        out.append("verify: OK" if self else "verify: FAILED")
        return out


def _problem_lines(problems: dict, indent: str) -> list[str]:
    """``{index: problem}`` as lines: an item a line, or one line of ranges for more than ten with one problem."""
    by_problem: dict[str, list[int]] = {}
    for i, p in sorted(problems.items()):
        by_problem.setdefault(p, []).append(i)
    out = []
    for i, p in sorted(problems.items()):
        if len(by_problem[p]) <= _ONE_LINE_EACH:
            out.append(f"{indent}item {i} ({store.item_name(i)}): {p}")
        elif by_problem[p][0] == i:  # a job stopped at 10% of 100k items: one line, not 90k
            out.append(f"{indent}items {_ranges(by_problem[p])} ({len(by_problem[p])}): {p}")
    return out


def _ranges(xs: list[int]) -> str:
    xs = sorted(xs)
    parts, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        parts.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ", ".join(parts)


def _fingerprint_notes(a: dict, b: dict) -> list[str]:
    fa, fb = list(a.get("fingerprints", {}).values()), list(b.get("fingerprints", {}).values())
    out = [f"{len(fa)} fingerprint(s) here, {len(fb)} in the other"]
    if not fa or not fb:  # a manifest with no rendered item lists no fingerprint: nothing to compare
        return out
    keys = sorted({k for f in fa + fb for k in f})
    for k in keys:
        va = sorted({json.dumps(f.get(k)) for f in fa})
        vb = sorted({json.dumps(f.get(k)) for f in fb})
        if va != vb:
            out.append(f"{k}: {', '.join(va)} here, {', '.join(vb)} in the other")
    return out


def compare(here, other) -> Comparison:
    """Compare the manifests of two folders (or manifest files) item by item."""
    return _compare(here, _load(here, "out")[0], other, _load(other, "against")[0])


def _compare(here, a: dict, other, b: dict) -> Comparison:
    """:func:`compare` of the manifests ``a`` (read from ``here``) and ``b`` (from ``other``)."""
    ia, ib = a["items"], b["items"]
    both = sorted(set(ia) & set(ib), key=int)
    equal, differ, not_same = [], [], []
    for k in both:
        ea, eb = ia[k], ib[k]
        if any(ea.get(f) != eb.get(f) for f in ("label", "seed", "stream")):
            not_same.append(int(k))
        elif ea.get("checksum") == eb.get("checksum"):
            equal.append(int(k))
        else:
            differ.append(int(k))
    same_spec = a.get("spec_hash") == b.get("spec_hash")
    return Comparison(
        here=str(here), other=str(other), same_spec=same_spec,
        spec_notes=[] if same_spec else spec_differences(a.get("spec", {}), b.get("spec", {}),
                                                         ("here", "in the other")),
        equal=equal, differ=differ, not_same_item=not_same,
        only_here=sorted(int(k) for k in set(ia) - set(ib)), only_other=sorted(int(k) for k in set(ib) - set(ia)),
        fingerprint_notes=_fingerprint_notes(a, b),
    )


def verify(out, against=None) -> VerifyReport:
    """Recheck every item file of the folder ``out`` against its manifest (image checksum and file sha256), list
    the items not rendered yet, and with ``against`` (another folder or manifest) compare item by item."""
    manifest, folder = _load(out, "out")
    if folder is None:
        raise RenderError(f"out: expected a render folder, got the file {str(out)!r}")
    temps, files, _ = store.scan_folder(folder)
    ok, problems = [], {}
    entries = manifest["items"]
    indices = _indices(manifest["spec"]["items"])
    for idx in indices:
        entry = entries.get(str(idx))
        if entry is None:
            problems[idx] = ("not in the manifest (its file is there but was never reported: the job was "
                             "interrupted; rerun it)" if idx in files else
                             "not rendered yet (the job is incomplete: rerun it)")
            continue
        p = store.check_item(folder, idx, entry)
        if p is None:
            ok.append(idx)
        else:
            problems[idx] = p + " (a rerun of the job recomputes it)"
    comparison, against_problems = None, {}
    if against is not None:
        other, other_folder = _load(against, "against")
        comparison = _compare(out, manifest, against, other)
        # the comparison reads the other folder's checksums from its manifest: a folder's own files are rechecked
        # too, or a damaged or missing file there passed as "the same" (a user trial); a manifest file alone is
        # compared as it is
        if other_folder is not None:
            for k, entry in other["items"].items():
                p = store.check_item(other_folder, int(k), entry)
                if p is not None:
                    against_problems[int(k)] = p
    return VerifyReport(out=str(out), total=len(ok) + len(problems), ok=ok, problems=problems, temp_files=temps,
                        comparison=comparison, not_of_the_job=sorted(set(files) - set(indices)),
                        against_problems=against_problems)
