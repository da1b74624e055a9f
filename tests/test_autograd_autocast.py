"""Gradients and ``torch.autocast`` through deterministic mode.

Every routed call that records autograd gets the vector-Jacobian product of its op's fp32 reference
(``jetdet/ops/registry.py``: ``Op._backward``), so ``.backward()`` works and agrees with torch's own gradients. The
forward stays the batch-invariant one; the backward is torch's (not covered by the guarantee, README "Limits").
Under ``torch.autocast`` routed calls and patched layers take autocast's dtypes (``jetdet.mode._autocast_route``)."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _devices import to_default_device

import jetdet


def _mask(g):
    m = torch.rand(2, 1, 6, 9, generator=g) > 0.3
    m[..., 0] = True
    return m


_MASK = _mask(torch.Generator().manual_seed(1))

# name -> (make(gen) -> tensors, fn(*tensors)) with every tensor a leaf that needs a gradient
CASES = {
    "linear": (lambda g: [torch.randn(3, 5, 8, generator=g), torch.randn(6, 8, generator=g),
                          torch.randn(6, generator=g)],
               lambda x, w, b: F.linear(x, w, b)),
    "matmul": (lambda g: [torch.randn(4, 7, generator=g), torch.randn(7, 5, generator=g)], lambda a, b: a @ b),
    "bmm": (lambda g: [torch.randn(2, 4, 7, generator=g), torch.randn(2, 7, 5, generator=g)], torch.bmm),
    "addmm": (lambda g: [torch.randn(5, generator=g), torch.randn(4, 7, generator=g), torch.randn(7, 5, generator=g)],
              lambda c, a, b: torch.addmm(c, a, b, beta=0.5, alpha=2.0)),
    "conv2d": (lambda g: [torch.randn(2, 4, 7, 6, generator=g), torch.randn(5, 4, 3, 3, generator=g),
                          torch.randn(5, generator=g)],
               lambda x, w, b: F.conv2d(x, w, b, stride=(2, 1), padding=1)),
    "layer_norm": (lambda g: [torch.randn(3, 4, 16, generator=g), torch.randn(16, generator=g),
                              torch.randn(16, generator=g)],
                   lambda x, w, b: F.layer_norm(x, (16,), w, b, 1e-5)),
    "group_norm": (lambda g: [torch.randn(2, 8, 3, 5, generator=g), torch.randn(8, generator=g),
                              torch.randn(8, generator=g)],
                   lambda x, w, b: F.group_norm(x, 4, w, b, 1e-5)),
    "rms_norm": (lambda g: [torch.randn(3, 16, generator=g), torch.randn(16, generator=g)],
                 lambda x, w: F.rms_norm(x, (16,), w, 1e-6)),
    "softmax": (lambda g: [torch.randn(3, 11, generator=g) * 3], lambda x: torch.softmax(x, -1)),
    "sdpa_mask": (lambda g: [torch.randn(2, 2, 6, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g),
                             torch.randn(2, 2, 9, 8, generator=g)],
                  lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=_MASK.to(q.device))),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_match_torch(backend, name):
    """The same loss, mode off against deterministic mode: every input's gradient agrees (fp32) and the forward
    was jetdet's (it differs from torch's in the last bits somewhere, or equals it). Negative control (run by
    hand): without ``register_autograd``, ``.backward()`` raised "no autograd formula was registered"."""
    make, fn = CASES[name]
    g = torch.Generator().manual_seed(0)
    with torch.device("cpu"):  # CPU draws (the triton case runs on CUDA tensors on a GPU), then moved
        xs = make(g)
        w = torch.randn(fn(*xs).shape, generator=g)
    xs, w = to_default_device(xs), w.to(torch.get_default_device())

    def grads(det: bool):
        leaves = [x.clone().requires_grad_(True) for x in xs]
        if det:
            with jetdet.mode("deterministic"):
                out = fn(*leaves)
        else:
            out = fn(*leaves)
        (out * w).sum().backward()
        return out.detach(), [leaf.grad for leaf in leaves]

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 on both sides on a GPU
    try:
        ref_out, ref = grads(False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    out, got = grads(True)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a is not None, f"{name}: input {i} got no gradient"
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m, i=i: f"{name} input {i}: {m}")


def test_patched_model_backward_and_half_precision():
    """A patched model's parameters get gradients, fp16 leaves get fp16 gradients."""
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    ref = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    ref.load_state_dict(model.state_dict())
    x = torch.randn(5, 8)
    with jetdet.patch(model, mode="deterministic"):
        model(x).square().sum().backward()
    ref(x).square().sum().backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    xh = torch.randn(4, 8, dtype=torch.float16, requires_grad=True)
    wh = torch.randn(3, 8, dtype=torch.float16, requires_grad=True)
    with jetdet.mode("deterministic"):
        F.linear(xh, wh).float().sum().backward()
    assert xh.grad.dtype == torch.float16 and wh.grad.dtype == torch.float16
    torch.testing.assert_close(xh.grad.float(), wh.float().sum(0).expand(4, 8), atol=2e-3, rtol=2e-3)


def test_in_place_change_of_an_op_output_under_autograd():
    """A routed op's output may be changed in place while autograd records (ComfyUI's Flux and Chroma blocks do
    ``img.addcmul_(gate, proj(x))`` and ``txt += ...``): it was a view of the op's 2-D GEMM result, which autograd
    refuses to change in place inside a custom Function. Gradients equal mode off's."""
    lin = nn.Linear(8, 6)
    ref = nn.Linear(8, 6)
    ref.load_state_dict(lin.state_dict())
    x = torch.randn(2, 3, 8, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    g = torch.randn(6)
    with jetdet.mode("deterministic"):
        y = lin(x)
        y.addcmul_(g, y.detach())
        y.square().sum().backward()
    yr = ref(xr)
    yr.addcmul_(g, yr.detach())
    yr.square().sum().backward()
    torch.testing.assert_close(y, yr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lin.weight.grad, ref.weight.grad, atol=1e-5, rtol=1e-4)


def test_autocast_reaches_routed_calls_and_patched_layers():
    """Under ``torch.autocast("cpu", bfloat16)`` deterministic mode gives the dtype torch gives (the matmul family,
    convs and SDPA in bf16; norms and softmax in their inputs' dtype on CPU), close to torch's values, and stays
    batch invariant; a patched model the same. Negative control: the next test, without the router's autocast
    step."""
    from jetdet.models import TinyDiT, make_toy_inputs

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(6, 5, 16, generator=g), torch.randn(12, 16, generator=g)
    img, cw = torch.randn(3, 4, 6, 6, generator=g), torch.randn(5, 4, 3, 3, generator=g)
    q = torch.randn(3, 2, 7, 8, generator=g)
    calls = {
        "linear": lambda n: F.linear(x[:n], w),
        "matmul": lambda n: x[:n] @ w.t(),
        "conv2d": lambda n: F.conv2d(img[:n], cw, padding=1),
        "sdpa": lambda n: F.scaled_dot_product_attention(q[:n], q[:n], q[:n]),
        "layer_norm_bf16": lambda n: F.layer_norm(x[:n].bfloat16(), (16,)),
        "softmax": lambda n: torch.softmax(x[:n], -1),
        # a trial's finds: MultiheadAttention ran in fp32 (torch: bf16), prod in bf16 (torch's CPU list: fp32)
        "mha": lambda n: mha(x[:n], x[:n], x[:n], need_weights=False)[0],
        "mha_weights": lambda n: mha(x[:n], x[:n], x[:n])[0],
        "prod": lambda n: torch.prod(x[:n].bfloat16(), -1),
    }
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()
    for name, fn in calls.items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = fn(3)
            with jetdet.mode("deterministic"):
                got, one = fn(3), fn(1)
        assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
        torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2, msg=lambda m, n=name: f"{n}: {m}")
        assert torch.equal(one, got[:1]), name

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # a warned fallback: torch's call, autocast
        want = torch.addbmm(torch.zeros(5, 12), x, w.t().expand(6, 16, 12))
        with jetdet.mode("deterministic"), pytest.warns(UserWarning, match="addbmm falls back"):
            sys.modules["jetdet.mode"]._warned.clear()
            got = torch.addbmm(torch.zeros(5, 12), x, w.t().expand(6, 16, 12))
    assert got.dtype == want.dtype == torch.bfloat16

    model = TinyDiT().eval()
    xs, t, y = make_toy_inputs(4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(xs, t, y)
        with jetdet.patch(model, mode="deterministic"):
            got, one = model(xs, t, y), model(xs[:1], t[:1], y[:1])
    assert got.dtype == want.dtype == torch.bfloat16
    assert torch.equal(one, got[:1])
    assert (got.float() - want.float()).abs().max() < 0.1


def test_negative_control_without_the_routers_autocast_step(monkeypatch):
    """The check above fails when the router ignores autocast (as it did before): the routed linear then comes out
    fp32 where torch gives bf16."""
    import importlib

    jm = importlib.import_module("jetdet.mode")  # the module (jetdet.mode is also the context manager's name)
    monkeypatch.setattr(jm, "_autocast_route", lambda func, handler, args, kwargs: handler(func, args, kwargs))
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 16, generator=g), torch.randn(12, 16, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.linear(x, w)
        with jetdet.mode("deterministic"):
            got = F.linear(x, w)
    assert want.dtype == torch.bfloat16 and got.dtype == torch.float32


def test_second_derivatives_and_fully_masked_rows():
    """``create_graph=True`` gives the same second derivatives as torch (the op's gradient stays connected to its
    inputs), an input passed twice gets each argument's share, and a query row with every key masked has finite
    gradients (0, as torch's). Negative controls (run by hand): with the recomputation on detached inputs, the
    second derivative's norm was 76.2 against torch's 95.2 with no error; with the reference's softmax over all
    -inf, q's and k's gradients were NaN."""
    g = torch.Generator().manual_seed(0)
    x0, w0 = torch.randn(4, 6, generator=g), torch.randn(5, 6, generator=g)

    def second(det: bool):
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        with jetdet.mode("deterministic" if det else "off"):
            z = (F.linear(x, w) * x[:, :5]).sum()
            (gx,) = torch.autograd.grad(z, x, create_graph=True)
            return torch.autograd.grad(gx.square().sum(), (x, w))

    for a, b in zip(second(True), second(False)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    q0 = torch.randn(2, 2, 4, 8, generator=g)
    keep = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    keep[1] = False  # item 1 has no key to attend to
    kv0 = torch.randn(2, 2, 5, 8, generator=g)

    def masked(det: bool):
        q, kv = q0.clone().requires_grad_(True), kv0.clone().requires_grad_(True)
        with jetdet.mode("deterministic" if det else "off"):
            F.scaled_dot_product_attention(q, kv, kv, attn_mask=keep).square().sum().backward()
        return q.grad, kv.grad

    got, want = masked(True), masked(False)
    for a, b in zip(got, want):
        assert a.isfinite().all()
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_rms_norm_takes_cuda_autocasts_fp32_policy_where_torch_has_it(monkeypatch):
    """torch 2.12 put ``rms_norm`` on CUDA autocast's "float32" list (its ``autocast_mode.h``); torch 2.11 has it on
    no list. The router follows the torch it runs on, read from the dispatcher (which CPU builds have as well), and
    the probe can tell both answers apart."""
    import importlib

    jm = importlib.import_module("jetdet.mode")  # the module, not the context manager
    if not hasattr(F, "rms_norm"):
        pytest.skip("torch without F.rms_norm")
    registered = "AutocastCUDA:" in torch._C._dispatch_dump("aten::rms_norm")
    assert jm._torch_autocasts_rms_norm_on_cuda() is registered
    assert (F.rms_norm in jm._AUTOCAST_FP32_CUDA) is registered
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    if (major, minor) >= (2, 12):
        assert registered  # the version the policy came in
    monkeypatch.setattr(torch._C, "_dispatch_dump", lambda name: "CPU: registered at x.cpp:1\n")
    assert jm._torch_autocasts_rms_norm_on_cuda() is False  # negative control: a torch without the kernel
