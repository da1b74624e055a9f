"""The router's direct Triton route (``jetdet.mode._direct``): in deterministic mode a routed call on plain tensors
that the Triton kernels serve (CUDA tensors; CPU tensors under ``JETDET_BACKEND=triton``, in the interpreter) goes
from the handler straight to the op's launcher, skipping the public op's argument checks and the custom-op entry
(host time per call: ``python bench/host_cost.py``). It must give bit for bit what the public op gives, in the
same layout; it must decline what it does not check (autograd, mixed dtypes, string padding, a dtype= softmax),
and bad shapes must still reach the public op's clear errors."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import jetdet
from jetdet import ops

mode_mod = importlib.import_module("jetdet.mode")  # the module (``jetdet.mode`` the attribute is the context manager)


def _calls(dtype):
    """(name, routed call, public-op call) on shapes with tails; every routed call here takes the direct route."""
    g = torch.Generator().manual_seed(0)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(torch.get_default_device())

    x, w, b = r(3, 7, 19), r(13, 19, scale=0.3), r(13)
    img, gw, gb = r(2, 6, 5, 9), r(6), r(6)
    img_cl = img.contiguous(memory_format=torch.channels_last)
    cw, cb, pw = r(5, 6, 3, 3, scale=0.2), r(5), r(4, 6, 1, 1, scale=0.4)
    q, k, v = r(2, 3, 17, 8), r(2, 3, 11, 8), r(2, 3, 11, 8)
    vq = r(2, 1, 6, 512)  # a VAE mid block's attention: one head over 512 channels, past the kernel's head dims
    lw, lb = r(19), r(19)
    return [
        ("linear", lambda: F.linear(x, w, b), lambda: ops.linear(x, w, b)),
        ("linear 1-D", lambda: F.linear(x[0, 0], w), lambda: ops.linear(x[0, 0], w)),
        ("layer_norm", lambda: F.layer_norm(x, (19,), lw, lb, 1e-6), lambda: ops.layer_norm(x, (19,), lw, lb, 1e-6)),
        ("layer_norm int shape", lambda: F.layer_norm(x, 19), lambda: ops.layer_norm(x, 19)),
        ("group_norm", lambda: F.group_norm(img, 3, gw, gb), lambda: ops.group_norm(img, 3, gw, gb)),
        ("group_norm channels-last", lambda: F.group_norm(img_cl, 2), lambda: ops.group_norm(img_cl, 2)),
        ("sdpa", lambda: F.scaled_dot_product_attention(q, k, v), lambda: ops.attention(q, k, v)),
        ("sdpa scale", lambda: F.scaled_dot_product_attention(q, k, v, scale=0.3),
         lambda: ops.attention(q, k, v, scale=0.3)),
        ("sdpa head dim 512", lambda: F.scaled_dot_product_attention(vq, vq, vq), lambda: ops.attention(vq, vq, vq)),
        ("conv2d 3x3", lambda: F.conv2d(img, cw, cb, 1, 1), lambda: ops.conv2d(img, cw, cb, 1, 1)),
        ("conv2d channels-last stride (2, 1)", lambda: F.conv2d(img_cl, cw, None, (2, 1), (1, 0)),
         lambda: ops.conv2d(img_cl, cw, None, (2, 1), (1, 0))),
        ("conv2d 1x1", lambda: torch.conv2d(img, pw), lambda: ops.conv2d(img, pw)),
        ("softmax last", lambda: torch.softmax(x, -1), lambda: ops.softmax(x, -1)),
        ("softmax dim 1", lambda: F.softmax(x, dim=1), lambda: ops.softmax(x, 1)),
        ("softmax method dim 0", lambda: x.softmax(0), lambda: ops.softmax(x, 0)),
    ]


def _spy(monkeypatch):
    taken = []
    orig = mode_mod._run_triton
    monkeypatch.setattr(mode_mod, "_run_triton", lambda name, *a: taken.append(name) or orig(name, *a))
    return taken


def _same(a, b):
    return a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_direct_triton_route_equals_the_public_ops(triton_backend, monkeypatch, dtype):
    taken = _spy(monkeypatch)
    with torch.no_grad():
        for name, routed, public in _calls(dtype):
            taken.clear()
            with jetdet.mode("deterministic"):
                got = routed()
            assert taken, f"{name}: the direct route was not taken"
            want = public()
            assert _same(got, want), name


def test_direct_triton_route_declines_what_it_does_not_check(triton_backend, monkeypatch):
    """Autograd to record, mixed dtypes, string padding and softmax's dtype= take the full path, with the same
    results as the public ops."""
    taken = _spy(monkeypatch)
    dev = torch.get_default_device()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 16, generator=g).to(dev)
    x16 = x.half()
    w32, b32 = torch.randn(16, generator=g).to(dev), torch.randn(16, generator=g).to(dev)
    img = torch.randn(2, 4, 6, 6, generator=g).to(dev)
    cw = (torch.randn(3, 4, 3, 3, generator=g) * 0.3).to(dev)
    lin = (torch.randn(8, 16, generator=g) * 0.3).to(dev).requires_grad_(True)
    cases = [
        ("autograd", lambda: F.linear(x, lin), lambda: ops.linear(x, lin)),
        ("fp32 affine on fp16 input", lambda: F.layer_norm(x16, (16,), w32, b32),
         lambda: ops.layer_norm(x16, (16,), w32, b32)),
        ("padding='same'", lambda: F.conv2d(img, cw, None, 1, "same"), lambda: ops.conv2d(img, cw, None, 1, "same")),
        ("softmax dtype=", lambda: torch.softmax(x16, -1, dtype=torch.float32), lambda: ops.softmax(x16.float(), -1)),
    ]
    for name, routed, public in cases:
        taken.clear()
        with jetdet.mode("deterministic"):
            got = routed()
        assert not taken, f"{name}: the direct route took a call it does not check"
        assert torch.equal(got.detach(), public().detach()), name


def test_direct_triton_route_keeps_clear_errors(triton_backend):
    """Bad shapes are not taken by the direct route: they reach the public op and its argument checks."""
    dev = torch.get_default_device()
    with jetdet.mode("deterministic"), torch.no_grad():
        with pytest.raises(ValueError, match="weight"):
            F.linear(torch.randn(4, 8, device=dev), torch.randn(3, 7, device=dev))
        with pytest.raises(ValueError, match="num_groups"):
            F.group_norm(torch.randn(2, 6, 4, 4, device=dev), 4)
        with pytest.raises(ValueError, match="normalized_shape"):
            F.layer_norm(torch.randn(2, 6, device=dev), (5,))
        with pytest.raises(ValueError, match="weight"):
            F.conv2d(torch.randn(1, 3, 5, 5, device=dev), torch.randn(2, 4, 3, 3, device=dev))
        with pytest.raises(ValueError, match="spatial size"):
            F.conv2d(torch.randn(1, 3, 2, 2, device=dev), torch.randn(2, 3, 3, 3, device=dev))
        with pytest.raises(ValueError, match="dim"):
            torch.softmax(torch.randn(2, 3, device=dev), 2)


def test_cpu_fp32_without_override_keeps_the_cpu_route(monkeypatch):
    """Plain fp32 CPU tensors with JETDET_BACKEND unset still take the CPU route, not the Triton one."""
    monkeypatch.delenv("JETDET_BACKEND", raising=False)
    taken = _spy(monkeypatch)
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    with jetdet.mode("deterministic"), torch.no_grad():
        got = F.linear(x, w)
    assert not taken and torch.equal(got, ops.linear(x, w))
    assert mode_mod._direct(x, w) == "torch" and mode_mod._direct(x.half(), w.half()) is None
    assert mode_mod._direct(x, w.double()) is None
