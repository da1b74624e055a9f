"""The deterministic ops as ``torch.library`` custom ops ``jetdet::<op>``, with public wrappers whose
signatures follow ``torch.nn.functional``.

Each wrapper validates its arguments (errors name the argument), normalises shapes, and calls
the registered op ``torch.ops.jetdet.<op>`` (:mod:`jetdet.ops.registry`, eagerly when nothing needs the
dispatcher). The op body dispatches on device via :func:`jetdet.backend.backend_for`: CUDA -> Triton kernel
(``jetdet.kernels.<folder>.launch``), CPU -> the batch-invariant torch path (``jetdet.kernels.<folder>.
torch_path``). ``JETDET_BACKEND`` overrides that choice.

Every op is batch invariant: item *i* of the output is bitwise the same whatever the batch size, the item's
position in it, or (CPU) the thread count.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..kernels.conv2d.op import out_size
from . import registry
from ._checks import check_same, check_shape, check_tensor, number, pair

__all__ = [
    "linear",
    "mm",
    "addmm",
    "bmm",
    "conv2d",
    "attention",
    "layer_norm",
    "rms_norm",
    "group_norm",
    "softmax",
    "sum",
    "mean",
]

# ---------------------------------------------------------------------------------------------- matmul


_OPS = registry.OPS


def _check_mm(input, mat2, names=("input", "mat2")):
    a, b = names
    check_tensor(a, input, ndim=2)
    check_tensor(b, mat2, ndim=2)
    check_same(b, mat2, a, input)
    if input.shape[1] != mat2.shape[0]:
        raise ValueError(f"{b}: expected {input.shape[1]} rows to match {a}'s last dim, got shape {tuple(mat2.shape)}")


def mm(input: torch.Tensor, mat2: torch.Tensor) -> torch.Tensor:
    """``input @ mat2`` for 2-D ``[M, K] @ [K, N]``; batch invariant along M."""
    _check_mm(input, mat2)
    if input.numel() == 0 or mat2.numel() == 0:
        return torch.mm(input, mat2)
    return _OPS["mm"](input, mat2, None)


def addmm(input: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor, *, beta=1, alpha=1) -> torch.Tensor:
    """``beta * input + alpha * (mat1 @ mat2)``; the product is batch invariant, the rest is elementwise."""
    _check_mm(mat1, mat2, names=("mat1", "mat2"))
    check_tensor("input", input)
    check_same("input", input, "mat1", mat1)
    out_shape = (mat1.shape[0], mat2.shape[1])
    try:
        torch.broadcast_shapes(input.shape, out_shape)
    except RuntimeError:
        raise ValueError(f"input: expected a shape broadcastable to {out_shape}, got {tuple(input.shape)}") from None
    if mat1.numel() == 0 or mat2.numel() == 0:
        return torch.addmm(input, mat1, mat2, beta=beta, alpha=alpha)
    # a 1-D input of N values with beta = alpha = 1 is a bias row: linear's epilogue, kept in fp32 before the
    # final rounding; anything else is the batch-invariant product, then elementwise
    return _OPS["addmm"](input, mat1, mat2, float(beta), float(alpha))


def bmm(input: torch.Tensor, mat2: torch.Tensor) -> torch.Tensor:
    """Batched ``[B, M, K] @ [B, K, N]``; item b and row m are independent of B and M."""
    check_tensor("input", input, ndim=3)
    check_tensor("mat2", mat2, ndim=3)
    check_same("mat2", mat2, "input", input)
    if input.shape[0] != mat2.shape[0] or input.shape[2] != mat2.shape[1]:
        raise ValueError(
            f"mat2: expected shape ({input.shape[0]}, {input.shape[2]}, N) for input {tuple(input.shape)}, "
            f"got {tuple(mat2.shape)}"
        )
    if input.numel() == 0 or mat2.numel() == 0:
        return torch.bmm(input, mat2)
    return _OPS["bmm"](input, mat2)


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``input @ weight.T + bias`` like ``F.linear``; input ``[..., K]``, weight ``[N, K]``, bias ``[N]``."""
    check_tensor("input", input, min_ndim=1)
    check_tensor("weight", weight, ndim=2)
    check_same("weight", weight, "input", input)
    if weight.shape[1] != input.shape[-1]:
        raise ValueError(
            f"weight: expected shape (N, {input.shape[-1]}) to match input's last dim, "
            f"got {tuple(weight.shape)}"
        )
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        check_same("bias", bias, "input", input)
        check_shape("bias", bias, (weight.shape[0],), "one value per output feature")
    if input.numel() == 0 or weight.numel() == 0:  # nothing to reduce: torch's result is exact
        return F.linear(input, weight, bias)
    return _OPS["linear"](input, weight, bias)


# ---------------------------------------------------------------------------------------------- conv2d


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """Like ``F.conv2d`` for NCHW or channels-last input (the output keeps the input's layout), groups=1,
    dilation=1, zero padding (int, pair or ``"same"``/``"valid"``). Batch invariant: output item b depends only on
    input item b."""
    check_tensor("input", input, ndim=(3, 4))
    check_tensor("weight", weight, ndim=4)
    check_same("weight", weight, "input", input)
    if groups != 1:
        raise ValueError(f"groups: jetdet.ops.conv2d supports groups=1 only, got {groups}")
    if pair("dilation", dilation) != (1, 1):
        raise ValueError(f"dilation: jetdet.ops.conv2d supports dilation=1 only, got {dilation}")
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"weight: expected {x.shape[1]} input channels (dim 1) to match input, got {tuple(weight.shape)}"
        )
    s = pair("stride", stride)
    if min(s) < 1:
        raise ValueError(f"stride: expected positive ints, got {stride}")
    if isinstance(padding, str):
        if padding == "valid":
            p = (0, 0)
        elif padding == "same":
            if s != (1, 1) or weight.shape[2] % 2 == 0 or weight.shape[3] % 2 == 0:
                raise ValueError("padding: 'same' is supported for stride 1 and odd kernel sizes only")
            p = (weight.shape[2] // 2, weight.shape[3] // 2)
        else:
            raise ValueError(f"padding: expected an int, a pair, 'same' or 'valid', got {padding!r}")
    else:
        p = pair("padding", padding)
        if min(p) < 0:
            raise ValueError(f"padding: expected non-negative ints, got {padding}")
    ho, wo = out_size(x, weight, s, p)
    if ho <= 0 or wo <= 0:
        raise ValueError(
            f"input: spatial size {tuple(x.shape[2:])} is too small for kernel {tuple(weight.shape[2:])} "
            f"with padding {p}"
        )
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        check_same("bias", bias, "input", input)
        check_shape("bias", bias, (weight.shape[0],), "one value per output channel")
    if x.numel() == 0 or weight.numel() == 0:
        out = F.conv2d(x, weight, bias, s, p)
    else:
        out = _OPS["conv2d"](x, weight, bias, list(s), list(p))
    return out.squeeze(0) if unbatched else out


# ------------------------------------------------------------------------------------------- attention




def attention(q, k, v, attn_mask=None, scale=None) -> torch.Tensor:
    """``softmax(q @ k.T * scale + mask) @ v`` with q ``[B, H, Nq, D]``, k ``[B, H, Nk, D]``,
    v ``[B, H, Nk, Dv]``. ``attn_mask`` is additive (float) or boolean (True = keep), broadcastable to
    ``[B, H, Nq, Nk]``. KV is reduced in a fixed order with a fixed block size, so item b is independent
    of B. A query row whose mask removes every key gives 0, as torch's SDPA does (since 2.5)."""
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    check_tensor("v", v, ndim=4)
    check_same("k", k, "q", q)
    check_same("v", v, "q", q)
    b, h, nq, d = q.shape
    if k.shape[:2] != (b, h) or k.shape[3] != d:
        raise ValueError(f"k: expected shape ({b}, {h}, Nk, {d}) to match q, got {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v: expected shape {tuple(k.shape[:3])} + (Dv,) to match k, got {tuple(v.shape)}")
    if scale is None:
        scale = 1.0 / math.sqrt(d) if d > 0 else 1.0
    scale = float(scale)
    mask = None
    if attn_mask is not None:
        check_tensor("attn_mask", attn_mask, dtypes=(torch.bool, torch.float32, torch.float16, torch.bfloat16))
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask: expected device {q.device} (like q), got {attn_mask.device}")
        target = (b, h, nq, k.shape[2])
        try:
            torch.broadcast_shapes(attn_mask.shape, target)
        except RuntimeError:
            raise ValueError(
                f"attn_mask: expected a shape broadcastable to {target}, got {tuple(attn_mask.shape)}"
            ) from None
        if attn_mask.dtype == torch.bool:
            mask = torch.zeros(attn_mask.shape, dtype=torch.float32, device=q.device)
            mask.masked_fill_(~attn_mask, float("-inf"))
        else:
            mask = attn_mask.to(torch.float32)
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return _OPS["attention"](q, k, v, mask, scale)


# ----------------------------------------------------------------------------------------------- norms


def _norm_shape(name, normalized_shape, x):
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    if not isinstance(normalized_shape, (tuple, list, torch.Size)) or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in normalized_shape):
        raise TypeError(f"{name}: expected an int or a sequence of ints, got {normalized_shape!r}")
    normalized_shape = tuple(int(s) for s in normalized_shape)
    if len(normalized_shape) == 0 or tuple(x.shape[-len(normalized_shape) :]) != normalized_shape:
        raise ValueError(
            f"{name}: expected the trailing dims of input, got {normalized_shape} for input "
            f"{tuple(x.shape)}"
        )
    return normalized_shape








def _affine(name, t, shape, x):
    if t is None:
        return None
    check_tensor(name, t)
    check_same(name, t, "input", x, dtype=False)
    check_shape(name, t, shape)
    return t.reshape(-1)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5) -> torch.Tensor:
    """Like ``F.layer_norm``; one row per program, fixed reduction order."""
    check_tensor("input", input, min_ndim=1)
    ns = _norm_shape("normalized_shape", normalized_shape, input)
    w = _affine("weight", weight, ns, input)
    b = _affine("bias", bias, ns, input)
    if input.numel() == 0:
        return F.layer_norm(input, ns, weight, bias, eps)
    c = math.prod(ns)
    x2 = input.reshape(-1, c)
    return _OPS["layer_norm"](x2, w, b, number("eps", eps)).reshape(input.shape)


def rms_norm(input, normalized_shape, weight=None, eps=None) -> torch.Tensor:
    """Like ``F.rms_norm``. ``eps`` defaults as in torch: the machine epsilon of the type the op computes in, which
    for fp16 and bf16 inputs is fp32 (torch's ``opmath_t``), not the input's own (bf16's is 2**-7: on small rows that
    was a visible difference from torch)."""
    check_tensor("input", input, min_ndim=1)
    ns = _norm_shape("normalized_shape", normalized_shape, input)
    w = _affine("weight", weight, ns, input)
    if eps is None:
        eps = torch.finfo(torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype).eps
    if input.numel() == 0:
        return input.clone()
    c = math.prod(ns)
    return _OPS["rms_norm"](input.reshape(-1, c), w, number("eps", eps)).reshape(input.shape)


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5) -> torch.Tensor:
    """Like ``F.group_norm`` for ``[B, C, *]``; one program per (sample, group). The output keeps a
    channels-last 4-D input's layout (read in place, no copy), as torch's group_norm; any other input gives
    contiguous output."""
    check_tensor("input", input, min_ndim=2)
    c = input.shape[1]
    if not isinstance(num_groups, int) or num_groups < 1 or c % num_groups:
        raise ValueError(f"num_groups: expected a positive divisor of the {c} channels, got {num_groups}")
    w = _affine("weight", weight, (c,), input)
    b = _affine("bias", bias, (c,), input)
    if input.numel() == 0:
        return F.group_norm(input, num_groups, weight, bias, eps)
    # the op takes [B, C, *spatial] as it is: a [B, C, H*W] view of channels-last input would be neither layout
    return _OPS["group_norm"](input, num_groups, w, b, number("eps", eps))


# ------------------------------------------------------------------------------- softmax and reductions








def _dim(name, dim, ndim):
    if not isinstance(dim, int) or not -ndim <= dim < ndim:
        raise ValueError(f"{name}: expected an int in [{-ndim}, {ndim - 1}], got {dim!r}")
    return dim % ndim


def softmax(input, dim=-1) -> torch.Tensor:
    """Softmax along ``dim`` (computed along the last dim after a move), fp32 inside."""
    check_tensor("input", input, min_ndim=1)
    d = _dim("dim", dim, input.dim())
    if input.numel() == 0:
        return torch.softmax(input, d)
    x = input.movedim(d, -1)
    shape = x.shape
    out = _OPS["softmax"](x.reshape(-1, shape[-1]))
    return out.reshape(shape).movedim(-1, d)


def _reduce(op, input, dim, keepdim):
    check_tensor("input", input, min_ndim=1)
    if dim is None:
        dims = list(range(1, input.dim())) if input.dim() > 1 else [0]
    else:
        dims = [dim] if isinstance(dim, int) else list(dim) if isinstance(dim, (tuple, list)) else None
        if not dims:  # torch reads an empty dim list as every dim; say which dims instead
            raise ValueError(f"dim: expected an int or a non-empty tuple of ints (None: every dim but the batch dim "
                             f"0), got {dim!r}")
        norm = [_dim("dim", d, input.dim()) for d in dims]
        if len(set(norm)) != len(norm):
            raise ValueError(f"dim: each dim at most once, got {dim!r}")
        dims = sorted(norm)
    if type(keepdim) is not bool:
        raise TypeError(f"keepdim: expected a bool, got {keepdim!r}")
    keep = [d for d in range(input.dim()) if d not in dims]
    x = input.permute(*keep, *dims)
    kept_shape = [input.shape[d] for d in keep]
    if input.numel() == 0:
        fn = torch.sum if op == "sum" else torch.mean
        return fn(input.float(), dim=dims, keepdim=keepdim).to(input.dtype)
    x2 = x.reshape(math.prod(kept_shape), -1)
    out = _OPS[op](x2).reshape(kept_shape)
    if keepdim:
        for d in dims:
            out = out.unsqueeze(d)
    return out


def sum(input, dim=None, keepdim=False) -> torch.Tensor:  # noqa: A001 - mirrors torch.sum
    """Sum over ``dim`` (default: every dim but the batch dim 0), fp32 accumulation in a fixed order."""
    return _reduce("sum", input, dim, keepdim)


def mean(input, dim=None, keepdim=False) -> torch.Tensor:  # noqa: A001 - mirrors torch.mean
    """Mean over ``dim`` (default: every dim but the batch dim 0), fp32 accumulation in a fixed order."""
    return _reduce("mean", input, dim, keepdim)

