"""Deterministic mode's routed calls make no host sync and build no tensor from host data between the torch call
and the kernel launch, so a deterministic model can be captured in a CUDA graph (``torch.compile(mode=
"reduce-overhead")`` or ``torch.cuda.graph``): inside a capture a sync (``.item()``, ``bool(t)``, ``nonzero``)
raises, and a tensor made from Python data is copied once at capture and never again at replay.

The kernel launches are stubbed (``static_report.stub_launches``) and every aten op the call dispatches is
recorded, so this runs on CPU: it checks the path a GPU takes (the Triton launchers), on warm caches (a capture
comes after warm-up calls; the first call may pack a weight). ``bench/gpu_check.py``'s ``compiled`` section
captures the DiT stack on a GPU. The negative control puts a sync into the launch and sees it reported.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import jetdet
from jetdet import static_report
from jetdet.models import TinyDiT, TinyUNet, make_toy_inputs

#: aten ops that wait for the device (a value or a data-dependent shape read on the host) or put host data into a
#: new tensor
_FORBIDDEN = ("_local_scalar_dense", "is_nonzero", "item", "nonzero", "masked_select", "unique", "lift_fresh",
              "_assert_async")


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.bad: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if any(name == f or name.startswith(f + "_") for f in _FORBIDDEN):
            self.bad.append(str(func))
        return func(*args, **(kwargs or {}))


def _forbidden_ops(fn, on_launch=None) -> tuple[list[str], int]:
    """(forbidden aten ops dispatched by the second call of ``fn`` in deterministic mode, kernel launches)."""
    launched = []

    def launch(kernel, args, kwargs, grid):
        launched.append(kernel)
        if on_launch is not None:
            on_launch(kernel, args, kwargs, grid)

    with torch.no_grad(), static_report.stub_launches(launch), jetdet.mode("deterministic"):
        fn()  # warm-up: tables read, weights packed
        launched.clear()
        rec = _Recorder()
        with rec:
            fn()
    return rec.bad, len(launched)


def _cases(dev, dtype):
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dev, dtype)

    x, w, b = r(2, 17, 64), r(48, 64), r(48)
    a2, m2 = r(33, 64), r(64, 40)
    a3, m3 = r(3, 33, 64), r(3, 64, 40)
    q, k, v = r(2, 3, 40, 32), r(2, 3, 24, 32), r(2, 3, 24, 32)
    bool_mask = torch.rand(40, 24, generator=g).to(dev) > 0.3
    bool_mask[:, 0] = True
    float_mask = r(2, 1, 40, 24)
    img = r(2, 8, 9, 11)
    img_cl = img.contiguous(memory_format=torch.channels_last)
    cw, cw1 = r(12, 8, 3, 3), r(12, 8, 1, 1)
    vol, w3 = r(1, 4, 5, 6, 7), r(6, 4, 3, 3, 3)
    ln, gn = nn.LayerNorm(64).to(dev, dtype), nn.GroupNorm(4, 8).to(dev, dtype)
    cases = {
        "linear": lambda: F.linear(x, w, b),
        "mm": lambda: torch.mm(a2, m2),
        "addmm": lambda: torch.addmm(r(40), a2, m2),
        "bmm": lambda: torch.bmm(a3, m3),
        "baddbmm": lambda: torch.baddbmm(r(3, 33, 40), a3, m3),
        "matmul 3d@2d": lambda: x @ w.t(),
        "matmul 4d": lambda: q @ k.transpose(-1, -2),
        "einsum": lambda: torch.einsum("bhnd,bhmd->bhnm", q, k),
        "conv2d 3x3": lambda: F.conv2d(img, cw, None, 1, 1),
        "conv2d 3x3 channels-last stride 2": lambda: F.conv2d(img_cl, cw, None, 2, 1),
        "conv2d 1x1": lambda: F.conv2d(img, cw1),
        "conv3d": lambda: F.conv3d(vol, w3, None, 1, 1),
        "layer_norm": lambda: ln(x),
        "group_norm": lambda: gn(img),
        "softmax": lambda: torch.softmax(x, -1),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        "sdpa bool mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask),
        "sdpa float mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=float_mask),
        "sdpa causal": lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True),
        "sdpa 3-d": lambda: F.scaled_dot_product_attention(q[0], k[0], v[0]),
        "sum dim 1": lambda: x.sum(1),
        "mean dims (1, 2)": lambda: torch.mean(x, (1, 2)),
        "vector_norm": lambda: torch.linalg.vector_norm(x, dim=-1, keepdim=True),
    }
    if hasattr(F, "rms_norm"):
        cases["rms_norm"] = lambda: F.rms_norm(x, (64,), r(64))
    return cases


_NAMES = list(_cases("cpu", torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", _NAMES)
def test_routed_call_is_capture_safe(triton_backend, name, dtype):
    bad, launches = _forbidden_ops(_cases(triton_backend, dtype)[name])
    assert launches, f"{name}: no jetdet kernel was launched (the call was not routed)"
    assert not bad, f"{name} ({dtype}): host syncs or host-data tensors on the routed path: {bad}"


@pytest.mark.parametrize("cls", [TinyDiT, TinyUNet], ids=lambda c: c.__name__)
def test_model_forward_is_capture_safe(triton_backend, cls):
    torch.manual_seed(0)
    model = cls().eval().to(triton_backend)
    inputs = [t.to(triton_backend) for t in make_toy_inputs(4)]
    inputs = inputs if cls is TinyDiT else inputs[:2]
    bad, launches = _forbidden_ops(lambda: model(*inputs))
    assert launches > 10, launches
    assert not bad, f"{cls.__name__}: host syncs or host-data tensors in a deterministic forward: {bad}"


def test_negative_control_a_sync_in_the_launch_is_seen(triton_backend):
    """A launcher that read a value on the host (here: the first input's first element, as a launcher sizing its
    grid from a tensor would) is reported."""
    def read_a_value(kernel, args, kwargs, grid):
        next(a for a in args if isinstance(a, torch.Tensor)).reshape(-1)[0].item()

    fn = _cases(triton_backend, torch.float32)["linear"]
    bad, _ = _forbidden_ops(fn, on_launch=read_a_value)
    assert any("_local_scalar_dense" in b for b in bad), bad
    bad, _ = _forbidden_ops(lambda: (fn(), torch.tensor([1.0, 2.0], device=triton_backend)))
    assert any("lift_fresh" in b for b in bad), bad
