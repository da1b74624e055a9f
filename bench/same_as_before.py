"""Is the controller's whole-call path still the controller the README's peer runs measured?

    python bench/same_as_before.py                 # against commit 62f8817 (before partial rows)
    python bench/same_as_before.py --commit <sha> --seeds 4

The quality presets skip whole calls (``block_reuse=False``). This script loads ``jetdet/cache/controller.py`` as it
was at ``--commit`` (``git show``, so it needs this repository's history) next to the current one and samples the
bundled model through both (``jetdet.models.evaluate.cached_model_fn``: the same ModelCalls), Euler and Heun, CFG
batched and as two forwards, at the presets' budgets, and reports whether every sample is bit-identical and the
model calls are equal. When they are, the earlier runs' rows at those budgets are measurements of the presets.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv=None) -> bool:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commit", default="62f8817")
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import jetdet.cache  # noqa: F401  (the package the old module's relative imports resolve in)
    from jetdet.cache import StepCacheController
    from jetdet.cache.controller import QUALITY
    from jetdet.models import bundled, sampling
    from jetdet.models.evaluate import cached_model_fn

    src = subprocess.run(["git", "show", f"{args.commit}:jetdet/cache/controller.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "controller_before.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location("jetdet.cache._controller_before", path)
        old = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = old
        spec.loader.exec_module(old)
    model = bundled.load_bundled()
    ok = True
    for sampler in ("euler", "heun"):
        for q, preset in QUALITY.items():
            for batch_cfg in (True, False):
                b = preset["budget"]
                before, now = old.StepCacheController(budget=b, num_steps=30), StepCacheController(quality=q,
                                                                                                   num_steps=30)
                same = True
                for seed in range(args.seeds):
                    kw = dict(steps=30, seed=seed, sampler=sampler, batch_cfg=batch_cfg)
                    a = sampling.sample(model, [seed % 4], model_fn=cached_model_fn(model, before), **kw)
                    c = sampling.sample(model, [seed % 4], model_fn=cached_model_fn(model, now), **kw)
                    same &= torch.equal(a, c)
                calls = (before.stats()["calls_run"], now.stats()["calls_run"])
                same &= calls[0] == calls[1]
                ok &= same
                print(f"{sampler:>5} quality={q:<8} (budget {b:g}) {'batched' if batch_cfg else 'separate'} CFG: "
                      f"{'bit-identical' if same else 'DIFFERENT'} samples, model calls {calls[0]} / {calls[1]}",
                      flush=True)
    print(f"whole-call path vs {args.commit}: {'same' if ok else 'NOT the same'}")
    return ok


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
