"""Procedural 10-class shape dataset the bundled model and classifier are trained on.

Each image is one antialiased shape on a lightly varied background, ``[3, 32, 32]`` RGB in ``[-1, 1]``.
Rendering is vectorised torch: every pixel gets the signed distance (in pixels, negative inside) to its
item's shape, and the shape's coverage is ``clamp(0.5 - sdf, 0, 1)``, a one-pixel-wide antialiasing ramp.

Per item, drawn from a ``torch.Generator`` seeded with ``seed`` (so a call is a pure function of
``(n, seed, labels)``):

* half-size ``s`` in [7.5, 11.5] px, centre jittered up to 3 px from the middle (less for big shapes, so they
  stay inside the frame), strokes at least ``0.5 s`` wide. The ranges are deliberately moderate: a patch-4 DiT
  has no built-in translation equivariance, and with 10-22 px shapes anywhere in the frame and thinner strokes
  the 15-minute CPU budget learned colours and blobs first (66% recognised after 3000 steps);
* a small rotation in [-8, 8] degrees (never enough to turn a plus into an X or a square into a diamond);
* a foreground colour with every channel at least 0.3 away from 0, and a background roughly opposite to it
  (``-0.6 fg + 0.4 u``), plus a linear gradient of amplitude <= 0.15, so the shape always contrasts.
"""

from __future__ import annotations

import math

import torch

#: Class names in label order.
SHAPE_CLASSES = (
    "circle",
    "square",
    "triangle",
    "plus",
    "ring",
    "hbar",
    "vbar",
    "diamond",
    "x",
    "L",
)
NUM_CLASSES = len(SHAPE_CLASSES)
IMAGE_SIZE = 32


def _box(px, py, bx, by):
    """Signed distance to an axis-aligned box centred at the origin with half-sizes ``(bx, by)``."""
    qx = px.abs() - bx
    qy = py.abs() - by
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    return outside + torch.maximum(qx, qy).clamp(max=0)


def _triangle(px, py, r):
    """Signed distance to an upward-pointing equilateral triangle inscribed in radius ``r`` (y grows down)."""
    k = math.sqrt(3.0)
    y = -py  # the formula below is for y up
    x = px.abs() - r
    y = y + r / k
    fold = (x + k * y) > 0
    x, y = torch.where(fold, (x - k * y) / 2, x), torch.where(fold, (-k * x - y) / 2, y)
    x = x - torch.maximum(torch.minimum(x, torch.zeros_like(x)), -2 * r)
    return -torch.sqrt(x * x + y * y) * torch.sign(y)


def _sdf(label: int, px, py, s):
    """Signed distance (pixels) for class ``label``; ``px, py`` are shape-local coordinates, ``s`` the half-size."""
    name = SHAPE_CLASSES[label]
    if name == "circle":
        return torch.sqrt(px * px + py * py) - s
    if name == "square":
        return _box(px, py, 0.85 * s, 0.85 * s)
    if name == "triangle":
        return _triangle(px, py + 0.25 * s, 1.15 * s)
    if name == "plus":
        return torch.minimum(_box(px, py, s, 0.38 * s), _box(px, py, 0.38 * s, s))
    if name == "ring":
        return (torch.sqrt(px * px + py * py) - 0.8 * s).abs() - 0.25 * s  # hole radius 0.55 s
    if name == "hbar":
        return _box(px, py, s, 0.35 * s)
    if name == "vbar":
        return _box(px, py, 0.35 * s, s)
    if name == "diamond":
        return (px.abs() + py.abs() - 1.1 * s) / math.sqrt(2.0)
    if name == "x":
        u = (px + py) / math.sqrt(2.0)
        w = (px - py) / math.sqrt(2.0)
        return torch.minimum(_box(u, w, 1.1 * s, 0.38 * s), _box(u, w, 0.38 * s, 1.1 * s))
    if name == "L":
        vert = _box(px + 0.6 * s, py, 0.4 * s, s)
        horiz = _box(px, py - 0.6 * s, s, 0.4 * s)
        return torch.minimum(vert, horiz)
    raise ValueError(f"label {label} out of range [0, {NUM_CLASSES})")


def make_shapes(
    n: int, seed: int, labels: torch.Tensor | None = None, edge_noise: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render ``n`` shape images.

    Args:
        n: number of images.
        seed: generator seed; the result is a pure function of ``(n, seed, labels)``.
        labels: optional ``[n]`` long tensor of class indices in ``[0, 10)``; drawn uniformly when None.
        edge_noise: augmentation for the grading classifier (0 = clean data, what the DiT trains on): each item's
            signed distance gets blocky noise (4 px and 2 px cells, unit std) times an amplitude drawn from
            ``[0, edge_noise]`` px, so edges come out ragged at the scale of a patch-4 model's artifacts while
            the shape's outline stays put. Drawn after everything else: the clean part of an item is the same
            with or without it.

    Returns:
        ``(images [n, 3, 32, 32] float32 in [-1, 1], labels [n] long)``, on the CPU (also under a
        ``torch.set_default_device``).
    """
    with torch.device("cpu"):
        return _make_shapes(n, seed, labels, edge_noise)


F32 = torch.float32  # whatever the default dtype (make_shapes promises float32)


def _make_shapes(n: int, seed: int, labels, edge_noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(int(seed))
    if labels is None:
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    else:
        labels = torch.as_tensor(labels, dtype=torch.long, device="cpu").reshape(-1)
        if labels.numel() != n:
            raise ValueError(f"labels: expected {n} labels, got {labels.numel()}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
            raise ValueError(f"labels: expected values in [0, {NUM_CLASSES})")
    size = IMAGE_SIZE
    s = 7.5 + 4.0 * torch.rand(n, generator=g, dtype=F32)
    # Centre jitter: up to +-3 px, less where the shape would leave the frame.
    reach = (size / 2 - 1.15 * s - 1.0).clamp(min=0.0).clamp(max=3.0)
    cx = size / 2 + reach * (2 * torch.rand(n, generator=g, dtype=F32) - 1)
    cy = size / 2 + reach * (2 * torch.rand(n, generator=g, dtype=F32) - 1)
    ang = math.radians(8.0) * (2 * torch.rand(n, generator=g, dtype=F32) - 1)
    sign = torch.where(torch.rand(n, 3, generator=g, dtype=F32) < 0.5, -1.0, 1.0).to(F32)
    fg = sign * (0.3 + 0.7 * torch.rand(n, 3, generator=g, dtype=F32))
    bg = -0.6 * fg + 0.4 * (2 * torch.rand(n, 3, generator=g, dtype=F32) - 1)
    grad = 0.15 * (2 * torch.rand(n, 2, generator=g, dtype=F32) - 1)

    coords = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # [H, W]
    dx = xx[None] - cx[:, None, None]
    dy = yy[None] - cy[:, None, None]
    cos, sin = torch.cos(ang)[:, None, None], torch.sin(ang)[:, None, None]
    px = cos * dx + sin * dy
    py = -sin * dx + cos * dy

    sdf = torch.empty(n, size, size, dtype=F32)
    for c in range(NUM_CLASSES):
        idx = (labels == c).nonzero().flatten()
        if idx.numel():
            sdf[idx] = _sdf(c, px[idx], py[idx], s[idx, None, None])
    if edge_noise > 0:
        amp = edge_noise * torch.rand(n, 1, 1, generator=g, dtype=F32)
        coarse = torch.randn(n, size // 4, size // 4, generator=g, dtype=F32)
        coarse = coarse.repeat_interleave(4, 1).repeat_interleave(4, 2)
        fine = torch.randn(n, size // 2, size // 2, generator=g, dtype=F32)
        fine = fine.repeat_interleave(2, 1).repeat_interleave(2, 2)
        sdf = sdf + amp * (0.8 * coarse + 0.6 * fine)
    cover = (0.5 - sdf).clamp(0.0, 1.0)[:, None]  # [n, 1, H, W]

    ramp = (grad[:, 0, None, None] * (xx[None] / size - 0.5) + grad[:, 1, None, None] * (yy[None] / size - 0.5)) * 2
    background = bg[:, :, None, None] + ramp[:, None]
    img = background * (1 - cover) + fg[:, :, None, None] * cover
    return img.clamp(-1.0, 1.0).contiguous(), labels
