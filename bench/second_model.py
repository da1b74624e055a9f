"""The quality presets on a model they were not chosen on: a freshly trained DiT variant, run as a new user would.

    python bench/second_model.py                      # train the variant (if absent), then measure it
    python bench/second_model.py --dir /tmp/variant --peers SeaCache FirstBlockCache

The presets (``jetdet.cache.controller.QUALITY``) were chosen on the bundled DiT. This script trains a *different*
DiT with ``bench/train_bundled.py`` (another seed, width 48 instead of 64, depth 8 instead of 10: a different
network, same data and recipe, 600 steps of 32) into ``--dir`` (the bundled classifier grades it; training is
skipped when the weights exist), loads it into diffusers' ``DiTTransformer2DModel`` and runs ``bench/peers.py`` on
it: full compute, ``jetdet.patch(model, mode="fast")`` with nothing but ``num_steps`` (the default quality), the
other presets, and the diffusers peers named by ``--peers``, Euler, 30 steps, CFG 4, 8 seeds x 4 classes,
interleaved, 1 thread. The bar (issue 12): the default gives >= 2x wall at >= 33 dB mean PSNR.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: The variant: what bench/train_bundled.py is told (besides --out-dir).
VARIANT = ["--seed", "1", "--hidden-size", "48", "--depth", "8", "--num-heads", "2", "--dit-steps", "600",
           "--threads", "1", "--eval-seeds", "4", "--skip-classifier"]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"jetdet_bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> dict:
    from jetdet.models import bundled

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/jetdet_second_model", help="where the variant's weights live")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--peers", nargs="*", default=[], help="diffusers peer families to run beside (slow)")
    ap.add_argument("--budgets", type=float, nargs="*", default=[])
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args(argv)
    out = Path(args.dir)
    dit = out / bundled.DIT_FILE.name
    if not dit.exists():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(bundled.CLASSIFIER_FILE, out / bundled.CLASSIFIER_FILE.name)
        _load("train_bundled").main(["--out-dir", str(out), "--grid", str(out / "grid.png"), *VARIANT])
    peers = _load("peers")
    print(f"variant: {bundled.read_metadata(dit)['config']}", flush=True)
    res = peers.run_peers(seeds=range(args.seeds), sampler=args.sampler, budgets=args.budgets,
                          qualities=("balanced", "high", "fast"), peers=args.peers, weights=str(dit), threads=1,
                          progress=lambda s: print(s, flush=True))
    print(f"\n## {peers.format_header(res)}; weights {dit} (sha256 {res['weights']['dit_sha256']})\n")
    print(peers.format_table(res))
    default = next(r for r in res["rows"] if r["method"] == "jetdet quality=balanced")
    ok = default["speedup"] >= 2.0 and default["psnr_mean"] >= 33.0
    verdict = (f"default quality (balanced) on the variant: {default['reduction']:.2f}x fewer full-model "
               f"equivalents, {default['speedup']:.2f}x wall, {default['psnr_mean']:.2f} dB mean PSNR "
               f"(min {default['psnr_min']:.2f}), accuracy {100 * default['accuracy']:.1f}% (full "
               f"{100 * res['acceptance']['full_accuracy']:.1f}%): bar >= 2x wall at >= 33 dB: "
               f"{'PASS' if ok else 'FAIL'}")
    print("\n" + verdict)
    if args.markdown:
        Path(args.markdown).write_text(f"## Second model: {peers.format_header(res)}\n\n`python bench/second_model.py "
                                       f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
                                       f"variant config: `{bundled.read_metadata(dit)['config']}`\n\n"
                                       f"{peers.format_table(res)}\n\n```\n{verdict}\n```\n")
    if args.plot:
        peers.plot(res, args.plot)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return res


if __name__ == "__main__":
    main()
