"""The batch-invariant torch path of the GEMMs (``mm``, ``bmm``), and the pieces the other torch paths
share: row-tiled GEMMs, packed-weight cache, per-thread scratch buffers. The notes below cover all of them.

Why this is needed: MKL's fp32 GEMM picks its blocking and thread split from the problem shape, so on this
class of machine ``(x @ W)[:1]`` differs from ``x[:1] @ W`` at M=257 (~2e-5), and mkldnn's conv2d differs
between batch 1 and batch 6 (~8e-7). Row *i* of a GEMM must not depend on how many rows there are.

How: every GEMM is cut into row tiles of a fixed height ``ROW_TILE`` (large GEMMs put their rows in
``BIG_TILE``-row tiles first; rows past the last full tile go into zero-padded tiles of ``TAIL_TILE`` rows) and
run as batched GEMMs of identical ``[tile, K] @ [K, N]`` problems, so MKL runs the same code path with the same K
order for every row of a problem; GEMMs of few rows against a large weight run each row tile over column chunks of
the weight instead (``CHUNK_BELOW_ROWS``), and GEMMs against the transpose of a large weight that cannot be cached
(ComfyUI's inference tensors) run as ``w @ x^T`` with x's row tiles as the columns (``WEIGHT_MAJOR``). Which
height a row gets, and whether its GEMM is chunked, depends on M, so the path rests on one measured premise: a
row's bits are the same in an 8-, 32- and 128-row problem, over the whole width or a column chunk, and as 8, 32 or
128 columns of a weight-major problem (``bench/tile_heights.py`` checks it on the machine it runs on; on the Intel
Xeon it was measured on heights 4..128, chunks and the weight-major form held, 256 rows failed). Convolution is one
strided im2col gather per item followed by one GEMM per item, ``W [O, C*kh*kw] @ cols [C*kh*kw, Ho*Wo]``, all
items' problems identical and batched. Attention is two row-tiled GEMMs around a row-wise softmax. Norms and softmax use
torch's row-wise CPU kernels, which reduce each row serially in an order fixed by the row length; reductions
are kept to >= 2 output rows, because torch splits a reduction across threads only when it has a single
output.

The tests (tests/test_ops_invariance.py, tests/test_cpu_sweep.py, tests/test_cpu_path_details.py,
tests/test_registry.py) check all of this bitwise at batch 1..8, random slots, and 1 vs 2 threads, with
negative controls showing plain torch differing.

fp16/bf16 inputs are computed in fp32 and rounded once at the end.
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
import weakref

import torch
import torch.nn.functional as F

ROW_TILE = 32
# MKL switches to another kernel for narrow outputs (N < 16 measured here), and that kernel's result for a
# row depends on where the row sits. Padding N to a multiple of COL_PAD with zero columns keeps every
# problem on the wide-N path (a 150-shape random sweep: 10 failures unpadded, 0 padded to 8 or 16).
COL_PAD = 16


def f32(t):
    return t if t is None or t.dtype == torch.float32 else t.to(torch.float32)


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def pad_cols(b: torch.Tensor) -> torch.Tensor:
    pad = (-b.shape[-1]) % COL_PAD
    return F.pad(b, (0, pad)).contiguous() if pad else b.contiguous()


# Packed right-hand sides of nn.Parameter weights (fp32, contiguous, N padded), keyed by the Parameter and
# checked against its data pointer and version counter, so an in-place update (optimizer step, load_state_dict,
# `param.copy_`) or new data (`param.data = t`) repacks. Re-packing a DiT linear's weight on every call cost
# ~25 us of ~200 us (measured, 1 thread). Not cached: inference tensors (created under torch.inference_mode(), as
# ComfyUI loads every model), which keep no version counter, so an in-place update could not be seen.
# A write through `param.data` (`param.data += delta`, as PEFT's fuse_lora merges a LoRA; `param.data.copy_(w)`)
# moves neither the pointer nor the version counter, and comparing the whole weight at every call costs most of what
# the cache saves. So each CPU copy also keeps the bits of PROBES elements of the weight (all of a weight of at most
# PROBE_ALL elements), at a fixed stride through its memory, and is made again when any of them differs: a write
# that changes the whole weight is seen, one that changes only elements outside the sample is not
# (clear_weight_cache() after it). The sample is read through a new view at each check (a kept view would keep the
# old storage alive after `param.data = other`). CUDA copies are not probed (a host sync per call).
_packed: dict[int, tuple] = {}
PROBES = 256
PROBE_ALL = 4096


def clear_weight_cache() -> None:
    """Drop every packed weight copy, so the next call packs each weight again: needed after a write through
    ``param.data`` that changes only a few elements of a weight (such a write moves neither its data pointer nor
    its version counter; one that changes the whole weight is found by the copies' sampled elements on the CPU)."""
    _packed.clear()


_INT_OF = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _probe(owner: torch.Tensor) -> tuple | None:
    """``(k, step, offset, bits)``: where :func:`_probe_bits` reads the sample of ``owner``, and its bits now; None
    for a tensor that is not dense (its elements do not fill one span of memory). A dense tensor in another layout
    (a channels-last conv weight) is sampled in memory order. The stride is coprime with a row's length (the
    elements per index of the outermost dimension in memory: a GEMM's K for a weight), so the sample falls on that
    many different columns as well as on rows spread over the weight."""
    t, n = owner.detach(), owner.numel()
    if n == 0:
        return None
    dims = sorted(range(t.dim()), key=lambda d: (t.stride(d), t.size(d)))
    span = 1
    for d in dims:
        if t.size(d) != 1 and t.stride(d) != span:
            return None
        span *= t.size(d)
    if n <= PROBE_ALL:
        k, step = n, 1
    else:
        k, step = PROBES, n // PROBES
        row = n // t.size(dims[-1])
        while step > 1 and math.gcd(step, row) != 1:
            step -= 1
    spec = (k, step, t.storage_offset() + step // 2 if k < n else t.storage_offset())
    return (*spec, _probe_bits(t, *spec).clone())


def _probe_bits(owner: torch.Tensor, k: int, step: int, offset: int) -> torch.Tensor:
    v = owner.detach().as_strided((k,), (step,), offset)
    size = v.element_size()
    return v.view(_INT_OF[size]) if v.dtype.is_floating_point and size in _INT_OF else v  # NaN == NaN, -0.0 != 0.0


def _graph_aware(b: torch.Tensor) -> bool:
    return b.is_cuda


def _capturing(b: torch.Tensor) -> bool:
    return torch.cuda.is_current_stream_capturing()


def _make_on_own_thread(b: torch.Tensor, make):
    """``(make(), done)``: ``make()`` run on a new thread, ordered after the work queued so far on the caller's
    stream; ``done`` is the event after it on CUDA (None on CPU), which the caller's stream waits for."""
    cuda = b.is_cuda
    if cuda:
        caller = torch.cuda.current_stream(b.device)
        ready = caller.record_event()
    res: dict = {}

    def run():
        try:
            with torch.no_grad():
                if not cuda:
                    res["out"] = make()
                    return
                with torch.cuda.device(b.device):
                    stream = torch.cuda.current_stream(b.device)
                    stream.wait_event(ready)
                    res["out"] = make()
                    res["done"] = stream.record_event()
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            res["err"] = e

    t = threading.Thread(target=run, name="jetdet-pack", daemon=True)
    t.start()
    t.join()
    if "err" in res:
        raise res["err"]
    return res["out"], res.get("done")


def _current_raw_stream(device: torch.device) -> int:
    """The current CUDA stream's handle, one C call (``torch.cuda.current_stream`` builds a Python object, ~2 us)."""
    return torch._C._cuda_getCurrentRawStream(device.index)


def _use_on_stream(b: torch.Tensor, packed: torch.Tensor, done, streams: set) -> None:
    """A CUDA copy used on the current stream: the first time on a stream, that stream waits for the copy to be made
    and the allocator is told the stream uses it (so freeing the copy waits for that stream's work)."""
    if done is None:
        return
    raw = _current_raw_stream(b.device)
    if raw in streams:
        return
    stream = torch.cuda.current_stream(b.device)
    stream.wait_event(done)
    packed.record_stream(stream)
    streams.add(raw)


def _owner(b: torch.Tensor) -> torch.Tensor:
    return b._base if b._base is not None else b


def cacheable(b: torch.Tensor) -> bool:
    """Whether :func:`cached_pack` keeps copies of ``b``: a view of an nn.Parameter that is not an inference tensor."""
    owner = _owner(b)
    return isinstance(owner, torch.nn.Parameter) and not owner.is_inference()


def cached_pack(b: torch.Tensor, tag: str, make):
    if not cacheable(b):
        return make()
    owner = _owner(b)
    graph_aware = _graph_aware(b)
    if graph_aware and _capturing(b):
        return make()
    key = (id(owner), tag)
    sig = (tuple(b.shape), b.stride(), b.storage_offset(), b.dtype, owner.data_ptr(), owner._version)
    ent = _packed.get(key)
    if ent is not None and ent[0]() is owner and ent[1] == sig:
        if graph_aware:
            _use_on_stream(b, ent[2], ent[3], ent[4])
            return ent[2]
        k, step, offset, bits = ent[5]
        if torch.equal(_probe_bits(owner, k, step, offset), bits):  # the sampled elements as when packed
            return ent[2]
    done, streams = None, set()
    if graph_aware:
        packed, done = _make_on_own_thread(b, make)
        _use_on_stream(b, packed, done, streams)
    else:
        with torch.no_grad():
            packed = make()
    if len(_packed) > 1024:
        _packed.clear()
    probe = None if graph_aware else _probe(owner)
    if probe is None and not graph_aware:
        return packed  # nothing to check a later call against: not kept
    # the default argument keeps the dict reachable at interpreter exit, when module globals are None
    _packed[key] = (weakref.ref(owner, lambda _r, k=key, d=_packed: d.pop(k, None)), sig, packed, done, streams,
                    probe)
    return packed


# Scratch buffers (im2col columns, padded inputs, GEMM outputs that are copied out again) are kept per thread
# and reused, so a call does not pay a fresh multi-MB allocation and its first-touch page faults. How much that
# saves depends on the allocator's state: `python bench/cpu_costs.py` times the TinyUNet gathers into a fresh
# and a reused buffer (within ~10% of each other in the run in bench/results/). Nothing returned to the caller
# ever aliases a scratch buffer.
_scratch = threading.local()
SCRATCH_BYTES = 64 << 20  # per thread; least recently used buffers are dropped past this


def scratch_buffer(tag: str, shape: tuple, like: torch.Tensor, zero: bool = False) -> torch.Tensor:
    """A per-thread float32 buffer of ``shape`` on ``like``'s device, reused across calls. ``zero``: created
    zero-filled; callers relying on that only ever write the same interior region of it."""
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    # a buffer made under torch.inference_mode() is an inference tensor that cannot be written outside it (and
    # ComfyUI runs every node under inference mode): keep one per mode
    key = (tag, shape, like.device, torch.is_inference_mode_enabled())
    buf = bufs.pop(key, None)
    if buf is None:
        make = torch.zeros if zero else torch.empty
        buf = make(shape, dtype=torch.float32, device=like.device)
        if buf.numel() * 4 > SCRATCH_BYTES:  # too big to keep: a fresh buffer each call, nothing held
            return buf
        total = sum(b.numel() for b in bufs.values()) * 4 + buf.numel() * 4
        while bufs and total > SCRATCH_BYTES:
            total -= bufs.pop(next(iter(bufs))).numel() * 4
    bufs[key] = buf  # re-inserted last: dict order is recency order
    return buf


# ONE_PROBLEM: torch runs a bmm/baddbmm of one problem through MKL's plain SGEMM and one of two or more through
# SGEMM_BATCH. On an Intel Xeon (AVX-512) the plain SGEMM at 2 threads splits K for K >= 769 (its result equals the
# sum of two half-K products, bit for bit), while the batched call computes each problem on one thread. So an item
# alone (one problem) differed from the same item in a batch: conv2d with C*kh*kw > 768 at batch 1, an [M <= 32, K]
# GEMM, one (batch, head) of attention over more than 768 keys (a helper's sweep: 203 of 15,728 cases, every one with
# K >= 770, at 2 threads only; not seen on the AMD EPYC these paths were first measured on). gemm() never issues a
# single problem: it computes the problem twice in one batched call and keeps the first, so every problem of every
# call takes the batched path. That doubles the work of exactly those calls (a 4x8 @ 8x16 linear: 24 -> 33 us; a
# TinyUNet forward at batch 1, 2 threads: 3.1 -> 3.8 ms).


def gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``out[g] = a[g] @ b[g] (+ bias)``, a ``[G, M, K]``, b ``[G, K, N]``, out ``[G, M, N]`` fp32 (operands may be
    expanded views; ``bias`` broadcasts against ``[M, N]``), always as a batched call of two or more problems
    (ONE_PROBLEM). The bias is the GEMM's C operand (beta = 1: no separate pass over the output), except for K = 1,
    where it is added after the product (BIAS_AFTER_K1)."""
    if a.shape[0] == 1:
        a2, b2 = a.expand(2, *a.shape[1:]), b.expand(2, *b.shape[1:])
        pair = torch.empty((2, *out.shape[1:]), dtype=out.dtype, device=out.device)
        gemm(a2, b2, pair, bias)
        out.copy_(pair[:1])
        return out
    if bias is None or a.shape[2] == 1:
        torch.bmm(a, b, out=out)
        if bias is not None:
            out += bias
    else:
        torch.baddbmm(bias, a, b, out=out)
    return out


def _tiled_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out[g] = a[g] @ b[g] for groups g, computed as fixed [ROW_TILE, K] @ [K, Np] problems.

    a: [G, M, K]; b: [G, K, Np] (Np a multiple of COL_PAD). Returns [G, Mp, Np] with Mp = M rounded up to
    ROW_TILE; rows past M are the products of zero padding.
    """
    g, m, k = a.shape
    np_ = b.shape[2]
    mp = round_up(m, ROW_TILE)
    a = F.pad(a, (0, 0, 0, mp - m)) if mp != m else a.contiguous()
    t = mp // ROW_TILE
    out = torch.empty((g * t, ROW_TILE, np_), dtype=torch.float32, device=a.device)
    if t > 1 and g > 1 and g * t * k * np_ >= GROUP_LOOP_ELEMS:
        # one batched call per group, its tiles against a stride-0 view of its b: the same problems (so the same
        # bits) without a copy of b per tile, which a single call over all groups needs (a (group, tile) batch of
        # b views has no single stride)
        a3, out3 = a.view(g, t, ROW_TILE, k), out.view(g, t, ROW_TILE, np_)
        for i in range(g):
            gemm(a3[i], b[i].expand(t, k, np_), out3[i])
        return out.view(g, mp, np_)
    bb = b.unsqueeze(1).expand(g, t, k, np_).reshape(g * t, k, np_)
    return gemm(a.view(g * t, ROW_TILE, k), bb, out).view(g, mp, np_)


# A grouped GEMM whose per-tile copies of b would pass this many elements (4 MB of fp32) runs one call per group
# instead (`python bench/cpu_large.py --parts` times attention's product at a Flux-like size both ways); a loop
# over many tiny groups (64 x [77, 40] @ [40, 77]) cost more in Python than the copy (0.86 against 0.54 ms in a
# one-off run), hence the threshold.
GROUP_LOOP_ELEMS = 1 << 20


# Rows past the last full ROW_TILE tile of a plain GEMM go into tiles of TAIL_TILE rows: a batch-4 timestep or
# adaLN linear then computes 8 rows, not 32. A row's result is the same in a 4-, 8-, 16- or 32-row tile
# (measured: 0 of 200 random K, N at 1 and 2 threads differ; 1- and 2-row tiles differ in 199 of 200, as
# another kernel takes them). torch runs a bmm whose per-problem K*M*N is below 400 in a plain loop of its
# own, not MKL, so the tail tile is used only where its problems are at least twice that size.
TAIL_TILE = 8


# A GEMM with K x N of at least BIG_TILE_MIN_KN and at least two BIG_TILE-row tiles' worth of rows runs those
# tiles BIG_TILE rows high, and the rest as below. MKL's batched GEMM repacks b for every problem, so at DiT sizes
# 32-row problems spend most of their time doing that (`python bench/cpu_large.py --parts` times a
# [1024, 3072] @ [3072, 12288] GEMM both ways beside F.linear). A row's bits are the same in an 8-, 32- or
# 128-row problem (measured: bench/tile_heights.py, heights 8..128 at 1, 2 and 4 threads), so which rows go into
# which height, which depends on M, changes no row; 256-row problems change MKL's K blocking for some K (1100, 1428
# at N 640) and are not used.
BIG_TILE = 128
BIG_TILE_MIN_KN = 1 << 20


# Column chunks: a GEMM against a large weight (K x N >= BIG_TILE_MIN_KN) with fewer than CHUNK_BELOW_ROWS rows runs
# each row tile as one batched call of [height, K] @ [K, chunk] problems over column chunks of the weight. MKL's
# batched GEMM packs b per problem and runs each problem on one thread, so the 32-row problems of a small batch
# (a batch-4 call of 24 text tokens: 96 rows, three problems) each packed the whole weight, on at most as many
# threads as there were problems, and a call of one problem ran it twice (ONE_PROBLEM). Chunks pack each part of the
# weight once per row tile, spread over every thread; `python bench/cpu_large.py --parts` times both. A row's bits
# are the same in a column chunk as in the whole-width problem (measured: bench/tile_heights.py checks chunks of
# every width chunk_cols() picks at heights 8, 32 and 128, at 1, 2 and 4 threads), so where a call is chunked, which
# depends on M, changes no row. Calls of 2 * BIG_TILE rows or more keep the problems above: their tiles already give
# every thread work.
CHUNK_COLS = 512
MIN_CHUNK_COLS = 256
CHUNK_BELOW_ROWS = 2 * BIG_TILE
# ... and K of at least this: a thin weight ([64, 16384]) packs cheaply, and its 32 chunks cost more than they save
# (a review probe, 1 thread: [200, 64] @ [64, 16384] 3.5 ms whole-width, 5.5 ms in chunks)
CHUNK_MIN_K = 512


@functools.lru_cache(maxsize=256)
def chunk_cols(np_: int) -> int:
    """The column-chunk width for a padded width ``np_``: the divisor of ``np_`` (a multiple of COL_PAD) nearest
    CHUNK_COLS that gives at least two chunks of at least MIN_CHUNK_COLS columns; 0 when there is none."""
    units, best = np_ // COL_PAD, 0
    for c in range(2, units + 1):
        width = np_ // c
        if width < MIN_CHUNK_COLS:
            break
        if units % c == 0 and (not best or abs(width - CHUNK_COLS) < abs(best - CHUNK_COLS)):
            best = width
    return best


def chunk_heights(m: int) -> list[int]:
    """Row-tile heights of a column-chunked GEMM of ``m`` rows: BIG_TILE-row tiles while that many rows are left; a
    rest of more than two ROW_TILEs is one more BIG_TILE-row tile, any other rest ROW_TILE-row tiles, the last of them
    TAIL_TILE rows high if it has no more rows than that. Every tile packs the whole weight again, so fewer, taller
    tiles win over zero padding: a 96-row rest in one 128-row tile rather than three 32-row ones took two DiT blocks
    at width 3072 (batch 4 x 24 tokens, 2 threads) from 436 to 358 ms, while a 64-row rest stays in two (a scratch
    A/B; `python bench/cpu_large.py --parts` times the 96-row GEMM). A tail is one tile, not TAIL_TILE-row tiles as
    :func:`mm_rows` cuts it."""
    big, rest = divmod(m, BIG_TILE)
    if rest > 2 * ROW_TILE:
        return [BIG_TILE] * (big + 1)
    full, tail = divmod(rest, ROW_TILE)
    return [BIG_TILE] * big + [ROW_TILE] * full + ([TAIL_TILE if tail <= TAIL_TILE else ROW_TILE] if tail else [])


def _mm_chunked(a: torch.Tensor, bp: torch.Tensor, bias: torch.Tensor | None, width: int,
                heights: list[int] | None = None) -> torch.Tensor:
    """[M, K] @ [K, Np] (+ bias) in column chunks of ``width`` (see CHUNK_COLS), row tiles of ``heights`` (default
    :func:`chunk_heights`; bench/tile_heights.py passes its own); a fresh [Mp, Np] tensor."""
    m, k = a.shape
    np_ = bp.shape[1]
    c = np_ // width
    heights = chunk_heights(m) if heights is None else heights
    mp = sum(heights)
    a = F.pad(a, (0, 0, 0, mp - m)) if mp != m else a.contiguous()
    out = torch.empty((mp, np_), dtype=torch.float32, device=a.device)
    chunks = bp.view(k, c, width).transpose(0, 1)  # [c, K, width], rows Np apart
    bias_c = bias.view(c, 1, width) if bias is not None else None
    r0 = 0
    for h in heights:
        # the problems' own output, then one copy into place: bmm into the strided view of `out` takes another
        # path in torch, whose rows differ (tests/test_cpu_sweep.py's negative control)
        part = scratch_buffer("mm_chunk", (c, h, width), a)
        gemm(a[r0 : r0 + h].unsqueeze(0).expand(c, h, k), chunks, part, bias_c)
        out[r0 : r0 + h].view(h, c, width).copy_(part.transpose(0, 1))
        r0 += h
    return out


# WEIGHT_MAJOR: a GEMM against the transpose of a large row-major weight that the cache cannot hold (``x @ w.t()``, w
# [N, K], K x N >= WEIGHT_MAJOR_MIN_KN, K and N not thin (below), how F.linear reads nn.Linear's weight; not
# cacheable: inference tensors, which is every ComfyUI model's weight, and weights that are not Parameters, such as
# ones cast per call, or any weight inside torch.compile, where the op sees a plain tensor) is computed as
# ``out^T = w @ x^T``: problems ``[rows, K] @ [K, height]`` over row chunks of w read where it lies (about WEIGHT_ROWS
# rows each) and row tiles of x (heights as chunk_heights) transposed into a scratch copy. The weight is never copied.
# The other path needs b row-major, so it transposed w into a new [K, N] copy at every such call: 187 of 285 ms for
# [96, 3072] @ [3072, 21504] here. Reading w.t() in place as a column-major operand instead is not batch invariant at
# 3 threads and more (tests/test_cpu_sweep.py); here both operands are row-major.
# - Same bits: x's rows are the problems' columns, so the measured premise is that a column's bits depend neither on
#   how many columns its problem has (8 to 128, as for rows) nor on the thread count, nor on whether a call batches
#   its problems over chunks or over tiles. bench/tile_heights.py checks it; on the Intel Xeon 0 of 200 random shapes
#   differed (K 16-5000, 16-1100 rows per chunk, odd counts too, heights 8-128 at several positions, 1-6 threads);
#   256 columns differed, as 256 rows do.
# - Which path a GEMM takes depends on b's layout, size and cacheability, never on M.
# - Cost (2 threads, fp32, ms, the copy path -> this one; F.linear in brackets): [96, 3072] @ [3072, 21504] 280 -> 61
#   (55); [2, 3072] @ [3072, 18432] 179 -> 16 (8); [1024, 3072] @ [3072, 3072] 113 -> 68 (62); [2048, 1152] @
#   [1152, 1152] 19.7 -> 21.2 (15.9). Many rows against a narrow weight lose to the transposes of x and of the output
#   (5-15% at these widths, more for thinner weights), hence the thresholds, and cacheable Parameters keep their
#   cached copy (at many rows it is faster: [4096, 1280] @ [1280, 320] 10.6 cached, 14.8 here). ``python
#   bench/cpu_large.py --parts`` times it.
WEIGHT_ROWS = 512
WEIGHT_MAJOR_MIN_KN = BIG_TILE_MIN_KN
# ... and K and N of at least these: the form transposes x (M x K) and the output (M x N) where the copy transposes the
# weight (K x N), so a thin or narrow weight at many rows lost up to 4x (a review's sweep, 2 threads: [4096, 31776] @
# [31776, 33] 257 against 64 ms; [1024, 16] @ [16, 65536] 1.9x). No diffusion model's large linear is that thin.
WEIGHT_MAJOR_MIN_K = 256
WEIGHT_MAJOR_MIN_N = 512


def _cpu_vendor() -> str:
    """The CPU's vendor id (``GenuineIntel``, ``AuthenticAMD``, ...), or "" where it cannot be read."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    text = platform.processor() or ""  # Windows: "... GenuineIntel" / "... AuthenticAMD"
    return next((v for v in ("GenuineIntel", "AuthenticAMD") if v in text), "")


def _weight_major_default() -> bool:
    """Whether the weight-major form is used: its premise (a column's bits do not depend on the number of columns
    of its problem) held on the Intel Xeon it was built on (0 of 200 shapes differed) and fails on an AMD EPYC (92
    cases in ``bench/tile_heights.py``, and ``tests/test_cpu_sweep.py``'s invariance test: single rows differed from
    the whole call even at 1 thread). So it is on with MKL on an Intel CPU only; elsewhere uncached weights are
    copied row-major at every call (slower, the premise the rest of the path rests on). ``JETDET_CPU_WEIGHT_MAJOR``
    = 1 or 0 overrides (after ``python bench/tile_heights.py`` passes on the machine)."""
    import os

    env = os.environ.get("JETDET_CPU_WEIGHT_MAJOR", "").strip()
    if env in ("0", "1"):
        return env == "1"
    return torch.backends.mkl.is_available() and _cpu_vendor() == "GenuineIntel"


#: Whether uncached large weights take the weight-major form on this machine (_weight_major_default, at import).
WEIGHT_MAJOR = _weight_major_default()


def weight_rows(b: torch.Tensor) -> torch.Tensor | None:
    """w [N, K] when b [K, N] is its transpose with w row-major, K x N >= WEIGHT_MAJOR_MIN_KN, K >= WEIGHT_MAJOR_MIN_K
    and N >= WEIGHT_MAJOR_MIN_N, on a CPU where the form is used (WEIGHT_MAJOR); else None."""
    if b.dim() != 2 or not WEIGHT_MAJOR:
        return None
    k, n = b.shape
    if k < WEIGHT_MAJOR_MIN_K or n < WEIGHT_MAJOR_MIN_N or k * n < WEIGHT_MAJOR_MIN_KN or b.stride() != (1, k):
        return None
    return b.t()


@functools.lru_cache(maxsize=256)
def weight_row_chunks(n: int) -> tuple[tuple[int, int], ...]:
    """How w's ``n`` rows are cut into problems: ``(first row, rows)`` per chunk, about WEIGHT_ROWS rows each, row
    counts differing by at most one. At least two chunks, and never a row count that only one chunk has, so that
    every call over one tile of x has two problems or more (ONE_PROBLEM would compute a lone one twice): the chunk
    count nearest ``n / WEIGHT_ROWS`` that allows it (n = 1537: 5 chunks of 308 and 307 rows, not 513, 512, 512)."""
    want = max(2, round(n / WEIGHT_ROWS))
    for c in sorted(range(2, max(want * 2, 8) + 1), key=lambda c: (abs(c - want), c)):
        q, r = divmod(n, c)
        if q and (r == 0 or (r >= 2 and c - r >= 2)):
            break
    else:
        c = want
    sizes = even_sizes(n, c)
    return tuple(zip(itertools.accumulate(sizes, initial=0), sizes))


def even_sizes(n: int, parts: int) -> list[int]:
    """``n`` cut into ``parts`` sizes that differ by at most one, the larger first."""
    q, r = divmod(n, parts)
    return [q + 1] * r + [q] * (parts - r)


def _mm_weight_major(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                     heights: list[int] | None = None) -> torch.Tensor:
    """[M, K] @ w.t() (+ bias) for w [N, K] fp32 row-major (WEIGHT_MAJOR), row tiles of ``heights`` (default
    :func:`chunk_heights`; bench/tile_heights.py passes its own); a fresh [Mp, N] tensor.

    Every problem is ``w[chunk] @ x_tile^T``, [rows, K] @ [K, height]. A run of t equal-height tiles is one call per
    chunk over its t tiles when there are at least as many tiles as chunks (many rows), else one call per tile over
    its chunks: the same problems either way, batched the way that makes fewer calls."""
    m, k = a.shape
    n = w.shape[0]
    heights = chunk_heights(m) if heights is None else heights
    out = torch.empty((sum(heights), n), dtype=torch.float32, device=a.device)
    chunks = weight_row_chunks(n)
    r0 = 0
    for h, t in ((h, len(list(run))) for h, run in itertools.groupby(heights)):
        # the tiles of x, transposed: [t, K, h], rows past M zero (a scratch buffer: every element written each call)
        xt = scratch_buffer("wm_x", (t, k, h), a)
        xv = xt.transpose(1, 2)
        full = max(0, min(t, (m - r0) // h))
        if full:
            xv[:full].copy_(a[r0 : r0 + full * h].reshape(full, h, k))
        for i in range(full, t):
            rows = max(0, min(h, m - r0 - i * h))
            if rows:
                xv[i, :rows].copy_(a[r0 + i * h : r0 + i * h + rows])
            xv[i, rows:].zero_()
        dst = out[r0 : r0 + t * h].view(t, h, n)
        if t >= len(chunks):
            for n0, rows in chunks:
                # the problems' own output, then one copy into place (as _mm_chunked)
                part = scratch_buffer("wm_out", (t, rows, h), a)
                gemm(w[n0 : n0 + rows].unsqueeze(0).expand(t, rows, k), xt, part,
                     bias[n0 : n0 + rows].view(rows, 1) if bias is not None else None)
                dst[:, :, n0 : n0 + rows].copy_(part.transpose(1, 2))
        else:
            for i in range(t):
                for n0, span, c, rows in _chunk_groups(chunks):
                    part = scratch_buffer("wm_out", (c, rows, h), a)
                    gemm(w[n0 : n0 + span].view(c, rows, k), xt[i].unsqueeze(0).expand(c, k, h), part,
                         bias[n0 : n0 + span].view(c, rows, 1) if bias is not None else None)
                    dst[i, :, n0 : n0 + span].copy_(part.view(span, h).t())
        r0 += t * h
    return out


@functools.lru_cache(maxsize=256)
def _chunk_groups(chunks: tuple) -> tuple[tuple[int, int, int, int], ...]:
    """Consecutive chunks of equal rows as (first row, rows in all, count, rows each): one batched call each."""
    groups = [list(run) for _, run in itertools.groupby(chunks, key=lambda chunk: chunk[1])]
    return tuple((g[0][0], len(g) * g[0][1], len(g), g[0][1]) for g in groups)


def mm_rows(m: int, k: int, np_: int) -> tuple[int, int, int]:
    """(rows in full ROW_TILE tiles, padded tail rows, tail tile height) for an [m, k] @ [k, np_] GEMM."""
    full = m // ROW_TILE * ROW_TILE
    rest = m - full
    if not rest:
        return full, 0, ROW_TILE
    if k * TAIL_TILE * np_ >= 800:
        return full, round_up(rest, TAIL_TILE), TAIL_TILE
    return full, ROW_TILE, ROW_TILE


# BIAS_AFTER_K1: with K = 1, torch's baddbmm fuses the bias into the product (one FMA, one rounding) for a batch of
# one problem and rounds the product before adding it for a batch of two or more (seen on an Intel Xeon with
# AVX-512; not on the AMD EPYC these paths were first measured on). A row's result then depended on how many tiles
# its GEMM had. For K = 1 the bias is added after the product, one rounding each, whatever the tile count (as the
# Triton kernel does: its epilogue adds the bias to the finished accumulator). K >= 2 was tile-count invariant.


def _mm_padded(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None):
    """[M, K] @ [K, N] (+ bias) as a fresh [Mp, Np] tensor (both padded); the caller slices [:M, :N]."""
    w = weight_rows(b)
    if w is not None and not cacheable(b):
        w = f32(w)
        if bias is not None:
            bias = bias.to(torch.float32).contiguous()
        return _mm_weight_major(a, w, bias)
    bp = cached_pack(b, "mm", lambda: pad_cols(b.to(torch.float32)))
    m, k = a.shape
    np_ = bp.shape[1]
    bp_bias = None
    if bias is not None:
        bp_bias = cached_pack(bias, "bias", lambda: F.pad(bias.to(torch.float32), (0, np_ - bias.shape[0])))
    large = k * np_ >= BIG_TILE_MIN_KN
    width = chunk_cols(np_) if large and m < CHUNK_BELOW_ROWS and k >= CHUNK_MIN_K else 0
    if width:
        return _mm_chunked(a, bp, bp_bias, width)
    big = m // BIG_TILE * BIG_TILE if m >= 2 * BIG_TILE and large else 0
    full, tail, h = mm_rows(m - big, k, np_)
    mp = big + full + tail
    a = F.pad(a, (0, 0, 0, mp - m)) if mp != m else a.contiguous()
    out = torch.empty((mp, np_), dtype=torch.float32, device=a.device)
    if not big and not (full and tail):  # one tile height: one GEMM call, no slicing (a slice costs ~1 us)
        h = h if tail else ROW_TILE
        t = mp // h
        gemm(a.view(t, h, k), bp.expand(t, k, np_), out.view(t, h, np_), bp_bias)
        return out
    r0 = 0
    for rows, height in ((big, BIG_TILE), (full, ROW_TILE), (tail, h)):
        if rows:
            t = rows // height
            gemm(a[r0 : r0 + rows].view(t, height, k), bp.expand(t, k, np_), out[r0 : r0 + rows].view(t, height, np_),
                 bp_bias)
            r0 += rows
    return out


def mm_f32(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 [M, K] @ [K, N] (+ bias [N], the GEMM's C operand) with row-tile invariance."""
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or n == 0 or k == 0:
        out = a.new_zeros(m, n)
        return out if bias is None else out + bias.to(torch.float32)[:n]
    out = _mm_padded(a, b, bias)
    if out.shape[0] != m:
        out = out[:m]
    return out if out.shape[1] == n else out[:, :n].contiguous()


def bmm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp32 [B, M, K] @ [B, K, N] with row-tile invariance."""
    bsz, m, k = a.shape
    n = b.shape[2]
    if bsz == 0 or m == 0 or n == 0 or k == 0:
        return a.new_zeros(bsz, m, n)
    bp = pad_cols(b)
    out = _tiled_bmm(a, bp)
    return out if out.shape[1:] == (m, n) else out[:, :m, :n].contiguous()


def matmul(a, b, bias=None):
    return mm_f32(f32(a), b, bias).to(a.dtype)


def bmm(a, b):
    return bmm_f32(f32(a), f32(b)).to(a.dtype)
