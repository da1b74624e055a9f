"""Quality and cost model of the fast-path attention ops on realistic (spatially smooth) attention inputs.

    python bench/fast_quality.py [--side 32] [--heads 4] [--dim 64] [--block-size 64] [--backend torch]

Inputs: the tokens of a ``side × side`` latent grid (N = side², 1024 by default), one batch item, several
heads. Each head's queries and keys are random Fourier features of the token position (so q·k is a smooth,
decaying function of the distance between tokens, as in image DiTs whose attention is mostly local), with
a per-head length scale and sharpness, one head with a global content term, and a little i.i.d. noise;
values are a smooth random field plus noise. Not i.i.d. noise: that would make every block equally
important and tell nothing about real attention maps.

Measured against dense fp32 softmax attention:

* block-sparse attention with ``attention_block_mask(q, k, block_size, mass)`` for mass in
  {0.8, 0.9, 0.95, 0.99}: density (the fraction of work) and relative L2 / max error;
* linear attention (relu, elu1) **used in place of softmax attention — an approximation**, not a kernel
  error: the same inputs through a different attention function.

Then a cost model: FLOPs and bytes per op at a representative size and the roofline time on an H100 SXM
from stated peak numbers, with the static report's registers / spills / tensor-core use (sm_90) per
kernel. It is a model, not a measurement: no GPU was timed.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def smooth_attention_inputs(side=32, heads=4, dim=64, seed=0):
    """``q, k, v [1, heads, side², dim]`` fp32 with spatially smooth structure (see the module docstring)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    pos = torch.stack([xs.flatten(), ys.flatten()], dim=1).float() / side  # [N, 2] in [0, 1)
    n = side * side
    # per head: (length scale in grid units, sharpness of the attention, weight of a global content term)
    head_params = [(2.0, 1.0, 0.0), (4.0, 1.0, 0.0), (8.0, 1.0, 0.3), (3.0, 0.5, 0.0)]
    qs, ks, vs = [], [], []
    for h in range(heads):
        scale, sharp, glob = head_params[h % len(head_params)]
        omega = torch.randn(dim, 2, generator=g) * (side / scale)
        phase = torch.rand(dim, generator=g) * 2 * math.pi
        feat = math.sqrt(2.0 / dim) * torch.cos(pos @ omega.T + phase)  # RFF: feat_i·feat_j ≈ exp(-|Δp|²/2ℓ²)
        # q·k/sqrt(D) ≈ beta * kernel(Δp): beta sets how peaked the attention is
        beta = sharp * 12.0
        amp = math.sqrt(beta) * dim**0.25
        q = amp * feat
        k = amp * feat
        if glob:
            content = torch.randn(dim, generator=g)
            content_field = torch.cos(pos @ (torch.randn(2, dim, generator=g) * 2.0) + phase)
            k = k + glob * amp * content_field * content.sign()
        q = q + 0.05 * amp * torch.randn(n, dim, generator=g) / math.sqrt(dim)
        k = k + 0.05 * amp * torch.randn(n, dim, generator=g) / math.sqrt(dim)
        w = torch.randn(dim, dim, generator=g) / math.sqrt(dim)
        omega_v = torch.randn(dim, 2, generator=g) * (side / 6.0)
        v = math.sqrt(2.0) * torch.cos(pos @ omega_v.T + phase.flip(0)) @ w + 0.1 * torch.randn(n, dim, generator=g)
        qs.append(q), ks.append(k), vs.append(v)
    return (torch.stack(qs)[None], torch.stack(ks)[None], torch.stack(vs)[None])


def _err(out, ref):
    out, ref = out.double(), ref.double()
    rel = float((out - ref).norm() / ref.norm())
    return rel, float((out - ref).abs().max()), float(ref.abs().max())


def attention_stats(q, k):
    """How local the attention is: mean distance-weighted attention entropy proxy (effective number of
    attended tokens, exp(entropy)) per head."""
    p = (q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
    ent = -(p * p.clamp_min(1e-30).log()).sum(-1)
    return [float(x) for x in ent.exp().mean(-1)[0]]


def quality(args):
    import torch

    from jetdet import configs
    from jetdet.kernels.block_sparse import reference as bref
    from jetdet.ops import fast

    q, k, v = smooth_attention_inputs(args.side, args.heads, args.dim, args.seed)
    dtype = {name: dt for dt, name in configs.DTYPE_NAMES.items()}[args.dtype]
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    dense = bref.block_sparse_attention_reference(q, k, v, None)
    H = args.heads
    print(f"inputs: 1 x {H} heads x N={q.shape[2]} tokens ({args.side}x{args.side} grid) x D={args.dim}, "
          f"{args.dtype}, backend={os.environ.get('JETDET_BACKEND', 'auto')}")
    print("effective attended tokens per head (exp of the softmax entropy): "
          + ", ".join(f"{x:.0f}" for x in attention_stats(q, k)))
    perm, inv = fast.spatial_block_order(args.side, args.side, args.block_size)
    rows = []
    pools = [args.block_size] + [int(x) for x in args.pool_sizes.split(",") if int(x) != args.block_size]
    for pool, order in itertools.product(pools, ("raster", "tiled")):
        if order == "raster":
            qo, ko, vo = q, k, v
        else:
            qo, ko, vo = q[:, :, perm], k[:, :, perm], v[:, :, perm]
        print()
        print(f"Block-sparse attention vs dense softmax attention: block_size={args.block_size}, "
              f"pool_size={pool}{' (default)' if pool == args.block_size else ''}, tokens in "
              + ("raster order" if order == "raster" else "spatial_block_order (2-D tiles per block)"))
        print(f"{'mass':>6} {'density':>8} {'rel L2 err':>11} {'max abs err':>12}   per head: density / rel err")
        for mass in (0.8, 0.9, 0.95, 0.99):
            bm = fast.attention_block_mask(qo, ko, block_size=args.block_size, mass=mass, pool_size=pool)
            out = fast.block_sparse_attention(qo, ko, vo, bm, block_size=args.block_size)
            if order == "tiled":
                out = out[:, :, inv]
            rel, mx, _ = _err(out, dense)
            dens = fast.block_sparse_work(bm)["density"]
            heads = [(float(bm.mask[0, h].float().mean()), _err(out[:, h], dense[:, h])[0]) for h in range(H)]
            rows.append((order, pool, mass, dens, rel, mx))
            print(f"{mass:>6.2f} {dens:>8.3f} {rel:>11.4f} {mx:>12.4f}   "
                  + "  ".join(f"{d:.2f}/{e:.3f}" for d, e in heads))
        if pool == args.block_size:
            full = torch.ones_like(bm.mask)
            out = fast.block_sparse_attention(qo, ko, vo, full, block_size=args.block_size)
            rel, mx, _ = _err(out[:, :, inv] if order == "tiled" else out, dense)
            print(f"{'full':>6} {1.0:>8.3f} {rel:>11.2e} {mx:>12.2e}   (kernel / floating-point error only)")
    print()
    print("Linear attention used IN PLACE OF softmax attention (an approximation, not a kernel error)")
    print(f"{'feature map':>12} {'rel L2 err':>11} {'max abs err':>12}   per-head rel err")
    for fm in ("relu", "elu1"):
        out = fast.linear_attention(q, k, v, feature_map=fm)
        rel, mx, _ = _err(out, dense)
        print(f"{fm:>12} {rel:>11.4f} {mx:>12.4f}   "
              + "  ".join(f"{_err(out[:, h], dense[:, h])[0]:.3f}" for h in range(H)))
    mean_out = v.float().mean(dim=2, keepdim=True).expand_as(dense)
    rel, mx, _ = _err(mean_out, dense)
    print(f"{'(mean of V)':>12} {rel:>11.4f} {mx:>12.4f}   "
          + "  ".join(f"{_err(mean_out[:, h], dense[:, h])[0]:.3f}" for h in range(H))
          + "   <- uniform attention, for scale")
    return rows, pools


# ------------------------------------------------------------------------------------------------ cost model

# H100 SXM5 (80 GB HBM3) dense peaks, from NVIDIA's datasheet (no sparsity)
PEAK = {
    "hbm_bytes_s": 3.35e12,
    "fp16_tc_flops": 989.4e12,
    "tf32_tc_flops": 494.7e12,
    "fp32_flops": 66.9e12,
    "mufu_ops": 132 * 16 * 1.83e9,  # 16 SFU ops/clk/SM (exp2), 132 SMs at the 1.83 GHz boost clock
}


def cost_model(density: float, pools, with_static: bool = True):
    B, H, N, D = 2, 24, 4096, 64  # e.g. a 1024² image DiT (64x64 latent tokens, patch 1) with CFG as batch 2
    e = 2  # fp16 bytes
    bs = 64
    nb = N // bs
    ops = []
    # dense flash attention (for comparison)
    ops.append(("dense attention (flash)", 4 * B * H * N * N * D, B * H * N * N, 4 * B * H * N * D * e,
                "fp16_tc_flops"))
    pairs = density * B * H * nb * nb
    # HBM bytes: Q, K, V, O once (a head's K/V, 1 MB, stays in L2 across its query blocks), as for dense
    ops.append((f"block_sparse_attention (density {density:.2f})", 4 * pairs * bs * bs * D, pairs * bs * bs,
                4 * B * H * N * D * e, "fp16_tc_flops"))
    for pool in sorted(pools, reverse=True):
        # pooling kernel + fp32 pooled-score matmul and softmax (torch), per refresh step, not per step
        npool = N // pool
        ops.append((f"attention_block_mask (pool_size {pool})", 2 * B * H * N * D + 2 * B * H * npool * npool * D,
                    B * H * npool * npool, 2 * B * H * N * D * e + 2 * B * H * npool * D * 4, "fp32_flops"))
    ops.append(("linear_attention pass 1 (state)", 2 * B * H * N * D * D + B * H * N * D, B * H * N * D,
                2 * B * H * N * D * e + B * H * (D * D + D) * 4, "tf32_tc_flops"))
    ops.append(("linear_attention pass 2 (apply)", 2 * B * H * N * D * D + 3 * B * H * N * D, 0,
                2 * B * H * N * D * e + B * H * (D * D + D) * 4, "tf32_tc_flops"))
    lat = 2 * 16 * 128 * 128  # latent [2, 16, 128, 128] fp16
    ops.append(("relative_change (latent 2x16x128x128)", 3 * lat, 0, 2 * lat * e, "fp32_flops"))
    ops.append(("forecast order 2 (3 history, same latent)", 5 * lat, 0, 4 * lat * e, "fp32_flops"))
    print(f"Cost model at B={B} (CFG pair), H={H}, N={N}, D={D}, fp16, block_size={bs}; H100 SXM peaks: "
          f"HBM {PEAK['hbm_bytes_s'] / 1e12:.2f} TB/s, FP16 TC {PEAK['fp16_tc_flops'] / 1e12:.0f} TFLOP/s, "
          f"TF32 TC {PEAK['tf32_tc_flops'] / 1e12:.0f} TFLOP/s, FP32 {PEAK['fp32_flops'] / 1e12:.0f} TFLOP/s, "
          f"exp {PEAK['mufu_ops'] / 1e12:.1f} Tops/s")
    print("roofline time = max(FLOPs / peak, exps / exp rate, HBM bytes / bandwidth): a model, not a measurement")
    print(f"{'op':<45} {'GFLOP':>9} {'Gexp':>7} {'MB':>8} {'bound':>8} {'model us':>9}")
    for name, flops, exps, nbytes, peak in ops:
        t = {"compute": flops / PEAK[peak], "exp": exps / PEAK["mufu_ops"], "memory": nbytes / PEAK["hbm_bytes_s"]}
        bound = max(t, key=t.get)
        print(f"{name:<45} {flops / 1e9:>9.2f} {exps / 1e9:>7.3f} {nbytes / 1e6:>8.1f} {bound:>8} "
              f"{t[bound] * 1e6:>9.1f}")
    if with_static:
        static_rows()


def static_rows():
    """Registers, spills and tensor-core use of the kernels at the representative config on sm_90."""
    try:
        from jetdet import static_report
        from jetdet.kernels.block_sparse import specs as bl
        from jetdet.kernels.forecast import specs as fl
        from jetdet.kernels.linear_attention import specs as ll
    except Exception as e:  # noqa: BLE001 - the cost model stands without it
        print(f"(static report unavailable: {e})")
        return
    want = ("bsa_fwd_d64_fp16_bs64", "block_pool_d64_fp16_ps4_", "block_pool_d64_fp16_ps64", "la_state_d64_fp16",
            "la_apply_d64_fp16", "relchange_flat_fp16", "forecast_k4_fp16")
    specs = [s for m in (bl, ll, fl) for s in m.compile_specs() if s.name.startswith(want) and 90 in s.archs]
    print()
    print("static report, sm_90 (what the GPU would run at these configs)")
    print(f"{'kernel':<40} {'regs':>5} {'spill B':>8} {'smem':>7} {'mma':>5} {'tf32':>5} {'mufu':>5}")
    for spec in specs:
        try:
            r = static_report.analyze(spec, 90)
        except Exception as e:  # noqa: BLE001
            print(f"{spec.name:<40} compile failed: {e}")
            continue
        print(f"{spec.name:<40} {r['regs']:>5} {r['stack']:>8} {r['shared']:>7} {r['hmma'] + r['hgmma']:>5} "
              f"{r['tf32']:>5} {r['mufu']:>5}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--side", type=int, default=32, help="token grid side (N = side²)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--pool-sizes", default="16,4", help="finer poolings compared with the default (= block size)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default=None, choices=("torch", "triton"),
                   help="JETDET_BACKEND; triton on a CPU-only machine runs the Triton interpreter")
    p.add_argument("--no-static", action="store_true", help="skip the static-report columns")
    args = p.parse_args(argv)
    if args.backend:
        os.environ["JETDET_BACKEND"] = args.backend
        if args.backend == "triton":
            import torch

            if not torch.cuda.is_available():
                os.environ.setdefault("TRITON_INTERPRET", "1")
    rows, pools = quality(args)
    print()
    at95 = [d for o, ps, m, d, _, _ in rows if m == 0.95 and o == "tiled" and ps == min(pools)][0]
    cost_model(at95, pools, with_static=not args.no_static)


if __name__ == "__main__":
    main()
