"""The step cache's memory manager: budgets, least-recently-used eviction, spill to host and disk, and the
bit-exact reload."""

import os

import pytest
import torch

from jetdet.cache import CacheManager


def tensors(seed, dtype=torch.float32, n=2, shape=(4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(n)]


def nbytes(ts):
    return sum(t.numel() * t.element_size() for t in ts)


def test_unlimited_keeps_everything_on_the_device_tier():
    m = CacheManager()
    for k in range(5):
        m.set(k, tensors(k))
    assert len(m) == 5 and m.bytes_by_tier() == {"device": 5 * nbytes(tensors(0)), "cpu": 0, "disk": 0}
    got = m.get(3)
    assert all(torch.equal(a, b) for a, b in zip(got, tensors(3)))
    assert m.get("missing") is None
    st = m.stats()
    assert st["hits"] == 1 and st["misses"] == 1 and st["streams"]["device"] == 5


def test_set_replaces_and_drop_releases():
    m = CacheManager()
    m.set("a", tensors(0, n=3))
    m.set("a", tensors(1, n=1))
    assert m.bytes_by_tier()["device"] == nbytes(tensors(1, n=1))
    m.drop("a")
    assert m.bytes_by_tier()["device"] == 0 and "a" not in m
    with pytest.raises(ValueError, match="tensors: expected at least one tensor"):
        m.set("b", [])


def test_eviction_takes_the_least_recently_used_first():
    one = nbytes(tensors(0))
    m = CacheManager(memory_budget_bytes=3 * one, spill=())
    for k in "abc":
        m.set(k, tensors(ord(k)))
    m.get("a")  # a is now the most recently used
    m.set("d", tensors(1))
    assert m.keys() == ["c", "a", "d"]  # b (least recent) was dropped
    assert m.stats()["evicted"] == 1 and m.bytes_by_tier()["device"] <= 3 * one


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
@pytest.mark.parametrize("tiers", [("cpu",), ("disk",), ("cpu", "disk")])
def test_spill_and_reload_round_trip_is_bitwise(dtype, tiers):
    one = nbytes(tensors(0, dtype))
    m = CacheManager(memory_budget_bytes=one, cpu_budget_bytes=one if tiers == ("cpu", "disk") else None,
                     spill=tiers)
    for k in range(4):
        m.set(k, tensors(k, dtype))
    assert m.bytes_by_tier()["device"] == one and m.tier(3) == "device"
    where = [m.tier(k) for k in range(3)]
    if tiers == ("cpu",):
        assert where == ["cpu"] * 3
    elif tiers == ("disk",):
        assert where == ["disk"] * 3
    else:
        assert where == ["disk", "disk", "cpu"]
        assert m.bytes_by_tier() == {"device": one, "cpu": one, "disk": 2 * one}
    for k in (2, 0, 1, 3):  # 2 first: in the cpu+disk case it is the one on the host tier
        got = m.get(k)
        want = tensors(k, dtype)
        assert all(a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) for a, b in zip(got, want))
        assert m.tier(k) == "device"  # reloaded, another stream spilled instead
    st = m.stats()
    assert st["evicted"] == 0
    if "disk" in tiers:
        assert st["reloaded_from_disk"] > 0 and st["spilled_to_disk"] > 0
    if "cpu" in tiers:
        assert st["reloaded_from_cpu"] > 0 and st["spilled_to_cpu"] > 0


def test_nan_and_special_values_survive_disk():
    t = torch.tensor([float("nan"), float("inf"), -0.0, 1e-45, -3.5])
    m = CacheManager(memory_budget_bytes=0, spill=("disk",))
    m.set("k", [t])
    assert m.tier("k") == "disk"
    got = m.get("k")[0]
    assert torch.equal(got.view(torch.int32), t.view(torch.int32))


def test_views_are_compacted_on_spill():
    big = torch.randn(8, 4, 8, 8)
    m = CacheManager(memory_budget_bytes=0, spill=("cpu",))
    m.set("row3", [big[3]])
    stored = m._entries["row3"].tensors[0]
    assert stored.untyped_storage().nbytes() == big[3].numel() * 4  # its own storage, not the batch's
    assert torch.equal(m.get("row3")[0], big[3])


def test_a_device_budget_counts_what_the_stored_rows_hold():
    """The controller stores each row of a batch output as a view of the whole output. Under a device budget a
    view is copied to its own storage, so the bytes counted are the bytes held and a spill frees them: before, 8
    rows of one output counted 8 rows and held the batch until every row was gone. Without a budget, views are
    kept as given (no copy)."""
    out = torch.randn(8, 4, 8, 8)
    m = CacheManager(memory_budget_bytes=10**9)
    for i, row in enumerate(out.unbind(0)):
        m.set(i, [row])
    held = {m._entries[i].tensors[0].untyped_storage().data_ptr() for i in range(8)}
    assert len(held) == 8 and out.untyped_storage().data_ptr() not in held
    assert all(m._entries[i].tensors[0].untyped_storage().nbytes() == 4 * 8 * 8 * 4 for i in range(8))
    assert all(torch.equal(m.get(i)[0], out[i]) for i in range(8))
    compact = m._entries[0].tensors[0]
    m.set(0, [compact])  # a tensor that owns its storage is not copied again
    assert m._entries[0].tensors[0] is compact
    free = CacheManager()
    free.set(0, [out[3]])
    assert free._entries[0].tensors[0].untyped_storage().data_ptr() == out.untyped_storage().data_ptr()


def test_disk_budget_drops_and_clear_deletes_the_directory():
    one = nbytes(tensors(0))
    m = CacheManager(memory_budget_bytes=0, disk_budget_bytes=2 * one, spill=("disk",))
    for k in range(4):
        m.set(k, tensors(k))
    assert m.keys() == [2, 3] and m.stats()["evicted"] == 2
    d = m.directory
    assert d is not None and len(os.listdir(d)) == 2
    m.drop(2)
    assert len(os.listdir(d)) == 1
    m.clear()
    assert not os.path.exists(d) and m.directory is None and len(m) == 0
    assert m.bytes_by_tier() == {"device": 0, "cpu": 0, "disk": 0}


def test_a_stream_alone_over_budget_still_round_trips():
    m = CacheManager(memory_budget_bytes=10, spill=("disk",))
    m.set("big", tensors(0))
    assert m.tier("big") == "disk"
    got = m.get("big")
    assert all(torch.equal(a, b) for a, b in zip(got, tensors(0)))
    assert m.tier("big") == "disk"  # pushed back out, but the caller got it


@pytest.mark.parametrize("kwargs,match", [
    ({"memory_budget_bytes": -5}, "memory_budget_bytes: expected None \\(unlimited\\) or an int"),
    ({"memory_budget_bytes": True}, "memory_budget_bytes: expected"),
    ({"cpu_budget_bytes": 2.0}, "cpu_budget_bytes: expected"),
    ({"disk_budget_bytes": -1}, "disk_budget_bytes: expected"),
    ({"spill": ("cpu", "tape")}, "spill: expected a subset of"),
    ({"spill": 3}, "spill: expected a subset of"),
    ({"pin_memory": "yes"}, "pin_memory: expected None, True or False"),
])
def test_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CacheManager(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_host_tier_is_pinned_and_round_trips():
    one = nbytes(tensors(0))
    m = CacheManager(memory_budget_bytes=one, spill=("cpu", "disk"), cpu_budget_bytes=one)
    for k in range(3):
        m.set(k, [t.cuda() for t in tensors(k)])
    assert m.tier(1) == "cpu" and all(t.is_pinned() for t in m._entries[1].tensors)
    for k in range(3):
        got = m.get(k)
        assert all(a.is_cuda and torch.equal(a.cpu(), b) for a, b in zip(got, tensors(k)))
