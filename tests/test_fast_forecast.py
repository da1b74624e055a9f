"""jetdet.ops.forecast / relative_change: Triton (interpreter on CPU, compiled on a GPU) and torch paths against
the references; polynomial exactness; batch invariance; bad inputs."""

import pytest
import torch
from _tolerances import FORECAST_REL

from jetdet.kernels.forecast import reference as ref
from jetdet.ops import fast

BACKENDS = ["triton", "torch"]
TS = [0.93, 0.81, 0.6, 0.47]  # non-uniform, decreasing (like sigmas); oldest first


def _poly_history(degree, ts, shape, dtype=torch.float32):
    """h(t) = Σ_p c_p t^p with a random tensor c_p per power: a polynomial of ``degree`` in t."""
    coef = [torch.randn(shape) for _ in range(degree + 1)]

    def h(t):
        return sum(c * t**p for p, c in enumerate(coef))

    return [h(t).to(dtype) for t in ts], h


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order,k", [(1, 2), (1, 4), (2, 3), (3, 4), ("lagrange", 2), ("lagrange", 3),
                                     ("lagrange", 4)])
def test_exact_for_polynomials_of_its_degree(backend, order, k, monkeypatch):
    monkeypatch.setenv("JETDET_BACKEND", backend)
    degree = k - 1 if order == "lagrange" else order
    ts = TS[-k:]
    hist, h = _poly_history(degree, ts, (3, 37, 11))  # 1221 elements: a tail past the 1024 block
    out = fast.forecast(hist, ts, 0.3, order=order)
    expect = h(0.3)
    assert out.shape == expect.shape and out.dtype == torch.float32
    assert torch.allclose(out, expect, rtol=1e-4, atol=1e-4 * float(expect.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lower_order_is_not_exact_for_higher_degree(backend, monkeypatch):
    """Negative control: the quadratic term is what order 1 misses."""
    monkeypatch.setenv("JETDET_BACKEND", backend)
    hist, h = _poly_history(2, TS, (64,))
    err1 = (fast.forecast(hist, TS, 0.3, order=1) - h(0.3)).abs().max()
    err2 = (fast.forecast(hist, TS, 0.3, order=2) - h(0.3)).abs().max()
    assert err1 > 100 * err2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_matches_reference_and_writes_the_history_dtype(backend, dtype, monkeypatch):
    monkeypatch.setenv("JETDET_BACKEND", backend)
    hist = torch.randn(4, 2, 5, 103).to(dtype)  # stacked history
    ts = torch.tensor([10.0, 12.5, 13.0, 17.0])  # increasing, as a tensor (one sync)
    for order in (1, 2, "lagrange"):
        out = fast.forecast(hist, ts, 19.0, order=order)
        assert out.dtype == dtype and out.shape == hist.shape[1:]
        expect = ref.forecast_reference(list(hist), ts.tolist(), 19.0, order)
        tol = FORECAST_REL[dtype]
        assert torch.allclose(out.double(), expect, rtol=tol, atol=tol * float(expect.abs().max()))


def test_weights():
    w = fast.forecast_weights([1.0, 2.0], 3.0, order=1)
    assert w == pytest.approx([-1.0, 2.0])
    w = fast.forecast_weights([0.0, 1.0, 2.0, 3.0], 4.0, order=2)
    assert w == pytest.approx([0.0, 1.0, -3.0, 3.0])
    assert sum(fast.forecast_weights(TS, 0.1, "lagrange")) == pytest.approx(1.0)


def test_forecast_bad_inputs():
    h = [torch.randn(4, 4) for _ in range(3)]
    with pytest.raises(ValueError, match="history: expected 1 to 4 tensors, got an empty history"):
        fast.forecast([], [], 0.5)
    with pytest.raises(ValueError, match="history: expected 1 to 4 tensors, got an empty history"):
        fast.forecast(torch.empty(0, 4), [], 0.5)
    with pytest.raises(ValueError, match="history: expected at most 4"):
        fast.forecast(h + h, [1, 2, 3, 4, 5, 6], 7.0, order="lagrange")
    with pytest.raises(ValueError, match="timesteps: expected strictly increasing or strictly decreasing"):
        fast.forecast(h, [0.9, 0.9, 0.5], 0.3, order=2)
    with pytest.raises(ValueError, match="timesteps: expected strictly increasing or strictly decreasing"):
        fast.forecast(h, [0.9, 0.5, 0.7], 0.3, order=2)
    with pytest.raises(ValueError, match="timesteps: expected 3 values"):
        fast.forecast(h, [0.9, 0.5], 0.3)
    with pytest.raises(ValueError, match="history: order=3 needs at least 4 outputs, got 3"):
        fast.forecast(h, [0.9, 0.7, 0.5], 0.3, order=3)
    with pytest.raises(ValueError, match="order"):
        fast.forecast(h, [0.9, 0.7, 0.5], 0.3, order=0)
    with pytest.raises(ValueError, match=r"history\[1\]: expected shape"):
        fast.forecast([h[0], torch.randn(4, 5)], [0.9, 0.7], 0.3)
    with pytest.raises(TypeError, match=r"history\[1\]: expected dtype"):
        fast.forecast([h[0], h[1].half()], [0.9, 0.7], 0.3)
    with pytest.raises(TypeError, match=r"history\[0\]: expected dtype"):
        fast.forecast([h[0].int(), h[1].int()], [0.9, 0.7], 0.3)
    with pytest.raises(ValueError, match="finite"):
        fast.forecast(h[:2], [0.9, float("nan")], 0.3)


def test_forecast_custom_op():
    h = [torch.randn(3, 5) for _ in range(3)]
    torch.library.opcheck(torch.ops.jetdet.forecast.default, (h, [0.9, 0.7, 0.4], 0.2, "2"))


# ----------------------------------------------------------------------------------------- relative change


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 4, 37, 29), (2, 77, 5), (1, 70001), (2, 3, 5, 6, 7)])
def test_relative_change_per_item(backend, shape, monkeypatch):
    monkeypatch.setenv("JETDET_BACKEND", backend)
    a, b = torch.randn(shape), torch.randn(shape)
    out = fast.relative_change(a, b)
    assert out.dtype == torch.float32 and out.shape == (shape[0],)
    assert torch.allclose(out.double(), ref.relative_change_reference(a, b), rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape,tile,ref_tile",
    [
        ((2, 4, 37, 29), (None, 8, 8), (None, 8, 8)),  # latent [B, C, H, W], 8x8 spatial tiles, clipped edges
        ((2, 4, 37, 29), 16, (None, 16, 16)),  # int: square spatial tiles
        ((3, 77, 6), 16, (16, None)),  # hidden states [B, N, C]: 16-token blocks
        ((2, 3, 5, 9, 10), (None, 2, 4, 4), (None, 2, 4, 4)),  # video [B, C, T, H, W]
        ((2, 6, 9, 4), (4, None, None), (4, None, None)),  # a tiled dim followed by whole dims merges
    ],
)
def test_relative_change_per_tile(backend, shape, tile, ref_tile, monkeypatch):
    monkeypatch.setenv("JETDET_BACKEND", backend)
    a, b = torch.randn(shape).half(), torch.randn(shape).half()
    per_item, per_tile = fast.relative_change(a, b, tile=tile)
    expect = ref.relative_change_tiles(a, b, ref_tile)
    assert per_tile.shape == expect.shape and per_tile.dtype == torch.float32
    assert torch.allclose(per_tile.double(), expect, rtol=1e-5)
    assert torch.allclose(per_item.double(), ref.relative_change_reference(a, b), rtol=1e-5)


def test_relative_change_batch_invariant_and_zero_norm(triton_backend):
    a, b = torch.randn(4, 3, 70, 70), torch.randn(4, 3, 70, 70)
    full = fast.relative_change(a, b)
    for i in range(4):
        assert torch.equal(fast.relative_change(a[i:i + 1], b[i:i + 1]), full[i:i + 1])
    _, tiles = fast.relative_change(a, b, tile=(None, 32, 32))
    _, one = fast.relative_change(a[2:3], b[2:3], tile=(None, 32, 32))
    assert torch.equal(one[0], tiles[2])
    z = torch.zeros(2, 8)
    out = fast.relative_change(torch.stack([torch.zeros(8), torch.ones(8)]), z)
    assert out[0] == 0 and out[1] == float("inf")


def test_relative_change_bad_inputs():
    a = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="b: expected shape"):
        fast.relative_change(a, a[:, :3])
    with pytest.raises(TypeError, match="b: expected dtype"):
        fast.relative_change(a, a.half())
    with pytest.raises(TypeError, match="a: expected dtype"):
        fast.relative_change(a.int(), a.int())
    with pytest.raises(ValueError, match="tile: expected 3 entries"):
        fast.relative_change(a, a, tile=(4, 4))
    with pytest.raises(ValueError, match="at most 4 are supported"):
        fast.relative_change(torch.randn(1, 5, 5, 5, 5, 5), torch.randn(1, 5, 5, 5, 5, 5), tile=(2, 2, 2, 2, 2))
    with pytest.raises(ValueError, match="non-empty"):
        fast.relative_change(torch.randn(2, 0), torch.randn(2, 0))


def test_relative_change_custom_op():
    a, b = torch.randn(2, 3, 9, 9), torch.randn(2, 3, 9, 9)
    torch.library.opcheck(torch.ops.jetdet.relative_change.default, (a, b, [0, 4, 4]))
    torch.library.opcheck(torch.ops.jetdet.relative_change.default, (a, b, []))
