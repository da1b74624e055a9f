"""The batch-invariant torch path of the gated GELU.

torch's CPU elementwise kernels compute an element in a vector lane or in the scalar tail loop depending on
where it sits in the tensor (and where the thread split falls), and the vector and scalar GELU differ in the
last bit. So the rows are copied into fixed fp32 tiles, ``LANES``-padded and at most ``TILE_ELEMS`` elements,
which torch runs in one chunk (below its parallel grain size) entirely in vector lanes: every element takes
the same path at the same lane whatever the batch, the row's position or the thread count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LANES = 64  # a multiple of every vector width (and of 2x the widest, which torch's loops step by)
TILE_ELEMS = 16384  # below ATen's parallel grain size (32768): one chunk, no thread split


def gelu_gate(h: torch.Tensor, approximate: str) -> torch.Tensor:
    two_h = h.shape[-1]
    n = two_h // 2
    rows = h.reshape(-1, two_h)
    r = rows.shape[0]
    out = torch.empty(r, n, dtype=h.dtype, device=h.device)
    cols = min(-(-n // LANES) * LANES, TILE_ELEMS)  # columns per tile
    tr = max(1, TILE_ELEMS // cols)  # rows per tile
    xb = torch.zeros(tr, cols, dtype=torch.float32, device=h.device)
    gb = torch.zeros(tr, cols, dtype=torch.float32, device=h.device)
    for c0 in range(0, n, cols):
        c1 = min(n, c0 + cols)
        w = c1 - c0
        if w < cols:  # the padding columns of the last column block hold zeros
            xb.zero_()
            gb.zero_()
        for r0 in range(0, r, tr):
            k = min(tr, r - r0)
            xb[:k, :w] = rows[r0 : r0 + k, c0:c1]
            gb[:k, :w] = rows[r0 : r0 + k, n + c0 : n + c1]
            y = F.gelu(gb, approximate=approximate)
            y.mul_(xb)
            out[r0 : r0 + k, c0:c1] = y[:k, :w]
    return out.reshape(*h.shape[:-1], n)
