"""Fast-mode ops: bidirectional linear attention, block-sparse attention over a cached block mask, and the
timestep-skip pair ``relative_change`` / ``forecast``.

Each op is a ``torch.library`` custom op (``torch.ops.jetdet.<name>``, with a fake impl for tracing), built
by :mod:`jetdet.ops.registry` from the spec in ``jetdet.kernels.{linear_attention,block_sparse,forecast}.op``,
behind a Python wrapper here that takes friendlier arguments and validates them (every error names the
argument). The op body dispatches with :func:`jetdet.backend.backend_for` to the folder's Triton launcher or
its torch path, eagerly when nothing needs the dispatcher (like the core ops).

Linear attention and block-sparse attention with a partial mask are **approximations** of softmax
attention when they replace it in a model trained with softmax attention; ``bench/fast_quality.py``
measures how far off they are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..kernels.block_sparse import torch_path as _BT
from ..kernels.forecast import torch_path as _FT
from . import _checks, registry

__all__ = [
    "LinearAttentionState",
    "BlockMask",
    "linear_attention",
    "attention_block_mask",
    "block_mask_from_bool",
    "block_sparse_attention",
    "block_sparse_work",
    "spatial_block_order",
    "relative_change",
    "forecast",
    "forecast_weights",
]

_OPS = registry.OPS
FEATURE_MAPS = ("relu", "elu1", "identity")
BLOCK_SIZES = (16, 32, 64, 128)
POOL_SIZES = (4, 8, 16, 32, 64, 128)
MAX_HEAD_DIM = 128
MAX_HISTORY = 4


def _check_head_dim(name: str, t: torch.Tensor) -> None:
    d = t.shape[-1]
    if d < 1 or d > MAX_HEAD_DIM:
        raise ValueError(f"{name}: head dim {d} is not supported; expected 1 <= D <= {MAX_HEAD_DIM} "
                         f"(one head is kept in one tile), got shape {tuple(t.shape)}")


def _check_feature_map(feature_map) -> None:
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map: expected one of {FEATURE_MAPS}, got {feature_map!r}")


# ========================================================================================== linear attention


class LinearAttentionState(NamedTuple):
    """The per-head state of linear attention, reusable across calls whose keys/values are unchanged (a
    step cache can reuse it across denoising steps and CFG branches; only linear attention allows that).

    ``kv``: ``φ(K)ᵀV``, fp32 ``[B, H, D, Dv]``. ``k_sum``: ``φ(K)ᵀ1``, fp32 ``[B, H, D]``.
    ``feature_map``: the φ it was built with; passing it back with another φ is an error."""

    kv: torch.Tensor
    k_sum: torch.Tensor
    feature_map: str


def _check_la_qkv(q, k, v):
    _checks.check_tensor("q", q, ndim=4)
    _checks.check_tensor("k", k, ndim=4)
    _checks.check_tensor("v", v, ndim=4)
    _checks.check_same("k", k, "q", q)
    _checks.check_same("v", v, "q", q)
    _check_head_dim("q", q)
    _check_head_dim("v", v)
    B, H, _, D = q.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"k: expected shape ({B}, {H}, M, {D}) to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v: expected shape ({B}, {H}, {k.shape[2]}, Dv) to match k {tuple(k.shape)}, "
                         f"got {tuple(v.shape)}")


def _check_la_state(q, kv, k_sum):
    _checks.check_tensor("q", q, ndim=4)
    _check_head_dim("q", q)
    _checks.check_tensor("state.kv", kv, ndim=4, dtypes=(torch.float32,))
    _checks.check_tensor("state.k_sum", k_sum, ndim=3, dtypes=(torch.float32,))
    _checks.check_same("state.kv", kv, "q", q, dtype=False)
    _checks.check_same("state.k_sum", k_sum, "q", q, dtype=False)
    B, H, _, D = q.shape
    if kv.shape[:3] != (B, H, D):
        raise ValueError(f"state.kv: expected shape ({B}, {H}, {D}, Dv) for q {tuple(q.shape)}, "
                         f"got {tuple(kv.shape)}")
    _check_head_dim("state.kv", kv)
    _checks.check_shape("state.k_sum", k_sum, (B, H, D), "[B, H, D] like q")


def _check_eps(eps) -> None:
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps: expected a finite float >= 0, got {eps!r}")


def linear_attention(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, feature_map: str = "relu",
                     eps: float = 1e-6, state: LinearAttentionState | Sequence[torch.Tensor] | None = None,
                     return_state: bool = False):
    """Bidirectional (non-causal) linear attention.

    ``out = φ(Q)·(φ(K)ᵀV) / (φ(Q)·(φ(K)ᵀ1) + eps)``, per batch item and head.

    Args:
        q: ``[B, H, N, D]``, fp32/fp16/bf16, ``D <= 128``.
        k: ``[B, H, M, D]``, same dtype and device as ``q``. Not read when ``state`` is given (may be None).
        v: ``[B, H, M, Dv]``, ``Dv <= 128``. Not read when ``state`` is given (may be None).
        feature_map: ``"relu"`` (SANA's LiteLA), ``"elu1"`` (elu + 1) or ``"identity"``.
        eps: added to the denominator.
        state: a :class:`LinearAttentionState` (or ``(kv, k_sum)``) from an earlier call with
            ``return_state=True``; the key/value pass is skipped and the state applied to ``q``.
        return_state: also return the state, so a cache can pass it back in.

    Returns:
        ``out [B, H, N, Dv]`` in ``q.dtype``, or ``(out, LinearAttentionState)``.

    Pass 1 reduces ``φ(K)ᵀ[V | 1]`` over the tokens in fp32 in a fixed order (deterministic, independent of
    the batch size); pass 2 applies it to ``φ(Q)``. Linear attention is exact only for models trained with
    it (e.g. SANA). **Used in place of softmax attention it is an approximation**: ``bench/fast_quality.py``
    measured a relative L2 error of 0.82 (relu) / 0.85 (elu1) against softmax attention on spatially smooth
    inputs with mostly local heads, about that of uniform attention (0.87).
    """
    _check_feature_map(feature_map)
    if state is not None:
        if isinstance(state, LinearAttentionState):
            if state.feature_map != feature_map:
                raise ValueError(f"state: built with feature_map={state.feature_map!r}, "
                                 f"but feature_map={feature_map!r} was passed")
            kv, k_sum = state.kv, state.k_sum
        else:
            if len(state) != 2:
                raise ValueError("state: expected a LinearAttentionState or a (kv, k_sum) pair")
            kv, k_sum = state
        _check_eps(eps)
        _check_la_state(q, kv, k_sum)
        out = _OPS["linear_attention_apply"](q, kv, k_sum, feature_map, float(eps))
        return (out, LinearAttentionState(kv, k_sum, feature_map)) if return_state else out
    if k is None or v is None:
        raise ValueError("k, v: required when no state is given")
    _check_eps(eps)
    _check_la_qkv(q, k, v)
    if not return_state:
        return _OPS["linear_attention"](q, k, v, feature_map, float(eps))
    kv, k_sum = _OPS["linear_attention_state"](k, v, feature_map)
    out = _OPS["linear_attention_apply"](q, kv, k_sum, feature_map, float(eps))
    return out, LinearAttentionState(kv, k_sum, feature_map)


# ===================================================================================== block-sparse attention


class BlockMask(NamedTuple):
    """A block-level attention mask in both forms.

    ``mask``: bool ``[Bm, H, nQB, nKB]``, ``nQB = ceil(N / block_size)``, ``nKB = ceil(M / block_size)``;
    ``Bm`` is the batch size or 1 (one mask for the whole batch, e.g. both CFG branches).
    ``indices``: int32 ``[Bm, H, nQB, nKB]``, per query block its kept KV block ids in ascending order,
    then ``-1`` padding. ``counts``: int32 ``[Bm, H, nQB]``, the number of kept blocks.
    ``block_size``: tokens per block, for both queries and keys.

    The kernel reads only ``indices`` and ``counts``: the program for a query block loops ``counts`` times.
    """

    mask: torch.Tensor
    indices: torch.Tensor
    counts: torch.Tensor
    block_size: int

    @property
    def density(self) -> float:
        """Fraction of (query block, KV block) pairs kept (a host sync)."""
        return float(self.mask.float().mean()) if self.mask.numel() else 0.0


def _check_block_size(block_size) -> None:
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size: expected one of {BLOCK_SIZES}, got {block_size!r}")


def _check_block_mask_args(q, k, block_size, mass, min_blocks, pool_size) -> None:
    _checks.check_tensor("q", q, ndim=4)
    _checks.check_tensor("k", k, ndim=4)
    _checks.check_same("k", k, "q", q)
    _check_head_dim("q", q)
    _check_block_size(block_size)
    if isinstance(mass, bool) or not isinstance(mass, (int, float)) or not (0.0 < mass <= 1.0):
        raise ValueError(f"mass: expected a number with 0 < mass <= 1, got {mass!r}")
    if type(min_blocks) is not int or min_blocks < 1:
        raise ValueError(f"min_blocks: expected an int >= 1, got {min_blocks!r}")
    if pool_size not in POOL_SIZES or pool_size > block_size:
        raise ValueError(f"pool_size: expected one of {POOL_SIZES} and <= block_size={block_size}, "
                         f"got {pool_size!r}")
    B, H, N, D = q.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"k: expected shape ({B}, {H}, M, {D}) to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if N == 0 or k.shape[2] == 0:
        raise ValueError(f"q, k: need at least one token each, got N={N}, M={k.shape[2]}")


def attention_block_mask(q: torch.Tensor, k: torch.Tensor, block_size: int = 64, mass: float = 0.95,
                         min_blocks: int = 1, pool_size: int | None = None) -> BlockMask:
    """Pick, per query block, the KV blocks that carry most of the attention, for
    :func:`block_sparse_attention`.

    Queries and keys are mean-pooled per ``pool_size`` tokens (default ``block_size``); the softmax over
    the pooled keys of the pooled scores (plus ``log`` of each pool's token count), summed per KV block and
    averaged over the query pools of a query block, estimates how much attention mass each KV block gets.
    Per query block the highest-scoring KV blocks are kept until their cumulative mass reaches ``mass``,
    at least ``min_blocks`` of them, and always the diagonal block.

    A finer ``pool_size`` (e.g. 16 with 64-token blocks) sees inside a block and tracks the true block mass
    much better, for ``(N / pool_size)²`` pooled scores per head instead of ``(N / block_size)²``: on the
    smooth inputs of ``bench/fast_quality.py`` it gives a lower error at a lower density.

    Args:
        q: ``[B, H, N, D]``; k: ``[B, H, M, D]``; fp32/fp16/bf16, ``D <= 128``.
        block_size: 16, 32, 64 or 128 tokens.
        mass: in ``(0, 1]``; 1 keeps every block.
        min_blocks: at least this many KV blocks per query block.
        pool_size: tokens per pool for the estimate; 4, 8, ..., 128, dividing ``block_size``.

    Returns:
        A :class:`BlockMask` (bool and index forms). Computing it costs one read of Q and K plus a
        ``[nQB, nKB]`` softmax per head; a cache can compute it at refresh steps and reuse it for several
        steps and across CFG branches.
    """
    pool = block_size if pool_size is None else pool_size
    _check_block_mask_args(q, k, block_size, mass, min_blocks, pool)
    mask, indices, counts = _OPS["attention_block_mask"](q, k, int(block_size), float(mass), int(min_blocks),
                                                         int(pool))
    return BlockMask(mask, indices, counts, int(block_size))


def block_mask_from_bool(mask: torch.Tensor, block_size: int = 64) -> BlockMask:
    """A :class:`BlockMask` from a bool ``[Bm, H, nQB, nKB]`` block mask (any source)."""
    _checks.check_tensor("block_mask", mask, ndim=4, dtypes=(torch.bool,))
    _check_block_size(block_size)
    indices, counts = _BT.mask_to_index(mask)
    return BlockMask(mask, indices, counts, int(block_size))


def _check_block_sparse_args(q, k, v, indices, counts, block_size, scale) -> None:
    _check_la_qkv(q, k, v)
    _check_block_size(block_size)
    B, H, N, _ = q.shape
    nqb, nkb = -(-N // block_size), -(-k.shape[2] // block_size)
    _checks.check_tensor("block_mask.indices", indices, ndim=4, dtypes=(torch.int32,))
    _checks.check_tensor("block_mask.counts", counts, ndim=3, dtypes=(torch.int32,))
    _checks.check_same("block_mask.indices", indices, "q", q, dtype=False)
    _checks.check_same("block_mask.counts", counts, "q", q, dtype=False)
    if indices.shape[0] not in (1, B) or tuple(indices.shape[1:]) != (H, nqb, nkb):
        raise ValueError(
            f"block_mask: expected shape ({B if B == 1 else f'{B} or 1'}, {H}, {nqb}, {nkb}) = (B, H, "
            f"ceil(N/{block_size}), "
            f"ceil(M/{block_size})) for q {tuple(q.shape)}, k {tuple(k.shape)}, got {tuple(indices.shape)}"
        )
    _checks.check_shape("block_mask.counts", counts, (indices.shape[0], H, nqb), "[Bm, H, nQB] like indices")
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite float, got {scale!r}")


def _as_block_mask(block_mask, block_size) -> BlockMask:
    if isinstance(block_mask, BlockMask):
        if block_mask.block_size != block_size:
            raise ValueError(f"block_mask: built with block_size={block_mask.block_size}, "
                             f"but block_size={block_size} was passed")
        return block_mask
    if isinstance(block_mask, torch.Tensor):
        return block_mask_from_bool(block_mask, block_size)
    raise TypeError(f"block_mask: expected a BlockMask or a bool tensor, got {type(block_mask).__name__}")


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask | torch.Tensor,
                           block_size: int = 64, scale: float | None = None) -> torch.Tensor:
    """Softmax attention restricted to the kept KV blocks of each query block.

    Flash-style online softmax; the program for a query block loops only over its kept KV blocks (in
    ascending order), so work is proportional to the mask density (see :func:`block_sparse_work`). With a
    full mask it is dense attention; with a partial mask it equals dense attention with the dropped blocks'
    scores set to ``-inf`` (query blocks with no kept block give zeros), which is an **approximation** of the
    full attention whose error ``bench/fast_quality.py`` measures against density.

    Args:
        q: ``[B, H, N, D]``; k: ``[B, H, M, D]``; v: ``[B, H, M, Dv]``; fp32/fp16/bf16, ``D, Dv <= 128``.
        block_mask: a :class:`BlockMask` or a bool ``[B or 1, H, ceil(N/block_size), ceil(M/block_size)]``.
        block_size: 16, 32, 64 or 128 (must match the mask).
        scale: score scale, default ``D ** -0.5``.

    Returns:
        ``[B, H, N, Dv]`` in ``q.dtype``.
    """
    _check_block_size(block_size)
    bm = _as_block_mask(block_mask, block_size)
    if scale is None:
        _checks.check_tensor("q", q, ndim=4)
        scale = q.shape[-1] ** -0.5
    _check_block_sparse_args(q, k, v, bm.indices, bm.counts, block_size, scale)
    return _OPS["block_sparse_attention"](q, k, v, bm.indices, bm.counts, int(block_size), float(scale))


def block_sparse_work(block_mask: BlockMask | torch.Tensor, batch: int | None = None) -> dict:
    """The work a block mask asks of :func:`block_sparse_attention`, in (query block, KV block) tile pairs.

    Returns ``{"programs", "blocks_visited", "dense_blocks", "density"}``: ``programs`` query-block programs
    (``B·H·nQB``), ``blocks_visited`` the KV blocks they loop over in total (the sum of the kept counts),
    ``dense_blocks`` what dense attention would visit, and their ratio. ``batch`` expands a mask shared by
    the batch (``Bm = 1``). A host sync."""
    if isinstance(block_mask, BlockMask):
        counts, nkb = block_mask.counts, block_mask.indices.shape[-1]
    else:
        counts, nkb = block_mask.sum(dim=-1), block_mask.shape[-1]
    if batch is not None and (type(batch) is not int or batch < 1 or batch % counts.shape[0]):
        raise ValueError(f"batch: expected a positive int multiple of the mask's batch {counts.shape[0]}, "
                         f"got {batch!r}")
    rep = (batch // counts.shape[0]) if batch else 1
    programs = counts.numel() * rep
    visited = int(counts.sum()) * rep
    dense = programs * nkb
    return {"programs": programs, "blocks_visited": visited, "dense_blocks": dense,
            "density": visited / dense if dense else 0.0}


def spatial_block_order(height: int, width: int, block_size: int = 64, device=None):
    """A token permutation that makes each ``block_size`` run of tokens a compact 2-D tile.

    Image tokens in raster order put a whole row strip (e.g. 64 tokens of one row) in one block, so a
    spatially local attention pattern touches many blocks and mean-pooling a block averages tokens far
    apart. Reordering tokens into ``th × tw`` tiles (``th·tw = block_size``, ``tw >= th``, e.g. 8×8 for 64)
    keeps neighbours in the same block. Attention is equivariant under a common permutation of queries,
    keys and values, so ``out = block_sparse_attention(q[:, :, perm], k[:, :, perm], v[:, :, perm], ...)
    [:, :, inv]`` is exact for a full mask and usually far sparser for the same error (see
    ``bench/fast_quality.py``).

    Returns ``(perm, inv)``, int64 ``[height·width]``: tiled token ``i`` is raster token ``perm[i]``;
    ``inv`` undoes it. Edge tiles are partial when the tile does not divide the grid.
    """
    _check_block_size(block_size)
    if height < 1 or width < 1:
        raise ValueError(f"height, width: expected positive ints, got {height}, {width}")
    tw = 1 << math.ceil(math.log2(block_size) / 2)
    th = block_size // tw
    rows = torch.arange(height, device=device).view(-1, 1).expand(height, width)
    cols = torch.arange(width, device=device).view(1, -1).expand(height, width)
    n_tc = -(-width // tw)
    key = (((rows // th) * n_tc + cols // tw) * th + rows % th) * tw + cols % tw
    perm = torch.argsort(key.flatten(), stable=True)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return perm, inv


# ======================================================================================= timestep skipping


def _check_pair(a, b):
    _checks.check_tensor("a", a, min_ndim=1)
    _checks.check_tensor("b", b, min_ndim=1)
    _checks.check_same("b", b, "a", a)
    if a.shape != b.shape:
        raise ValueError(f"b: expected shape {tuple(a.shape)} like a, got {tuple(b.shape)}")
    if a.numel() == 0:
        raise ValueError(f"a: expected a non-empty tensor, got shape {tuple(a.shape)}")


def _norm_tile(tile, shape) -> list[int]:
    """Tile sizes per non-batch dim (0 = whole dim) from an int or a sequence."""
    nd = len(shape) - 1
    if isinstance(tile, int):
        if tile < 1:
            raise ValueError(f"tile: expected a positive int, got {tile}")
        if nd == 2:  # [B, N, C]: token blocks
            return [tile, 0]
        if nd >= 3:  # [B, C, ..., H, W]: square spatial tiles
            return [0] * (nd - 2) + [tile, tile]
        return [tile] * nd
    tile = list(tile)
    if len(tile) != nd:
        raise ValueError(f"tile: expected {nd} entries (one per non-batch dim of shape {tuple(shape)}), "
                         f"got {len(tile)}")
    out = []
    for t in tile:
        if t is None:
            out.append(0)
        elif isinstance(t, int) and t >= 0:
            out.append(t)
        else:
            raise ValueError(f"tile: entries must be ints >= 1, or None / 0 for a whole dim; got {tile}")
    return out


def relative_change(a: torch.Tensor, b: torch.Tensor, tile: int | Sequence[int | None] | None = None):
    """``‖a − b‖₁ / ‖b‖₁`` per batch item (dim 0), and optionally per tile, in one pass on the device.

    Args:
        a, b: equal shapes ``[B, ...]``, same dtype (fp32/fp16/bf16) and device; e.g. a model output and the
            previous step's.
        tile: ``None`` for per-item only. Otherwise a tile size per non-batch dim (``None``/0 = the whole dim),
            e.g. ``(None, 16, 16)`` for 16×16 spatial tiles of a ``[B, C, H, W]`` latent summed over channels,
            or ``(256, None)`` for 256-token blocks of ``[B, N, C]`` hidden states. An int ``t`` means
            ``(t, None)`` for 3-D inputs and ``t×t`` tiles over the last two dims for 4-D and larger.
            Edge tiles are clipped. At most four dim groups after whole dims merge into their left
            neighbour (``[B, C, T, H, W]`` with ``(None, t, h, w)`` tiles fits).

    Returns:
        fp32 ``[B]`` on the input device; with ``tile``, ``(per_item [B], per_tile [B, n_1, ..., n_k])`` with
        ``n_i = ceil(size_i / tile_i)`` (1 for whole dims). Where ``‖b‖₁ = 0`` the ratio is 0 if ``a == b``
        there, else ``inf``. Sums are fp32 in a fixed order: deterministic and independent of the batch
        size. No host sync.
    """
    _check_pair(a, b)
    if tile is None:
        return _OPS["relative_change"](a, b, [])[0]
    _checks.check_tensor("a", a, min_ndim=2)
    return _OPS["relative_change"](a, b, _norm_tile(tile, a.shape))


def _as_floats(name: str, x) -> list[float]:
    if isinstance(x, torch.Tensor):
        # a device tensor costs one sync here; pass Python floats to avoid it
        return [float(v) for v in x.detach().reshape(-1).tolist()]
    try:
        return [float(v) for v in x]
    except TypeError:
        raise TypeError(f"{name}: expected a sequence of floats or a 1-D tensor, got {type(x).__name__}") from None


def _check_timesteps(timesteps: list[float], t: float, k: int) -> None:
    if len(timesteps) != k:
        raise ValueError(f"timesteps: expected {k} values (one per history entry), got {len(timesteps)}")
    if not all(math.isfinite(x) for x in [*timesteps, t]):
        raise ValueError(f"timesteps, t: expected finite values, got {timesteps}, t={t}")
    if k > 1:
        steps = [b - a for a, b in zip(timesteps, timesteps[1:])]
        if not (all(s > 0 for s in steps) or all(s < 0 for s in steps)):
            raise ValueError(
                f"timesteps: expected strictly increasing or strictly decreasing values (oldest first), "
                f"got {timesteps}"
            )


def _method_points(order) -> int | None:
    """History entries an order uses; None for "lagrange" (all)."""
    if order == "lagrange":
        return None
    if isinstance(order, int) and not isinstance(order, bool) and 1 <= order <= MAX_HISTORY - 1:
        return order + 1
    raise ValueError(f"order: expected 1, 2, 3 or 'lagrange', got {order!r}")


def forecast_weights(timesteps: Sequence[float], t: float, order: int | str = 1) -> list[float]:
    """The weights ``w`` with ``forecast(...) = Σ_i w_i · history[i]`` (0 for unused entries)."""
    ts = _as_floats("timesteps", timesteps)
    t = float(t)
    _check_forecast_args(ts, t, order)
    return _FT.weights(ts, t, str(order))


def _check_forecast_args(ts: list[float], t: float, order: int | str) -> None:
    """The order, the timesteps and ``t`` of a forecast (what :func:`forecast_weights` and :func:`forecast`
    accept), without computing the weights."""
    pts = _method_points(order)
    k = len(ts)
    if k < 1 or k > MAX_HISTORY:
        raise ValueError(f"timesteps: expected 1 to {MAX_HISTORY} values, got {k}")
    use = k if pts is None else pts
    if use > k:
        raise ValueError(f"history: order={order!r} needs at least {use} outputs, got {k}")
    _check_timesteps(ts, t, k)


def _check_history(history: list, timesteps: list) -> None:
    if len(history) == 0:
        raise ValueError("history: expected 1 to 4 tensors, got an empty history")
    if len(history) > MAX_HISTORY:
        raise ValueError(f"history: expected at most {MAX_HISTORY} tensors, got {len(history)}")
    h0 = _checks.check_tensor("history[0]", history[0])
    for i, h in enumerate(history[1:], 1):
        _checks.check_tensor(f"history[{i}]", h)
        _checks.check_same(f"history[{i}]", h, "history[0]", h0)
        if h.shape != h0.shape:
            raise ValueError(f"history[{i}]: expected shape {tuple(h0.shape)} like history[0], got {tuple(h.shape)}")
    if len(timesteps) != len(history):
        raise ValueError(f"timesteps: expected {len(history)} values (one per history entry), got {len(timesteps)}")


def forecast(history: Sequence[torch.Tensor] | torch.Tensor, timesteps: Sequence[float] | torch.Tensor,
             t: float, order: int | str = 1) -> torch.Tensor:
    """Predict a skipped model output at timestep ``t`` from the last computed ones.

    Args:
        history: 1 to 4 equal-shaped outputs, oldest first, as a list or a stacked ``[k, ...]`` tensor.
        timesteps: the timestep (or sigma) of each history entry, strictly monotonic (increasing or
            decreasing); Python floats cost no sync, a tensor costs one ``.tolist()`` sync.
        t: the timestep to predict at.
        order: ``1`` (linear, last 2 entries), ``2`` (quadratic, last 3), ``3`` (cubic, last 4): Newton
            finite differences on non-uniform steps, written as Lagrange weights; or ``"lagrange"``: the
            polynomial through all entries. Exact for polynomials in ``t`` of that degree.

    Returns:
        A tensor like ``history[0]``. The weights are computed on the host in float64; one fused kernel
        reads the used entries and writes ``Σ w_i · h_i`` (fp32 math) in the history dtype.
    """
    if isinstance(history, torch.Tensor):
        if history.dim() < 1:
            raise ValueError(f"history: a stacked tensor needs a leading history dim, got shape {tuple(history.shape)}")
        history = list(history.unbind(0))
    else:
        history = list(history)
    if len(history) == 0:
        raise ValueError("history: expected 1 to 4 tensors, got an empty history")
    if isinstance(t, torch.Tensor):
        t = float(t.item())
    ts = _as_floats("timesteps", timesteps)
    _check_history(history, ts)
    _check_forecast_args(ts, float(t), order)
    return _OPS["forecast"](history, ts, float(t), str(order))
