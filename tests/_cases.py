"""Op cases shared by the batch-invariance and accuracy tests: (name, make_inputs(batch, dtype), call, ref).

Shapes have tails on purpose (odd sizes, non-powers of two). ``make_inputs`` returns per-item CPU tensors
(dim 0 = batch) and shared tensors; ``call(*items, *shared)`` runs the jetdet op; ``ref`` the fp32 torch
reference (accuracy tolerances: ``_tolerances.py``).
"""

import torch
import torch.nn.functional as F

import jetdet

G = torch.Generator().manual_seed(1234)


def _r(*shape, dtype=torch.float32, scale=1.0):
    # drawn on CPU (the generator is a CPU one): the same values whatever the test's default device
    return (torch.randn(*shape, generator=G, device="cpu") * scale).to(dtype)


def _f(*ts):
    return [None if t is None else t.float() for t in ts]


CASES = {
    "linear": (
        lambda b, dt: ([_r(b, 13, 65, dtype=dt)], [_r(33, 65, dtype=dt, scale=0.1), _r(33, dtype=dt)]),
        lambda x, w, bias: jetdet.ops.linear(x, w, bias),
        lambda x, w, bias: F.linear(*_f(x, w, bias)),
    ),
    "mm": (
        lambda b, dt: ([_r(b, 129, dtype=dt)], [_r(129, 47, dtype=dt, scale=0.1)]),
        lambda a, m: jetdet.ops.mm(a, m),
        lambda a, m: torch.mm(*_f(a, m)),
    ),
    "bmm": (
        lambda b, dt: ([_r(b, 70, 33, dtype=dt), _r(b, 33, 21, dtype=dt, scale=0.2)], []),
        lambda a, m: jetdet.ops.bmm(a, m),
        lambda a, m: torch.bmm(*_f(a, m)),
    ),
    "conv3x3_s1": (
        lambda b, dt: ([_r(b, 5, 13, 11, dtype=dt)], [_r(7, 5, 3, 3, dtype=dt, scale=0.2), _r(7, dtype=dt)]),
        lambda x, w, bias: jetdet.ops.conv2d(x, w, bias, stride=1, padding=1),
        lambda x, w, bias: F.conv2d(*_f(x, w, bias), stride=1, padding=1),
    ),
    "conv3x3_s2": (
        lambda b, dt: ([_r(b, 5, 13, 11, dtype=dt)], [_r(6, 5, 3, 3, dtype=dt, scale=0.2), None]),
        lambda x, w, bias: jetdet.ops.conv2d(x, w, bias, stride=2, padding=1),
        lambda x, w, bias: F.conv2d(*_f(x, w, bias), stride=2, padding=1),
    ),
    "conv1x1": (
        lambda b, dt: ([_r(b, 19, 9, 7, dtype=dt)], [_r(11, 19, 1, 1, dtype=dt, scale=0.2), _r(11, dtype=dt)]),
        lambda x, w, bias: jetdet.ops.conv2d(x, w, bias),
        lambda x, w, bias: F.conv2d(*_f(x, w, bias)),
    ),
    "attention": (
        lambda b, dt: (
            [_r(b, 3, 77, 40, dtype=dt), _r(b, 3, 29, 40, dtype=dt), _r(b, 3, 29, 24, dtype=dt)], []
        ),
        lambda q, k, v: jetdet.ops.attention(q, k, v),
        lambda q, k, v: F.scaled_dot_product_attention(*_f(q, k, v)),
    ),
    "attention_mask": (
        lambda b, dt: (
            [_r(b, 2, 21, 16, dtype=dt), _r(b, 2, 33, 16, dtype=dt), _r(b, 2, 33, 16, dtype=dt)],
            [torch.rand(1, 1, 21, 33, generator=G, device="cpu") > 0.3],
        ),
        lambda q, k, v, m: jetdet.ops.attention(
            q, k, v, attn_mask=m | torch.eye(21, 33, dtype=torch.bool, device=m.device)
        ),
        lambda q, k, v, m: F.scaled_dot_product_attention(
            *_f(q, k, v), attn_mask=m | torch.eye(21, 33, dtype=torch.bool, device=m.device)
        ),
    ),
    "layer_norm": (
        lambda b, dt: ([_r(b, 7, 100, dtype=dt, scale=3)], [_r(100, dtype=dt), _r(100, dtype=dt)]),
        lambda x, w, bias: jetdet.ops.layer_norm(x, (100,), w, bias, 1e-5),
        lambda x, w, bias: F.layer_norm(*_f(x), (100,), *_f(w, bias), 1e-5),
    ),
    "rms_norm": (
        lambda b, dt: ([_r(b, 7, 33, dtype=dt, scale=2)], [_r(33, dtype=dt)]),
        lambda x, w: jetdet.ops.rms_norm(x, (33,), w, 1e-6),
        lambda x, w: F.rms_norm(*_f(x), (33,), *_f(w), 1e-6),
    ),
    "group_norm": (
        lambda b, dt: ([_r(b, 12, 7, 5, dtype=dt, scale=2)], [_r(12, dtype=dt), _r(12, dtype=dt)]),
        lambda x, w, bias: jetdet.ops.group_norm(x, 4, w, bias, 1e-5),
        lambda x, w, bias: F.group_norm(*_f(x), 4, *_f(w, bias), 1e-5),
    ),
    "softmax": (
        lambda b, dt: ([_r(b, 9, 77, dtype=dt, scale=4)], []),
        lambda x: jetdet.ops.softmax(x, -1),
        lambda x: torch.softmax(x.float(), -1),
    ),
    "sum": (
        lambda b, dt: ([_r(b, 5, 33, dtype=dt)], []),
        lambda x: jetdet.ops.sum(x),
        lambda x: x.float().sum(dim=(1, 2)),
    ),
    "mean": (
        lambda b, dt: ([_r(b, 5, 33, dtype=dt)], []),
        lambda x: jetdet.ops.mean(x, dim=-1, keepdim=True),
        lambda x: x.float().mean(dim=-1, keepdim=True),
    ),
}
