"""``python -m jetdet.render run ...`` / ``torchrun ... -m jetdet.render run ...`` / ``python -m jetdet.render verify``.

Exit status: 0 done (``verify``: everything checks out), 1 ``verify`` found a problem (a damaged manifest too), or
a job stopped by a failed write (a full disk) or a worker that left mid-job (one line, on each rank that saw it), 2 bad
input (the message names the argument; the output folder is left as it was), 130 interrupted (Ctrl-C), 143
terminated (SIGTERM); an interrupted or terminated job keeps what it finished.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from .spec import DEVICES, DTYPES, MODES, ManifestDamaged, RenderError, _is_int
from .store import MANIFEST_EVERY_S

_EPILOG = """\
items: --count N [--start S] [--classes 0,3,circle | all] [--seed S] give the range form (item i: class
classes[i % len], noise jetdet.randn(seed, item_offset=i)); a spec file (--spec) can also list items one by one.
Flags override the spec file's values. --model takes 'bundled' or an entry point 'package.module:factory' whose
factory() returns a model with the bundled model's contract (see README, "Render farm").
"""


def _classes(text: str):
    if text == "all":
        return "all"
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise argparse.ArgumentTypeError(f"expected comma-separated class indices or names, got {text!r}")
        out.append(int(part) if part.lstrip("-").isdigit() else part)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jetdet.render", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="render a job (or resume it) into a folder", epilog=_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--spec", help="job spec, a JSON file (keys: jetdet.render.spec)")
    r.add_argument("--out", required=True, help="output folder (created if missing)")
    r.add_argument("--model", help="'bundled' (default) or 'package.module:factory'")
    r.add_argument("--count", type=int, help="number of items (range form)")
    r.add_argument("--start", type=int, help="index of the first item (range form, default 0)")
    r.add_argument("--classes", type=_classes, help="classes cycled over the items: 'all' or e.g. 0,3,circle")
    r.add_argument("--seed", type=int, help="the items' seed (default 0)")
    r.add_argument("--steps", type=int, help="sampler steps (default 30)")
    r.add_argument("--sampler", help="euler (default) or heun")
    r.add_argument("--cfg", type=float, help="classifier-free guidance scale (default 4.0; 1 turns it off)")
    r.add_argument("--shift", type=float, help="timestep-grid shift (default 1.0)")
    r.add_argument("--mode", help=f"{' | '.join(MODES)} (default deterministic)")
    r.add_argument("--budget", type=float, help="fast mode: the step cache's error budget (default 0.06)")
    r.add_argument("--dtype", help=f"{' | '.join(DTYPES)} (default float32)")
    r.add_argument("--batch-size", type=int, help="items per sampling call, per worker (default 4)")
    r.add_argument("--device", help=f"{' | '.join(DEVICES)} (default auto: cuda:LOCAL_RANK when CUDA is there)")
    r.add_argument("--threads", type=int, help="torch threads per worker (default: torch's; torchrun sets 1 with "
                   "more than one worker)")
    r.add_argument("--manifest-every", type=float, default=MANIFEST_EVERY_S, metavar="SECONDS",
                   help=f"save the manifest at most once per SECONDS while rendering, and at the end (default "
                        f"{MANIFEST_EVERY_S:g}; "
                        "after a crash the items since the last save are rendered again; 0: after every round)")
    r.add_argument("--join-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="workers started by hand (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, no torchrun): how long "
                        "they wait for one another before stopping with an error (default 600)")
    r.add_argument("--force", action="store_true", help="replace the folder's job: one of another spec, or this "
                   "one (every item is rendered again; a torchrun restart of the forced run resumes it)")
    r.add_argument("--no-progress", action="store_true", help="no progress line and no resume/summary lines")

    v = sub.add_parser("verify", help="recheck every item file against the folder's manifest")
    v.add_argument("out", help="the job's output folder")
    v.add_argument("--against", help="another job's folder or manifest.json: compare checksums item by item")
    return p


def _spec_from_args(a) -> tuple[object, dict]:
    from .spec import read_spec_file

    base = read_spec_file(a.spec) if a.spec else {}
    overrides = {"model": a.model, "seed": a.seed, "steps": a.steps, "sampler": a.sampler, "cfg": a.cfg,
                 "shift": a.shift, "mode": a.mode, "budget": a.budget, "dtype": a.dtype, "batch_size": a.batch_size,
                 "device": a.device}
    range_flags = {"count": a.count, "start": a.start, "classes": a.classes}
    if any(v is not None for v in range_flags.values()):
        items = base.get("items")
        if isinstance(items, list):
            given = next(k for k, v in range_flags.items() if v is not None)  # the flag the user gave, not --count
            raise RenderError(f"--{given}: the spec file lists its items one by one; --count/--start/--classes set "
                              "the range form only")
        if _is_int(items):  # "items": 12 is the range form's count
            items = {"count": items}
        elif items is not None and not isinstance(items, dict):
            raise RenderError(f"--spec: items: expected a count, a range object or a list of items, got {items!r}")
        items = dict(items or {})
        items.update({k: v for k, v in range_flags.items() if v is not None})
        if a.seed is not None:
            items["seed"] = a.seed
        base["items"] = items
    elif a.seed is not None and isinstance(base.get("items"), dict):
        base["items"] = {**base["items"], "seed": a.seed}
    return base, overrides


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main(argv=None) -> int:
    from .run import say  # (a line stderr cannot take is dropped: the exit status still says what happened)

    a = _parser().parse_args(argv)
    try:
        if a.command == "verify":
            from .check import verify

            if not a.out:
                raise RenderError("out: expected a render folder, got ''")
            if a.against == "":
                raise RenderError("--against: expected a render folder or manifest file, got ''")

            try:
                report = verify(a.out, against=a.against)
            except ManifestDamaged as e:  # something wrong in the folder, as a bad item file is
                say(f"jetdet.render: verify: {e}\n")
                return 1
            try:
                print("\n".join(report.lines()))
                sys.stdout.flush()
            except BrokenPipeError:  # verify ... | head
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0 if report else 1
        from .run import WorkerLost, render
        from .spec import load_spec

        if not 0 <= a.manifest_every < float("inf"):
            raise RenderError(f"--manifest-every: expected a finite number of seconds >= 0, got {a.manifest_every}")
        if not 0 < a.join_timeout < float("inf"):
            raise RenderError(f"--join-timeout: expected a finite number of seconds > 0, got {a.join_timeout}")
        base, overrides = _spec_from_args(a)
        items = base.get("items")
        if "items" not in base or (isinstance(items, dict) and "count" not in items):
            raise RenderError("--count: required, or a --spec file with 'items' (a count, a range object or a list "
                              "of items)")
        # SIGTERM (a scheduler's pre-emption, torchrun passing one on) stops the job as Ctrl-C does: the items finished
        # since the last manifest save are saved, not lost
        previous = signal.signal(signal.SIGTERM, _terminated)
        try:
            render(load_spec(base, **overrides), a.out, force=a.force, progress=not a.no_progress,
                   threads=a.threads, manifest_every_s=a.manifest_every, join_timeout_s=a.join_timeout)
        except WorkerLost as e:  # gloo's traceback says no more than this line (another worker's output says why)
            say(f"jetdet.render: error: {e}\n")
            return 1
        except OSError as e:  # the job stopped on a write (a full disk, a quota): one line, on the rank that hit it
            rank = f"rank {os.environ['RANK']}: " if os.environ.get("WORLD_SIZE", "1") != "1" else ""
            where = f" ({e.filename})" if e.filename else ""
            say(f"jetdet.render: error: {rank}{e.strerror or e}{where}; the job stopped. The items listed in the "
                "manifest are kept: the same command resumes the job\n")
            return 1
        finally:
            signal.signal(signal.SIGTERM, previous)
        return 0
    except RenderError as e:
        if _is_rank0() or getattr(e, "every_rank", False):  # the group's errors are every rank's: say them once
            say(f"jetdet.render: error: {e}\n")
        return 2
    except KeyboardInterrupt as e:
        if _is_rank0():
            how = "terminated" if isinstance(e, _Terminated) else "interrupted"
            say(f"jetdet.render: {how}; the items finished are listed in the manifest, and the same command resumes "
                "the job\n")
        return 143 if isinstance(e, _Terminated) else 130


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the job is, so that it unwinds as an interrupt does."""


def _terminated(signum, frame):
    raise _Terminated()


if __name__ == "__main__":
    sys.exit(main())
