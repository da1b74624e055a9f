"""SANA's linear attention through jetdet (``jetdet.patch(model, mode="fast", sana_linear_attention=True)``) against
diffusers' own ``SanaLinearAttnProcessor2_0``: accuracy and CPU time of one self-attention module.

    python bench/sana_linear_attention.py                # accuracy + timings, ~30 s
    python bench/sana_linear_attention.py --repeats 3    # quicker
    JETDET_BACKEND=triton TRITON_INTERPRET=1 python bench/sana_linear_attention.py --accuracy-only   # kernel path

1. Accuracy: a diffusers ``Attention`` module built as SANA's blocks build it (head dim 32, random weights), its
   output with diffusers' processor against jetdet's route, fp32, bf16 and fp16: max abs error, and max abs error
   over max abs value ("rel").
2. Time (fp32, CPU): the median wall time of the module's forward, diffusers' processor and jetdet's route
   interleaved, after a warm-up, at a few token counts and widths (batch 2: a CFG pair).
3. The step cache on a tiny random ``SanaTransformer2DModel`` (2 blocks, width 32, 8x8 latent; the weights of its
   timestep embedding damped towards low frequencies, so that its output varies smoothly in t as a trained model's
   does: a random one's jumps between steps and nothing can be forecast), sampled with ``FlowMatchEulerDiscrete``
   (shift 3), ``--steps`` steps, batched CFG 4.5: model calls computed and PSNR against the unpatched model, with
   and without ``sana_linear_attention``; and deterministic mode, each of 3 items alone against the batch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIZES = ((256, 8), (1024, 8), (1024, 16), (4096, 8))  # (tokens, heads) at head dim 32


def _module(heads: int, dtype, qk_norm=None):
    import torch
    from diffusers.models.attention_processor import Attention, SanaLinearAttnProcessor2_0

    torch.manual_seed(0)
    return Attention(query_dim=heads * 32, heads=heads, dim_head=32, kv_heads=heads if qk_norm else None,
                     qk_norm=qk_norm, bias=False, processor=SanaLinearAttnProcessor2_0()).to(dtype).eval()


def _route(module):
    """``(diffusers' forward, jetdet's forward)`` of ``module``, through the patch's own code."""
    from jetdet.patch.sana import SanaRoute

    r = SanaRoute()
    r.install(module, lambda *a: None)  # the module is not patched: its route is called directly
    return module, (lambda x: r.forward(module, None, x))


def accuracy() -> None:
    import torch

    print("accuracy: jetdet's route vs diffusers' processor (one module, batch 2, 300 tokens)")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for qk_norm in (None, "rms_norm_across_heads"):
            m = _module(4, dtype, qk_norm)
            ref_f, got_f = _route(m)
            x = torch.randn(2, 300, m.inner_dim, generator=torch.Generator().manual_seed(1)).to(dtype)
            with torch.no_grad():
                ref, got = ref_f(x).double(), got_f(x).double()
            d, top = (ref - got).abs().max().item(), ref.abs().max().item()
            print(f"  {str(dtype)[6:]:9s} qk_norm={str(qk_norm):22s} max abs {d:.2e}  rel {d / top:.2e}"
                  f"  bitwise {torch.equal(ref, got)}")


def timings(repeats: int) -> None:
    import torch

    print(f"time per forward of one self-attention module, fp32, batch 2, head dim 32, {torch.get_num_threads()} "
          f"threads, median of {repeats} (ms)")
    print(f"  {'tokens':>6} {'heads':>5} {'diffusers':>10} {'jetdet':>8} {'jetdet/diffusers':>17}")
    for n, heads in SIZES:
        m = _module(heads, torch.float32)
        ref_f, got_f = _route(m)
        x = torch.randn(2, n, heads * 32, generator=torch.Generator().manual_seed(0))
        times: dict = {"d": [], "j": []}
        with torch.no_grad():
            ref_f(x), got_f(x)  # warm-up
            for _ in range(repeats):
                for k, f in (("d", ref_f), ("j", got_f)):
                    t0 = time.perf_counter()
                    f(x)
                    times[k].append((time.perf_counter() - t0) * 1e3)
        d, j = statistics.median(times["d"]), statistics.median(times["j"])
        print(f"  {n:>6} {heads:>5} {d:>10.2f} {j:>8.2f} {j / d:>17.2f}")


def _tiny_sana():
    import torch
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    m = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                               num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=16,
                               cross_attention_dim=32, caption_channels=16, sample_size=8)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        lin = m.time_embed.emb.timestep_embedder.linear_1  # columns: [cos | sin] halves, high frequencies first
        half = lin.weight.shape[1] // 2
        lin.weight.mul_(torch.exp(-(half - 1 - torch.arange(2 * half).remainder(half)) / 8.0))
    return m.eval()


def _sample(model, steps: int):
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    g = torch.Generator().manual_seed(0)
    lat, cond, unc = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 6, 16, generator=g), torch.randn(1, 6, 16,
                                                                                                         generator=g)
    sch = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sch.set_timesteps(steps)
    with torch.no_grad():
        for t in sch.timesteps:
            out = model(hidden_states=torch.cat([lat, lat]), encoder_hidden_states=torch.cat([unc, cond]),
                        timestep=t.expand(2)).sample
            u, c = out.chunk(2)
            lat = sch.step(u + 4.5 * (c - u), t, lat).prev_sample
    return lat


def step_cache(steps: int) -> None:
    import torch

    import jetdet

    m = _tiny_sana()
    ref = _sample(m, steps)
    print(f"step cache on a tiny random SANA, {steps} steps, batched CFG: calls computed, PSNR vs unpatched (dB)")
    for opts in ({}, {"sana_linear_attention": True}):
        with jetdet.patch(m, mode="fast", **opts) as h:
            out = _sample(m, steps)
            st = h.stats()
        mse = float(((out.double() - ref.double()) ** 2).mean())
        db = 10 * torch.log10(ref.double().abs().max() ** 2 / mse).item() if mse else float("inf")
        routed = sum(st.get("sana_linear_attention", {}).get("routed", {}).values())
        print(f"  fast mode{' + sana_linear_attention' if opts else ''}: {st['cache']['calls_run']} of "
              f"{st['cache']['calls']} calls, {db:.2f} dB, attention calls routed through jetdet: {routed}")
    g = torch.Generator().manual_seed(1)
    x, e, t = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 6, 16, generator=g), torch.tensor([900., 500., 1.])
    with torch.no_grad(), jetdet.patch(m, mode="deterministic"):
        full = m(hidden_states=x, encoder_hidden_states=e, timestep=t).sample
        alone = torch.cat([m(hidden_states=x[i:i + 1], encoder_hidden_states=e[i:i + 1], timestep=t[i:i + 1]).sample
                           for i in range(3)])
    with torch.no_grad():  # the control: the same calls unpatched
        pfull = m(hidden_states=x, encoder_hidden_states=e, timestep=t).sample
        palone = torch.cat([m(hidden_states=x[i:i + 1], encoder_hidden_states=e[i:i + 1], timestep=t[i:i + 1]).sample
                            for i in range(3)])
    print(f"  deterministic mode: 3 items alone == in a batch of 3, bitwise: {torch.equal(full, alone)} "
          f"(unpatched: {torch.equal(pfull, palone)}, max diff {float((pfull - palone).abs().max()):.1e})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared machine)")
    p.add_argument("--steps", type=int, default=30, help="sampling steps of the step-cache run")
    p.add_argument("--accuracy-only", action="store_true")
    a = p.parse_args(argv)
    if a.repeats < 1 or a.threads < 1 or a.steps < 1:
        p.error("--repeats, --threads, --steps: expected ints >= 1")
    import torch

    torch.set_num_threads(a.threads)
    from jetdet.backend import backend_for

    print(f"torch {torch.__version__}, backend for CPU tensors: {backend_for(torch.empty(0))}")
    accuracy()
    if not a.accuracy_only:
        timings(a.repeats)
        step_cache(a.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
