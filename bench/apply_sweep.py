"""Turn a ``bench/gpu_check.py --sweep`` run into launch-table entries, with their provenance, after the static report.

    PYTHONPATH=. python bench/apply_sweep.py bench/results/gpu_NVIDIA_H200.json [--dry-run] [--margin 0.03]

For each swept shape of ``matmul``, ``attention`` and ``conv2d`` whose best fixed tile beat the tile the speed
section ran with at that shape (by more than ``--margin``, 3 % by default: do_bench medians move by about that
between runs), the tile goes into ``autotune_configs/<op>/device_name=<DEVICE>,dtype=<dt>.json`` under the shape's
table key (N, head dim, output channels: never a batch size), and ``PROVENANCE.json`` records it as "measured", with
the run and both times. A device file that did not exist starts as a copy of the file the device used (it replaces
that file for its dtype), recorded as "carried over".

Each new entry must pass the static report (no spills, shared memory within the limit, no atomics...) on the archs
the file runs on, under the installed Triton, before it is written; one that does not goes to PROVENANCE's
"not_shipped" list, as issue 13's spilling conv tile did. CI then checks the written tables under triton 3.6 and
the installed one (``.ci/run``). The TMA kernels' sweeps (``attention_tma``, ``conv2d_tma``) are printed, not
written: their tiles are code (``launch_tma.CONFIGS``).

``--dry-run`` prints the plan and writes nothing. Exit status: 0, or 2 when the file has no sweep.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile

from jetdet import _paths, configs

OPS = ("matmul", "attention", "conv2d")
_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def _table_rel(op: str, ident: str, dt: str | None) -> str:
    return f"{op}/device_name={ident}{f',dtype={dt}' if dt else ''}.json"


def serving_file(config_dir: str, op: str, ident: str, arch: str, dt: str) -> str | None:
    """The table file (relative to ``config_dir``) a device ``ident`` of ``arch`` (``"sm_90"``) reads for dtype
    ``dt``: :func:`jetdet.configs.find_table`'s search order, for a device that is not this machine's."""
    for name in (*configs.name_candidates(ident), arch):
        for suffix_dt in (dt, None):
            rel = _table_rel(op, name, suffix_dt)
            if os.path.isfile(os.path.join(config_dir, rel)):
                return rel
    return None


def plan(result: dict, margin: float) -> tuple[list[dict], list[str]]:
    """``(entries, notes)``: an entry per swept shape whose best tile beat the shipped one, and lines for the rest."""
    env = result["sections"].get("environment", {})
    ident = str(env.get("device_name", "")).replace(" ", "_")
    cap = env.get("capability") or []
    arch = f"sm_{cap[0]}{cap[1]}" if len(cap) == 2 else ""
    shipped = {r["label"]: r for r in result["sections"].get("speed", {}).get("rows", []) if "jetdet_ms" in r}
    run = (f"bench/gpu_check.py --sweep on {env.get('device_name')}, torch {env.get('torch')}, triton "
           f"{env.get('triton')}, jetdet {env.get('commit') or 'commit unknown'}, {result.get('when', '')}")
    entries, notes = [], []
    for row in result["sections"].get("sweep", {}).get("rows", []):
        best, label = row.get("best"), row["label"]
        if row["op"] not in OPS:
            if best:
                notes.append(f"{label} ({row['op']}): best tile {best['config']} at {best['ms']:.3f} ms; a TMA "
                             "kernel's tile is its launch_tma.CONFIGS (code), not a table: change it by hand")
            continue
        ran = shipped.get(label)
        if not best or ran is None or row.get("key") is None:
            notes.append(f"{label}: nothing to compare (no best tile, no speed row or no table key)")
            continue
        if best["ms"] >= ran["jetdet_ms"] * (1 - margin):
            notes.append(f"{label}: shipped tile kept ({ran['jetdet_ms']:.3f} ms; best of the sweep "
                         f"{best['ms']:.3f} ms)")
            continue
        dt = _DTYPES[row["dtype"]]
        entries.append({
            "op": row["op"], "dtype": dt, "key": str(int(row["key"])), "config": best["config"], "ident": ident,
            "arch": arch, "file": _table_rel(row["op"], ident, dt),
            "source": f"{run}: {label}: {best['ms']:.3f} ms against {ran['jetdet_ms']:.3f} ms for the tile it ran with",
        })  # fmt: skip
    return entries, notes


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        if os.path.basename(path) == "PROVENANCE.json":
            json.dump(data, f, indent=1)
        else:  # one entry per line, as the shipped tables are written
            f.write("{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in data.items()) + "\n}")
        f.write("\n")


def apply(entries: list[dict], config_dir: str) -> None:
    """Write ``entries`` (checked) into the tables under ``config_dir`` and record them in its PROVENANCE.json."""
    prov_path = os.path.join(config_dir, "PROVENANCE.json")
    with open(prov_path) as f:
        prov = json.load(f)
    for e in entries:
        path = os.path.join(config_dir, e["file"])
        if os.path.isfile(path):
            with open(path) as f:
                table = json.load(f)
        else:
            origin = serving_file(config_dir, e["op"], e["ident"], e["arch"], e["dtype"])
            table = {}
            if origin is not None:
                with open(os.path.join(config_dir, origin)) as f:
                    table = json.load(f)
            prov["files"][e["file"]] = {"default": ({"status": "carried over", "from": origin} if origin else
                                                    {"status": "static report"}), "entries": {}}  # fmt: skip
        table[e["key"]] = e["config"]
        table = dict(sorted(table.items(), key=lambda kv: int(kv[0])))
        _write_json(path, table)
        prov["files"][e["file"]].setdefault("entries", {})[e["key"]] = {"status": "measured", "source": e["source"]}
    _write_json(prov_path, prov)


def static_check(entry: dict, config_dir: str) -> list[str]:
    """The static report's violations for the op's tables with ``entry`` applied to a copy of ``config_dir`` (the
    shipped tables have none, CI checks that), on the archs the entry's file runs on."""
    from jetdet import static_report as sr

    with tempfile.TemporaryDirectory(prefix="jetdet-apply-") as tmp:
        trial = os.path.join(tmp, "configs")
        shutil.copytree(config_dir, trial)
        apply([entry], trial)
        with configs.tables_from(trial):
            specs = sr.collect_specs([f"jetdet.kernels.{entry['op']}.specs"], jit=False)
            archs = configs.table_archs(entry["ident"])
            rows = sr.report(specs, archs=archs)
    return sr.violations(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("result", help="the JSON bench/gpu_check.py --sweep wrote (bench/results/gpu_<device>.json)")
    p.add_argument("--config-dir", default=None, help="the tables to update (default: the shipped autotune_configs)")
    p.add_argument("--margin", type=float, default=0.03, help="how much faster the best tile must be (default 0.03)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    p.add_argument("--no-static-check", action="store_true", help="skip the static report (CI still runs it)")
    args = p.parse_args(argv)
    if not 0 <= args.margin < 1:
        p.error(f"--margin: expected a fraction in [0, 1), got {args.margin}")
    with open(args.result) as f:
        result = json.load(f)
    if not result.get("sections", {}).get("sweep", {}).get("rows"):
        print(f"{args.result}: no sweep in this run (run bench/gpu_check.py with --sweep)")
        return 2
    config_dir = args.config_dir or _paths.configs_dir()
    entries, notes = plan(result, args.margin)
    for line in notes:
        print(f"  {line}")
    accepted = []
    for e in entries:
        bad = [] if args.no_static_check or args.dry_run else static_check(e, config_dir)
        what = f"{e['file']} [{e['key']}] = {e['config']}"
        if bad:
            print(f"  rejected by the static report: {what}: {'; '.join(bad[:3])}")
            if not args.dry_run:
                _not_shipped(e, bad, config_dir)
        else:
            print(f"  {'would write' if args.dry_run else 'writing'} {what}")
            accepted.append(e)
    if accepted and not args.dry_run:
        apply(accepted, config_dir)
        print(f"wrote {len(accepted)} entries under {config_dir}; now run the test suite (tests/test_configs.py counts "
              "the measured entries) and python -m jetdet.static_report")
    return 0


def _not_shipped(entry: dict, bad: list[str], config_dir: str) -> None:
    prov_path = os.path.join(config_dir, "PROVENANCE.json")
    with open(prov_path) as f:
        prov = json.load(f)
    rec = {"op": entry["op"], "dtype": entry["dtype"], "key": entry["key"], "config": copy.deepcopy(entry["config"]),
           "measured": entry["source"], "why": "static report: " + "; ".join(bad[:3])}  # fmt: skip
    prov.setdefault("not_shipped", []).append(rec)
    _write_json(prov_path, prov)


if __name__ == "__main__":
    sys.exit(main())
