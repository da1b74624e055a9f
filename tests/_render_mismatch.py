"""Run under torchrun by tests/test_render_dist.py: every rank calls render() with one argument of its own, which
the ranks must agree on; each writes the error it got to ROOT/rank<r>.txt.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/_render_mismatch.py out|batch ROOT
"""

import sys
from pathlib import Path

import torch._dynamo  # noqa: F401  - before the group exists (README, "Your own process group")
import torch.distributed as dist

from jetdet.render import RenderError, render

if __name__ == "__main__":
    what, root = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    said = "did not finish"
    try:
        out, bs = root / "job", 2
        if what == "out":  # node-local folders, as on nodes without a shared file system
            out = root / f"node{rank}"
            out.mkdir(parents=True, exist_ok=True)
        else:
            bs = 1 + rank
        render({"items": 6, "steps": 1, "batch_size": bs}, out, progress=False)
        said = "no error"
    except RenderError as e:
        said = f"RenderError: {e}"
    finally:
        (root / f"rank{rank}.txt").write_text(said)  # a file each: the ranks' prints interleave on one pipe
        dist.destroy_process_group()
