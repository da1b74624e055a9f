"""Block-sparse attention over a cached block mask, and the block pooling used to build the mask: Triton
kernels, launch, fp32 reference. Public entry points: ``jetdet.ops.attention_block_mask`` and
``jetdet.ops.block_sparse_attention``."""
