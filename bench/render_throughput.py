"""Render-farm throughput on this machine: the same job with 1 and 2 ``torchrun`` workers.

Each configuration runs the real command line in a fresh folder,

    python -m torch.distributed.run --standalone --nproc-per-node N -m jetdet.render run \\
        --out DIR --count ITEMS --steps STEPS --batch-size B --threads T --no-progress

and reports two rates: the **render phase** (items / seconds from the plan to the last report, read from the
manifest's run record: sampling and writing, process start and model load excluded) and the **whole command**
(items / wall seconds of the torchrun command, start-up included). The configurations are interleaved, repeated
``--repeats`` times, and every run's files are checked byte for byte against the first run's (deterministic mode:
any worker count gives the same bytes). The load average before and after is printed: on a shared machine the
rates move with it.

    python bench/render_throughput.py --items 32 --steps 10 --repeats 2 [--out bench/results/render_throughput.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# (workers, torch threads per worker)
CONFIGS = [(1, 1), (1, 2), (2, 1)]


def command(workers: int, threads: int, out: Path, a) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}", "-m",
            "jetdet.render", "run", "--out", str(out), "--count", str(a.items), "--steps", str(a.steps),
            "--batch-size", str(a.batch_size), "--threads", str(threads), "--no-progress"]


def run_once(workers: int, threads: int, out: Path, a) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = command(workers, threads, out, a)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(REPO))
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    run = json.loads((out / "manifest.json").read_text())["runs"][-1]
    files = {q.name: q.read_bytes() for q in sorted(out.glob("item-*.safetensors"))}
    return {"render_items_per_s": run["items_per_s"], "render_s": run["seconds"], "wall_s": wall,
            "wall_items_per_s": a.items / wall, "files": files}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", help="also write the report (markdown) here")
    a = ap.parse_args(argv)

    load_before = os.getloadavg()
    results = {c: [] for c in CONFIGS}
    reference = None
    same_bytes = True
    root = Path(tempfile.mkdtemp(prefix="jetdet_render_bench_"))
    try:
        for rep in range(a.repeats):
            for workers, threads in CONFIGS:
                out = root / f"w{workers}_t{threads}_r{rep}"
                r = run_once(workers, threads, out, a)
                files = r.pop("files")
                reference = reference or files
                same_bytes &= files == reference
                results[(workers, threads)].append(r)
                print(f"run {rep + 1}/{a.repeats}: {workers} worker(s) x {threads} thread(s): render "
                      f"{r['render_items_per_s']:.3f} items/s ({r['render_s']:.1f} s), whole command "
                      f"{r['wall_items_per_s']:.3f} items/s ({r['wall_s']:.1f} s)", file=sys.stderr)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    load_after = os.getloadavg()

    import torch

    lines = [
        f"# Render-farm throughput ({a.items} items, {a.steps} Euler steps, CFG 4, batch {a.batch_size} per worker, "
        "deterministic mode, the bundled model)",
        "",
        f"`python bench/render_throughput.py --items {a.items} --steps {a.steps} --batch-size {a.batch_size} "
        f"--repeats {a.repeats}`",
        "",
        f"CPU: {os.cpu_count()} cores, torch {torch.__version__}; load average before {load_before[0]:.2f}, after "
        f"{load_after[0]:.2f} (1 min). Median of {a.repeats} interleaved runs per row.",
        "",
        "| workers | threads / worker | render phase items/s | whole command items/s | render s | command s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for (workers, threads), rs in results.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        lines.append(f"| {workers} | {threads} | {med['render_items_per_s']:.3f} | {med['wall_items_per_s']:.3f} | "
                     f"{med['render_s']:.1f} | {med['wall_s']:.1f} |")
    lines += ["", f"Every run's item files byte-identical to the first run's: {same_bytes}."]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0 if same_bytes else 1


if __name__ == "__main__":
    sys.exit(main())
