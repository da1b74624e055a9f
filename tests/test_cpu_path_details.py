"""Details of the CPU path that the op-level prefix/needle tests do not reach: the fill flag around op bodies,
scratch buffers never leaking into results, the per-item choice in attention, and short GEMMs."""

import platform
import random

import pytest
import torch
from _invariance import batch_mismatches

import jetdet
from jetdet import backend, ops
from jetdet.kernels.attention import torch_path as attention_torch
from jetdet.kernels.matmul import torch_path as mm_torch
from jetdet.kernels.norms import torch_path as norms_torch


def _all_ops(g):
    x = torch.randn(5, 7, 19, generator=g)
    w = torch.randn(13, 19, generator=g)
    img = torch.randn(3, 6, 11, 9, generator=g)
    cw = torch.randn(5, 6, 3, 3, generator=g)
    q = torch.randn(2, 3, 17, 8, generator=g)
    return [
        ops.linear(x, w, torch.randn(13, generator=g)),
        ops.bmm(x, torch.randn(5, 19, 6, generator=g)),
        ops.conv2d(img, cw, torch.randn(5, generator=g), stride=2, padding=1),
        ops.conv2d(img, torch.randn(16, 6, 1, 1, generator=g)),
        ops.attention(q, q, q),
        ops.layer_norm(x, (19,)),
        ops.group_norm(img, 3),
        ops.softmax(x, -1),
        ops.sum(x),
    ]


def test_op_bodies_restore_the_fill_flag_and_never_read_unwritten_memory(monkeypatch):
    """Op bodies run with torch's NaN fill of new tensors off (it only costs time there). The flag must be
    back on afterwards, and the results must equal those computed with the fill left on: a body that read
    memory it had not written would see NaN in one run and garbage in the other."""
    with jetdet.mode("deterministic"):
        assert torch.utils.deterministic.fill_uninitialized_memory
        fast = _all_ops(torch.Generator().manual_seed(0))
        assert torch.utils.deterministic.fill_uninitialized_memory
        monkeypatch.setattr(backend, "_get_fill", lambda: False)  # never switch it off: every new tensor is NaN
        filled = _all_ops(torch.Generator().manual_seed(0))
    for a, b in zip(fast, filled):
        assert torch.equal(a, b) and a.isfinite().all()


def test_a_float64_default_dtype_changes_nothing():
    """A user's ``torch.set_default_dtype(torch.float64)`` (scientific code does this) must not reach the op bodies'
    own buffers: fp32 inputs give the same fp32 bits as under the float32 default. Before, the exact-size conv
    failed ("Expected out tensor to have dtype float, but got double") and gelu_gate computed in float64."""
    g = torch.Generator().manual_seed(4)
    x, w, b = torch.randn(5, 7, 19, generator=g), torch.randn(16, 19, generator=g), torch.randn(16, generator=g)
    img, q = torch.randn(2, 6, 8, 8, generator=g), torch.randn(2, 3, 17, 8, generator=g)
    cw3, cw1 = torch.randn(5, 6, 3, 3, generator=g), torch.randn(8, 6, 1, 1, generator=g)  # padded; exact buffers
    h = torch.randn(3, 10, 64, generator=g)

    def run():
        with jetdet.mode("deterministic"):
            return [ops.linear(x, w, b), ops.bmm(x, x.transpose(1, 2)),
                    ops.conv2d(img, cw3, stride=2, padding=1), ops.conv2d(img, cw1), ops.attention(q, q, q),
                    ops.layer_norm(x, (19,)), ops.group_norm(img, 3), ops.softmax(x, -1), ops.sum(x),
                    ops.gelu_gate(h)]

    want = run()
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = run()
    finally:
        torch.set_default_dtype(prev)
    for a, c in zip(want, got):
        assert a.dtype == c.dtype == torch.float32 and torch.equal(a, c)


def test_results_never_alias_scratch_buffers():
    """conv2d and the GEMMs reuse per-thread scratch buffers; a later call must not change an earlier result."""
    g = torch.Generator().manual_seed(1)
    for o, size, k in ((5, 11, 3), (16, 8, 3), (16, 8, 1), (7, 4, 1)):  # padded and exact O / Ho*Wo
        w = torch.randn(o, 6, k, k, generator=g)
        x1, x2 = torch.randn(2, 6, size, size, generator=g), torch.randn(2, 6, size, size, generator=g)
        first = ops.conv2d(x1, w, padding=k // 2)
        keep = first.clone()
        ops.conv2d(x2, w, padding=k // 2)
        assert torch.equal(first, keep)
        assert first.untyped_storage().data_ptr() != x1.untyped_storage().data_ptr()


def test_negative_control_torch_flash_attention_is_not_batch_invariant(restore_threads):
    """Why jetdet's CPU attention does not call torch's CPU flash-attention kernel: whether item 0 alone equals item
    0 in a batch depends on the CPU. On an AMD EPYC it differed at this shape; on an Intel Xeon it was equal at every
    shape tried (B 2-16, N 13-1000, D 8-128, fp32/fp16/bf16, 1 and 2 threads). jetdet's attention is equal on both."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(5, 2, 13, 8, generator=g) for _ in range(3))
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    torch.set_num_threads(2)
    assert torch.equal(ops.attention(q[:1], k[:1], v[:1]), ops.attention(q, k, v)[:1])
    alone = flash(q[:1], k[:1], v[:1], 0.0, False, scale=8**-0.5)[0]
    in_batch = flash(q, k, v, 0.0, False, scale=8**-0.5)[0][:1]
    if torch.equal(alone, in_batch):
        pytest.skip("torch's CPU flash attention happens to be batch invariant at this shape on this CPU "
                    f"({platform.processor() or platform.machine()}); it is not on every CPU (docstring)")


def test_short_gemms_match_rows_of_long_ones(restore_threads):
    """Rows past the last 32-row tile run in 8-row tiles: row i must not care which tile height it got."""
    rng = random.Random(3)
    bad = []
    for _ in range(40):
        k, n = rng.choice([1, 2, 3, 5, rng.randint(6, 300)]), rng.randint(1, 120)
        a, b = torch.randn(70, k), torch.randn(k, n)
        bias = torch.randn(n) if rng.random() < 0.5 else None
        for th in (2, 1):
            torch.set_num_threads(th)
            ref = mm_torch.mm_f32(a, b, bias)  # 64 rows in 32-row tiles, 6 in the tail
            windows = []
            for m in (1, 3, 4, 8, 9, 31, 33, 40):
                s = rng.randrange(70 - m)
                windows.append((s, s + m))
            bad += [(k, n, th, w) for w in batch_mismatches(mm_torch.mm_f32, [a], [b, bias], windows=windows, full=ref)]
    assert not bad, bad


@pytest.mark.parametrize("m", [1, 3, 8, 40, 70])
def test_k1_bias_is_added_after_the_product(m, restore_threads):
    """K = 1 with a bias: torch's baddbmm fuses the bias (one rounding) for one tile and not for several on some
    CPUs (an Intel Xeon), so a row depended on its GEMM's tile count. The bias goes after the product: every row is
    round(round(a * b) + bias), whatever M (and so on every CPU). Conv's K = C * kh * kw = 1 alike."""
    g = torch.Generator().manual_seed(m)
    a, b, bias = torch.randn(m, 1, generator=g), torch.randn(1, 96, generator=g), torch.randn(96, generator=g)
    for th in (1, 2):
        torch.set_num_threads(th)
        assert torch.equal(mm_torch.mm_f32(a, b, bias), a * b + bias)
        x, w = torch.randn(m, 1, 5, 7, generator=g), torch.randn(24, 1, 1, 1, generator=g)
        cb = torch.randn(24, generator=g)
        assert torch.equal(ops.conv2d(x, w, cb), x * w.reshape(1, 24, 1, 1) + cb.reshape(1, 24, 1, 1))


def _gemm_cases():
    g = torch.Generator().manual_seed(7)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    return [  # (op, batched inputs, item-alone slice): K > 768, where the one-problem SGEMM splits K at 2 threads
        ("conv2d", lambda n: ops.conv2d(cx[:n], cw, cb, padding=1), (cx := r(3, 128, 6, 6), cw := r(16, 128, 3, 3) / 34,
                                                                    cb := r(16))),
        ("linear", lambda n: ops.linear(lx[:n], lw, lb), (lx := r(20, 902), lw := r(129, 902) / 30, lb := r(129))),
        ("attention", lambda n: ops.attention(q[:n], k[:n], v[:n]), (q := r(3, 1, 16, 64), k := r(3, 1, 1024, 64),
                                                                      v := r(3, 1, 1024, 64))),
    ]


@pytest.mark.parametrize("case", [0, 1, 2], ids=["conv2d", "linear", "attention"])
def test_no_gemm_is_issued_as_one_problem(case, monkeypatch, restore_threads):
    """torch runs a one-problem bmm through MKL's plain SGEMM, which splits K at 2 threads for K >= 769 on an Intel
    Xeon, and two or more problems through SGEMM_BATCH (one thread per problem): an item alone differed from the same
    item in a batch (ONE_PROBLEM in kernels/matmul/torch_path.py). Every GEMM of the CPU path must be a batch of at
    least two problems (checked on any CPU), and the item alone must equal its row of the batch at 1 and 2 threads."""
    name, fn, _ = _gemm_cases()[case]
    sizes = []
    real_bmm, real_baddbmm = torch.bmm, torch.baddbmm

    def bmm(a, b, **kw):
        sizes.append(a.shape[0])
        return real_bmm(a, b, **kw)

    def baddbmm(c, a, b, **kw):
        sizes.append(a.shape[0])
        return real_baddbmm(c, a, b, **kw)

    monkeypatch.setattr(torch, "bmm", bmm)
    monkeypatch.setattr(torch, "baddbmm", baddbmm)
    alone = fn(1)
    assert sizes and min(sizes) >= 2, (name, sizes)
    monkeypatch.undo()
    for th in (1, 2):
        torch.set_num_threads(th)
        assert torch.equal(fn(1), fn(3)[:1]), (name, th)
        assert torch.equal(fn(1), alone)


@pytest.mark.parametrize("shape", [(9, 8, 1, 1), (9, 1, 5, 45)])
def test_group_norm_of_a_layout_ambiguous_batch(shape, restore_threads):
    """With C = 1 or H = W = 1 a channels-last tensor counts as contiguous, so .contiguous() kept its strides, and
    torch.group_norm took its channels-last kernel for the batch but the NCHW one for an item alone (a sweep found
    1.4e-6). The torch path normalises a [B, C, L] view, which has one kernel."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
    groups = 2 if shape[1] % 2 == 0 else 1
    for th in (1, 2):
        torch.set_num_threads(th)
        full = ops.group_norm(x, groups, w, b)
        for i in (0, 4, 8):
            assert torch.equal(ops.group_norm(x[i:i + 1], groups, w, b), full[i:i + 1]), (shape, th, i)


def test_scratch_buffers_over_the_cap_are_not_kept(monkeypatch):
    """A scratch buffer larger than SCRATCH_BYTES is allocated per call and not held; results are unchanged."""
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(3, 6, 13, 11, generator=g), torch.randn(9, 6, 3, 3, generator=g)
    ref = ops.conv2d(x, w, padding=1)
    monkeypatch.setattr(mm_torch, "SCRATCH_BYTES", 1024)
    mm_torch._scratch.bufs = {}
    assert torch.equal(ops.conv2d(x, w, padding=1), ref)
    assert all(b.numel() * 4 <= 1024 for b in mm_torch._scratch.bufs.values())


def _routed_calls(g, grad=False):
    """The four calls the router sends straight to the CPU path, on shapes with tails (and batch 1)."""
    import torch.nn.functional as F

    x = torch.randn(3, 7, 19, generator=g)
    w = torch.randn(13, 19, generator=g, requires_grad=grad)
    b = torch.randn(13, generator=g)
    img = torch.randn(1, 6, 5, 9, generator=g)
    gw, gb = torch.randn(6, generator=g), torch.randn(6, generator=g)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (17, 11, 11))
    return [
        (F.linear(x, w, b), ops.linear(x, w, b)),
        (F.linear(x[0, 0], w), ops.linear(x[0, 0], w)),
        (F.layer_norm(x, (19,), None, None, 1e-6), ops.layer_norm(x, (19,), None, None, 1e-6)),
        (F.layer_norm(x, 19, gw.new_ones(19), None, 1e-6), ops.layer_norm(x, 19, gw.new_ones(19), None, 1e-6)),
        (F.group_norm(img, 3, gw, gb), ops.group_norm(img, 3, gw, gb)),
        (F.scaled_dot_product_attention(q, k, v), ops.attention(q, k, v)),
        (F.scaled_dot_product_attention(q, k, v, scale=0.3), ops.attention(q, k, v, scale=0.3)),
    ]


def test_router_direct_cpu_route_equals_the_public_ops(monkeypatch):
    """In deterministic mode, plain fp32 CPU calls of linear, layer_norm, group_norm and 4-D SDPA go straight
    to the CPU path (jetdet.mode._direct_cpu). They must give bit for bit what the public ops give, and the
    calls the direct route declines (autograd recording) must still be routed through the ops."""
    # the direct route's bodies
    direct = (mm_torch.mm_f32, norms_torch.layer_norm, norms_torch.group_norm, attention_torch.attention)
    taken = []
    orig = backend.run_body
    monkeypatch.setattr(backend, "run_body", lambda fn, *a: (fn in direct and taken.append(fn)) or orig(fn, *a))
    with jetdet.mode("deterministic"):
        pairs = _routed_calls(torch.Generator().manual_seed(0))
    assert len(taken) == len(pairs)
    for i, (routed, public) in enumerate(pairs):
        assert torch.equal(routed, public), i
    taken.clear()
    with jetdet.mode("deterministic"):
        routed, public = _routed_calls(torch.Generator().manual_seed(0), grad=True)[0]
    assert mm_torch.mm_f32 not in taken and torch.equal(routed.detach(), public.detach())


def test_router_direct_cpu_route_keeps_clear_errors():
    """Bad shapes are not taken by the direct route: they reach the public op and its argument checks."""
    import pytest
    import torch.nn.functional as F

    with jetdet.mode("deterministic"):
        with pytest.raises(ValueError, match="weight"):
            F.linear(torch.randn(4, 8), torch.randn(3, 7))
        with pytest.raises(ValueError, match="num_groups"):
            F.group_norm(torch.randn(2, 6, 4, 4), 4)
        with pytest.raises(ValueError, match="normalized_shape"):
            F.layer_norm(torch.randn(2, 6), (5,))
        with pytest.raises(ValueError, match="normalized_shape"):
            F.layer_norm(torch.randn(2, 6), 5)


def _probed_positions(w: torch.Tensor) -> set[int]:
    k, step, offset, _ = mm_torch._probe(w)
    return {offset - w.storage_offset() + i * step for i in range(k)}


def test_packed_weights_follow_every_kind_of_weight_update():
    # the matmul torch path caches the packed right-hand side of a Parameter; a stale pack would be silently
    # wrong numbers

    lin = torch.nn.Linear(96, 80)  # 7680 elements: above PROBE_ALL, so sampled
    x = torch.randn(5, 96)

    def det():
        with torch.no_grad(), jetdet.mode("deterministic"):
            return lin(x)

    def ref():
        return torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double()).float()

    def close(a, b):
        return (a - b).abs().max().item() < 1e-4

    assert close(det(), ref())
    with torch.no_grad():
        lin.weight.mul_(2)  # in place: the version counter moves
    assert close(det(), ref())
    lin.weight.data = torch.randn(80, 96)  # new data, same shape
    assert close(det(), ref())
    lin.weight.data.copy_(torch.randn(80, 96))  # bypasses the version counter: the sampled elements see it
    assert close(det(), ref())
    lin.weight.data += 0.1 * torch.randn(80, 2) @ torch.randn(2, 96)  # a LoRA fused as PEFT does, through .data
    lin.bias.data += 1.0  # 80 elements: all of them compared
    assert close(det(), ref())
    # the sample: 256 elements on 256 different columns (of 96: each column) and rows spread over the weight
    probed = _probed_positions(lin.weight)
    assert len(probed) == 256 and len({i % 96 for i in probed}) == 96 and len({i // 96 for i in probed}) >= 60
    # one element outside the sample (documented): not seen until jetdet.clear_weight_cache()
    far = next(i for i in range(lin.weight.numel()) if i not in probed)
    lin.weight.data.view(-1)[far] += 5.0
    assert not close(det(), ref())
    jetdet.clear_weight_cache()
    assert close(det(), ref())
    with torch.inference_mode():  # ComfyUI loads models under inference mode: such weights are never cached
        inf = torch.nn.Linear(24, 40)
        y1 = jetdet.ops.linear(x[:, :24], inf.weight, inf.bias)
        inf.weight.add_(1.0)  # an in-place update with no version counter to see it by
        y2 = jetdet.ops.linear(x[:, :24], inf.weight, inf.bias)
        assert close(y2, torch.nn.functional.linear(x[:, :24], inf.weight, inf.bias))
        assert not torch.equal(y1, y2)
    img = torch.randn(2, 24, 7, 7)
    for layout in (torch.contiguous_format, torch.channels_last):  # channels-last weights are cached and sampled too
        conv = torch.nn.Conv2d(24, 20, 3, padding=1).to(memory_format=layout)  # 20 channels: packed (padded to 24)
        with torch.no_grad(), jetdet.mode("deterministic"):
            conv(img)
            assert mm_torch._packed.get((id(conv.weight), "conv")) is not None  # the copy was kept
            conv.weight.data += 0.1 * torch.randn_like(conv.weight)  # through .data: the sampled elements see it
            got = conv(img)
        want = torch.nn.functional.conv2d(img.double(), conv.weight.double(), conv.bias.double(), padding=1).float()
        assert close(got, want)


def test_a_replaced_weight_is_not_kept_alive_by_its_packed_copys_sample():
    """The sample is read through a new view at each check: after ``param.data = other`` (``model.half()``, a move to
    another device) nothing of the cache holds the old storage but the packed copy itself."""
    import weakref

    lin = torch.nn.Linear(96, 80)
    with torch.no_grad(), jetdet.mode("deterministic"):
        lin(torch.randn(3, 96))
    old = weakref.ref(lin.weight.data.untyped_storage())
    lin.weight.data = torch.randn(80, 96)
    assert old() is None


def test_scratch_buffers_work_in_and_out_of_inference_mode():
    # ComfyUI runs nodes under torch.inference_mode(); a scratch buffer made there is an inference tensor that
    # cannot be written outside it, so the same conv must work in either order
    x, w = torch.randn(2, 3, 9, 9), torch.randn(5, 3, 3, 3)
    with torch.inference_mode(), jetdet.mode("deterministic"):
        a = torch.nn.functional.conv2d(x, w, padding=1)
    with torch.no_grad(), jetdet.mode("deterministic"):
        b = torch.nn.functional.conv2d(x, w, padding=1)
    with torch.inference_mode(), jetdet.mode("deterministic"):
        c = torch.nn.functional.conv2d(x, w, padding=1)
    assert torch.equal(a, b) and torch.equal(b, c)


@pytest.mark.parametrize("mask", [None, "additive", "rows fully masked", "broadcast over items and queries"])
def test_large_attention_in_chunks_gives_the_whole_calls_bits(monkeypatch, mask):
    """Attention with a large score matrix runs in chunks of heads and query rows (SCORE_CHUNK_ELEMS): the same
    GEMM problems and row softmaxes, so the same bits as one call over everything, with every mask form, and
    still batch invariant. The chunk size is lowered here so that small inputs take several chunks of each kind
    (query rows of one head; several heads; whole items)."""
    g = torch.Generator().manual_seed(5)
    b, h, nq, nk, d = 3, 4, 150, 70, 16
    q, k, v = (torch.randn(b, h, n, d, generator=g) for n in (nq, nk, nk))
    m = None
    if mask == "additive":
        m = torch.randn(b, h, nq, nk, generator=g)
    elif mask == "rows fully masked":
        m = torch.zeros(1, 1, nq, nk).masked_fill(torch.rand(nq, nk, generator=g) > 0.6, float("-inf"))
        m[..., :5, :] = float("-inf")
    elif mask == "broadcast over items and queries":
        m = torch.randn(1, h, 1, nk, generator=g)
    whole = attention_torch.attention(q, k, v, m)  # 126,000 scores: one call at the shipped chunk size
    assert b * h * nq * nk <= attention_torch.SCORE_CHUNK_ELEMS
    for elems in (64 * nk, 2 * nq * nk, 2 * h * nq * nk):  # row chunks of one head; two heads; two whole items
        monkeypatch.setattr(attention_torch, "SCORE_CHUNK_ELEMS", elems)
        chunked = attention_torch.attention(q, k, v, m)
        assert torch.equal(torch.nan_to_num(chunked), torch.nan_to_num(whole)), elems
        assert not batch_mismatches(lambda qq, kk, vv: attention_torch.attention(qq, kk, vv, m if m is None or
                                    m.shape[0] == 1 else m[: qq.shape[0]]), [q, k, v], windows=[(0, 1)], full=chunked)


def test_large_attention_in_chunks_takes_strided_and_16_bit_inputs(monkeypatch):
    """Chunked attention on q/k/v as models pass them (heads split from a packed qkv by a transpose, so no
    dimension is contiguous in the [b, h, n, d] view; fp16), with the grouped GEMM's per-group loop forced on:
    the bits of the one-call path."""
    g = torch.Generator().manual_seed(9)
    b, h, n, d = 2, 3, 90, 8
    qkv = torch.randn(b, n, 3, h, d, generator=g).to(torch.float16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [b, h, n, d], strided
    assert not q.is_contiguous()
    whole = attention_torch.attention(q, k, v)
    monkeypatch.setattr(attention_torch, "SCORE_CHUNK_ELEMS", 2 * n * n)  # chunks of two heads: groups of 2
    from jetdet.kernels.matmul import torch_path as mm

    for loop in (1 << 62, 0):
        monkeypatch.setattr(mm, "GROUP_LOOP_ELEMS", loop)
        out = attention_torch.attention(q, k, v)
        assert out.dtype == torch.float16 and torch.equal(out, whole), loop


def test_conv_weights_are_read_in_place_where_a_copy_would_equal_them(monkeypatch):
    """A contiguous fp32 conv weight whose channel count needs no padding is the GEMM's operand as it is (an inference
    tensor, as every ComfyUI weight, was copied at every call); the result equals the copied weight's bit for bit
    (a channels-last weight still takes the copy)."""
    from jetdet.kernels.conv2d import torch_path as conv_torch

    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 6, 9, 9, generator=g)
    packs = []
    real = conv_torch.cached_pack
    monkeypatch.setattr(conv_torch, "cached_pack", lambda b, tag, make: packs.append(tag) or real(b, tag, make))
    for o in (16, 12):  # 12 output channels pad to 16: that weight is copied
        with torch.inference_mode():
            w = torch.randn(o, 6, 3, 3, generator=g)
            in_place = ops.conv2d(x, w, padding=1)
            copied = ops.conv2d(x, w.contiguous(memory_format=torch.channels_last), padding=1)
        assert torch.equal(in_place, copied), o
    assert packs == ["conv", "conv", "conv"]  # the channels-last 16, then both 12s: never the contiguous 16


@pytest.mark.parametrize("threads", [1, 2])
def test_conv_in_item_groups_gives_the_whole_batchs_bits(monkeypatch, restore_threads, threads):
    """Past COLS_GROUP_BYTES a conv pads its input and gathers its columns a group of items at a time, in buffers
    of one group, and the groups' GEMMs give the bits of one GEMM over the batch (each item is its own problem
    either way): groups forced down to two items here, odd batches (5, 7: a group of three, never a lone item)
    included, with padding and stride 2 and without; the 1x1 conv whose input is its columns takes no groups.
    Negative control: ``item_groups`` really split these batches, and the buffers held only one group."""
    from jetdet.kernels.conv2d import torch_path as conv_torch

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(6)
    cases = [(torch.randn(7, 6, 13, 11, generator=g), torch.randn(9, 6, 3, 3, generator=g), 1, 1),
             (torch.randn(7, 5, 9, 9, generator=g), torch.randn(16, 5, 3, 3, generator=g), 2, 1),
             (torch.randn(7, 4, 8, 8, generator=g), torch.randn(8, 4, 2, 2, generator=g), 2, 0),
             (torch.randn(7, 6, 8, 8, generator=g), torch.randn(12, 6, 1, 1, generator=g), 1, 0)]
    bias = torch.randn(16, generator=g)
    whole = [[ops.conv2d(x[:n], w, bias[: w.shape[0]], stride=s, padding=p) for n in (7, 5, 2)] for x, w, s, p in cases]
    assert conv_torch.item_groups(7, 1000) == [7]
    monkeypatch.setattr(conv_torch, "COLS_GROUP_BYTES", 1)
    assert conv_torch.item_groups(7, 1000) == [3, 2, 2]  # at least max(2, torch's threads) items a group
    assert conv_torch.item_groups(5, 1000) == [3, 2] and conv_torch.item_groups(1, 1000) == [1]
    seen = []
    real = conv_torch.scratch_buffer
    monkeypatch.setattr(conv_torch, "scratch_buffer", lambda tag, shape, *a, **k: seen.append((tag, shape))
                        or real(tag, shape, *a, **k))
    for (x, w, s, p), ref in zip(cases, whole):
        for n, r in zip((7, 5, 2), ref):
            assert torch.equal(ops.conv2d(x[:n], w, bias[: w.shape[0]], stride=s, padding=p), r), (w.shape, s, p, n)
            assert torch.equal(ops.conv2d(x[n - 1 : n], w, bias[: w.shape[0]], stride=s, padding=p)[0], r[-1])
    held = {shape[0] for tag, shape in seen if tag.startswith(("conv.cols", "conv.pad"))}
    assert max(held) == 3, seen  # 7 and 5 items: a first group of 3 (2 items: one group; 1 item alone)
