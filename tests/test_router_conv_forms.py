"""Every convolution form under deterministic mode (jetdet/conv_forms.py): 1-D, 3-D, dilated, grouped, depthwise,
``padding="same"`` with any kernel, and the transposed convolutions, rebuilt from batch-invariant conv2d calls and
elementwise arithmetic. Each form must match float64 torch within the ops tolerance, give every item alone the bits
it has in the batch (prefixes and a needle, compared bitwise), and raise no fallback warning. Negative control:
torch's own forms of the same calls depend on the batch on this CPU."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _invariance import assert_batch_invariant, batch_mismatches
from _tolerances import OPS_MAX_ERR, assert_max_err

import jetdet


def _det(fn, *a, **k):
    with torch.no_grad(), jetdet.mode("deterministic"):
        return fn(*a, **k)


def _r(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape)))


# (function, input shape, weight shape, bias, keyword arguments); batch 4 where batched
CASES = {
    "conv1d-stride2": (F.conv1d, (4, 6, 40), (8, 6, 5), True, dict(stride=2, padding=2)),
    "conv1d-dilation3": (F.conv1d, (4, 6, 40), (6, 6, 7), True, dict(dilation=3, padding=9)),  # Oobleck's units
    "conv1d-depthwise-same": (F.conv1d, (4, 6, 40), (6, 1, 7), False, dict(groups=6, padding="same")),
    "conv1d-groups-same-even": (F.conv1d, (4, 6, 40), (8, 3, 4), False, dict(groups=2, padding="same")),
    "conv2d-groups2": (F.conv2d, (4, 8, 13, 11), (8, 4, 3, 3), True, dict(groups=2, padding=1)),
    "conv2d-depthwise7-x2-stride2": (F.conv2d, (4, 8, 13, 11), (16, 1, 7, 7), True,
                                     dict(groups=8, padding=3, stride=2)),
    "conv2d-dilation2": (F.conv2d, (4, 8, 13, 11), (5, 8, 3, 3), True, dict(dilation=2, padding=2)),
    "conv2d-dilation23-same": (F.conv2d, (4, 8, 13, 11), (5, 8, 3, 2), True, dict(dilation=(2, 3), padding="same")),
    "conv2d-dilation-stride-groups": (F.conv2d, (4, 8, 13, 11), (6, 4, 3, 3), True,
                                      dict(dilation=2, stride=2, groups=2, padding=1)),
    "conv2d-same-even": (F.conv2d, (4, 8, 13, 11), (5, 8, 4, 4), False, dict(padding="same")),
    "conv3d-groups-dilation": (F.conv3d, (3, 4, 5, 8, 8), (6, 2, 3, 3, 3), True,
                               dict(groups=2, padding=1, dilation=(2, 1, 2))),
    "conv3d-same": (F.conv3d, (3, 4, 5, 8, 8), (6, 4, 3, 3, 3), True, dict(padding="same")),
    "convT1d-stride4": (F.conv_transpose1d, (3, 6, 9), (6, 4, 8), True, dict(stride=4, padding=2)),  # Oobleck's
    "convT2d-stride2": (F.conv_transpose2d, (3, 6, 5, 7), (6, 4, 4, 4), True, dict(stride=2, padding=1)),
    "convT2d-outpad-groups": (F.conv_transpose2d, (3, 6, 5, 7), (6, 2, 3, 3), True,
                              dict(stride=2, padding=1, output_padding=1, groups=2)),
    "convT2d-dilation": (F.conv_transpose2d, (3, 6, 5, 7), (6, 3, 3, 3), False, dict(dilation=2, padding=3)),
    "convT2d-crop": (F.conv_transpose2d, (3, 6, 5, 7), (6, 4, 3, 3), False, dict(stride=3, padding=4)),
    "convT3d": (F.conv_transpose3d, (2, 4, 3, 5, 5), (4, 3, 3, 4, 4), True, dict(stride=(1, 2, 2), padding=1)),
}


def _case(name, dtype=torch.float32):
    fn, xs, ws, bias, kw = CASES[name]
    x, w = _r(*xs).to(dtype), (_r(*ws, seed=1) * 0.3).to(dtype)
    b = _r(ws[1] * kw.get("groups", 1) if "transpose" in fn.__name__ else ws[0], seed=2).to(dtype) if bias else None
    return fn, x, w, b, kw


def _ref(fn, x, w, b, kw):
    return fn(x.double(), w.double(), None if b is None else b.double(), **kw)


def _check(name, dtype=torch.float32):
    fn, x, w, b, kw = _case(name, dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="jetdet")  # no fallback: the form is routed
        out = _det(fn, x, w, b, **kw)
    ref = _ref(fn, x, w, b, kw)
    assert out.shape == ref.shape and out.dtype == dtype
    # contiguous like torch's: model code views conv outputs (HunyuanVideo's VAE attention does)
    assert out.is_contiguous() == fn(x, w, b, **kw).is_contiguous(), name
    assert_max_err(out.float(), ref.float(), OPS_MAX_ERR[dtype], name)
    assert_batch_invariant(lambda x: _det(fn, x, w, b, **kw), [x], prefixes=(1, 2), slots=(x.shape[0] - 1,),
                           full=out, label=name)


@pytest.mark.parametrize("name", sorted(CASES))
def test_conv_forms_match_torch_and_are_batch_invariant(name):
    _check(name)


@pytest.mark.parametrize("name", ["conv1d-dilation3", "conv2d-depthwise7-x2-stride2", "convT2d-outpad-groups"])
def test_conv_forms_in_bf16(name):
    _check(name, torch.bfloat16)


@pytest.mark.parametrize("name", ["conv1d-dilation3", "conv2d-groups2", "convT2d-stride2"])
def test_conv_forms_on_the_triton_path(name, triton_backend):
    """The same forms with jetdet's conv2d as the Triton kernel (the interpreter on CPU, compiled on a GPU)."""
    _check(name)


def test_unbatched_inputs_are_the_batched_item():
    for name in ("conv1d-groups-same-even", "convT2d-stride2", "conv3d-same"):
        fn, x, w, b, kw = _case(name)
        assert torch.equal(_det(fn, x[1], w, b, **kw), _det(fn, x[1:2], w, b, **kw)[0]), name
        torch.testing.assert_close(_det(fn, x[1], w, b, **kw), fn(x[1], w, b, **kw), atol=1e-4, rtol=0)


def test_modules_with_their_own_padding_and_output_size():
    torch.manual_seed(0)
    conv = nn.Conv1d(4, 6, 5, padding=4, dilation=2, padding_mode="reflect")  # the module pads, then F.conv1d
    up = nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1)
    x1, x2 = torch.randn(3, 4, 30), torch.randn(3, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(_det(conv, x1), conv(x1), atol=1e-5, rtol=0)
        # output_size picks output_padding 1
        y = _det(up, x2, output_size=(12, 12))
        assert y.shape == (3, 3, 12, 12)
        torch.testing.assert_close(y, up(x2, output_size=(12, 12)), atol=1e-5, rtol=0)
        assert torch.equal(_det(up, x2[2:], output_size=(12, 12))[0], y[2])


def test_calls_torch_refuses_raise_torch_errors():
    x, w = torch.randn(2, 6, 10), torch.randn(4, 2, 3)
    cases = [
        lambda: F.conv1d(x, w, groups=4),                   # 6 channels do not split into 4 groups
        lambda: F.conv1d(x, w[:, :1], groups=3, stride=2, padding="same"),  # "same" with a stride
        lambda: F.conv1d(x, w[:, :1].expand(4, 1, 3), groups=6),   # 4 outputs for 6 groups
        lambda: F.conv_transpose2d(torch.randn(1, 3, 4, 4), torch.randn(3, 2, 3, 3), stride=2, output_padding=2),
        lambda: F.conv2d(torch.randn(1, 4, 2, 2), torch.randn(4, 1, 3, 3), groups=4),  # kernel larger than input
        lambda: F.conv1d(x, w.double()),
    ]
    for call in cases:
        with pytest.raises(RuntimeError) as plain:
            call()
        with pytest.raises(RuntimeError) as routed, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the float64 one falls back, with its warning
            _det(call)
        assert str(routed.value) == str(plain.value)


def test_calls_torch_refuses_give_no_jetdet_warning_and_calls_it_takes_warn():
    """Bad calls raise torch's error and nothing else; a call torch takes in a form the router does not (a numpy
    int as the stride) runs as torch's, and says that it is not covered."""
    import numpy as np

    sys.modules["jetdet.mode"]._warned.clear()
    x, w = torch.randn(2, 6, 10), torch.randn(4, 2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError):
            _det(F.conv1d, x, w, groups=4)
    w3 = torch.randn(6, 2, 3)
    with pytest.warns(UserWarning, match="conv1d falls back to torch .*does not take"):
        out = _det(F.conv1d, x, w3, None, np.int64(2), 1, 1, 3)
    assert torch.equal(out, F.conv1d(x, w3, None, np.int64(2), 1, 1, 3))


def test_float64_falls_back_with_the_named_warning():
    sys.modules["jetdet.mode"]._warned.clear()
    x, w = torch.randn(2, 4, 16, dtype=torch.float64), torch.randn(4, 1, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match="conv1d falls back to torch .*float64"):
        out = _det(F.conv1d, x, w, groups=4)
    assert torch.equal(out, F.conv1d(x, w, groups=4))


def test_gradients_flow_and_match_torch():
    fn, x, w, b, kw = _case("convT2d-outpad-groups")
    for name in ("convT2d-outpad-groups", "conv2d-dilation-stride-groups", "conv1d-depthwise-same"):
        fn, x, w, b, kw = _case(name)
        grads = []
        for det in (True, False):
            xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
            with jetdet.mode("deterministic" if det else "off"):
                fn(xs, ws, b, **kw).square().sum().backward()
            grads.append((xs.grad, ws.grad))
        for g, ref in zip(*grads):
            torch.testing.assert_close(g, ref, atol=1e-4, rtol=1e-4)


def test_autocast_runs_the_forms_in_its_dtype():
    for name in ("conv1d-dilation3", "convT2d-stride2", "conv2d-groups2"):
        fn, x, w, b, kw = _case(name)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = _det(fn, x, w, b, **kw)
        assert out.dtype == torch.bfloat16, name
        assert_max_err(out.float(), _ref(fn, x, w, b, kw).float(), OPS_MAX_ERR[torch.bfloat16], name)


def test_negative_control_torch_forms_depend_on_the_batch():
    """What the routing buys: the same calls with the mode off give some items other bits than the item alone
    (oneDNN picks other algorithms for other batch sizes; which forms show it depends on the CPU)."""
    differ = []
    for name in sorted(CASES):
        fn, x, w, b, kw = _case(name)
        with torch.no_grad():
            if batch_mismatches(lambda x, fn=fn, w=w, b=b, kw=kw: fn(x, w, b, **kw), [x], prefixes=(1, 2),
                                slots=(x.shape[0] - 1,)):
                differ.append(name)
    assert differ, "torch's own forms were batch invariant here: this test shows nothing on this CPU"


def _sweep_cases(seed: int, count: int, transposed: bool):
    """Random valid calls: rank 1-3 (1-2 transposed), strides, kernels, dilations, paddings (``"same"``/
    ``"valid"`` too), output paddings, groups and depthwise ones, inputs as small as one element."""
    import random

    rng = random.Random(seed)
    out = []
    while len(out) < count:
        nd = rng.choice([1, 2] if transposed else [1, 2, 3])
        s = [rng.randint(1, 5 if transposed else 3) for _ in range(nd)]
        k = [rng.randint(1, 7 if transposed else 5) for _ in range(nd)]
        d = [1] * nd if rng.random() < 0.6 else [rng.randint(1, 3) for _ in range(nd)]
        g = rng.choice([1, 2, 3])
        cin = g if rng.random() < 0.3 else g * rng.randint(1, 3)
        n_in = [rng.randint(1, 9) for _ in range(nd)]
        if transposed:
            p = [rng.randint(0, 6) for _ in range(nd)]
            op = [rng.randint(0, max(si, di) - 1) for si, di in zip(s, d)]
            if min((i - 1) * si - 2 * pi + di * (ki - 1) + oi
                   for i, si, pi, di, ki, oi in zip(n_in, s, p, d, k, op)) < 0:
                continue
            kw = dict(stride=s, padding=p, output_padding=op, groups=g, dilation=d)
            w_shape = (cin, rng.randint(1, 2), *k)
        else:
            p = rng.choice(["same", "valid", None]) if all(v == 1 for v in s) and rng.random() < 0.3 else None
            p = p or [rng.randint(0, 3) for _ in range(nd)]
            total = [0] * nd if p == "valid" else ([di * (ki - 1) for di, ki in zip(d, k)] if p == "same"
                                                  else [2 * v for v in p])
            if min(i + t - di * (ki - 1) for i, t, di, ki in zip(n_in, total, d, k)) < 1:
                continue
            kw = dict(stride=s, padding=p, dilation=d, groups=g)
            w_shape = (g * rng.randint(1, 2), cin // g, *k)
        fns = [None, F.conv_transpose1d, F.conv_transpose2d] if transposed else [None, F.conv1d, F.conv2d, F.conv3d]
        fn = fns[nd]
        out.append((fn, (2, cin, *n_in), w_shape, rng.random() < 0.5, kw))
    return out


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "conv_transpose"])
def test_random_forms_match_torch_and_are_batch_invariant(transposed):
    bad = []
    for i, (fn, xs, ws, bias, kw) in enumerate(_sweep_cases(7 + transposed, 120, transposed)):
        x, w = _r(*xs, seed=i), _r(*ws, seed=i + 1)
        b = _r(ws[1] * kw["groups"] if transposed else ws[0], seed=i + 2) if bias else None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Using padding='same'")  # torch's own, on the reference
            ref = _ref(fn, x, w, b, kw)
            warnings.filterwarnings("error", message="jetdet")
            out = _det(fn, x, w, b, **kw)
            alone = _det(fn, x[1:], w, b, **kw)
        if out.shape != ref.shape or (out.double() - ref).abs().max() > 1e-4 * max(1.0, ref.abs().max()):
            bad.append((fn.__name__, xs, ws, kw, "wrong"))
        elif not torch.equal(alone[0], out[1]):
            bad.append((fn.__name__, xs, ws, kw, "batch variant"))
    assert not bad, bad
