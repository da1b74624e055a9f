"""Two small diffusion denoisers with the layer mix of real ones, used by the whole-model determinism tests
and ``python -m jetdet.bench``:

* :class:`TinyUNet`: an SD-style UNet: 3x3/1x1 convs (stride 1 and 2), GroupNorm, a timestep MLP,
  a self-attention block over the low-resolution feature map, a skip connection.
* :class:`TinyDiT`: a DiT: patchify conv, adaLN-Zero-modulated blocks of LayerNorm + multi-head attention
  + GELU MLP, class and timestep conditioning.

Weights are random but seeded (``seed``), so every run builds the same model. They are plain
``nn.Module`` code calling ``torch.nn.functional``: jetdet's deterministic mode reaches them only through
its router, exactly as it would reach a user's model.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _ResBlock(nn.Module):
    def __init__(self, cin, cout, temb):
        super().__init__()
        self.n1 = nn.GroupNorm(8, cin)
        self.c1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.t = nn.Linear(temb, cout)
        self.n2 = nn.GroupNorm(8, cout)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.c1(F.silu(self.n1(x)))
        h = h + self.t(temb)[:, :, None, None]
        h = self.c2(F.silu(self.n2(h)))
        return self.skip(x) + h


class _AttnBlock(nn.Module):
    def __init__(self, c, heads):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(8, c)
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)

    def forward(self, x):
        b, c, h, w = x.shape
        t = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = self.qkv(t).reshape(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        return x + self.proj(o).transpose(1, 2).reshape(b, c, h, w)


class TinyUNet(nn.Module):
    def __init__(self, in_ch=4, ch=32, heads=4, seed=0):
        super().__init__()
        g = torch.random.fork_rng()
        with g:
            torch.manual_seed(seed)
            self.temb = nn.Sequential(nn.Linear(ch, 4 * ch), nn.SiLU(), nn.Linear(4 * ch, 4 * ch))
            self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
            self.down1 = _ResBlock(ch, ch, 4 * ch)
            self.downsample = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
            self.down2 = _ResBlock(ch, 2 * ch, 4 * ch)
            self.attn = _AttnBlock(2 * ch, heads)
            self.mid = _ResBlock(2 * ch, 2 * ch, 4 * ch)
            self.upconv = nn.Conv2d(2 * ch, ch, 3, padding=1)
            self.up1 = _ResBlock(2 * ch, ch, 4 * ch)
            self.norm_out = nn.GroupNorm(8, ch)
            self.conv_out = nn.Conv2d(ch, in_ch, 3, padding=1)
        self.ch = ch

    def forward(self, x, t, y=None):
        temb = self.temb(timestep_embedding(t, self.ch))
        h0 = self.down1(self.conv_in(x), temb)
        h = self.down2(self.downsample(h0), temb)
        h = self.mid(self.attn(h), temb)
        h = self.upconv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.up1(torch.cat([h, h0], dim=1), temb)
        return self.conv_out(F.silu(self.norm_out(h)))


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class TinyDiTBlock(nn.Module):
    """One adaLN-Zero DiT block of :class:`TinyDiT` (width ``d``, ``heads`` attention heads): ``forward(x, c)`` on
    tokens ``[B, N, d]`` with a condition ``[B, d]``; public for benches that stack it on their own."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.n1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.n2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))
        self.ada = nn.Linear(d, 6 * d)

    def forward(self, x, c):
        b, n, d = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.silu(c)).chunk(6, dim=-1)
        h = _modulate(self.n1(x), sh1, sc1)
        q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + g1[:, None] * self.proj(o)
        return x + g2[:, None] * self.mlp(_modulate(self.n2(x), sh2, sc2))


class DiTStack(nn.Module):
    """``depth`` :class:`TinyDiTBlock` blocks on tokens ``[B, N, width]`` with a condition ``[B, width]``: a DiT's
    transformer trunk without the patch embedding, at any width (the benches' real-width models)."""

    def __init__(self, width, heads, depth):
        super().__init__()
        self.blocks = nn.ModuleList(TinyDiTBlock(width, heads) for _ in range(depth))

    def forward(self, h, c):
        for blk in self.blocks:
            h = blk(h, c)
        return h


class TinyDiT(nn.Module):
    def __init__(self, in_ch=4, size=16, patch=2, d=96, depth=3, heads=4, classes=10, seed=0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.patch_embed = nn.Conv2d(in_ch, d, patch, stride=patch)
            self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2, d) * 0.02)
            self.t_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
            self.y_emb = nn.Embedding(classes + 1, d)
            self.blocks = nn.ModuleList([TinyDiTBlock(d, heads) for _ in range(depth)])
            self.n_out = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
            self.ada_out = nn.Linear(d, 2 * d)
            self.out = nn.Linear(d, patch * patch * in_ch)
        self.d, self.patch, self.in_ch, self.classes = d, patch, in_ch, classes

    def forward(self, x, t, y=None):
        b, c, hh, ww = x.shape
        p = self.patch
        if y is None:
            y = torch.full((b,), self.classes, dtype=torch.long, device=x.device)
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos
        cond = self.t_mlp(timestep_embedding(t * 1000, self.d)) + self.y_emb(y)
        for blk in self.blocks:
            h = blk(h, cond)
        sh, sc = self.ada_out(F.silu(cond)).chunk(2, dim=-1)
        h = self.out(_modulate(self.n_out(h), sh, sc))  # [B, N, p*p*C]
        h = h.reshape(b, hh // p, ww // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(b, c, hh, ww)


def make_toy_inputs(batch: int, seed: int = 0, size: int = 16, channels: int = 4):
    """Per-item inputs that do not depend on ``batch``: item i is the same for every batch size. CPU tensors (move
    them to the model's device)."""
    g = torch.Generator().manual_seed(seed)
    cpu = dict(generator=g, device="cpu")  # on the CPU also under a user's torch.set_default_device("cuda")
    x = torch.randn(8, channels, size, size, dtype=torch.float32, **cpu)  # and float32 under any default dtype
    t = torch.rand(8, dtype=torch.float32, **cpu)
    y = torch.randint(0, 10, (8,), **cpu)
    reps = -(-batch // 8)
    return x.repeat(reps, 1, 1, 1)[:batch], t.repeat(reps)[:batch], y.repeat(reps)[:batch]
