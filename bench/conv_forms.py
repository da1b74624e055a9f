"""The convolution forms jetdet's conv2d kernel does not take itself (``jetdet/conv_forms.py``) under
deterministic mode, against torch's own: batch invariance and cost.

    python bench/conv_forms.py [--threads 1] [--repeats 5]

For each form, at a shape of the models that use it (audio VAEs' 1-D and transposed convs, ConvNeXt-type
depthwise convs, grouped convs, dilated convs): how many of the batch's items equal the item run alone, bit for
bit, with the mode off (torch's kernels) and in deterministic mode, and the median wall time of the batch call.
``tests/test_router_conv_forms.py`` asserts the invariance and the accuracy; this gives the cost.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jetdet  # noqa: E402

B = 4
# name, function, input shape, weight shape, keyword arguments
FORMS = [
    ("conv1d k7 dilation 9 (Oobleck residual unit)", F.conv1d, (B, 128, 4096), (128, 128, 7),
     dict(dilation=9, padding=27)),
    ("conv1d k3 stride 2", F.conv1d, (B, 128, 4096), (256, 128, 3), dict(stride=2, padding=1)),
    ("conv_transpose1d k16 stride 8 (Oobleck upsampler)", F.conv_transpose1d, (B, 128, 512), (128, 64, 16),
     dict(stride=8, padding=4)),
    ("conv_transpose2d k4 stride 2", F.conv_transpose2d, (B, 128, 32, 32), (128, 128, 4, 4),
     dict(stride=2, padding=1)),
    ("conv2d depthwise 3x3", F.conv2d, (B, 256, 32, 32), (256, 1, 3, 3), dict(groups=256, padding=1)),
    ("conv2d depthwise 7x7 (ConvNeXt)", F.conv2d, (B, 256, 32, 32), (256, 1, 7, 7), dict(groups=256, padding=3)),
    ("conv2d 3x3 groups 32", F.conv2d, (B, 256, 32, 32), (256, 8, 3, 3), dict(groups=32, padding=1)),
    ("conv2d 3x3 dilation 2", F.conv2d, (B, 128, 32, 32), (128, 128, 3, 3), dict(dilation=2, padding=2)),
]


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _equal_items(fn, x) -> int:
    full = fn(x)
    return sum(torch.equal(fn(x[i:i + 1])[0], full[i]) for i in range(x.shape[0]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steadier timings)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {B}, fp32, median of {args.repeats}")
    print("| form | items equal alone, torch | items equal alone, jetdet | torch ms | jetdet ms | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, fn, xs, ws, kw in FORMS:
        x = torch.randn(*xs, generator=g)
        w = torch.randn(*ws, generator=g) * ws[1] ** -0.5

        def off(x, fn=fn, w=w, kw=kw):
            return fn(x, w, **kw)

        def det(x, fn=fn, w=w, kw=kw):
            with jetdet.mode("deterministic"):
                return fn(x, w, **kw)

        with torch.inference_mode():
            eq_off, eq_det = _equal_items(off, x), _equal_items(det, x)
            t_off = _median_ms(lambda: off(x), args.repeats)  # noqa: B023 - called before the loop moves on
            t_det = _median_ms(lambda: det(x), args.repeats)  # noqa: B023
        print(f"| {name} | {eq_off}/{B} | {eq_det}/{B} | {t_off:.1f} | {t_det:.1f} | {t_det / t_off:.1f}x |")
        if eq_det != B:
            print(f"FAIL: {name}: deterministic mode gave {eq_det}/{B} items equal to the item alone")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
