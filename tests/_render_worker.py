"""Run under torchrun by tests/test_render_dist.py: one process group, three render jobs (batch 1, 4, 5) through
the Python API, as a user's own torchrun script would call it.

    python -m torch.distributed.run --standalone --nproc-per-node N tests/_render_worker.py OUT_ROOT STEPS
"""

import sys
from pathlib import Path

import torch._dynamo  # noqa: F401  - before the group exists (README, "Your own process group")
import torch.distributed as dist

from jetdet.render import render

if __name__ == "__main__":
    root, steps = Path(sys.argv[1]), int(sys.argv[2])
    dist.init_process_group("gloo")
    try:
        for bs in (1, 4, 5):
            r = render({"items": 12, "steps": steps, "batch_size": bs}, root / f"b{bs}", progress=False)
            assert r.complete and r.world_size == dist.get_world_size(), r
        assert dist.is_initialized()  # render() leaves the caller's process group alone
    finally:
        dist.destroy_process_group()
