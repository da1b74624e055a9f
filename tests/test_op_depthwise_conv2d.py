"""jetdet.ops.depthwise_conv2d beyond what tests/test_registry.py checks for every op: filters per channel,
strides, paddings, layouts, the Triton kernel (interpreter on CPU) and the torch path against torch's grouped
conv, bitwise batch invariance, and the argument errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _invariance import assert_batch_invariant
from _tolerances import OPS_MAX_ERR, assert_max_err

from jetdet import ops

CASES = [  # (C, M filters per channel, kernel, stride, padding, H, W)
    (6, 1, (3, 3), (1, 1), (1, 1), 9, 11),
    (5, 2, (7, 7), (2, 1), (3, 3), 13, 10),
    (4, 3, (3, 5), (1, 2), (0, 2), 7, 12),
    (8, 1, (1, 1), (1, 1), (0, 0), 4, 4),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", CASES, ids=[f"C{c}xM{m}_k{k[0]}x{k[1]}_s{s[0]}{s[1]}" for c, m, k, s, *_ in CASES])
def test_matches_grouped_conv_and_is_batch_invariant(case, channels_last, backend, monkeypatch):
    from _devices import on_backend

    c, m, k, s, p, h, w = case
    with on_backend(monkeypatch, backend):
        g = torch.Generator().manual_seed(c * 31 + m)
        x = torch.randn(4, c, h, w, generator=g)
        wt = torch.randn(c * m, 1, *k, generator=g) * 0.3
        b = torch.randn(c * m, generator=g)
        dev = torch.get_default_device()
        x, wt, b = x.to(dev), wt.to(dev), b.to(dev)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = ops.depthwise_conv2d(x, wt, b, s, p)
        ref = F.conv2d(x.double(), wt.double(), b.double(), s, p, groups=c)
        assert out.shape == ref.shape
        assert out.is_contiguous(memory_format=torch.channels_last) == (channels_last and c > 1 and out.shape[2] *
                                                                        out.shape[3] > 1)
        assert_max_err(out.double(), ref, OPS_MAX_ERR[torch.float32], str(case))
        assert_batch_invariant(lambda x: ops.depthwise_conv2d(x, wt, b, s, p), [x], prefixes=(1, 2), slots=(3,),
                               full=out, label=str(case))


def test_half_precision_on_the_torch_path():
    x = torch.randn(3, 6, 9, 9).to(torch.bfloat16)
    w = (torch.randn(6, 1, 3, 3) * 0.3).to(torch.bfloat16)
    out = ops.depthwise_conv2d(x, w, None, 1, 1)
    assert out.dtype == torch.bfloat16
    assert_max_err(out.float(), F.conv2d(x.float(), w.float(), None, 1, 1, groups=6), OPS_MAX_ERR[torch.bfloat16])
    assert torch.equal(ops.depthwise_conv2d(x[2:], w, None, 1, 1)[0], out[2])


@pytest.mark.parametrize("args,error,match", [
    ((torch.ones(2, 4, 5, 5), torch.ones(4, 2, 3, 3)), ValueError, r"weight: expected \[M \* 4, 1, KH, KW\]"),
    ((torch.ones(2, 4, 5, 5), torch.ones(6, 1, 3, 3)), ValueError, "weight: expected"),
    ((torch.ones(2, 4, 5, 5), torch.ones(4, 1, 3, 3), torch.ones(3)), ValueError, "bias"),
    ((torch.ones(2, 4, 2, 2), torch.ones(4, 1, 3, 3)), ValueError, "input: spatial size"),
    ((torch.ones(2, 4, 5, 5), torch.ones(4, 1, 3, 3), None, 0), ValueError, "stride, padding"),
    ((torch.ones(2, 4, 5, 5), torch.ones(4, 1, 3, 3), None, 1, (1, 1, 1)), TypeError, "padding: expected an int"),
    ((torch.ones(4, 5, 5), torch.ones(4, 1, 3, 3)), ValueError, "input"),
])
def test_bad_arguments_name_the_argument(args, error, match):
    with pytest.raises(error, match=match):
        ops.depthwise_conv2d(*args)
