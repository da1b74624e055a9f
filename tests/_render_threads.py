"""Run under torchrun by tests/test_render_dist.py: render() creates and destroys its own process group; print the
process's thread count before and after, so the test can check that no gloo worker thread outlives the job.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/_render_threads.py OUT [--user-group]

``--user-group`` (the negative control): the script creates the group itself and enters deterministic mode for
the first time while it exists, then destroys it; torch keeps the group, and its threads, alive.
"""

import os
import sys
from pathlib import Path

import torch.distributed as dist

if __name__ == "__main__":
    out = Path(sys.argv[1])
    before = len(os.listdir("/proc/self/task"))
    if "--user-group" in sys.argv:
        import jetdet

        dist.init_process_group("gloo")
        with jetdet.mode("deterministic"):  # the first import of torch._dynamo, with a group alive
            pass
        dist.destroy_process_group()
    else:
        from jetdet.render import render

        r = render({"items": 4, "steps": 2, "batch_size": 1}, out, progress=False, threads=1)
        assert r.complete and r.world_size == 2 and not dist.is_initialized(), r
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    gloo = sum("gloo" in n for n in names)  # gloo_tcp_loop, pt_gloo_runloop
    # one write() per line, so the two workers' lines cannot interleave mid-line on torchrun's shared stdout
    sys.stdout.write(f"THREADS rank={os.environ['RANK']} before={before} after={len(names)} gloo={gloo}\n")
    sys.stdout.flush()
