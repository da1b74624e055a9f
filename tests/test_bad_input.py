"""Bad input: either the same result as the reference or a clear error naming the argument. Never silent
wrong numbers. Both paths (CPU torch path, and the Triton kernels: interpreter on CPU, compiled on a GPU)."""

import math

import pytest
import torch
import torch.nn.functional as F
from _devices import INTERPRETER, cpu_generator

import jetdet

ops = jetdet.ops


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    """JETDET_BACKEND and the device (CUDA for "triton" on a GPU) are set by conftest's ``_backend_param``."""
    return request.param


# ---------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float64, torch.bool])
def test_unsupported_dtypes_name_the_argument(dtype, backend):
    x = torch.ones(3, 8).to(dtype)
    w = torch.ones(4, 8)
    with pytest.raises(TypeError, match="input: expected dtype float32/float16/bfloat16"):
        ops.linear(x, w)
    with pytest.raises(TypeError, match="weight: expected dtype"):
        ops.linear(torch.ones(3, 8), w.to(dtype))
    with pytest.raises(TypeError, match="q: expected dtype"):
        ops.attention(torch.ones(1, 1, 2, 4).to(dtype), torch.ones(1, 1, 2, 4), torch.ones(1, 1, 2, 4))
    with pytest.raises(TypeError, match="input: expected dtype"):
        ops.layer_norm(torch.ones(2, 4).to(dtype), (4,))
    with pytest.raises(TypeError, match="input: expected dtype"):
        ops.conv2d(torch.ones(1, 2, 4, 4).to(dtype), torch.ones(3, 2, 3, 3))


def test_mixed_dtypes_rejected(backend):
    with pytest.raises(TypeError, match="weight: expected dtype torch.float32 \\(like input\\)"):
        ops.linear(torch.ones(3, 8), torch.ones(4, 8, dtype=torch.float16))


def test_float64_in_mode_falls_back_with_warning():
    lin = torch.nn.Linear(8, 4).double()
    x = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad(), jetdet.mode("deterministic"):
        with pytest.warns(UserWarning, match="falls back to torch \\(dtype torch.float64\\)"):
            y = lin(x)
    assert torch.equal(y, lin(x).detach())


# ---------------------------------------------------------------------------------------- shapes
def test_mismatched_shapes(backend):
    with pytest.raises(ValueError, match="weight: expected shape \\(N, 8\\)"):
        ops.linear(torch.ones(3, 8), torch.ones(4, 7))
    with pytest.raises(ValueError, match="bias: expected shape \\(4,\\)"):
        ops.linear(torch.ones(3, 8), torch.ones(4, 8), torch.ones(5))
    with pytest.raises(ValueError, match="mat2: expected 8 rows"):
        ops.mm(torch.ones(3, 8), torch.ones(7, 2))
    with pytest.raises(ValueError, match="mat2: expected shape \\(2, 8, N\\)"):
        ops.bmm(torch.ones(2, 3, 8), torch.ones(3, 8, 2))
    with pytest.raises(ValueError, match="k: expected shape \\(1, 2, Nk, 4\\)"):
        ops.attention(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 5), torch.ones(1, 2, 3, 4))
    with pytest.raises(ValueError, match="v: expected shape"):
        ops.attention(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4), torch.ones(1, 2, 5, 4))
    with pytest.raises(ValueError, match="attn_mask: expected a shape broadcastable to \\(1, 2, 3, 3\\)"):
        ops.attention(*(torch.ones(1, 2, 3, 4),) * 3, attn_mask=torch.ones(4, 4))
    with pytest.raises(ValueError, match="weight: expected 2 input channels"):
        ops.conv2d(torch.ones(1, 2, 5, 5), torch.ones(3, 4, 3, 3))
    with pytest.raises(ValueError, match="groups: jetdet.ops.conv2d supports groups=1 only"):
        ops.conv2d(torch.ones(1, 4, 5, 5), torch.ones(4, 2, 3, 3), groups=2)
    with pytest.raises(ValueError, match="input: spatial size \\(2, 2\\) is too small"):
        ops.conv2d(torch.ones(1, 2, 2, 2), torch.ones(3, 2, 3, 3))
    with pytest.raises(ValueError, match="normalized_shape: expected the trailing dims"):
        ops.layer_norm(torch.ones(2, 5), (4,))
    with pytest.raises(ValueError, match="weight: expected shape \\(5,\\)"):
        ops.layer_norm(torch.ones(2, 5), (5,), torch.ones(4))
    with pytest.raises(ValueError, match="num_groups: expected a positive divisor of the 6 channels"):
        ops.group_norm(torch.ones(2, 6, 3), 4)
    with pytest.raises(ValueError, match="dim: expected an int in \\[-2, 1\\]"):
        ops.softmax(torch.ones(2, 5), dim=2)


def test_wrong_types():
    with pytest.raises(TypeError, match="input: expected a torch.Tensor, got list"):
        ops.linear([[1.0]], torch.ones(1, 1))


# -------------------------------------------------------------------------- strided / non-contiguous
def test_non_contiguous_inputs_equal_contiguous(backend):
    g = cpu_generator(0)

    def randn(*shape):  # drawn on CPU, then moved whole (views below are taken on the test's device)
        return torch.randn(*shape, generator=g, device="cpu").to(torch.get_default_device())

    x = randn(9, 6, 20).transpose(0, 1)[:, ::2]  # [6, 5, 20], strided
    w = randn(20, 13).t()  # [13, 20] non-contiguous weight
    assert not x.is_contiguous() and not w.is_contiguous()
    assert torch.equal(ops.linear(x, w), ops.linear(x.contiguous(), w.contiguous()))
    img = randn(3, 5, 12, 14).permute(0, 1, 3, 2)  # [3, 5, 14, 12]
    k = randn(4, 5, 3, 3)
    assert torch.equal(ops.conv2d(img, k, padding=1), ops.conv2d(img.contiguous(), k, padding=1))
    cl = img.contiguous(memory_format=torch.channels_last)
    assert torch.equal(ops.conv2d(cl, k, padding=1), ops.conv2d(img.contiguous(), k, padding=1))
    q = randn(2, 7, 3, 8).transpose(1, 2)  # [2, 3, 7, 8] strided
    assert torch.equal(ops.attention(q, q, q), ops.attention(*(q.contiguous(),) * 3))
    n = randn(7, 4, 30)[:, :, ::3]  # [7, 4, 10]
    assert torch.equal(ops.layer_norm(n, (10,)), ops.layer_norm(n.contiguous(), (10,)))
    assert torch.equal(ops.softmax(n, 1), ops.softmax(n.contiguous(), 1))
    gn = randn(3, 8, 6, 5).transpose(2, 3)
    assert torch.equal(ops.group_norm(gn, 4), ops.group_norm(gn.contiguous(), 4))


def test_softmax_other_dims_and_reductions_match_reference(backend):
    x = torch.randn(3, 5, 7)
    for d in (0, 1, 2, -1):
        assert torch.allclose(ops.softmax(x, d), torch.softmax(x, d), atol=1e-6)
    assert torch.allclose(ops.sum(x, dim=(1, 2)), x.sum(dim=(1, 2)), atol=1e-5)
    assert torch.allclose(ops.mean(x, dim=1, keepdim=True), x.mean(dim=1, keepdim=True), atol=1e-6)


# ---------------------------------------------------------------------------------------- empty
def test_empty_tensors(backend):
    assert ops.linear(torch.ones(0, 8), torch.ones(4, 8)).shape == (0, 4)
    out = ops.linear(torch.ones(3, 0), torch.ones(4, 0), torch.arange(4.0))
    assert torch.equal(out, F.linear(torch.ones(3, 0), torch.ones(4, 0), torch.arange(4.0)))
    assert ops.conv2d(torch.ones(0, 2, 5, 5), torch.ones(3, 2, 3, 3)).shape == (0, 3, 3, 3)
    assert ops.attention(*(torch.ones(0, 2, 3, 4),) * 3).shape == (0, 2, 3, 4)
    assert ops.layer_norm(torch.ones(0, 5), (5,)).shape == (0, 5)
    assert ops.group_norm(torch.ones(0, 4, 3), 2).shape == (0, 4, 3)
    assert ops.softmax(torch.ones(0, 5)).shape == (0, 5)
    assert ops.sum(torch.ones(0, 5)).shape == (0,)
    assert ops.mm(torch.ones(0, 3), torch.ones(3, 2)).shape == (0, 2)
    assert ops.bmm(torch.ones(0, 3, 2), torch.ones(0, 2, 4)).shape == (0, 3, 4)


# ---------------------------------------------------------------------------------------- NaN / Inf
def test_nan_inf_propagate_like_reference_and_stay_in_their_row(backend):
    x = torch.randn(4, 6, 16)
    x[1, 2, 3] = float("nan")
    x[2, 0, 5] = float("inf")
    w = torch.randn(9, 16)
    out = ops.linear(x, w)
    ref = F.linear(x, w)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    fin = ref.isfinite()
    assert torch.allclose(out[fin], ref[fin], atol=1e-5)
    # rows without bad values are untouched and identical to running them alone
    assert torch.equal(out[0], ops.linear(x[:1], w)[0]) and out[3].isfinite().all()
    ln = ops.layer_norm(x, (16,))
    assert ln[1, 2].isnan().all() and ln[0].isfinite().all()
    sm = ops.softmax(x, -1)
    assert torch.equal(sm.isnan(), torch.softmax(x, -1).isnan())
    img = torch.randn(2, 3, 6, 6)
    img[1, 0, 2, 2] = float("nan")
    c = ops.conv2d(img, torch.randn(4, 3, 3, 3), padding=1)
    assert c[0].isfinite().all() and c[1].isnan().any()
    q = torch.randn(2, 1, 5, 8)
    q[1, 0, 0, 0] = float("nan")
    a = ops.attention(q, q.nan_to_num(), q.nan_to_num())
    assert a[0].isfinite().all() and a[1, 0, 0].isnan().all() and a[1, 0, 1:].isfinite().all()


def test_fully_masked_row_gives_zeros_like_torch_sdpa(backend):
    """A query row with no key to attend to outputs 0, as torch's SDPA does (2.5 and later), not the NaN of a
    literal softmax over all -inf; the other rows match the literal formula."""
    q = torch.randn(1, 1, 3, 4)
    m = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    m[0, 0, 1] = False
    out = ops.attention(q, q, q, attn_mask=m)
    ref = torch.softmax((q @ q.transpose(-1, -2)) / math.sqrt(4) + torch.where(m, 0.0, -math.inf), -1) @ q
    assert torch.equal(out[0, 0, 1], torch.zeros(4)) and ref[0, 0, 1].isnan().all()
    torch.testing.assert_close(out[0, 0, ::2], ref[0, 0, ::2])
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q, attn_mask=m))


def test_small_input_mistakes_get_clear_answers():
    """numpy scalars are numbers; the mode name is case-insensitive in patch as in mode(); an unknown fast option
    names jetdet.patch and lists the accepted ones; CUDA asked of a machine without it names the argument."""
    import numpy as np

    from jetdet.models import TinyUNet

    model = TinyUNet()
    jetdet.patch(model, mode="fast", budget=np.float32(0.05)).remove()
    jetdet.patch(model, mode="Deterministic").remove()
    with pytest.raises(TypeError, match=r"patch\(mode='fast'\): unknown option\(s\) \['bogus'\]; accepted: .*budget"):
        jetdet.patch(model, mode="fast", bogus=1)
    assert all("forward" not in m.__dict__ for m in model.modules())
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device: 'cuda' asks for CUDA"):
            jetdet.randn((2, 3), seed=1, device="cuda")


def test_an_interpreter_that_cannot_run_says_why_before_the_first_kernel(monkeypatch):
    """Triton's interpreter up to 3.6 with numpy 2.4 or later fails inside every kernel with a loop ("only
    0-dimensional arrays can be converted to Python scalars"); torch 2.11 pins triton 3.6. A forced Triton run on
    CPU tensors then stops before the first launch with the versions and the fix. The rule is checked on the
    version pairs either side of both boundaries; where this suite runs the kernels in the interpreter, the
    installed pair must pass it (else it could not run them at all; on a GPU they run compiled)."""
    from jetdet import backend

    bad = backend.interpreter_problem("3.6.0", "2.4.0")
    assert "triton 3.6.0" in bad and "numpy 2.4.0" in bad and "numpy<2.4" in bad and "triton>=3.7" in bad
    assert backend.interpreter_problem("3.6.0+git1234", "2.5.2")
    for ok in (("3.6.0", "2.3.5"), ("3.7.0", "2.4.0"), ("3.9.0", "2.5.2"), ("4.0.0", "2.4.6")):
        assert backend.interpreter_problem(*ok) is None, ok
    if INTERPRETER:
        assert backend.interpreter_problem() is None

    monkeypatch.setenv("JETDET_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(backend, "_interpreter_ok", False)
    monkeypatch.setattr(backend, "interpreter_problem", lambda: "the reason")
    with pytest.raises(RuntimeError, match="JETDET_BACKEND=triton with CPU tensors: the reason"):
        backend.backend_for(torch.zeros(2))
    # a found-good interpreter is not asked again (the check costs one flag test per call)
    monkeypatch.setattr(backend, "_interpreter_ok", True)
    assert backend.backend_for(torch.zeros(2)) == "triton"


_NO_TRITON_SCRIPT = r"""
import os, sys
sys.modules["triton"] = None  # as a Python with no triton installed
import torch, torch.nn.functional as F, jetdet
from jetdet import backend
backend._interpreter_ok = True  # the route a CUDA tensor takes (the CPU interpreter's own check imports triton)
for what, fn in [("randn", lambda: jetdet.randn((1, 4, 8, 8), 1, step=1)), ("linear", lambda: F.linear(
        torch.randn(2, 8), torch.randn(4, 8)))]:
    try:
        with jetdet.mode("deterministic"):
            fn()
        print(what, "ran")
    except RuntimeError as e:
        print(what, "RuntimeError", "cannot import triton" in str(e) and "triton-windows" in str(e))
"""


def test_triton_kernels_without_triton_installed_are_a_clear_error():
    """ComfyUI's Windows portable and desktop builds have CUDA torch and no triton. jetdet imports without it (its
    kernels load on first use); a CUDA tensor's first Triton launch, or noise drawn on the GPU, is then an error that
    says to install triton, not a bare ModuleNotFoundError from deep in a kernel module. The CUDA route is taken here
    on CPU tensors with ``JETDET_BACKEND=triton``, in a fresh process where triton cannot be imported."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "JETDET_BACKEND": "triton", "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", _NO_TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split("\n")[:2] == ["randn RuntimeError True", "linear RuntimeError True"], r.stdout + r.stderr


def test_reductions_and_addmm_name_what_is_wrong():
    """``dim=()`` (torch reads it as every dim; jetdet's default is every dim but the batch) and a repeated dim are
    refused instead of returning the input unchanged or reducing once; a non-bool keepdim is refused; addmm names
    mat1 when mat1 is wrong (it called it "input", the addend's name)."""
    x = torch.randn(4, 16)
    for fn in (jetdet.ops.sum, jetdet.ops.mean):
        with pytest.raises(ValueError, match=r"dim: expected an int or a non-empty tuple of ints"):
            fn(x, dim=())
        with pytest.raises(ValueError, match=r"dim: each dim at most once, got \(1, 1\)"):
            fn(x, dim=(1, 1))
        with pytest.raises(TypeError, match="keepdim: expected a bool, got 1"):
            fn(x, 1, keepdim=1)
    with pytest.raises(TypeError, match="mat1: expected dtype"):
        jetdet.ops.addmm(torch.randn(4, 8), x.double(), torch.randn(16, 8))
    with pytest.raises(ValueError, match="mat2: expected 16 rows to match mat1's last dim"):
        jetdet.ops.addmm(torch.randn(4, 8), x, torch.randn(15, 8))


def test_a_call_torch_takes_and_a_jetdet_op_refuses_falls_back_with_the_warning():
    """Under the mode, a broadcast linear bias (0-dim, [1, N]) and a conv stride given as a 1-tuple ran into jetdet's
    stricter checks and raised, where the model runs without the mode: torch's result with the one-time fallback
    warning naming why. A call torch refuses too keeps jetdet's error, which names the argument."""
    import sys

    sys.modules["jetdet.mode"]._warned.clear()
    x, w = torch.randn(4, 16), torch.randn(8, 16)
    cases = [(F.linear, (x, w, torch.tensor(0.5)), {}), (F.linear, (x, w, torch.randn(1, 8)), {}),
             (F.conv2d, (torch.randn(2, 3, 8, 8), torch.randn(8, 3, 3, 3)), {"stride": (1,)})]
    for fn, a, k in cases:
        sys.modules["jetdet.mode"]._warned.clear()  # once per op and argument: the two bias cases share one
        with pytest.warns(UserWarning, match=r"falls back to torch \(jetdet's op does not take these arguments"):
            with jetdet.mode("deterministic"):
                got = fn(*a, **k)
        assert torch.equal(got, fn(*a, **k))
    with jetdet.mode("deterministic"), pytest.raises(ValueError, match="weight"):
        F.linear(x, torch.randn(8, 15))


def test_argument_types_are_named():
    """A float or None stride/padding, a string eps and a None normalized_shape said "'float' object is not iterable"
    or "could not convert string to float"; unpatch('x') a weakref error (a bad-input audit). numpy ints and floats
    are still numbers."""
    import numpy as np

    x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)
    for kw in ({"stride": 1.5}, {"stride": None}, {"padding": 1.5}, {"padding": None}):
        name = next(iter(kw))
        with pytest.raises(ValueError, match=f"{name}: expected an int or a pair of ints"):
            jetdet.ops.conv2d(x, w, **kw)
    assert torch.equal(jetdet.ops.conv2d(x, w, stride=np.int64(1)), jetdet.ops.conv2d(x, w))
    t = torch.randn(2, 4, 3)
    for call in (lambda: jetdet.ops.layer_norm(t, (3,), eps="x"), lambda: jetdet.ops.group_norm(t, 2, eps="x"),
                 lambda: jetdet.ops.rms_norm(t, (3,), eps="x")):
        with pytest.raises(TypeError, match="eps: expected a number, got 'x'"):
            call()
    assert torch.equal(jetdet.ops.layer_norm(t, (3,), eps=np.float32(1e-5)), jetdet.ops.layer_norm(t, (3,)))
    with pytest.raises(TypeError, match="normalized_shape: expected an int or a sequence of ints, got None"):
        jetdet.ops.layer_norm(t, None)
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module, got str"):
        jetdet.unpatch("x")
