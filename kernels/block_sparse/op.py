"""The ops this folder serves (``jetdet::attention_block_mask``, ``jetdet::block_sparse_attention``), for
:mod:`jetdet.ops.registry`."""

from __future__ import annotations

import torch

from jetdet.ops.spec import OpSpec

from . import reference as R
from . import torch_path as T


def _mask(block_pool):
    def body(q, k, block_size, mass, min_blocks, pool_size):
        pq, pk = block_pool(q, pool_size), block_pool(k, pool_size)
        mask = T.select_blocks(pq, pk, q.shape[2], k.shape[2], block_size, pool_size, mass, min_blocks,
                               q.shape[3] ** -0.5)
        return (mask, *T.mask_to_index(mask))

    return body


def _mask_triton(*args):
    from . import launch

    return _mask(launch.block_pool)(*args)


def _mask_fake(q, k, block_size, mass, min_blocks, pool_size):
    B, H, N, _ = q.shape
    nqb, nkb = -(-N // block_size), -(-k.shape[2] // block_size)
    return (q.new_empty((B, H, nqb, nkb), dtype=torch.bool), q.new_empty((B, H, nqb, nkb), dtype=torch.int32),
            q.new_empty((B, H, nqb), dtype=torch.int32))


def _mask_reference(q, k, block_size, mass, min_blocks, pool_size):
    mask = R.attention_block_mask_reference(q, k, block_size, mass, min_blocks, pool_size)
    return (mask, *T.mask_to_index(mask))


def _mask_sample(batch, dtype, gen):
    q = torch.randn(batch, 2, 40, 16, generator=gen).to(dtype)
    return q, torch.randn(batch, 2, 40, 16, generator=gen).to(dtype), 16, 0.8, 1, 8


def _attn_triton(q, k, v, indices, counts, block_size, scale):
    from . import launch

    return launch.attention(q, k, v, indices.contiguous(), counts.contiguous(), block_size, scale)


def _attn_reference(q, k, v, indices, counts, block_size, scale):
    nkb = indices.shape[-1]
    keep = torch.zeros(*indices.shape[:3], nkb + 1, dtype=torch.bool)
    keep.scatter_(3, torch.where(indices < 0, nkb, indices).long(), True)
    mask = keep[..., :nkb].expand(q.shape[0], -1, -1, -1)
    return R.block_sparse_attention_reference(q, k, v, mask, block_size, scale)


def _attn_sample(batch, dtype, gen):
    q, k, v = (torch.randn(batch, 2, n, 16, generator=gen).to(dtype) for n in (40, 40, 40))
    mask = torch.rand(1, 2, 3, 3, generator=gen) < 0.6
    mask |= torch.eye(3, dtype=torch.bool)
    indices, counts = T.mask_to_index(mask)
    return q, k, v, indices, counts, 16, 0.25


SPECS = (
    OpSpec(name="attention_block_mask",
           schema="(Tensor q, Tensor k, int block_size, float mass, int min_blocks, int pool_size) "
                  "-> (Tensor, Tensor, Tensor)",
           fake=_mask_fake, torch_path=_mask(T.block_pool), launcher=_mask_triton, reference=_mask_reference,
           folder="block_sparse", sample=_mask_sample, batched=(0, 1), table="block_sparse",
           public="attention_block_mask"),
    OpSpec(name="block_sparse_attention",
           schema="(Tensor q, Tensor k, Tensor v, Tensor indices, Tensor counts, int block_size, float scale) "
                  "-> Tensor",
           fake=lambda q, k, v, indices, counts, block_size, scale: q.new_empty((*q.shape[:3], v.shape[-1])),
           torch_path=T.block_sparse_attention, launcher=_attn_triton, reference=_attn_reference,
           folder="block_sparse", sample=_attn_sample, batched=(0, 1, 2), table="block_sparse",
           public="block_sparse_attention"),
)
