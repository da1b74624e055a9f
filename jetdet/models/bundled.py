"""The bundled, trained class-conditional diffusion transformer (and the classifier that grades its samples).

Both are trained by ``bench/train_bundled.py`` on :mod:`jetdet.models.shapes` (10 classes of shapes,
``[3, 32, 32]`` RGB in ``[-1, 1]``) and shipped as safetensors in ``jetdet/data/``.

Model: a DiT (Peebles & Xie) written in plain torch, laid out so that it is *exactly* a diffusers
``DiTTransformer2DModel`` (``norm_type="ada_norm_zero"``, ``activation_fn="gelu-approximate"``, no learned sigma):

* ``x_embed``: ``p x p`` stride-``p`` conv patchify, plus a fixed 2-D sin-cos position table (first half of
  the channels encodes the column, second half the row; ``[sin, cos]`` per half; frequencies
  ``10000^(-m / (D/4))``), computed in float64 and rounded to float32;
* conditioning ``c = MLP(sinusoid(1000 t)) + E[y]``: the sinusoid is 256 wide, ``[cos, sin]`` order, frequencies
  ``exp(-ln(10000) m / 127)`` (diffusers' ``flip_sin_to_cos=True, downscale_freq_shift=1``); the MLP is
  ``Linear(256, D) -> SiLU -> Linear(D, D)``; ``E`` has ``num_classes + 1`` rows and row ``num_classes`` is
  the null label used for classifier-free guidance;
* ``depth`` blocks: ``(shift, scale, gate) x (attention, MLP) = Linear(SiLU(c))`` (adaLN-Zero),
  ``x += gate_a * Attn(LN(x) (1 + scale_a) + shift_a)``, ``x += gate_m * MLP(LN(x) (1 + scale_m) + shift_m)``;
  attention is multi-head ``F.scaled_dot_product_attention`` (so jetdet's deterministic router reaches it),
  the MLP is ``Linear(D, 4D) -> GELU(tanh) -> Linear(4D, D)``; LayerNorms have no affine, ``eps = 1e-6``;
* output: ``(shift, scale) = Linear(SiLU(c))``, ``Linear(LN(x) (1 + scale) + shift)`` to ``p * p * 3``
  values per token, unpatchified with channels fastest (``[p_row, p_col, C]``).

diffusers gives every block its own copy of the conditioning embedding; this model shares one (as the DiT paper
does), and :func:`to_diffusers_state_dict` writes the shared weights into every block, which computes the
same function. Pass ``timestep = 1000 * t`` to the diffusers model.

Prediction target (rectified flow): with data ``x0``, noise ``e`` and ``t`` in ``[0, 1]``,
``x_t = (1 - t) x0 + t e`` and the model predicts the velocity ``v = e - x0`` (diffusers'
``FlowMatchEulerDiscreteScheduler`` convention with ``sigma = t``). ``t = 1`` is pure noise.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .shapes import NUM_CLASSES, SHAPE_CLASSES

#: Class names of the bundled model, in label order; label ``len(BUNDLED_CLASSES)`` is the null (CFG) label.
BUNDLED_CLASSES = SHAPE_CLASSES
NULL_LABEL = NUM_CLASSES

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DIT_FILE = DATA_DIR / "bundled_dit.safetensors"
CLASSIFIER_FILE = DATA_DIR / "bundled_classifier.safetensors"

#: Default DiT shape (what ``bench/train_bundled.py`` trains unless told otherwise).
DEFAULT_DIT_CONFIG = {
    "sample_size": 32,
    "patch_size": 2,
    "in_channels": 3,
    "hidden_size": 64,
    "depth": 10,
    "num_heads": 2,
    "num_classes": NUM_CLASSES,
    "time_scale": 1000.0,
}

#: Default classifier shape.
DEFAULT_CLASSIFIER_CONFIG = {"widths": [32, 64, 128], "num_classes": NUM_CLASSES}

_TIME_FREQ_DIM = 256  # width of the sinusoidal timestep features (fixed in diffusers' CombinedTimestepLabelEmbeddings)
_EPS = 1e-6


def timestep_features(t: torch.Tensor, dim: int = _TIME_FREQ_DIM) -> torch.Tensor:
    """Sinusoidal features of (already scaled) timesteps ``t [B]`` -> ``[B, dim]`` in ``[cos, sin]`` order.

    Frequency ``m`` is ``exp(-ln(10000) m / (dim/2 - 1))``, ``m = 0 .. dim/2 - 1``.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(10000.0))
    freqs = torch.exp(exponent / (half - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D position table ``[grid * grid, dim]`` for tokens in row-major (row, column) order.

    Channels ``[0, dim/2)`` encode the column index, ``[dim/2, dim)`` the row index; each half is
    ``[sin(pos w), cos(pos w)]`` with ``w_m = 10000^(-m / (dim/4))``. Computed in float64.
    """
    if dim % 4:
        raise ValueError(f"hidden_size must be a multiple of 4 for the 2-D sin-cos table, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid, dtype=torch.float64)
    rows = pos.repeat_interleave(grid)  # token k = r * grid + c
    cols = pos.repeat(grid)

    def one_axis(p):
        a = p[:, None] * omega[None]
        return torch.cat([torch.sin(a), torch.cos(a)], dim=1)

    return torch.cat([one_axis(cols), one_axis(rows)], dim=1).float()


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head self-attention over ``[B, N, D]`` tokens with a fused ``qkv`` projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, hd]
        return self.proj(o.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """``Linear(D, 4D) -> GELU(tanh) -> Linear(4D, D)``."""

    def __init__(self, dim: int, ratio: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(dim, ratio * dim)
        self.fc2 = nn.Linear(ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: ``ada`` maps ``SiLU(c)`` to (shift, scale, gate) for attention and MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ada = nn.Linear(dim, 6 * dim)
        self.attn = Attention(dim, heads)
        self.mlp = Mlp(dim)

    def forward(self, x: torch.Tensor, c_act: torch.Tensor) -> torch.Tensor:
        """``x [B, N, D]``, ``c_act = SiLU(c) [B, D]``."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.ada(c_act).chunk(6, dim=1)
        d = x.shape[-1]
        x = x + gate_a[:, None] * self.attn(_modulate(F.layer_norm(x, (d,), eps=_EPS), shift_a, scale_a))
        x = x + gate_m[:, None] * self.mlp(_modulate(F.layer_norm(x, (d,), eps=_EPS), shift_m, scale_m))
        return x


class BundledDiT(nn.Module):
    """Class-conditional DiT predicting rectified-flow velocity.

    ``forward(x [B, C, S, S], t [B] float in [0, 1] (1 = noise), y [B] long in [0, num_classes], num_classes =
    null label) -> v [B, C, S, S]``. ``t`` may also be a python float or a 0-d tensor (broadcast to the batch).
    """

    def __init__(self, config: dict | None = None):
        super().__init__()
        cfg = dict(DEFAULT_DIT_CONFIG)
        cfg.update(config or {})
        self.config = cfg
        d, p, c = cfg["hidden_size"], cfg["patch_size"], cfg["in_channels"]
        if cfg["sample_size"] % p:
            raise ValueError(f"sample_size {cfg['sample_size']} is not divisible by patch_size {p}")
        self.grid = cfg["sample_size"] // p
        self.x_embed = nn.Conv2d(c, d, kernel_size=p, stride=p)
        self.register_buffer("pos_embed", sincos_pos_embed(d, self.grid)[None], persistent=False)
        self.t_fc1 = nn.Linear(_TIME_FREQ_DIM, d)
        self.t_fc2 = nn.Linear(d, d)
        self.y_embed = nn.Embedding(cfg["num_classes"] + 1, d)
        self.blocks = nn.ModuleList([DiTBlock(d, cfg["num_heads"]) for _ in range(cfg["depth"])])
        self.final_ada = nn.Linear(d, 2 * d)
        self.final_proj = nn.Linear(d, p * p * c)
        self.reset_parameters()

    @property
    def num_classes(self) -> int:
        return self.config["num_classes"]

    @property
    def null_label(self) -> int:
        return self.config["num_classes"]

    def reset_parameters(self, seed: int | None = None) -> None:
        """DiT initialisation (Xavier-uniform linears, zeroed adaLN and output layers: adaLN-Zero), except that the
        conditioning (timestep MLP, label table) starts at unit scale."""
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
            w = self.x_embed.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(self.x_embed.bias)
            # Unlike DiT's std-0.02 embeddings (tuned for 400k steps), the conditioning starts at unit scale:
            # with std 0.02, SiLU(c) ~ 0.01 starves the zero-initialised adaLN layers of gradient, and a
            # 600-step CPU run ignored the class label entirely (samples were identical across classes).
            nn.init.normal_(self.y_embed.weight, std=1.0)
            for blk in self.blocks:
                nn.init.zeros_(blk.ada.weight)
                nn.init.zeros_(blk.ada.bias)
            for m in (self.final_ada, self.final_proj):
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)

    def condition(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Conditioning vector ``c [B, D]`` from ``t [B]`` in [0, 1] and labels ``y [B]``."""
        tf = timestep_features(t * self.config["time_scale"]).to(self.t_fc1.weight.dtype)
        return self.t_fc2(F.silu(self.t_fc1(tf))) + self.y_embed(y)

    def forward(self, x: torch.Tensor, t, y: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        p = self.config["patch_size"]
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        h = self.x_embed(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)  # [B, N, D]
        c_act = F.silu(self.condition(t, y))
        for blk in self.blocks:
            h = blk(h, c_act)
        shift, scale = self.final_ada(c_act).chunk(2, dim=1)
        h = self.final_proj(_modulate(F.layer_norm(h, (h.shape[-1],), eps=_EPS), shift, scale))  # [B, N, p*p*C]
        gh, gw = hh // p, ww // p
        h = h.reshape(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(b, c, hh, ww)


class ShapeClassifier(nn.Module):
    """Small CNN: per stage two 3x3 convs (the first of stages 2+ with stride 2), GroupNorm + SiLU; global
    average pool; linear head. ``forward(images [B, 3, 32, 32] in [-1, 1]) -> logits [B, num_classes]``."""

    def __init__(self, config: dict | None = None):
        super().__init__()
        cfg = dict(DEFAULT_CLASSIFIER_CONFIG)
        cfg.update(config or {})
        self.config = cfg
        layers: list[nn.Module] = []
        cin = 3
        for i, w in enumerate(cfg["widths"]):
            for j in range(2):
                stride = 2 if (i > 0 and j == 0) else 1
                layers += [nn.Conv2d(cin, w, 3, stride=stride, padding=1), nn.GroupNorm(8, w), nn.SiLU()]
                cin = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, cfg["num_classes"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """Predicted labels ``[B]`` for images ``[B, 3, 32, 32]``, in chunks of ``batch``."""
        return torch.cat([self(x[i : i + batch]).argmax(dim=1) for i in range(0, x.shape[0], batch)])


# ---------------------------------------------------------------------------------------------------------------
# Saving and loading


def save_module(module: nn.Module, path, *, kind: str, dtype: torch.dtype = torch.float32, extra: dict | None = None):
    """Write ``module``'s state dict to ``path`` (safetensors), tensors cast to ``dtype``, with the config
    (and ``extra``) as JSON in the metadata."""
    from safetensors.torch import save_file

    sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in module.state_dict().items()}
    meta = {"kind": kind, "config": json.dumps(module.config, sort_keys=True)}
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(sd, str(path), metadata=meta)
    _canonical_header(path)


def _canonical_header(path) -> None:
    """Rewrite a safetensors header with sorted keys, in place. safetensors writes ``__metadata__`` in hash-map
    order, which changes from run to run, so two identical trainings would otherwise differ in a few bytes. Same
    length (the header is re-padded with spaces), so the tensor data is not moved."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if len(text) > n:  # never: same content, no whitespace
            return
        f.seek(8)
        f.write(text + b" " * (n - len(text)))


def read_metadata(path) -> dict:
    """The metadata dict of a safetensors file (``config`` decoded from JSON)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if "config" in meta:
        meta["config"] = json.loads(meta["config"])
    return meta


def _load(cls, path, kind: str, device, dtype):
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; train it with `python bench/train_bundled.py`")
    meta = read_metadata(path)
    if meta.get("kind") != kind:
        raise ValueError(f"{path} holds a {meta.get('kind')!r}, expected {kind!r}")
    with torch.random.fork_rng(devices=[]):  # the random init, overwritten below, leaves the caller's RNG alone
        model = cls(meta["config"])
    sd = load_file(str(path))
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_bundled(device="cpu", dtype: torch.dtype = torch.float32, path=None) -> BundledDiT:
    """The trained :class:`BundledDiT` (stored weights are widened to float32, then cast to ``dtype``), in eval
    mode with gradients off."""
    return _load(BundledDiT, path or DIT_FILE, "bundled_dit", device, dtype)


def load_classifier(device="cpu", dtype: torch.dtype = torch.float32, path=None) -> ShapeClassifier:
    """The trained :class:`ShapeClassifier`, in eval mode with gradients off."""
    return _load(ShapeClassifier, path or CLASSIFIER_FILE, "bundled_classifier", device, dtype)


# ---------------------------------------------------------------------------------------------------------------
# diffusers interop (no diffusers import here)


def diffusers_config(config: dict) -> dict:
    """Keyword arguments for ``diffusers.DiTTransformer2DModel`` that build the same network as ``config``."""
    d, heads = config["hidden_size"], config["num_heads"]
    return {
        "num_attention_heads": heads,
        "attention_head_dim": d // heads,
        "in_channels": config["in_channels"],
        "out_channels": config["in_channels"],
        "num_layers": config["depth"],
        "dropout": 0.0,
        "attention_bias": True,
        "sample_size": config["sample_size"],
        "patch_size": config["patch_size"],
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": config["num_classes"],
        "upcast_attention": False,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "norm_eps": _EPS,
    }


def to_diffusers_state_dict(sd: dict, config: dict) -> dict:
    """Map a :class:`BundledDiT` state dict to ``DiTTransformer2DModel`` keys.

    The fused ``qkv`` is split into ``to_q/to_k/to_v``; the shared conditioning embedding is copied into every
    block's ``norm1.emb`` (diffusers keeps one per block; the final layer reads block 0's).
    """
    out = {
        "pos_embed.proj.weight": sd["x_embed.weight"],
        "pos_embed.proj.bias": sd["x_embed.bias"],
        "proj_out_1.weight": sd["final_ada.weight"],
        "proj_out_1.bias": sd["final_ada.bias"],
        "proj_out_2.weight": sd["final_proj.weight"],
        "proj_out_2.bias": sd["final_proj.bias"],
    }
    emb = {
        "timestep_embedder.linear_1.weight": sd["t_fc1.weight"],
        "timestep_embedder.linear_1.bias": sd["t_fc1.bias"],
        "timestep_embedder.linear_2.weight": sd["t_fc2.weight"],
        "timestep_embedder.linear_2.bias": sd["t_fc2.bias"],
        "class_embedder.embedding_table.weight": sd["y_embed.weight"],
    }
    for i in range(config["depth"]):
        src, dst = f"blocks.{i}.", f"transformer_blocks.{i}."
        for k, v in emb.items():
            out[f"{dst}norm1.emb.{k}"] = v.clone()
        out[f"{dst}norm1.linear.weight"] = sd[src + "ada.weight"]
        out[f"{dst}norm1.linear.bias"] = sd[src + "ada.bias"]
        qw, kw, vw = sd[src + "attn.qkv.weight"].chunk(3, dim=0)
        qb, kb, vb = sd[src + "attn.qkv.bias"].chunk(3, dim=0)
        for name, w, b in (("to_q", qw, qb), ("to_k", kw, kb), ("to_v", vw, vb)):
            out[f"{dst}attn1.{name}.weight"] = w.contiguous()
            out[f"{dst}attn1.{name}.bias"] = b.contiguous()
        out[f"{dst}attn1.to_out.0.weight"] = sd[src + "attn.proj.weight"]
        out[f"{dst}attn1.to_out.0.bias"] = sd[src + "attn.proj.bias"]
        out[f"{dst}ff.net.0.proj.weight"] = sd[src + "mlp.fc1.weight"]
        out[f"{dst}ff.net.0.proj.bias"] = sd[src + "mlp.fc1.bias"]
        out[f"{dst}ff.net.2.weight"] = sd[src + "mlp.fc2.weight"]
        out[f"{dst}ff.net.2.bias"] = sd[src + "mlp.fc2.bias"]
    return out


def load_bundled_diffusers(device="cpu", dtype: torch.dtype = torch.float32, path=None):
    """The bundled weights in a ``diffusers.DiTTransformer2DModel`` (needs diffusers installed). Call it as
    ``model(x, timestep=1000 * t, class_labels=y).sample``."""
    from diffusers import DiTTransformer2DModel

    ours = load_bundled(path=path)
    model = DiTTransformer2DModel(**diffusers_config(ours.config))
    missing, unexpected = model.load_state_dict(to_diffusers_state_dict(ours.state_dict(), ours.config), strict=False)
    missing = [k for k in missing if not k.endswith("pos_embed.pos_embed")]
    if missing or unexpected:
        raise RuntimeError(f"diffusers DiT state dict mismatch: missing={missing}, unexpected={unexpected}")
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
