"""Where the deterministic CPU path's time goes, layer by layer, on the tiny models at batch 4.

``python -m jetdet.bench --only speed`` gives the whole-model ratio (deterministic against off); this script
splits it, timing each piece against what plain torch does in its place (median of ``--repeats`` runs, the
variants interleaved; microseconds):

1. **Convolutions of TinyUNet:** ``F.conv2d`` (oneDNN), the conv2d torch path (the whole deterministic conv),
   and its two parts: the im2col gather into a reused buffer, and the batched GEMM alone on those columns.
   Also the same gather into a freshly allocated buffer, the page-fault cost the per-thread scratch buffers
   avoid.
2. **Linears of TinyDiT:** ``F.linear``, ``F.linear`` routed in deterministic mode (the router's direct CPU
   route), the public op ``jetdet.ops.linear``, and the tiled GEMM alone; plus the bias as the GEMM's C operand
   (``baddbmm``) against a GEMM followed by a separate bias pass.
3. **The router itself:** calls per forward that it routes and that it passes through, and the cost of one
   pass-through (an ``add``) with and without the router on the stack.
4. **torch's NaN fill:** a deterministic-mode forward as shipped (op bodies switch the fill of new tensors off)
   against one where the bodies leave it on.

    python bench/cpu_costs.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jetdet  # noqa: E402
from jetdet.kernels.conv2d import torch_path as conv_torch  # noqa: E402
from jetdet.kernels.matmul import torch_path as mm_torch  # noqa: E402
from jetdet.models import TinyDiT, TinyUNet, make_toy_inputs  # noqa: E402


def timed(fns: dict, repeats: int, inner: int = 1) -> dict:
    """Median microseconds per call of each callable, interleaved."""
    res = {k: [] for k in fns}
    for f in fns.values():
        for _ in range(3):
            f()
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            res[k].append((time.perf_counter() - t0) / inner * 1e6)
    return {k: statistics.median(v) for k, v in res.items()}


class _Record(TorchFunctionMode):
    """Records the conv2d/linear calls of a forward (arguments) and counts every call the router would see."""

    def __init__(self):
        super().__init__()
        self.convs, self.linears, self.calls = [], [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls.append(func)
        if func in (F.conv2d, torch.conv2d):
            self.convs.append((args, kwargs))
        elif func is F.linear:
            self.linears.append((args, kwargs))
        return func(*args, **kwargs)


def _record(model_cls):
    model = model_cls().eval()
    x, t, y = make_toy_inputs(4)
    rec = _Record()
    with torch.no_grad(), rec:
        model(x, t, y)
    return model, (x, t, y), rec


def _conv_parts(x, w, b, stride, padding):
    """The deterministic conv's gather (into a reused and a fresh buffer) and its GEMM alone."""
    bsz, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    sh, sw = stride
    ph, pw = padding
    ho, wo = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    hp, wp = h + 2 * ph, wd + 2 * pw
    k, ll = c * kh * kw, ho * wo
    lp = -(-ll // mm_torch.COL_PAD) * mm_torch.COL_PAD
    op = -(-o // 8) * 8
    xp = torch.zeros(bsz, c, hp, wp)
    xp[:, :, ph:ph + h, pw:pw + wd] = x
    src = xp.as_strided((bsz, c, kh, kw, ho, wo), (c * hp * wp, hp * wp, wp, 1, sh * wp, sw))
    cols = torch.zeros(bsz, k, lp)

    def gather_reused():
        cols[:, :, :ll].view(bsz, c, kh, kw, ho, wo).copy_(src)

    def gather_fresh():
        fresh = torch.empty(bsz, k, lp)
        fresh[:, :, :ll].view(bsz, c, kh, kw, ho, wo).copy_(src)

    wm = F.pad(w.reshape(o, k), (0, 0, 0, op - o)).contiguous()
    out = torch.empty(bsz, op, lp)

    def gemm():
        torch.bmm(wm.expand(bsz, op, k), cols, out=out)

    return gather_reused, gather_fresh, gemm


def _pair(v) -> tuple[int, int]:
    """conv2d's int-or-pair argument as a pair."""
    return (v, v) if isinstance(v, int) else tuple(v)


def convs(repeats: int) -> list[str]:
    _, _, rec = _record(TinyUNet)
    lines = ["| conv (batch 4) | F.conv2d | jetdet conv2d torch path | gather (reused buffer) | gather (fresh buffer) "
             "| GEMM alone | jetdet / F |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    tot_f = tot_j = 0.0
    seen = set()
    with torch.no_grad():
        for args, kwargs in rec.convs:
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            stride = args[3] if len(args) > 3 else kwargs.get("stride", 1)
            padding = args[4] if len(args) > 4 else kwargs.get("padding", 0)
            stride, padding = _pair(stride), _pair(padding)
            key = (tuple(x.shape), tuple(w.shape), stride, padding)
            g_reused, g_fresh, gemm = _conv_parts(x, w, b, stride, padding)
            r = timed({
                "F": lambda x=x, w=w, b=b, s=stride, p=padding: F.conv2d(x, w, b, s, p),
                "jetdet": lambda x=x, w=w, b=b, s=stride, p=padding: conv_torch.conv2d(x, w, b, s, p),
                "reused": g_reused, "fresh": g_fresh, "gemm": gemm,
            }, repeats)
            tot_f += r["F"]
            tot_j += r["jetdet"]
            if key in seen:
                continue
            seen.add(key)
            name = (f"{x.shape[1]}->{w.shape[0]} {w.shape[2]}x{w.shape[3]} s{stride[0]} on "
                    f"{x.shape[2]}x{x.shape[3]}")
            lines.append(f"| {name} | {r['F']:.0f} | {r['jetdet']:.0f} | {r['reused']:.0f} | {r['fresh']:.0f} | "
                         f"{r['gemm']:.0f} | {r['jetdet'] / r['F']:.2f}x |")
    lines.append(f"| all {len(rec.convs)} convs of one forward | {tot_f:.0f} | {tot_j:.0f} | | | | "
                 f"{tot_j / tot_f:.2f}x |")
    return lines


def linears(repeats: int) -> list[str]:
    from jetdet.mode import handler_for  # jetdet.mode, the attribute, is the context manager

    handler = handler_for(F.linear)
    _, _, rec = _record(TinyDiT)
    lines = ["| linear (batch 4) | F.linear | router's handler (direct CPU route) | jetdet.ops.linear "
             "| tiled GEMM alone "
             "| GEMM + bias pass | bias as C operand |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    seen = set()
    tot = {"F": 0.0, "routed": 0.0}
    with torch.no_grad():
        for args, kwargs in rec.linears:
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            x2 = x.reshape(-1, x.shape[-1])
            m, k = x2.shape
            n = w.shape[0]
            full, tail, h = mm_torch.mm_rows(m, k, -(-n // mm_torch.COL_PAD) * mm_torch.COL_PAD)
            mp = full + tail
            hh = h if tail and not full else mm_torch.ROW_TILE
            tiles = mp // hh
            a3 = F.pad(x2, (0, 0, 0, mp - m)).view(tiles, hh, k)
            np_ = -(-n // mm_torch.COL_PAD) * mm_torch.COL_PAD
            bp = F.pad(w.t(), (0, np_ - n)).contiguous()
            bias = F.pad(b, (0, np_ - n)) if b is not None else torch.zeros(np_)
            out = torch.empty(tiles, hh, np_)

            bpe = bp.expand(tiles, k, np_)

            def gemm_bias_pass(a3=a3, bpe=bpe, out=out, bias=bias):
                torch.bmm(a3, bpe, out=out)
                out.add_(bias)

            r = timed({
                "F": lambda x=x, w=w, b=b: F.linear(x, w, b),
                "ops": lambda x=x, w=w, b=b: jetdet.ops.linear(x, w, b),
                "gemm": lambda a3=a3, bpe=bpe, out=out: torch.bmm(a3, bpe, out=out),
                "pass": gemm_bias_pass,
                "c": lambda a3=a3, bpe=bpe, out=out, bias=bias: torch.baddbmm(bias, a3, bpe, out=out),
                "routed": lambda x=x, w=w, b=b: handler(F.linear, (x, w, b), {}),
            }, repeats)
            tot["F"] += r["F"]
            tot["routed"] += r["routed"]
            key = (m, k, n)
            if key in seen:
                continue
            seen.add(key)
            lines.append(f"| [{m}, {k}] @ [{k}, {n}] | {r['F']:.0f} | {r['routed']:.0f} | {r['ops']:.0f} | "
                         f"{r['gemm']:.0f} | {r['pass']:.0f} | {r['c']:.0f} |")
    lines.append(f"| all {len(rec.linears)} linears of one forward | {tot['F']:.0f} | {tot['routed']:.0f} | | | | |")
    lines.append("")
    lines.append("The handler column calls the router's linear handler directly (what a routed `F.linear` runs "
                 "after the router's own dispatch, timed below).")
    return lines


def router(repeats: int) -> list[str]:
    from jetdet.mode import handler_for  # jetdet.mode, the attribute, is the context manager

    lines = []
    a = torch.randn(4, 8)
    plain = timed({"add": lambda: a + a}, repeats, inner=200)["add"]
    with jetdet.mode("deterministic"):
        routed = timed({"add": lambda: a + a}, repeats, inner=200)["add"]
    for cls in (TinyUNet, TinyDiT):
        _, _, rec = _record(cls)
        n_routed = sum(1 for f in rec.calls if handler_for(f) is not None)
        n_other = len(rec.calls) - n_routed
        lines.append(f"- {cls.__name__}: {len(rec.calls)} torch calls per forward, {n_routed} routed, {n_other} "
                     f"passed through: about {n_other * (routed - plain) / 1000:.2f} ms of router per forward")
    lines.append(f"- one pass-through call (`a + a`, [4, 8]): {plain:.1f} µs plain, {routed:.1f} µs under the router")
    return lines


def _fill_pair(model, inputs):
    from jetdet import backend

    def shipped():
        model(*inputs)

    def filled():
        with backend.fill_left_on():
            model(*inputs)

    return shipped, filled


def nan_fill(repeats: int) -> list[str]:
    """A deterministic-mode forward with the op bodies' NaN-fill switch-off disabled (every new tensor in them
    NaN-filled, as torch.use_deterministic_algorithms does by default) against the shipped behaviour."""
    lines = []
    for cls in (TinyUNet, TinyDiT):
        shipped, filled = _fill_pair(cls().eval(), make_toy_inputs(4))
        with torch.no_grad(), jetdet.mode("deterministic"):
            r = timed({"shipped": shipped, "filled": filled}, repeats)
        lines.append(f"- {cls.__name__} forward in deterministic mode: {r['shipped'] / 1000:.2f} ms with the fill "
                     f"off in op bodies, {r['filled'] / 1000:.2f} ms with it on")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=51)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cmd = "python bench/cpu_costs.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"## Deterministic CPU path, piece by piece ({args.threads} thread(s), median of {args.repeats}, "
             f"µs; torch {torch.__version__})", "", f"`{cmd.strip()}`", ""]
    lines += ["### Convolutions (TinyUNet)", ""] + convs(args.repeats) + [""]
    lines += ["### Linears (TinyDiT)", ""] + linears(args.repeats) + [""]
    lines += ["### Router", ""] + router(args.repeats) + [""]
    lines += ["### torch's NaN fill of new tensors", ""] + nan_fill(args.repeats)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)


if __name__ == "__main__":
    main()
