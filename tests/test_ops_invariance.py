"""Prefix and needle tests for every jetdet op on both paths (the Triton kernels: interpreter on CPU, compiled on
a GPU; and the CPU torch path), plus accuracy against the fp32 references and the negative controls showing
plain torch is not invariant."""

import random

import pytest
import torch
import torch.nn.functional as F
from _cases import CASES
from _devices import ON_GPU, to_default_device
from _invariance import assert_batch_invariant
from _tolerances import OPS_MAX_ERR, assert_max_err

BACKENDS = ["torch", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """JETDET_BACKEND and the device are set by conftest's ``_backend_param`` for this parameter."""
    return request.param


def _check_invariant(name, threads, dtype=torch.float32):
    """Every prefix 1..8 and one random slot per batch size, per thread count; the same bits at every count."""
    make, call, _ = CASES[name]
    items, shared = make(8, dtype)
    items, shared = to_default_device(items), to_default_device(shared)
    rng = random.Random(name)
    outs = {}
    for t in threads:
        torch.set_num_threads(t)
        outs[t] = call(*items, *shared)
        assert_batch_invariant(call, items, shared, prefixes=range(1, 9),
                               slots=[rng.randrange(b) for b in range(1, 9)], full=outs[t],
                               label=f"{name} {dtype} threads={t}")
    first = outs[threads[0]]
    for t in threads[1:]:
        assert torch.equal(outs[t], first), f"{name}: threads {threads[0]} vs {t} differ"


@pytest.mark.parametrize("name", sorted(CASES))
def test_prefix_and_needle(name, backend, restore_threads):
    _check_invariant(name, (1, 2) if backend == "torch" else (2,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_accuracy(name, dtype, backend):
    make, call, ref = CASES[name]
    items, shared = make(3, dtype)
    exp = ref(*items, *shared)  # fp32 on CPU: no TF32 in a cuDNN/cuBLAS reference on a GPU
    out = call(*to_default_device(items), *to_default_device(shared)).cpu()
    assert out.dtype == items[0].dtype and out.shape == exp.shape
    assert_max_err(out, exp, OPS_MAX_ERR[dtype], f"{name} {dtype}")


@pytest.mark.parametrize("name", ["linear", "conv3x3_s1", "layer_norm", "attention"])
def test_accuracy_bf16_cpu_path(name, torch_backend):
    """bf16 is checked on the CPU path only: the Triton interpreter's bf16 arithmetic is broken."""
    make, call, ref = CASES[name]
    items, shared = make(2, torch.bfloat16)
    out = call(*items, *shared)
    exp = ref(*items, *shared)
    assert out.dtype == torch.bfloat16
    assert_max_err(out, exp, OPS_MAX_ERR[torch.bfloat16], name)


@pytest.mark.skipif(not ON_GPU, reason="bf16 kernels run compiled on a GPU only (the interpreter's bf16 is wrong)")
@pytest.mark.parametrize("name", sorted(CASES))
def test_accuracy_bf16_gpu(name, triton_backend):
    make, call, ref = CASES[name]
    items, shared = make(3, torch.bfloat16)
    exp = ref(*items, *shared)
    out = call(*to_default_device(items), *to_default_device(shared))
    assert out.is_cuda and out.dtype == torch.bfloat16
    assert_max_err(out, exp, OPS_MAX_ERR[torch.bfloat16], name)


@pytest.mark.skipif(not ON_GPU, reason="needs the compiled kernels on a GPU")
@pytest.mark.parametrize("name", sorted(CASES))
def test_prefix_and_needle_bf16_gpu(name, triton_backend):
    _check_invariant(name, (torch.get_num_threads(),), torch.bfloat16)


# ------------------------------------------------------------------------------ negative controls


def test_negative_control_torch_mm_not_batch_invariant(restore_threads):
    """Plain torch mm at M=257: row 0 alone differs from row 0 of the full product on this CPU."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(257, 257, generator=g)
    w = torch.randn(257, 193, generator=g)
    torch.set_num_threads(2)
    assert not torch.equal((x @ w)[:1], x[:1] @ w)


def test_negative_control_torch_conv2d_not_batch_invariant(restore_threads):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 32, 16, 16, generator=g)
    w = torch.randn(64, 32, 3, 3, generator=g)
    torch.set_num_threads(2)
    full = F.conv2d(x, w, padding=1)
    alone = torch.cat([F.conv2d(x[i : i + 1], w, padding=1) for i in range(6)])
    assert not torch.equal(full, alone)


def test_jetdet_passes_where_torch_fails(torch_backend, restore_threads):
    import jetdet

    g = torch.Generator().manual_seed(0)
    x = torch.randn(257, 257, generator=g)
    w = torch.randn(257, 193, generator=g)
    torch.set_num_threads(2)
    assert torch.equal(jetdet.ops.mm(x, w)[:1], jetdet.ops.mm(x[:1], w))
    x = torch.randn(6, 32, 16, 16, generator=g)
    w = torch.randn(64, 32, 3, 3, generator=g)
    full = jetdet.ops.conv2d(x, w, padding=1)
    alone = torch.cat([jetdet.ops.conv2d(x[i : i + 1], w, padding=1) for i in range(6)])
    assert torch.equal(full, alone)
