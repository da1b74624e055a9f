"""Row softmax and row sum/mean: one program per row, fixed-order chunked reduction in fp32.

Each row of length ``n`` is walked in chunks of ``BLOCK`` (a constexpr from the launch table, keyed by
``n``); chunks are combined lane-wise into a ``[BLOCK]`` accumulator and the lanes are reduced once at the
end, so the order of every operation depends only on ``n`` and ``BLOCK``: a row's result is bitwise the
same whatever the number of rows or its position.
"""

import triton
import triton.language as tl


@triton.jit
def softmax_kernel(x_ptr, out_ptr, stride_xr, stride_xc, stride_or, stride_oc, n, BLOCK: tl.constexpr):
    """``out = exp(x - max) / sum(exp(x - max))`` over row ``program_id(0)``: max, sum, write passes."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xr
    o_row = out_ptr + row * stride_or
    offs = tl.arange(0, BLOCK)

    m_acc = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(0, n, BLOCK):
        cols = start + offs
        x = tl.load(x_row + cols * stride_xc, mask=cols < n, other=float("-inf")).to(tl.float32)
        m_acc = tl.maximum(m_acc, x)
    m = tl.max(m_acc, 0)

    l_acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        cols = start + offs
        ok = cols < n
        x = tl.load(x_row + cols * stride_xc, mask=ok, other=float("-inf")).to(tl.float32)
        # padding lanes are exp(-inf - m) = 0; a row of all -inf (m = -inf) gives NaN, like torch.softmax
        l_acc += tl.where(ok, tl.exp(x - m), 0.0)
    inv = 1.0 / tl.sum(l_acc, 0)

    for start in range(0, n, BLOCK):
        cols = start + offs
        ok = cols < n
        x = tl.load(x_row + cols * stride_xc, mask=ok, other=float("-inf")).to(tl.float32)
        tl.store(o_row + cols * stride_oc, (tl.exp(x - m) * inv).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def sum_rows_kernel(x_ptr, out_ptr, stride_xr, stride_xc, n, MEAN: tl.constexpr, BLOCK: tl.constexpr):
    """``out[row] = sum(x[row, :])`` (divided by ``n`` when ``MEAN``), accumulated in fp32."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xr
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        cols = start + offs
        acc += tl.load(x_row + cols * stride_xc, mask=cols < n, other=0.0).to(tl.float32)
    total = tl.sum(acc, 0)
    if MEAN:
        total = total / n
    tl.store(out_ptr + row, total.to(out_ptr.dtype.element_ty))
