"""The ops this folder serves (``jetdet::mm``, ``bmm``, ``linear``, ``addmm``), for :mod:`jetdet.ops.registry`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jetdet.ops.spec import OpSpec

from . import reference as R
from . import torch_path as T


def _randn(gen, *shape, dtype):
    return torch.randn(*shape, generator=gen).to(dtype)


def _mm_sample(batch, dtype, gen):
    return _randn(gen, batch, 48, dtype=dtype), _randn(gen, 48, 40, dtype=dtype), _randn(gen, 40, dtype=dtype)


def _bmm_sample(batch, dtype, gen):
    return _randn(gen, batch, 19, 24, dtype=dtype), _randn(gen, batch, 24, 20, dtype=dtype)


def _linear_sample(batch, dtype, gen):
    return _randn(gen, batch, 7, 48, dtype=dtype), _randn(gen, 40, 48, dtype=dtype), _randn(gen, 40, dtype=dtype)


def _addmm_sample(batch, dtype, gen):
    return (_randn(gen, batch, 40, dtype=dtype), _randn(gen, batch, 48, dtype=dtype),
            _randn(gen, 48, 40, dtype=dtype), 0.5, 2.0)


def _linear_torch(x, w, bias):
    return T.matmul(x.reshape(-1, x.shape[-1]), w.t(), bias).reshape(*x.shape[:-1], w.shape[0])


def _linear_triton(x, w, bias):
    from . import launch

    return launch.matmul(x.reshape(-1, x.shape[-1]), w.t(), bias).reshape(*x.shape[:-1], w.shape[0])


def _addmm(mm):
    def body(c, a, b, beta, alpha):
        if beta == 1 and alpha == 1 and c.dim() == 1 and c.shape[0] == b.shape[1]:
            return mm(a, b, c)  # a bias row: linear's fp32 epilogue, one rounding
        out = mm(a, b, None)
        out = out if alpha == 1 else out * alpha
        if beta != 0:
            out = out + (c if beta == 1 else c * beta)
        return out

    return body


def _addmm_triton(c, a, b, beta, alpha):
    from . import launch

    return _addmm(launch.matmul)(c, a, b, beta, alpha)


def _addmm_fake(c, a, b, beta, alpha):
    out_shape = torch.broadcast_shapes(c.shape, (a.shape[0], b.shape[1])) if beta != 0 else (a.shape[0], b.shape[1])
    return a.new_empty(out_shape)


SPECS = (
    OpSpec(name="mm", schema="(Tensor a, Tensor b, Tensor? bias) -> Tensor",
           fake=lambda a, b, bias: a.new_empty(a.shape[0], b.shape[1]),
           torch_path=T.matmul, launcher="matmul", reference=R.mm_reference, folder="matmul",
           sample=_mm_sample, table="matmul", routed=(torch.mm, torch.Tensor.mm, torch.matmul, torch.Tensor.matmul,
                                                      torch.Tensor.__matmul__, torch.einsum),
           public="mm"),
    OpSpec(name="bmm", schema="(Tensor a, Tensor b) -> Tensor",
           fake=lambda a, b: a.new_empty(a.shape[0], a.shape[1], b.shape[2]),
           torch_path=T.bmm, launcher="bmm", reference=R.bmm_reference, folder="matmul", sample=_bmm_sample,
           batched=(0, 1), table="matmul",
           routed=(torch.bmm, torch.Tensor.bmm, torch.baddbmm, torch.Tensor.baddbmm), public="bmm"),
    OpSpec(name="linear", schema="(Tensor input, Tensor weight, Tensor? bias) -> Tensor",
           fake=lambda x, w, bias: x.new_empty(*x.shape[:-1], w.shape[0]),
           torch_path=_linear_torch, launcher=_linear_triton, reference=R.linear_reference, folder="matmul",
           sample=_linear_sample, table="matmul", routed=(F.linear,), public="linear"),
    OpSpec(name="addmm", schema="(Tensor input, Tensor mat1, Tensor mat2, float beta, float alpha) -> Tensor",
           fake=_addmm_fake, torch_path=_addmm(T.matmul), launcher=_addmm_triton, reference=R.addmm_reference,
           folder="matmul", sample=_addmm_sample, batched=(0, 1), table="matmul",
           routed=(torch.addmm, torch.Tensor.addmm), public="addmm"),
)
