"""Train the shapes model that ComfyUI loads natively (an SD3-architecture MMDiT) and write it to jetdet/data/.

    python bench/train_comfy_native.py --comfyui /path/to/ComfyUI        # the shipped weights
    python bench/train_comfy_native.py --eval-only                       # re-grade the shipped file
    python bench/train_comfy_native.py --steps 200 --out /tmp/try.safetensors   # a quick experiment

``$COMFYUI_DIR`` works in place of ``--comfyui``. The model is built from ComfyUI's own class
(``comfy.ldm.modules.diffusionmodules.mmdit.OpenAISignatureMMDITWrapper``, with plain ``torch.nn`` layers so every
weight is initialised), trained here, and saved as the bare diffusion-model state dict that ComfyUI's detection
reads back as SD3 (:mod:`jetdet.comfy.shapes_model` says what the latent and the conditioning are).

Objective: rectified flow in the model's space, ``x_t = (1 - t) x0 + t e``, target ``v = e - x0``, the timestep
given as ``1000 t`` (ComfyUI's SD3 ``model_sampling``: ``CONST``, multiplier 1000); ``t`` from a logit-normal(0, 1);
10 % of the class vectors dropped to zeros for classifier-free guidance. AdamW, warm-up then cosine decay, gradient
clipping at 1, EMA of the weights. Deterministic: fixed seeds, ``torch.use_deterministic_algorithms(True)``, a
fixed step count.

The evaluation samples through ComfyUI's own sampler (``comfy.sample.sample``, Euler, "simple" schedule, SD3's
shift 3) from jetdet's per-item noise, decodes, and grades with the bundled classifier.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/train_bundled.py: shared cores

import argparse  # noqa: E402
import copy  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.train_bundled import lr_at, make_optimizer, optimizer_step, save_png_grid  # noqa: E402
from jetdet.comfy import shapes_model as sm  # noqa: E402
from jetdet.comfy.runtime import import_comfyui  # noqa: E402
from jetdet.models.bundled import load_classifier, save_module  # noqa: E402
from jetdet.models.shapes import NUM_CLASSES, make_shapes  # noqa: E402

DATA_SEED = 5_000_000  # batch k of the training stream is make_shapes(batch, DATA_SEED + k)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """``[1, grid * grid, dim]`` fixed 2-D sin-cos table (rows, then columns), float32."""
    quarter = dim // 4
    freqs = torch.exp(-math.log(10000.0) * torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid, dtype=torch.float64)
    ang = pos[:, None] * freqs[None]  # [grid, quarter]
    one = torch.cat([ang.sin(), ang.cos()], dim=1)  # [grid, dim/2]
    rows = one[:, None, :].expand(grid, grid, dim // 2)
    cols = one[None, :, :].expand(grid, grid, dim // 2)
    return torch.cat([rows, cols], dim=-1).reshape(1, grid * grid, dim).float()


def build_model(seed: int):
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper

    ops = types.SimpleNamespace(Linear=nn.Linear, Conv2d=nn.Conv2d, Conv3d=nn.Conv3d, LayerNorm=nn.LayerNorm)
    torch.manual_seed(seed)
    model = OpenAISignatureMMDITWrapper(**sm.UNET_CONFIG, dtype=torch.float32, operations=ops)
    with torch.no_grad():  # DiT-style: xavier linears, zero biases, adaLN-Zero, zero output layer
        for m in model.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
                nn.init.zeros_(m.bias)
        for name, m in model.named_modules():
            if name.endswith("adaLN_modulation"):
                nn.init.zeros_(m[-1].weight)
                nn.init.zeros_(m[-1].bias)
            elif name.endswith(("t_embedder.mlp", "y_embedder.mlp")):
                for layer in (m[0], m[2]):
                    nn.init.normal_(layer.weight, std=0.02)
        nn.init.zeros_(model.final_layer.linear.weight)
        nn.init.zeros_(model.final_layer.linear.bias)
        model.pos_embed.copy_(sincos_2d(model.hidden_size, UNET_GRID))
    for name, p in model.state_dict().items():  # every tensor written (ComfyUI's own layers would leave garbage)
        if not torch.isfinite(p).all():
            raise RuntimeError(f"{name} is not initialised")
    return model


UNET_GRID = sm.UNET_CONFIG["pos_embed_max_size"]


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    x0 = torch.zeros(images.shape[0], sm.LATENT_CHANNELS, sm.LATENT_SIZE, sm.LATENT_SIZE)
    x0[:, :3] = images
    return x0


def train(args):
    model = build_model(args.seed)
    if args.init:  # continue from earlier weights (the saved EMA) with a fresh optimiser and schedule
        from safetensors.torch import load_file

        model.load_state_dict({k: v.float() for k, v in load_file(args.init).items()})
        log(f"initialised from {args.init}; data stream from batch {args.data_offset}")
    ema = copy.deepcopy(model).requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"MMDiT {sm.UNET_CONFIG}, {n_params / 1e6:.3f}M parameters")
    opt = make_optimizer(model, args.lr)
    gen = torch.Generator().manual_seed(args.seed + 3 + args.data_offset)
    t0 = time.perf_counter()
    losses = []
    model.train()
    for step in range(args.steps):
        lr = lr_at(step, args.steps, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        images, labels = make_shapes(args.batch, DATA_SEED + args.data_offset + step)
        b = images.shape[0]
        drop = torch.rand(b, generator=gen) < args.cfg_dropout
        context, pooled = sm.class_vectors(torch.where(drop, torch.full_like(labels, -1), labels))
        x0 = to_model_space(images)
        t = torch.sigmoid(torch.randn(b, generator=gen))
        e = torch.randn(x0.shape, generator=gen)
        xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * e
        v = model(xt, t * 1000.0, context=context, y=pooled)
        loss = F.mse_loss(v, e - x0)
        optimizer_step(opt, model, ema, loss, step, args.ema)
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps - 1:
            log(f"step {step:5d}  loss {loss.item():.4f}  mean50 {statistics.fmean(losses[-50:]):.4f}  lr {lr:.2e}  "
                f"{time.perf_counter() - t0:.0f}s")
    el = time.perf_counter() - t0
    final = statistics.fmean(losses[-100:])
    log(f"trained {args.steps} steps x {args.batch} in {el:.0f}s, final loss (mean of last 100) {final:.4f}")
    return ema.eval(), {"steps": args.steps, "batch": args.batch, "final_loss": round(final, 5), "lr": args.lr,
                        "ema": args.ema, "cfg_dropout": args.cfg_dropout, "seed": args.seed,
                        "init": Path(args.init).name if args.init else None, "data_offset": args.data_offset}


def evaluate(path, args) -> dict:
    import comfy.sample

    import jetdet

    patcher = sm.load_model(path)
    clf = load_classifier()
    labels = torch.arange(NUM_CLASSES).repeat(args.eval_seeds)
    n = labels.numel()
    out = {}
    for sampler in args.eval_samplers:
        imgs = []
        s = time.perf_counter()
        for c in range(NUM_CLASSES):  # one batch per class: positive = that class, negative = zeros
            idx = (labels == c).nonzero().reshape(-1)
            latent = torch.zeros(idx.numel(), sm.LATENT_CHANNELS, sm.LATENT_SIZE, sm.LATENT_SIZE)
            noise = torch.cat([jetdet.randn((1, *latent.shape[1:]), args.eval_seed, item_offset=int(i)) for i in idx])
            res = comfy.sample.sample(patcher, noise, args.eval_steps, args.cfg, sampler, args.scheduler,
                                      sm.class_conditioning(c), sm.null_conditioning(), latent, disable_pbar=True,
                                      seed=args.eval_seed)
            imgs.append((idx, sm.latent_to_image(res)))
        el = time.perf_counter() - s
        images = torch.empty(n, 3, sm.LATENT_SIZE, sm.LATENT_SIZE)
        for idx, im in imgs:
            images[idx] = im
        pred = clf.predict(images)
        acc = (pred == labels).float().mean().item()
        per_class = [round((pred[labels == c] == c).float().mean().item() * 100) for c in range(NUM_CLASSES)]
        out[f"acc_{sampler}"] = acc
        log(f"sample accuracy {sampler}/{args.scheduler} {args.eval_steps} steps cfg {args.cfg}: {acc * 100:.2f}% of "
            f"{n} ({el:.0f}s); per class {per_class}")
        if args.grid:
            order = torch.arange(n).reshape(args.eval_seeds, NUM_CLASSES)[:8].reshape(-1)
            gp = str(args.grid).replace(".png", f"_{sampler}.png")
            save_png_grid(images[order], gp, NUM_CLASSES)
            log(f"wrote {gp}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", default=None, help="ComfyUI checkout (default: $COMFYUI_DIR)")
    ap.add_argument("--out", default=str(sm.MODEL_FILE), help="where to write the safetensors")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--cfg-dropout", type=float, default=0.1)
    ap.add_argument("--init", default=None, help="start from these weights (a file this script wrote)")
    ap.add_argument("--data-offset", type=int, default=0, help="first training batch index (to continue a run)")
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--eval-seeds", type=int, default=10, help="samples per class in the evaluation")
    ap.add_argument("--eval-seed", type=int, default=0)
    ap.add_argument("--eval-steps", type=int, default=30)
    ap.add_argument("--eval-samplers", nargs="+", default=["euler", "heun"])
    ap.add_argument("--scheduler", default="simple")
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--grid", default="/tmp/comfy_native_grid.png", help="PNG grid of samples ('' for none)")
    args = ap.parse_args(argv)

    import_comfyui(args.comfyui)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    log(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {os.getloadavg()}")
    out = Path(args.out)
    if not args.eval_only:
        c0 = time.process_time()
        model, info = train(args)
        model.config = dict(sm.UNET_CONFIG)  # save_module writes it into the metadata
        save_module(model, out, kind="comfy_shapes_sd3", extra={"training": info, "unet_config": sm.UNET_CONFIG})
        log(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB); {time.process_time() - c0:.0f} CPU-s")
    evaluate(out, args)


if __name__ == "__main__":
    main()
