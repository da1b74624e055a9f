"""Bidirectional linear attention (φ(Q)·(φ(K)ᵀV) / (φ(Q)·(φ(K)ᵀ1) + eps)): Triton kernels, launch, fp32
reference. Public entry point: ``jetdet.ops.linear_attention``."""
