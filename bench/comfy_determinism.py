"""The ComfyUI determinism table: items of a batch against batch-1 runs, jetdet's sampler against ComfyUI's own.

    JETDET_COMFYUI_STUBS=../shared/comfyui/stubs python bench/comfy_determinism.py --comfyui /path/to/ComfyUI

On jetdet's shapes model in real ComfyUI (an SD3-architecture MMDiT), for each sampler: a batch of 4 against a
batch-1 run of each item, bitwise, with

* ``JetDetDeterministicSampler`` (item i alone with ``batch_offset=i``), cond and uncond batched as ComfyUI batches
  them, then forced into separate model calls (ComfyUI does that when it sees too little free memory), then at 1
  and at 2 CPU threads;
* ComfyUI's stock ``KSampler`` (item i alone with ``batch_index=[i]``, so ComfyUI's ``prepare_noise`` gives it the
  same starting noise): the negative control.

``tests/comfy/test_comfy_deterministic.py`` asserts the same; this prints the table the README quotes.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from jetdet.comfy.runtime import import_comfyui  # noqa: E402

SAMPLERS = ("euler", "euler_ancestral", "dpmpp_2m_sde", "dpmpp_sde", "heun", "lms")


@contextlib.contextmanager
def no_free_memory():
    """ComfyUI sees no free memory: cond and uncond go to the model as separate calls."""
    import comfy.model_management as mm

    orig = mm.get_free_memory
    mm.get_free_memory = lambda dev=None, torch_free_too=False: (0, 0) if torch_free_too else 0
    try:
        yield
    finally:
        mm.get_free_memory = orig


def _latent(n, batch_index=None):
    from jetdet.comfy import shapes_model as sm

    lat = {"samples": torch.zeros(n, sm.LATENT_CHANNELS, sm.LATENT_SIZE, sm.LATENT_SIZE)}
    if batch_index is not None:
        lat["batch_index"] = batch_index
    return lat


def jetdet_items(model, conds, sampler, steps, seed, batch=4):
    from jetdet.comfy.nodes import JetDetDeterministicSampler

    def run(n, offset):
        return JetDetDeterministicSampler.execute(model, seed, steps, 4.0, sampler, "simple", *conds, _latent(n), 1.0,
                                                  offset).args[0]["samples"]

    full = run(batch, 0)
    return full, [torch.equal(full[i], run(1, i)[0]) for i in range(batch)]


def stock_items(model, conds, sampler, steps, seed, batch=4):
    import nodes

    def run(lat):
        return nodes.KSampler().sample(model, seed, steps, 4.0, sampler, "simple", *conds, lat, 1.0)[0]["samples"]

    full = run(_latent(batch))
    singles = [run(_latent(1, [i]))[0] for i in range(batch)]
    return [torch.equal(full[i], singles[i]) for i in range(batch)], max((full[i] - singles[i]).abs().max().item()
                                                                         for i in range(batch))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--samplers", nargs="+", default=list(SAMPLERS))
    args = ap.parse_args(argv)
    import_comfyui(args.comfyui)
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    from jetdet.comfy import shapes_model as sm

    model = sm.load_model()
    conds = (sm.class_conditioning(3), sm.null_conditioning())
    threads = torch.get_num_threads()
    print(f"shapes model, batch 4 against batch-1 runs of each item, {args.steps} steps, CFG 4, seed {args.seed}, "
          f"{threads} threads by default\n")
    print("| sampler | jetdet: items equal | cond/uncond apart | 1 vs 2 threads | stock KSampler: items equal "
          "(max diff) | s |")
    print("|---|---|---|---|---|---:|")
    for s in args.samplers:
        t0 = time.perf_counter()
        full, eq = jetdet_items(model, conds, s, args.steps, args.seed)
        with no_free_memory():
            apart, eq_apart = jetdet_items(model, conds, s, args.steps, args.seed)
        saved = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one, _ = jetdet_items(model, conds, s, args.steps, args.seed, batch=4)
            torch.set_num_threads(2)
            two, _ = jetdet_items(model, conds, s, args.steps, args.seed, batch=4)
        finally:
            torch.set_num_threads(saved)
        stock_eq, stock_diff = stock_items(model, conds, s, args.steps, args.seed)
        print(f"| {s} | {sum(eq)}/4 | {sum(eq_apart)}/4, batch equal: {torch.equal(full, apart)} | "
              f"{torch.equal(one, two) and torch.equal(one, full)} | {sum(stock_eq)}/4 ({stock_diff:.2g}) | "
              f"{time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
