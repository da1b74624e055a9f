"""``jetdet.ops.gelu_gate``: what is particular to it. The registry-wide checks (torch op, opcheck, batch
invariance on both paths, reference) are in test_registry.py."""

import pytest
import torch
import torch.nn.functional as F

import jetdet
from jetdet.kernels.gelu_gate import torch_path
from jetdet.kernels.gelu_gate.reference import gelu_gate_reference

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_matches_geglu(backend, dtype, approximate):
    h = (torch.randn(3, 7, 2 * 200) * 4).to(dtype)
    out = jetdet.ops.gelu_gate(h, approximate)
    assert out.dtype == dtype and out.shape == (3, 7, 200)
    x, gate = h.float().chunk(2, -1)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), (x * F.gelu(gate, approximate=approximate)).to(dtype).float(),
                               atol=atol, rtol=rtol)


@pytest.mark.parametrize("width", [1, 63, 64, 65, 9000, 16385])
def test_torch_path_odd_widths_and_column_blocks(width):
    """Widths around the lane padding and past one tile's columns (16385 spans two column blocks)."""
    h = torch.randn(3, 2 * width)
    torch.testing.assert_close(torch_path.gelu_gate(h, "none"), gelu_gate_reference(h), atol=2e-6, rtol=2e-6)


def test_torch_path_is_thread_and_batch_invariant(restore_threads):
    h = torch.randn(70, 2 * 300)  # 70 rows: more than one row tile (16384 // 320 = 51)
    outs = []
    for t in (1, 2):
        torch.set_num_threads(t)
        outs.append(jetdet.ops.gelu_gate(h))
        for s in (0, 50, 69):
            assert torch.equal(jetdet.ops.gelu_gate(h[s : s + 1])[0], outs[-1][s])
    assert torch.equal(outs[0], outs[1])


def test_plain_torch_geglu_is_not_position_invariant():
    """Negative control for the tiling: torch's own elementwise GELU computes an element in a vector lane or in
    the scalar tail depending on where it sits, and the two differ in the last bit for some values (measured
    here: the tanh form, 5392 of 65536 elements when computed in 7-element pieces)."""
    g = torch.randn(1 << 12, dtype=torch.float32) * 3
    full = F.gelu(g, approximate="tanh")
    shifted = torch.stack([F.gelu(g[i : i + 7], approximate="tanh")[0] for i in range(0, 1 << 12, 7)])
    if torch.equal(shifted, full[:: 7]):
        pytest.skip("this CPU's vector and scalar GELU agree on these values; nothing to show")
    assert not torch.equal(shifted, full[:: 7])


def test_bad_input():
    with pytest.raises(ValueError, match="input: expected an even last dim"):
        jetdet.ops.gelu_gate(torch.randn(2, 5))
    with pytest.raises(ValueError, match="approximate: expected one of"):
        jetdet.ops.gelu_gate(torch.randn(2, 4), approximate="fast")
    with pytest.raises((TypeError, ValueError), match="input"):
        jetdet.ops.gelu_gate(torch.randn(2, 4, dtype=torch.float64))
    assert jetdet.ops.gelu_gate(torch.randn(0, 4)).shape == (0, 2)
