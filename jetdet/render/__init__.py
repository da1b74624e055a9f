"""Render farm: one batch job split over ``torch.distributed`` workers, the same bytes whichever worker made an
item, resumable after a crash.

Python::

    from jetdet.render import render, verify
    result = render({"items": {"count": 64, "seed": 0}, "steps": 30, "batch_size": 4}, "out/")
    report = verify("out/", against="other/manifest.json")   # bool(report): all items there and matching

Command line (the same code; ``torchrun`` runs one worker per process; their group is gloo, also on GPUs)::

    python -m jetdet.render run --out out/ --count 64 --steps 30 --batch-size 4
    torchrun --standalone --nproc-per-node 4 -m jetdet.render run --spec job.json --out out/
    python -m jetdet.render verify out/ [--against other/]

* :mod:`jetdet.render.spec`: the job spec, the item and noise rules, the model entry point, the spec hash;
* :mod:`jetdet.render.run`: the worker loop, the plan, resume;
* :mod:`jetdet.render.store`: the folder layout, atomic writes, the manifest;
* :mod:`jetdet.render.check`: ``verify`` and ``compare``.
"""

from .check import Comparison, VerifyReport, compare, verify
from .run import RenderResult, WorkerLost, render
from .spec import Item, JobSpec, RenderError, load_spec

__all__ = ["render", "verify", "compare", "load_spec", "JobSpec", "Item", "RenderError", "RenderResult",
           "VerifyReport", "Comparison", "WorkerLost"]
