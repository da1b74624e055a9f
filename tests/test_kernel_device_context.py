"""``_devices.on_device``, the context the kernel tests run in, works on a GPU: there it makes CUDA the default device,
and torch then refuses a CPU generator in ``torch.randn(..., generator=g)`` ("Expected a 'cuda' device type for
generator but found 'cpu'"), the way these tests (and the ops' ``sample`` functions) draw their inputs. Inside it such
draws are made on the CPU and moved, so they work and equal the CPU run's values.

No GPU here: the meta device stands in for CUDA. Like CUDA, it is not the CPU; unlike CUDA it ignores a CPU
generator instead of refusing it, so a draw that bypassed the context would leave the generator where it was. That
is the negative control."""

import pytest
import torch
from _devices import on_device

META = torch.device("meta")


def _state_after(draw) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    draw(g)
    return g.get_state()


DRAWS = {
    "randn": lambda g: torch.randn(3, 4, generator=g),
    "rand": lambda g: torch.rand(5, generator=g),
    "randint": lambda g: torch.randint(0, 9, (6,), generator=g),
    "randperm": lambda g: torch.randperm(10, generator=g),
}


@pytest.mark.parametrize("name", sorted(DRAWS))
def test_cpu_generator_draws_are_made_on_the_cpu_and_moved(name):
    draw = DRAWS[name]
    on_cpu = _state_after(draw)  # where a CPU draw leaves the generator
    seen, depth = {}, torch._C._len_torch_function_stack()

    def inside(g):
        with on_device(META):
            seen["out"] = draw(g)
            seen["default"] = torch.get_default_device()

    assert torch.equal(_state_after(inside), on_cpu), "the draw did not consume the CPU generator"
    assert seen["out"].device.type == "meta" and seen["default"].type == "meta"
    assert torch.get_default_device().type == "cpu"  # the default comes back
    assert torch._C._len_torch_function_stack() == depth  # and no mode is left behind


def test_requires_grad_and_an_explicit_device_are_kept():
    g = torch.Generator().manual_seed(0)
    with on_device(META):
        t = torch.randn(4, generator=g, requires_grad=True)
        assert t.device.type == "meta" and t.requires_grad and t.is_leaf
        before = g.get_state()
        u = torch.randn(4, generator=g, device="meta")  # an explicit device: left to torch
        assert u.device.type == "meta" and torch.equal(g.get_state(), before)


def test_negative_control_a_bare_default_device_does_not_draw_on_the_cpu():
    """What the context adds: with only a default device (what the context set before), the draw never reaches the
    CPU generator (on CUDA it raises)."""
    on_cpu = _state_after(DRAWS["randn"])
    untouched = torch.Generator().manual_seed(7).get_state()

    def bare(g):
        with META:
            DRAWS["randn"](g)

    after = _state_after(bare)
    assert torch.equal(after, untouched) and not torch.equal(after, on_cpu)


def test_model_input_helpers_draw_on_the_cpu_under_a_users_default_device():
    """``make_toy_inputs`` and ``make_shapes`` draw from a CPU generator: under a user's
    ``torch.set_default_device("cuda")`` torch would refuse that (the meta device, standing in, silently gives meta
    tensors instead). They return the CPU tensors they return outside it."""
    from jetdet.models.shapes import make_shapes
    from jetdet.models.toy import make_toy_inputs

    for make in (lambda: make_toy_inputs(5, seed=3), lambda: make_shapes(4, seed=3, edge_noise=0.5),
                 lambda: make_shapes(3, seed=1, labels=[0, 4, 9])):
        want = make()
        with torch.device(META):
            got = make()
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)  # and float32 values under a float64 default dtype (as documented)
        try:
            got64 = make()
        finally:
            torch.set_default_dtype(prev)
        for w, g, g64 in zip(want, got, got64):
            assert g.device.type == "cpu" and torch.equal(w, g) and torch.equal(w, g64) and w.dtype == g64.dtype
