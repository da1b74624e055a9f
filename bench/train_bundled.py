"""Train the bundled DiT and its grading classifier on CPU, deterministically, and write them to jetdet/data/.

    python bench/train_bundled.py                      # full run (the shipped weights), 13 min on 2 cores
    python bench/train_bundled.py --eval-only          # re-grade the shipped weights
    python bench/train_bundled.py --dit-steps 300 --out-dir /tmp/try   # a quick experiment

Determinism: fixed seeds, ``torch.use_deterministic_algorithms(True)``, 2 threads, and a fixed step count
(never a wall-clock stop), so two runs on the same machine and torch build write the same bytes. Every
training batch is rendered fresh by :func:`jetdet.models.shapes.make_shapes` from a per-step seed.

DiT objective (rectified flow): ``x_t = (1 - t) x0 + t e``, target ``v = e - x0``, MSE; ``t`` from a
logit-normal(0, 1) (SD3), which spends the budget on mid-range noise where the class decides the image;
labels replaced by the null label with probability 0.1 (classifier-free guidance). AdamW, linear warmup then
cosine decay, gradient clipping at 1; the shipped weights are an EMA of the trained ones (float32).

Sizing, measured on this 2-core CPU (torch 2.13, 2 threads): a patch-4 DiT (64 tokens; width 96, depth 12)
trains about 1.6x faster per step than the shipped patch-2 one (256 tokens; width 64, depth 10), but after 2000
steps its samples were ragged 4x4-block blobs, 69% recognised. The shipped run (the defaults, 1200 steps of
32): classifier 56 s, DiT 723 s, 778 s = 13.0 min wall in all (load average ~1.7); held-out classifier accuracy
99.9%; samples recognised at 30 steps, CFG 4, 10 per class: Euler 91%, Heun 92% (rings are the weak class:
40% / 50%; every other class 80-100%). A batch-1 forward takes 15-17 ms (2 threads).

Why ``OMP_WAIT_POLICY=PASSIVE``: this machine's 2 cores are shared with other jobs. With OpenMP's default
spin-waiting a 2-thread batch-1 forward measured 310 ms median (7.6 ms min) under load, and 8.7 ms with
passive waiting; 1 thread measured 6.4 ms. It has to be set before torch starts its thread pool.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from jetdet.models.bundled import (  # noqa: E402
    CLASSIFIER_FILE,
    DEFAULT_CLASSIFIER_CONFIG,
    DEFAULT_DIT_CONFIG,
    DIT_FILE,
    BundledDiT,
    ShapeClassifier,
    load_bundled,
    load_classifier,
    save_module,
)
from jetdet.models.sampling import DEFAULT_CFG, sample  # noqa: E402
from jetdet.models.shapes import NUM_CLASSES, make_shapes  # noqa: E402

# Seeds of the data streams; each stream draws batch k from seed base + k, so the streams never overlap.
DIT_DATA_SEED = 1_000_000
CLF_DATA_SEED = 2_000_000
HELDOUT_SEED = 3_000_000


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def make_optimizer(model, lr: float) -> torch.optim.AdamW:
    """AdamW with weight decay 0.01 on the matrices that are not embeddings, none on the rest."""
    decay_params = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    other_params = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    return torch.optim.AdamW(
        [{"params": decay_params, "weight_decay": 0.01}, {"params": other_params, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.99),
    )


def optimizer_step(opt, model, ema, loss, step: int, ema_decay: float) -> None:
    """Backward, clip at 1, step, then move the EMA copy (warm-up ``(1 + step) / (10 + step)``)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    decay = min(ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - decay)


def train_classifier(args) -> ShapeClassifier:
    torch.manual_seed(args.seed + 1)
    clf = ShapeClassifier(DEFAULT_CLASSIFIER_CONFIG)
    opt = torch.optim.AdamW(clf.parameters(), lr=args.clf_lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed + 2)
    t0 = time.perf_counter()
    clf.train()
    for step in range(args.clf_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.clf_steps, args.clf_lr, 50, floor=0.02)
        # Ragged edges (make_shapes' edge_noise) and light Gaussian noise (sigma up to 0.1): the classifier grades
        # the outline of the shape, not whether every edge pixel is clean.
        x, y = make_shapes(args.clf_batch, CLF_DATA_SEED + step, edge_noise=args.clf_edge_noise)
        sigma = 0.1 * torch.rand(x.shape[0], 1, 1, 1, generator=gen)
        x = x + sigma * torch.randn(x.shape, generator=gen)
        loss = F.cross_entropy(clf(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.clf_steps - 1:
            log(f"classifier step {step:5d}  loss {loss.item():.4f}")
    clf.eval()
    log(f"classifier trained in {time.perf_counter() - t0:.0f}s")
    return clf


def train_dit(args):
    cfg = dict(DEFAULT_DIT_CONFIG)
    for k in ("patch_size", "hidden_size", "depth", "num_heads"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    torch.manual_seed(args.seed)
    model = BundledDiT(cfg)
    model.reset_parameters(seed=args.seed)
    ema = copy.deepcopy(model).requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"DiT config {cfg}, {n_params / 1e6:.3f}M parameters")
    opt = make_optimizer(model, args.lr)
    gen = torch.Generator().manual_seed(args.seed + 3)
    t0 = time.perf_counter()
    losses = []
    model.train()
    for step in range(args.dit_steps):
        lr = lr_at(step, args.dit_steps, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        x0, y = make_shapes(args.batch, DIT_DATA_SEED + step)
        b = x0.shape[0]
        drop = torch.rand(b, generator=gen) < args.cfg_dropout
        y = torch.where(drop, torch.full_like(y, model.null_label), y)
        t = torch.sigmoid(torch.randn(b, generator=gen))  # logit-normal(0, 1)
        e = torch.randn(x0.shape, generator=gen)
        xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * e
        loss = F.mse_loss(model(xt, t, y), e - x0)
        optimizer_step(opt, model, ema, loss, step, args.ema)
        losses.append(loss.item())
        if step % 50 == 0 or step == args.dit_steps - 1:
            recent = statistics.fmean(losses[-50:])
            el = time.perf_counter() - t0
            log(f"DiT step {step:5d}  loss {loss.item():.4f}  mean50 {recent:.4f}  lr {lr:.2e}  {el:.0f}s")
    el = time.perf_counter() - t0
    final = statistics.fmean(losses[-100:])
    log(f"DiT trained: {args.dit_steps} steps x {args.batch} in {el:.0f}s, final loss (mean of last 100) {final:.4f}")
    return ema.eval(), {"steps": args.dit_steps, "batch": args.batch, "final_loss": round(final, 5)}


def save_png_grid(images: torch.Tensor, path, ncol: int, upscale: int = 3) -> None:
    """Write ``[N, 3, H, W]`` images in ``[-1, 1]`` as a PNG grid (zlib only, no imaging library)."""
    imgs = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, _, h, w = imgs.shape
    nrow = -(-n // ncol)
    canvas = torch.full((3, nrow * (h + 2), ncol * (w + 2)), 255, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        canvas[:, r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = imgs[i]
    canvas = canvas.repeat_interleave(upscale, 1).repeat_interleave(upscale, 2)
    hh, ww = canvas.shape[1:]
    raw = b"".join(b"\x00" + canvas[:, y].t().contiguous().numpy().tobytes() for y in range(hh))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", ww, hh, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    Path(path).write_bytes(png)


def forward_ms(model, reps: int = 50) -> float:
    x = torch.randn(1, 3, 32, 32)
    t = torch.full((1,), 0.5)
    y = torch.zeros(1, dtype=torch.long)
    times = []
    with torch.no_grad():
        for _ in range(5):
            model(x, t, y)
        for _ in range(reps):
            s = time.perf_counter()
            model(x, t, y)
            times.append(time.perf_counter() - s)
    return statistics.median(times) * 1e3


def evaluate(dit_path, clf_path, args) -> dict:
    model = load_bundled(path=dit_path)
    clf = load_classifier(path=clf_path)
    xh, yh = make_shapes(2000, HELDOUT_SEED)
    held = (clf.predict(xh) == yh).float().mean().item()
    log(f"classifier accuracy on 2000 held-out clean images: {held * 100:.2f}%")
    labels = torch.arange(NUM_CLASSES).repeat(args.eval_seeds)  # item k: class k % 10, noise index k
    out = {"classifier_heldout": held, "forward_ms_b1": forward_ms(model)}
    log(f"DiT forward at batch 1: {out['forward_ms_b1']:.1f} ms median (threads={torch.get_num_threads()})")
    for sampler in args.eval_samplers:
        s = time.perf_counter()
        imgs = sample(model, labels, steps=args.eval_steps, cfg=args.cfg, sampler=sampler, seed=args.eval_seed)
        el = time.perf_counter() - s
        pred = clf.predict(imgs)
        acc = (pred == labels).float().mean().item()
        per_class = [(pred[labels == c] == c).float().mean().item() for c in range(NUM_CLASSES)]
        out[f"acc_{sampler}"] = acc
        log(
            f"sample accuracy {sampler} {args.eval_steps} steps cfg {args.cfg}: {acc * 100:.2f}% "
            f"of {labels.numel()} ({el:.0f}s); per class {[round(p * 100) for p in per_class]}"
        )
        if args.grid:
            grid_path = str(args.grid).replace(".png", f"_{sampler}.png")
            order = torch.arange(labels.numel()).reshape(args.eval_seeds, NUM_CLASSES)[:8].reshape(-1)
            save_png_grid(imgs[order], grid_path, NUM_CLASSES)
            log(f"wrote {grid_path}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=None, help="where to write the two safetensors (default jetdet/data)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dit-steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--cfg-dropout", type=float, default=0.1)
    ap.add_argument("--patch-size", dest="patch_size", type=int, default=None)
    ap.add_argument("--hidden-size", dest="hidden_size", type=int, default=None)
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--num-heads", dest="num_heads", type=int, default=None)
    ap.add_argument("--clf-steps", type=int, default=400)
    ap.add_argument("--clf-batch", type=int, default=64)
    ap.add_argument("--clf-lr", type=float, default=3e-3)
    ap.add_argument("--clf-edge-noise", type=float, default=2.0, help="max edge_noise amplitude (px) in training")
    ap.add_argument("--eval-only", action="store_true", help="skip training; grade the files in --out-dir")
    ap.add_argument("--skip-classifier", action="store_true", help="reuse the classifier file in --out-dir")
    ap.add_argument("--skip-dit", action="store_true", help="reuse the DiT file in --out-dir")
    ap.add_argument("--eval-seeds", type=int, default=10, help="samples per class in the final evaluation")
    ap.add_argument("--eval-seed", type=int, default=0)
    ap.add_argument("--eval-steps", type=int, default=30)
    ap.add_argument("--eval-samplers", nargs="+", default=["euler", "heun"])
    ap.add_argument("--cfg", type=float, default=DEFAULT_CFG)
    ap.add_argument("--grid", default="/tmp/bundled_grid.png", help="PNG grid of samples ('' for none)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    out_dir = Path(args.out_dir) if args.out_dir else DIT_FILE.parent
    dit_path, clf_path = out_dir / DIT_FILE.name, out_dir / CLASSIFIER_FILE.name
    log(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {os.getloadavg()}")

    if not args.eval_only:
        t0, c0 = time.perf_counter(), time.process_time()
        if not args.skip_classifier:
            clf = train_classifier(args)
            extra = {"train_steps": args.clf_steps, "edge_noise": args.clf_edge_noise}
            save_module(clf, clf_path, kind="bundled_classifier", extra=extra)
        if not args.skip_dit:
            dit, info = train_dit(args)
            info.update({"lr": args.lr, "ema": args.ema, "cfg_dropout": args.cfg_dropout, "seed": args.seed})
            save_module(dit, dit_path, kind="bundled_dit", extra={"training": info})
        el, cpu = time.perf_counter() - t0, time.process_time() - c0
        # CPU seconds / threads is what the wall time would be with the cores to ourselves.
        log(f"training total {el:.0f}s wall ({el / 60:.1f} min), {cpu:.0f} CPU-s = {cpu / args.threads / 60:.1f} min "
            f"on {args.threads} idle cores; load average {os.getloadavg()}")
        for p in (dit_path, clf_path):
            log(f"wrote {p} ({p.stat().st_size / 1e6:.2f} MB)")
    evaluate(dit_path, clf_path, args)


if __name__ == "__main__":
    main()
