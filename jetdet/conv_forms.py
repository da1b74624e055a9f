"""The convolution forms jetdet's conv2d kernel does not take itself, rebuilt from calls that are batch invariant
(the router's handlers in :mod:`jetdet.mode` call these in deterministic mode):

* **1-D** convolutions are 2-D ones over a height of 1 (audio VAEs, e.g. Stable Audio's, are built of them);
* **3-D** ones are a fixed-order sum over the kernel's time taps of 2-D ones on frames;
* **dilation** (stride 1) is a convolution of each of the ``d x d`` phases of the input with the undilated
  kernel, the phases folded into the batch of one conv2d call (an input's phases never meet another item's), the
  results interleaved; with a stride as well, the stride-1 result is subsampled (``stride**2`` times the work);
* **groups**: one conv2d call per group on its channel slice; a **depthwise** convolution (one input channel per
  group) is jetdet's depthwise op (``kernels/depthwise_conv2d``: a fixed-order sum over the filter's taps);
* **transposed** convolutions are one stride-1 convolution per output phase (``(o + padding) mod stride`` in
  each dim) with the kernel taps of that phase, flipped, each written to its strided slice of the output: the
  multiply-adds of torch's. With a dilation as well, the direct convolution of the zero-stuffed input
  (``stride**ndim`` times the work, the stuffed products exactly zero for finite weights).

Every step is either a batch-invariant conv call (``basic``, the router's conv2d, or the depthwise op) or data
movement, so an item's output does not depend on the batch around it. The results agree with
torch's within the rounding of a different summation order.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

#: ``basic(x, w, b, stride, padding)``: a batch-invariant conv2d of a 4-D input, groups 1, dilation 1, stride
#: and padding as int pairs
Basic = Callable[..., torch.Tensor]


def tuple_of(v, n: int) -> tuple[int, ...] | None:
    """``v`` as ``n`` ints (an int repeats), or None when it is not that."""
    if type(v) is int:
        return (v,) * n
    if isinstance(v, (tuple, list)) and len(v) == n and all(type(i) is int for i in v):
        return tuple(v)
    return None


def explicit_padding(padding, stride: tuple[int, ...], dilation: tuple[int, ...], ksize: Sequence[int]):
    """A conv's ``padding`` as ``(before, after)`` per spatial dim, or None when torch would refuse it
    (``"same"`` with a stride, negative or malformed values). ``"same"`` pads ``d*(k-1)`` in all, the odd one
    after, as torch does."""
    n = len(ksize)
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0),) * n
        if padding != "same" or any(s != 1 for s in stride):
            return None
        total = [d * (k - 1) for d, k in zip(dilation, ksize)]
        return tuple((t // 2, t - t // 2) for t in total)
    p = tuple_of(padding, n)
    if p is None or min(p) < 0:
        return None
    return tuple((i, i) for i in p)


def _pad(x: torch.Tensor, pads) -> torch.Tensor:
    """Zero-pad (or, for negative amounts, crop) the trailing ``len(pads)`` dims by ``(before, after)`` each."""
    if all(a == 0 and b == 0 for a, b in pads):
        return x
    flat = [v for pair in reversed(pads) for v in pair]
    return F.pad(x, flat)


def _depthwise(x: torch.Tensor, w: torch.Tensor, b, stride: tuple[int, int]) -> torch.Tensor:
    """Depthwise conv2d of an already padded ``x`` (``w [M*C, 1, kh, kw]``): jetdet's depthwise op."""
    from . import ops

    return ops.depthwise_conv2d(x, w, b, stride, 0)


def _grouped(x, w, b, stride, groups: int, basic: Basic) -> torch.Tensor:
    """conv2d with ``groups`` > 1 of an already padded ``x``, dilation 1."""
    if w.shape[1] == 1:
        return _depthwise(x, w, b, stride)
    cg, og = x.shape[1] // groups, w.shape[0] // groups
    outs = [basic(x[:, g * cg:(g + 1) * cg], w[g * og:(g + 1) * og], None if b is None else b[g * og:(g + 1) * og],
                  stride, (0, 0)) for g in range(groups)]
    return torch.cat(outs, dim=1)


def _undilated(x, w, b, stride, groups: int, basic: Basic) -> torch.Tensor:
    if groups == 1:
        return basic(x, w, b, stride, (0, 0))
    return _grouped(x, w, b, stride, groups, basic)


def conv2d(x, w, b, stride, pads, dilation, groups: int, basic: Basic) -> torch.Tensor:
    """conv2d of a 4-D ``x`` with explicit ``pads`` ((before, after) per spatial dim), any dilation and groups,
    from batch-invariant calls."""
    x = _pad(x, pads)
    dh, dw = dilation
    if dh == 1 and dw == 1:
        return _undilated(x, w, b, stride, groups, basic)
    B, C, H, W = x.shape
    kh, kw = w.shape[2:]
    ho, wo = H - dh * (kh - 1), W - dw * (kw - 1)  # the stride-1 output
    # phase (i, j) of the input holds rows i::dh and columns j::dw; pad each dim to a multiple of its dilation
    # (the added zeros reach only outputs cropped below)
    hq, wq = -(-H // dh), -(-W // dw)
    x = _pad(x, ((0, hq * dh - H), (0, wq * dw - W)))
    phases = x.reshape(B, C, hq, dh, wq, dw).permute(0, 3, 5, 1, 2, 4).reshape(B * dh * dw, C, hq, wq)
    y = _undilated(phases, w, b, (1, 1), groups, basic)  # [B*dh*dw, C_out, hq-kh+1, wq-kw+1]
    co, yh, yw = y.shape[1:]
    y = y.reshape(B, dh, dw, co, yh, yw).permute(0, 3, 4, 1, 5, 2).reshape(B, co, yh * dh, yw * dw)
    y = y[:, :, :ho, :wo]
    sh, sw = stride
    if sh != 1 or sw != 1:
        y = y[:, :, ::sh, ::sw]
    return y.contiguous()


def conv1d(x, w, b, stride, pads, dilation, groups: int, basic: Basic) -> torch.Tensor:
    """conv1d of a 3-D ``x``: conv2d over a height of 1."""
    y = conv2d(x.unsqueeze(2), w.unsqueeze(2), b, (1, stride[0]), ((0, 0), pads[0]), (1, dilation[0]), groups,
               basic)
    return y.squeeze(2)


def conv3d(x, w, b, stride, pads, dilation, groups: int, basic: Basic) -> torch.Tensor:
    """conv3d of a 5-D ``x``: a fixed-order sum over the kernel's time taps of conv2d calls over every (item,
    output frame); a kernel one frame deep (video DiTs' patch embeddings) is a single conv2d call."""
    st, dt = stride[0], dilation[0]
    x = _pad(x, pads[:1] + ((0, 0), (0, 0)))
    B, C, T, H, W = x.shape
    kt = w.shape[2]
    t_out = (T - dt * (kt - 1) - 1) // st + 1
    out = None
    for j in range(kt):  # fixed tap order
        frames = x[:, :, j * dt: j * dt + (t_out - 1) * st + 1: st]  # [B, C, t_out, H, W]
        f2 = frames.transpose(1, 2).reshape(B * t_out, C, H, W)
        y = conv2d(f2, w[:, :, j], None, stride[1:], pads[1:], dilation[1:], groups, basic)
        out = y if out is None else out + y
    if b is not None:
        out = out + b.reshape(1, -1, 1, 1)
    # contiguous, as torch's conv3d returns it: model code views it (HunyuanVideo's VAE attention does)
    return out.reshape(B, t_out, *out.shape[1:]).transpose(1, 2).contiguous()


CONV = {1: conv1d, 2: conv2d, 3: conv3d}


def _flip_channels(w, groups: int):
    """A transposed convolution's ``[C_in, C_out / groups, *k]`` weight as a convolution's ``[C_out, C_in /
    groups, *k]`` (channel axes swapped within each group; taps not flipped)."""
    cin, og, *ksize = w.shape
    return w.reshape(groups, cin // groups, og, *ksize).transpose(1, 2).reshape(groups * og, cin // groups, *ksize)


def _phase_plan(n_in: int, n_out: int, k: int, s: int, p: int, phase: int):
    """One spatial dim of one output phase of a transposed convolution (dilation 1): outputs ``o = s*q + phase -
    p`` for ``q`` in ``[q0, q1]`` are ``sum_m x[q - m] * w[phase + s*m]``, a correlation of ``x`` with the flipped
    sub-kernel ``w[phase::s]`` of ``m_taps`` taps. Returns ``(first output, count, m_taps, (before, after))``,
    the last the padding (negative: cropping) of ``x`` that makes the correlation's output exactly those ``q``."""
    m_taps = -(-(k - phase) // s) if phase < k else 0
    q0 = -((phase - p) // s)  # ceil((p - phase) / s)
    q1 = (p + n_out - 1 - phase) // s
    before = m_taps - 1 - q0  # x index q0 - (m_taps - 1) comes first
    after = q1 - (n_in - 1)
    return s * q0 + phase - p, q1 - q0 + 1, m_taps, (before, after)


def conv_transpose(x, w, b, stride, padding, output_padding, groups: int, dilation, basic: Basic) -> torch.Tensor:
    """The transposed convolution of a batched ``x`` (``w`` is ``[C_in, C_out / groups, *k]``, as torch's), all
    arguments as int tuples of the spatial rank.

    With dilation 1, output phase ``(o + p) mod s`` of each dim takes only the taps ``phase::s`` of the kernel: each
    of the ``prod(stride)`` phases is a stride-1 convolution of ``x`` with that flipped sub-kernel, written to its
    strided slice of the output (the multiply-adds of torch's, in ``prod(stride)`` calls). With a dilation, the
    direct convolution of the zero-stuffed input, padded by ``d*(k-1) - p`` before and that plus
    ``output_padding`` after (a negative amount crops), with the flipped kernel (``prod(stride)`` times the
    work; the stuffed products are exactly zero for finite weights)."""
    n = w.dim() - 2
    ksize = w.shape[2:]
    wc = _flip_channels(w, groups)
    conv = CONV[n]
    if any(d != 1 for d in dilation):
        if any(s > 1 for s in stride):
            stuffed = x.new_zeros(*x.shape[:2], *[(i - 1) * s + 1 for i, s in zip(x.shape[2:], stride)])
            stuffed[(slice(None), slice(None), *[slice(None, None, s) for s in stride])] = x
            x = stuffed
        x = _pad(x, tuple((d * (k - 1) - p, d * (k - 1) - p + op)  # a negative amount crops
                          for k, p, op, d in zip(ksize, padding, output_padding, dilation)))
        return conv(x, wc.flip(list(range(2, 2 + n))), b, (1,) * n, ((0, 0),) * n, dilation, groups, basic)
    n_out = [(i - 1) * s - 2 * p + k + op
             for i, s, p, k, op in zip(x.shape[2:], stride, padding, ksize, output_padding)]
    out = x.new_empty(x.shape[0], wc.shape[0], *n_out)
    for phases in itertools.product(*(range(s) for s in stride)):  # a fixed order; each phase is written once
        plans = [_phase_plan(i, o, k, s, p, ph)
                 for i, o, k, s, p, ph in zip(x.shape[2:], n_out, ksize, stride, padding, phases)]
        if any(count <= 0 for _, count, _, _ in plans):
            continue  # no output falls in this phase
        where = (slice(None), slice(None), *[slice(first, first + (count - 1) * s + 1, s)
                                             for (first, count, _, _), s in zip(plans, stride)])
        if any(m == 0 for _, _, m, _ in plans):  # the kernel is shorter than the stride: no tap reaches these
            out[where] = 0 if b is None else b.reshape(-1, *(1,) * n).to(out.dtype)
            continue
        sub = wc[(slice(None), slice(None), *[slice(ph, None, s) for ph, s in zip(phases, stride)])]
        xp = _pad(x, tuple(pads for _, _, _, pads in plans))
        out[where] = conv(xp, sub.flip(list(range(2, 2 + n))), b, (1,) * n, ((0, 0),) * n, (1,) * n, groups, basic)
    return out
