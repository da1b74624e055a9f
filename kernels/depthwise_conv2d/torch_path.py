"""The batch-invariant torch path of the depthwise conv2d: a fixed-order sum over the filter's taps of
elementwise products, in fp32.

Each output element is ``sum over taps of x[tap] * w[tap]``, accumulated tap by tap with a multiply and then an
add (two elementwise kernels, never a fused multiply-add, whose vector and scalar forms could round differently),
so its bits are a fixed expression of its own item's inputs whatever the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def depthwise_conv2d(x, w, bias, stride, padding) -> torch.Tensor:
    c = x.shape[1]
    co, _, kh, kw = w.shape
    sh, sw = stride
    ph, pw = padding
    xs = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    if co != c:
        xs = xs.repeat_interleave(co // c, dim=1)
    xs = xs.float()
    ho, wo = (xs.shape[2] - kh) // sh + 1, (xs.shape[3] - kw) // sw + 1
    wf = w.float()
    acc = None
    for r in range(kh):
        for s in range(kw):
            term = xs[:, :, r: r + (ho - 1) * sh + 1: sh, s: s + (wo - 1) * sw + 1: sw] * wf[:, 0, r, s].reshape(
                1, co, 1, 1)
            acc = term if acc is None else acc.add_(term)
    if bias is not None:
        acc = acc + bias.float().reshape(1, co, 1, 1)
    return acc.to(x.dtype)
