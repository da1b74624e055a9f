"""How far ``JETDET_FP32_DOT=tf32x3`` is from IEEE fp32, emulated on the CPU (no GPU needed).

    python bench/fp32_dot_accuracy.py [--seed 0]

Triton's ``tf32x3`` dot (``input_precision="tf32x3"``) splits each fp32 operand into ``big = tf32(x)``, rounded to
nearest with ties away from zero, and ``small = x - big``. A TF32 tensor core reads only the top 19 bits of each fp32
register, so ``small`` is in effect truncated to TF32. Each ``BLOCK_K`` step of the kernel then adds
``small_a @ big_b + big_a @ small_b`` and then ``big_a @ big_b`` to the fp32 accumulator. The ``small_a @ small_b``
term is dropped.

This script does the same with torch on fp32 tensors whose values are TF32 numbers. A product of two TF32 numbers
is exact in fp32, so only the additions round. It compares three kernels against an fp64 product of the same
inputs:

- ``ieee``: the IEEE kernel, ``acc += a @ b`` per ``BLOCK_K`` step in fp32;
- ``tf32x3``: the split above;
- ``tf32``: one TF32 dot, what torch's fp32 uses with TF32 allowed.

Error = max |out - fp64| / max |fp64|, the measure ``bench/gpu_check.py`` prints for the real kernels. The
tensor cores' own accumulation order and rounding inside one MMA instruction are not emulated. ``gpu_check.py``
measures the real kernels on a GPU.
"""

from __future__ import annotations

import argparse

import torch

BLOCK_K = 32  # the K step of the tf32x3 tiles (kernels/_common.py: TF32X3_DEFAULT); sm_90's is 16

# (M, K, N): a linear of a DiT at width 1152 and at 3072 (Flux), a 3x3 conv with 320 channels as the GEMM it is
# (K = 9 * 320), and an MLP down-projection (K = 12288). M is a sample of rows: the error of a row does not depend
# on how many there are.
SHAPES = [(256, 1152, 1152), (256, 3072, 3072), (256, 2880, 320), (128, 12288, 512)]


def tf32_rna(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> TF32 (kept in fp32), round to nearest, ties away from zero: ``cvt.rna.tf32.f32``."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def tf32_trunc(x: torch.Tensor) -> torch.Tensor:
    """What a TF32 tensor core reads of an fp32 value: its top 19 bits (the low 13 mantissa bits dropped)."""
    return (x.contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)


def _step_ieee(a, b, acc):
    return acc + a @ b


def _step_tf32x3(a, b, acc):
    a_big, b_big = tf32_rna(a), tf32_rna(b)
    a_small, b_small = tf32_trunc(a - a_big), tf32_trunc(b - b_big)
    small = a_small @ b_big
    small = small + a_big @ b_small
    return (acc + small) + a_big @ b_big


def _step_tf32(a, b, acc):
    return acc + tf32_rna(a) @ tf32_rna(b)


STEPS = {"ieee": _step_ieee, "tf32x3": _step_tf32x3, "tf32": _step_tf32}


def kernel_dot(a: torch.Tensor, b: torch.Tensor, how: str, block_k: int = BLOCK_K) -> torch.Tensor:
    """``a @ b`` as the kernel runs it: fp32 accumulator, ``block_k`` at a time, in order."""
    step = STEPS[how]
    acc = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float32)
    for k in range(0, a.shape[1], block_k):
        acc = step(a[:, k:k + block_k], b[k:k + block_k], acc)
    return acc


def measure(shapes=SHAPES, seed: int = 0) -> list[dict]:
    """Per shape, each kernel's max error relative to the largest fp64 output; inputs ``randn`` and weights scaled
    by ``K**-0.5`` (outputs of order 1), as the kernel tests use."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for m, k, n in shapes:
        a = torch.randn(m, k, generator=g)
        b = torch.randn(k, n, generator=g) * k**-0.5
        ref = a.double() @ b.double()
        scale = ref.abs().max().item()
        row = {"shape": (m, k, n)}
        for how in STEPS:
            row[how] = (kernel_dot(a, b, how).double() - ref).abs().max().item() / scale
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"max |out - fp64| / max |fp64|, emulated on CPU (BLOCK_K {BLOCK_K}, seed {args.seed})")
    print(f"{'M x K -> N':<22} {'ieee':>9} {'tf32x3':>9} {'tf32':>9}  tf32x3/ieee")
    for r in measure(SHAPES, args.seed):
        m, k, n = r["shape"]
        print(f"{f'{m} x {k} -> {n}':<22} {r['ieee']:9.2e} {r['tf32x3']:9.2e} {r['tf32']:9.2e}  "
              f"{r['tf32x3'] / r['ieee']:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
