"""The job runner: one process per worker (``torchrun``), items split by a fixed rule, rank 0 keeps the manifest.

How a run goes (every rank runs the same code):

1. **Check.** Every rank validates the spec, loads the model and computes the spec hash. The outcomes are
   all-gathered, so an error on any rank (a bad class, an entry point that does not import on one node, a model
   whose weights differ between nodes: different hashes) stops every rank with the same message before anything
   is written.
2. **Plan (rank 0).** Rank 0 checks the output folder: a manifest of another spec is refused unless ``force``;
   every item listed in the manifest is re-checked (image checksum and file sha256); items with no entry, a
   missing or a corrupt file go back on the to-do list, and an item file with no manifest entry (written, then
   killed before it was reported) is never trusted: it is recomputed. Temp files left by killed processes are
   removed. The manifest is written before any item (so a folder this job created is recognisably its own),
   and the to-do list is broadcast.
3. **Render.** Rank ``r`` of ``W`` takes to-do items ``r, r + W, r + 2W, ...`` and samples them ``batch_size`` at a
   time. After each round every rank has written its batch's files (temp, fsync, rename, folder fsync) and sends
   their reports (index, checksums, its fingerprint) to rank 0 with ``gather_object``; rank 0 adds them to the
   manifest and rewrites it atomically. Ranks with fewer items join the remaining rounds with empty reports.

What a crash costs: a killed worker loses at most the batch it was rendering and, for the other ranks, the
batch of that round that was written but not yet reported (those files are recomputed, not trusted). When any
worker dies the others fail in the next collective; ``torchrun --max-restarts N`` then restarts the whole group
(rank 0 included), and the restarted job resumes from the manifest exactly as a plain rerun does.

Backend: the group the runner creates is gloo on CPU and GPU workers alike (a GPU worker's device is
``cuda:LOCAL_RANK``). Its collectives carry a few pickled Python objects per batch, which gloo moves through host
memory; nccl would need each rank on a GPU of its own (two workers sharing a machine's one GPU fail at the first
collective), and gloo is the backend the tests run. A process group
that is already initialised (a user's own ``torchrun`` script calling :func:`render`) is used and left as it is;
with no ``torchrun`` environment the job runs in this process as a world of one.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from . import store
from .spec import DTYPES, Item, JobSpec, RenderError, load_model, load_spec, model_digest, spec_differences, spec_hash

__all__ = ["render", "RenderResult", "WorkerLost"]


@dataclass
class RenderResult:
    """What :func:`render` did (the same on every rank)."""

    out: str
    spec_hash: str
    total: int
    complete: bool
    rendered: int  # items sampled by this run, all ranks
    kept: int  # items found done and verified at the start
    recomputed: dict = field(default_factory=dict)  # index -> why an item found in the folder was redone
    temp_removed: int = 0
    seconds: float = 0.0  # the render phase: from the plan to the last report
    items_per_s: float = 0.0
    world_size: int = 1
    batch_size: int = 1


# ------------------------------------------------------------------------------------------------- group


class _Group:
    """This process's place in the job and the three collectives the runner uses."""

    def __init__(self, device: torch.device, join_timeout_s: float = 600.0):
        self.owned = False
        initialised = dist.is_available() and dist.is_initialized()
        env = None if initialised else _worker_env()  # (a user's group, made by file:// or tcp://: no MASTER_*)
        if initialised:
            self.dist = True
        elif env is not None:
            backend = "gloo"  # also for GPU workers (module docstring, "Backend")
            # torch._dynamo (which deterministic mode and the step cache import) keeps references to the process
            # group that exists when it is first imported (torch 2.13: 10 of them). destroy_process_group() then
            # leaves the group alive, gloo's worker threads run on into interpreter exit, and one still releasing
            # a collective's tensors there aborts the process ("terminate called without an active exception":
            # 1 in ~20 torchrun restarts in tests/test_render_dist.py). Imported before the group, it holds none.
            import torch._dynamo  # noqa: F401
            rank, world, addr, port = env
            if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
                # torchrun's agent keeps one TCPStore for every restart of the group, so after a restart a plain
                # init_process_group finds the dead group's addresses under the same keys and gloo waits on them
                # forever (torch 2.13: a 2-worker job hung in connectFullMesh after --max-restarts restarted it;
                # pytorch/pytorch#135712). Keys under the restart count keep each attempt apart. torchrun's own
                # rendezvous has already waited for every worker.
                store, rank, world = next(dist.rendezvous("env://"))
                attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
                store = dist.PrefixStore(f"jetdet.render/attempt_{attempt}", store)
            else:
                # workers started by hand (or by a launcher that leaves the store to rank 0): env:// would wait in
                # C++ for the missing ones for gloo's 30 minutes without a word, deaf to Ctrl-C and SIGTERM
                store = _join(rank, world, addr, port, join_timeout_s)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world)
            self.owned = self.dist = True
        else:
            self.dist = False
        self.rank = dist.get_rank() if self.dist else 0
        self.world = dist.get_world_size() if self.dist else 1

    def all_gather(self, obj) -> list:
        if not self.dist:
            return [obj]
        out = [None] * self.world
        self._collective(dist.all_gather_object, out, obj)
        return out

    def gather(self, obj) -> list | None:
        """``obj`` of every rank, on rank 0 (``None`` elsewhere)."""
        if not self.dist:
            return [obj]
        out = [None] * self.world if self.rank == 0 else None
        self._collective(dist.gather_object, obj, out, dst=0)
        return out

    def broadcast(self, obj):
        if not self.dist:
            return obj
        box = [obj]
        self._collective(dist.broadcast_object_list, box, src=0)
        return box[0]

    def _collective(self, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except RuntimeError as e:  # gloo: "Connection closed by peer", a timeout: a worker went away
            raise WorkerLost(f"rank {self.rank} of {self.world}: another worker left the job ({_gloo_reason(e)}); its "
                             "own output says why. The items listed in the manifest are kept: the same command "
                             "resumes the job") from e

    def close(self) -> None:
        if self.owned:
            dist.destroy_process_group()


class WorkerLost(RuntimeError):
    """A collective of the job's group failed: another worker stopped (killed, interrupted, a failed write) or the
    connection between them broke. The command line says so in one line on every rank that sees it (exit status 1)
    instead of gloo's traceback."""


def _gloo_reason(e: BaseException) -> str:
    """The first sentence of a gloo/c10d error, without its source location: ``Connection closed by peer
    [127.0.0.1]:3486``."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". ")[0].rstrip(".")


_WORKER_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _worker_env() -> tuple[int, int, str, int] | None:
    """(rank, world size, address, port) of a multi-worker job from the environment, None for a world of one.

    A partial set (RANK and WORLD_SIZE 2 with no MASTER_ADDR, as a user starting workers by hand may write) is
    an error: run as a world of one, each such process would render the whole job on its own."""
    have = {k: os.environ.get(k, "") for k in _WORKER_VARS}
    if not any(have.values()):
        return None
    world_s = have["WORLD_SIZE"] or "1"
    try:
        world = int(world_s)
        rank = int(have["RANK"] or "0")
    except ValueError:
        raise _SetupError(f"RANK={have['RANK']!r}, WORLD_SIZE={have['WORLD_SIZE']!r}: expected integers "
                          "(set by torchrun, or by hand for every worker)") from None
    if world < 1 or not 0 <= rank < world:
        raise _SetupError(f"RANK={rank}, WORLD_SIZE={world}: expected WORLD_SIZE >= 1 and 0 <= RANK < WORLD_SIZE")
    if world == 1:
        return None
    missing = [k for k in _WORKER_VARS if not have[k]]
    if missing:
        raise _SetupError(
            f"{', '.join(missing)}: not set, but {', '.join(k for k in _WORKER_VARS if have[k])} are: a job over "
            "several workers needs all four (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) in every worker's "
            "environment; torchrun sets them (README, Render farm). To run in one process, unset them")
    try:
        port = int(have["MASTER_PORT"])
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise _SetupError(f"MASTER_PORT={have['MASTER_PORT']!r}: expected a TCP port number 1-65535")
    return rank, world, have["MASTER_ADDR"], port


class _SetupError(RenderError):
    """Raised in one worker before the group exists: the other workers may not see it, so every rank says it."""

    every_rank = True


def _join(rank: int, world: int, addr: str, port: int, timeout_s: float):
    """The group's store, once all ``world`` workers have joined it; rank 0 hosts it at ``addr:port``.

    Waits in Python (so Ctrl-C and SIGTERM work), says what it is waiting for after a few seconds and then every
    half minute, and gives up after ``timeout_s`` naming the missing ranks. Two workers with the same RANK stop
    every worker with an error. The C++ stack traces c10d logs meanwhile are dropped: each of its errors becomes one
    line here."""
    with _C10dTraces():
        return _join_held(rank, world, addr, port, timeout_s)


class _C10dTraces:
    """While workers join, fd 2 runs through a pipe to a thread that passes every line on as it comes, less the C++
    stack traces c10d logs with its errors: when rank 0 goes away, every waiting worker's TCPStore client logs one of
    some 30 lines before raising, and ``_join`` says the same in one line. c10d's log lines themselves pass (with
    ``TORCH_CPP_LOG_LEVEL`` or ``TORCH_DISTRIBUTED_DEBUG`` set, nothing is filtered at all). Other threads' output is
    not held back."""

    def __init__(self):
        self._saved: int | None = None
        self._thread = None

    def __enter__(self) -> _C10dTraces:
        if os.environ.get("TORCH_CPP_LOG_LEVEL") or os.environ.get("TORCH_DISTRIBUTED_DEBUG"):
            return self  # the user asked for c10d's logs, traces included
        import select
        import threading

        if not hasattr(select, "poll"):  # Windows: no poll, and its select takes sockets alone, not a pipe
            return self
        r = w = None
        try:
            if sys.stderr is not None:  # (None: Python started with fd 2 closed, which the dup below finds)
                sys.stderr.flush()
            # fd 2 first: with fd 2 closed, os.pipe() would return it as the read end, then fd 2 became the pipe's
            # write end with no reader (a write past the pipe's 64 KiB blocked for good); now a closed fd 2 is left
            self._saved = os.dup(2)
            r, w = os.pipe()
            self._thread = threading.Thread(target=_forward_without_traces, args=(r, self._saved), daemon=True,
                                            name="jetdet.render: c10d traces")
            self._thread.start()
            r = None  # the thread's now: it closes it
            os.dup2(w, 2)
            os.close(w)
        except BaseException as e:  # Ctrl-C in here too: fd 2 must not stay on the pipe
            for fd in (w, r):
                if fd is not None:
                    _quietly(lambda fd=fd: os.close(fd))
            self._restore()
            if not isinstance(e, OSError):  # no fd 2 to filter (a closed stderr): c10d writes where it would have
                raise
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._saved is not None:
            _quietly(lambda: os.dup2(self._saved, 2))  # the pipe's last write end closes: the thread sees its end
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            if self._thread.is_alive():  # a child process still holds the pipe: leave the thread its fds
                self._saved = self._thread = None
                return
            self._thread = None
        if self._saved is not None:
            _quietly(lambda: os.close(self._saved))
            self._saved = None


class _TraceFilter:
    """Lines in, lines out, less c10d's C++ stack traces: a c10d log line (``[W1207 14:32:05.3 TCPStore.cpp:125]
    [c10d] ...``) followed by ``Exception raised from ...`` is dropped with the trace's ``frame #`` lines; any other
    line passes, a c10d line as soon as the next line shows it is not a trace's head (or ``flush``)."""

    _START = re.compile(rb"\[[IWE]\d{4} [^\]]*\] \[c10d\]")
    _TRACE = (b"Exception raised from ", b"frame #", b"<omitting python frames>")

    def __init__(self):
        self._held: bytes | None = None
        self._in_trace = False

    def feed(self, line: bytes) -> list[bytes]:
        if self._in_trace and (line.startswith(self._TRACE) or not line.strip()):
            return []
        self._in_trace = False
        out = []
        if self._held is not None:
            if line.startswith(self._TRACE[0]):
                self._held, self._in_trace = None, True
                return []
            out.append(self._held)
            self._held = None
        if self._START.match(line):
            self._held = line
        else:
            out.append(line)
        return out

    def flush(self) -> list[bytes]:
        held, self._held = self._held, None
        return [held] if held is not None else []


def _forward_without_traces(r: int, out: int) -> None:
    """The capture's thread: reads the pipe ``r`` until every write end is closed, writes to ``out``."""
    import select

    f, rest = _TraceFilter(), b""
    poll = select.poll()  # not select.select: it refuses an fd past 1023 (a process with many files open), and the
    poll.register(r, select.POLLIN)  # thread then died with fd 2 on its pipe: every write to it broken
    try:
        while True:
            if not poll.poll(200):  # quiet for a moment: a held line or a partial one goes on
                pending, rest = f.flush() + ([rest] if rest else []), b""
                _write_all(out, pending)
                continue
            chunk = os.read(r, 65536)
            if not chunk:
                break
            # a line ends at \n or at \r: a progress bar redraws its line with \r alone, and held until a \n it
            # stood still while workers joined, its updates all written at the end
            lines = (rest + chunk).splitlines(keepends=True)
            rest = lines.pop() if not lines[-1].endswith((b"\n", b"\r")) else b""
            for line in lines:
                _write_all(out, f.feed(line))
        _write_all(out, f.flush() + ([rest] if rest else []))
    finally:
        _quietly(lambda: os.close(r))


def _write_all(fd: int, parts: list[bytes]) -> None:
    for data in parts:
        while data:
            try:
                data = data[os.write(fd, data):]
            except OSError:  # the terminal is gone: nothing more to show
                return


def _join_held(rank: int, world: int, addr: str, port: int, timeout_s: float):
    import datetime
    import socket

    where = f"{addr}:{port}"
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    start = "" if under_torchrun else (" with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE (or run the job with "
                                       "torchrun: README, Render farm)")
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    next_note = t0 + 5.0

    def note(msg: str) -> None:
        nonlocal next_note
        if time.monotonic() >= next_note:
            say(f"jetdet.render: rank {rank} of {world}: {msg} ({time.monotonic() - t0:.0f} s of {timeout_s:g}; "
                "--join-timeout sets the limit)\n")
            next_note = time.monotonic() + 30.0

    store_timeout = datetime.timedelta(minutes=30)  # the store's own operations (gloo's connect, collectives)
    if rank == 0:
        _check_own_address(addr, port)
        try:
            store = dist.TCPStore(addr, port, world, True, store_timeout, wait_for_workers=False)
        except (RuntimeError, OSError) as e:
            raise _SetupError(f"MASTER_PORT={port}: rank 0 could not listen on it ({str(e).splitlines()[0]}); "
                              "another job may hold it: choose a free port for every worker") from None
    else:
        while True:  # probe with a plain socket first: a TCPStore client that cannot connect logs C++ traces
            try:
                socket.create_connection((addr, port), timeout=2.0).close()
                break
            except OSError as e:
                if time.monotonic() >= deadline:
                    raise _SetupError(f"rank {rank} of {world}: rank 0 never answered at MASTER_ADDR:MASTER_PORT = "
                                      f"{where} within {timeout_s:g} s ({e.strerror or e}); start rank 0{start}"
                                      ) from None
                note(f"waiting for rank 0 at {where}")
                time.sleep(0.5)
        store = dist.TCPStore(addr, port, world, False, store_timeout)
    key = "jetdet.render/join/"
    if store.check([f"{key}started"]):  # a job whose workers have all joined: this worker is not one of them
        raise _SetupError(f"MASTER_ADDR:MASTER_PORT = {where}: another job's workers, already running, listen there "
                          "(their rank 0 holds the port); give each job a MASTER_PORT of its own")
    if store.add(f"{key}rank_{rank}", 1) > 1:
        msg = (f"RANK={rank}: two workers were started with this rank; each of the {world} workers needs its own "
               f"RANK, 0 to {world - 1}")
        store.set(f"{key}error", msg)
        raise _SetupError(msg)
    store.add(f"{key}count", 1)
    left = 0  # 1 once this worker has left the count
    try:
        while True:
            if store.check([f"{key}error"]):
                raise _SetupError(store.get(f"{key}error").decode())
            joined = store.add(f"{key}count", 0)
            if joined >= world:
                store.set(f"{key}started", "1")  # for a worker of another job given this port later
                return dist.PrefixStore("jetdet.render/group", store)
            if time.monotonic() >= deadline or time.monotonic() >= next_note:
                missing = [r for r in range(world) if not store.check([f"{key}rank_{r}"])]
                shown = ", ".join(map(str, missing[:16])) + (f" and {len(missing) - 16} more" if len(missing) > 16
                                                             else "")
                if time.monotonic() >= deadline:
                    # leave the count in one step: if every worker had joined by then, the others may be starting
                    # the group already, so this one joins after all (a review: between reading the count and
                    # leaving, the last worker could come, and the others then waited in gloo for this one)
                    if store.add(f"{key}count", -1) + 1 >= world:
                        store.add(f"{key}count", 1)
                        store.set(f"{key}started", "1")
                        return dist.PrefixStore("jetdet.render/group", store)
                    left = 1
                    msg = (f"{joined} of {world} workers joined at {where} within {timeout_s:g} s; missing RANK "
                           f"{shown}: start them{start}")
                    # every worker stops with this message: one that left while still counted would make the
                    # others start the group without it when the last one came, and wait in gloo for it
                    store.set(f"{key}error", f"rank {rank} of {world} gave up: {msg}")
                    raise _SetupError(f"rank {rank} of {world}: {msg}")
                note(f"{joined} of {world} workers joined at {where}; waiting for RANK {shown}")
            time.sleep(0.2)
    except _SetupError:
        if rank == 0:  # keep the store up until the workers that joined have read the error (at most 3 s)
            until = time.monotonic() + 3.0
            while store.add(f"{key}read", 0) < store.add(f"{key}count", 0) - 1 + left and time.monotonic() < until:
                time.sleep(0.05)
        else:
            _quietly(lambda: store.add(f"{key}read", 1))
        raise
    except dist.DistError:
        raise _SetupError(f"rank {rank} of {world}: rank 0 at {where} left before every worker joined (its own "
                          "output says why, unless it was killed)") from None
    except BaseException:  # Ctrl-C, SIGTERM: leave the count, so the others do not start a group without this one
        _quietly(lambda: (store.add(f"{key}count", -1), store.delete_key(f"{key}rank_{rank}")))
        raise


def _check_own_address(addr: str, port: int, probe_s: float = 3.0) -> None:
    """Rank 0 hosts the store at MASTER_ADDR and connects to it there: an address that does not resolve, or does not
    lead back to this machine, made it wait in C++ past --join-timeout, deaf to Ctrl-C and SIGTERM (a user trial: a
    typo in MASTER_ADDR, still silent after 10 minutes). An address of one of this machine's interfaces passes at
    once; any other (a NAT's public address, a cluster service's) passes when a connection to it on MASTER_PORT
    reaches a socket listening here within ``probe_s``, as the store's own connection would."""
    import socket

    try:
        infos = socket.getaddrinfo(addr, None, type=socket.SOCK_STREAM)
    except OSError as e:
        raise _SetupError(f"MASTER_ADDR={addr!r}: cannot be resolved ({e.strerror or e}); rank 0 runs on the machine "
                          "MASTER_ADDR names (its host name or IP address)") from None
    if _binds_here(infos) or _reaches_here(infos[0], port, probe_s):
        return
    raise _SetupError(f"MASTER_ADDR={addr!r}: not an address of this machine, and a connection to it on MASTER_PORT "
                      f"{port} did not come back here within {probe_s:g} s; rank 0 runs on the machine MASTER_ADDR "
                      "names (its host name or IP address)")


def _binds_here(infos) -> bool:
    """Whether one of ``infos``' addresses (``socket.getaddrinfo``'s) is one of this machine's interfaces."""
    import socket

    for family, _, _, _, sockaddr in infos:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((sockaddr[0], 0))
            return True
        except OSError:
            pass
    return False


def _reaches_here(info, port: int, timeout_s: float) -> bool:
    """Whether a connection to ``info``'s address on ``port`` arrives at a socket listening on this machine (True too
    where the port cannot be listened on here: the store's own error says why then)."""
    import socket

    family, _, _, _, sockaddr = info
    try:
        listener = socket.socket(family, socket.SOCK_STREAM)
    except OSError:  # no such sockets here (IPv6 off): no connection to that address can be made from here either
        return False
    with listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
            listener.listen(1)
        except OSError:
            return True
        try:
            with socket.create_connection((sockaddr[0], port), timeout=timeout_s):
                pass
        except OSError:
            return False
        listener.settimeout(timeout_s)
        try:  # the connection came here, not to another machine listening on that port
            conn, _ = listener.accept()
            conn.close()
            return True
        except OSError:
            return False


def say(text: str) -> None:
    """``text`` on stderr, where it can be shown. With stderr closed (``2>&-``, a daemon: ``sys.stderr`` is None) or
    not writable (fd 2 open for reading), a write raised before the first item and stopped the job, as if a write of
    its own (an item, the manifest) had failed; a line that cannot be shown is dropped instead."""
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass


def stderr_usable() -> bool:
    """Whether stderr takes writes: False where it is None, closed, or its fd is gone or open for reading only."""
    import io

    try:
        fd = sys.stderr.fileno()
    except io.UnsupportedOperation:  # no fd of its own (a capture, a StringIO): it takes writes
        return True
    except (OSError, ValueError, AttributeError):
        return False
    try:
        import fcntl

        return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY
    except ImportError:  # Windows: no fcntl
        return True
    except OSError:
        return False


def _quietly(fn) -> None:
    try:
        fn()
    except Exception:  # the store may be gone already; leaving is best effort
        pass


def _device(name: str, model) -> torch.device:
    if model is not None:
        if not isinstance(model, torch.nn.Module):
            raise RenderError(f"model: expected the model object (a torch.nn.Module), got {type(model).__name__} "
                              f"{model!r}; a model to load by name goes in the spec ('model': 'bundled' or "
                              "'package.module:factory')")
        p = next(model.parameters(), None)
        if p is None:
            raise RenderError(f"model: the {type(model).__name__} passed to render() has no parameters")
        return p.device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RenderError("device: 'cuda' requested, but torch.cuda.is_available() is False")
        count = torch.cuda.device_count()
        # several GPUs visible and more workers than GPUs: two workers would share one GPU (never faster than one
        # worker on it), surely a launch mistake. One visible GPU is the one-GPU-per-task setup
        # (CUDA_VISIBLE_DEVICES, SLURM --gpus-per-task=1)
        if count > 1 and local >= count:
            raise RenderError(f"device: worker LOCAL_RANK={local} has no GPU of its own (this machine shows "
                              f"{count}); start at most that many workers per machine (torchrun --nproc-per-node)")
        return torch.device("cuda", local % count)
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------- job


@dataclass
class _Job:
    spec: JobSpec
    model: torch.nn.Module
    items: list[Item]
    hash: str
    device: torch.device


def _load_job(spec: JobSpec, device: torch.device, model) -> _Job:
    from ..models.sampling import timestep_grid

    try:  # the sampler's first step: a count of steps it cannot take failed mid-job, the folder already written
        timestep_grid(spec.steps, spec.shift)
    except (OverflowError, RuntimeError, MemoryError) as e:
        raise RenderError(f"steps: expected a number of steps the sampler can take, got {spec.steps} (its timestep "
                          f"grid: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    except ValueError as e:  # a shift whose grid does not run from 1 to 0 (a NaN image, rendered silently)
        raise RenderError(str(e)) from None
    if model is None:
        model, class_names = load_model(spec.model, device, DTYPES[spec.dtype], guided=spec.cfg != 1.0)
    else:
        from .spec import check_model_contract, probe_model
        from .spec import class_names as _class_names

        check_model_contract(model, "the model passed to render()")
        training = next((name or type(model).__name__ for name, m in model.named_modules() if m.training), None)
        if training is not None:
            raise RenderError(f"model: the model passed to render() is in training mode ({training!r}.training is "
                              "True: dropout and batch-norm statistics would change its output from call to call); "
                              "call model.eval() first")
        p = next(model.parameters())
        if p.dtype != DTYPES[spec.dtype]:
            raise RenderError(f"dtype: the spec says {spec.dtype}, the model passed to render() is "
                              f"{str(p.dtype).replace('torch.', '')}")
        probe_model(model, "the model passed to render()", guided=spec.cfg != 1.0)
        class_names = _class_names(model, "the model passed to render()")
    items = spec.expand(class_names, model.config["num_classes"])
    if spec.mode == "deterministic":
        import jetdet

        # The first deterministic context of a process pays torch's one-time imports behind
        # torch.use_deterministic_algorithms (torch._dynamo/_inductor, about 3 s of CPU here): pay it now, so that
        # the render phase's items/s measures sampling, not process start.
        with jetdet.mode("deterministic"):
            pass
    return _Job(spec, model, items, spec_hash(spec, items, model_digest(model)), device)


def _check_everywhere(group: _Group, spec: JobSpec, device, model) -> _Job:
    """Load the job on every rank; any rank's error (or differing spec hashes) stops all of them."""
    job, err, exc = None, None, None
    try:
        job = _load_job(spec, device, model)
    except RenderError as e:
        err = str(e)
    except Exception as e:  # reported to the other ranks, then re-raised here
        err, exc = f"{type(e).__name__}: {e}", e
    outcomes = group.all_gather((err, job.hash if job else None, spec.batch_size))
    if exc is not None:
        raise exc
    for r, (e, _, _) in enumerate(outcomes):
        if e is not None:
            raise RenderError(e if group.world == 1 else f"rank {r}: {e}")
    hashes = {h for _, h, _ in outcomes}
    if len(hashes) > 1:
        detail = ", ".join(f"rank {r}: {h[:12]}" for r, (_, h, _) in enumerate(outcomes))
        raise RenderError(f"model: the workers do not agree on the job ({detail}); every worker must load the same "
                          "model weights and spec")
    sizes = [b for _, _, b in outcomes]
    if len(set(sizes)) > 1:  # the spec hash leaves it out (it does not change an item's bytes), the rounds do not
        detail = ", ".join(f"rank {r}: {b}" for r, b in enumerate(sizes))
        raise RenderError(f"batch_size: the workers were given different batch sizes ({detail}); every worker must "
                          "pass the same")
    return job


# ------------------------------------------------------------------------------------------------- plan


def _missing_ancestors(path: Path) -> list[Path]:
    out = []
    p = path
    while not p.exists():
        out.append(p)
        if p.parent == p:
            break
        p = p.parent
    return out


def _remove_empty(folders: list[Path]) -> None:
    """Undo the folders this run created (deepest first), if they are still empty."""
    for p in folders:
        try:
            p.rmdir()
        except OSError:
            pass


def _plan(out: Path, job: _Job, force: bool, world: int = 1) -> dict:
    """Rank 0: take the folder's lock, check the folder, decide what to render, write the manifest. Raises
    RenderError with the folder unchanged (and the lock released); otherwise the returned ``lock`` is held until
    :func:`store.release_lock`."""
    if out.exists() and not out.is_dir():
        raise RenderError(f"out: {str(out)!r} exists and is not a folder")
    held = [store.acquire_lock(out) if out.is_dir() else None]  # a new folder's is taken once it is made
    try:
        return _plan_locked(out, job, force, world, held)
    except BaseException:
        store.release_lock(held[0])
        raise


def _plan_locked(out: Path, job: _Job, force: bool, world: int, held: list) -> dict:
    spec_dict = job.spec.to_dict()
    manifest, created = None, []
    temps, files, other = [], {}, []
    if out.is_dir():
        try:
            manifest = store.load_manifest(out)
        except RenderError as e:
            if not force:
                raise RenderError(f"{e}, or pass --force (force=True) to replace it and the job it was for") from None
            manifest = {"spec_hash": None, "items": {}, "spec": {}}  # damaged: replaced, as another job's would be
        try:
            temps, files, other = store.scan_folder(out)
        except OSError as e:
            raise RenderError(f"out: cannot list {str(out)!r}: {e.strerror or e}") from None
        if manifest is None and (other or (files and not force)):
            raise RenderError(f"out: {str(out)!r} holds {len(files) + len(other)} file(s) but no jetdet render "
                              f"manifest ({store.MANIFEST}); choose an empty or new folder, or a render job's folder"
                              + ("" if other else " (--force replaces the item files it holds)"))
        not_files = [name for name in files.values() if not (out / name).is_file()]
        if not_files:  # an item's file is written over by a rename, which a folder (or a device) would refuse midway
            raise RenderError(f"out: {str(out / not_files[0])!r} is not a file (an item's name, which this job "
                              "writes); move it away")
    # --force replaces the folder's job, also one of this spec: its items are rendered again (it resumed a job of the
    # same spec, keeping the items a model's old forward had made, which is what README advises --force for). A
    # torchrun restart of a forced run (same run id, restart count > 0) resumes what that run rendered instead.
    # torchrun's default run id "none" (--master-port, or several nodes, without --rdzv-id) is every such launch's:
    # it names no run, or a forced run whose first attempt was lost before this plan resumed an earlier forced run's
    # items (those of the old forward) instead of replacing them
    run_id = os.environ.get("TORCHELASTIC_RUN_ID") or None
    if run_id == "none":
        run_id = None
    restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0")
    forced_before = (manifest is not None and run_id is not None and restarted
                     and manifest.get("forced_by") == run_id)
    replaced = manifest is not None and (manifest.get("spec_hash") != job.hash or (force and not forced_before))
    if replaced and not force:
        diffs = spec_differences(manifest.get("spec", {}), spec_dict) or [
            "the same spec text, but a different model (its weights) or item list"]
        raise RenderError(
            f"out: {str(out)!r} holds another job (spec hash {str(manifest.get('spec_hash'))[:12]}, this job "
            f"{job.hash[:12]}): {'; '.join(diffs)}. Choose another folder, or pass --force (force=True) to replace "
            "that job (its items are recomputed or removed)")

    # what is done: listed in the manifest and the file checks out
    keep, why = {}, {}
    wanted = {it.index for it in job.items}
    stale = []
    if manifest is not None and not replaced:
        for k, entry in manifest["items"].items():
            idx = int(k)
            if idx not in wanted:
                continue
            problem = store.check_item(out, idx, entry)
            if problem is None:
                keep[k] = entry
            else:
                why[idx] = problem
    elif force:  # replacing another job (or item files with no manifest): its files that the new job will not
        # overwrite go, those its manifest lists and those it wrote without reporting them yet (a killed run)
        listed = manifest["items"] if manifest is not None else {}
        stale = sorted({store.item_name(int(k)) for k in listed if int(k) not in wanted}
                       | {name for idx, name in files.items() if idx not in wanted})
    todo = [it.index for it in job.items if str(it.index) not in keep]
    for idx in todo:
        if idx not in why:
            why[idx] = ("not rendered yet" if idx not in files else
                        "a file of the replaced job, recomputed" if replaced else
                        "file not in the manifest (unreported), recomputed")

    if manifest is None or replaced:
        new = store.new_manifest(spec_dict, job.hash, len(job.items))
        if manifest is not None:
            new["runs"] = manifest.get("runs", [])
            new["replaced"] = manifest.get("replaced", []) + [manifest.get("spec_hash")]
        if force and run_id is not None:
            new["forced_by"] = run_id
    else:
        new = dict(manifest)
        new["items"] = keep
        new["spec"] = spec_dict  # batch_size/device may differ: the latest run's
    new["complete"] = not todo
    new["fingerprints"] = {fp: v for fp, v in new.get("fingerprints", {}).items()
                           if fp in {e.get("fingerprint") for e in new["items"].values()}}

    if not out.exists():
        created = _missing_ancestors(out)  # deepest first
        try:
            out.mkdir(parents=True)
        except OSError as e:
            _remove_empty(created)
            raise RenderError(f"out: cannot create the folder {str(out)!r}: {e.strerror or e}") from None
        try:
            held[0] = store.acquire_lock(out)  # another job may have made the folder too, a moment before
        except RenderError:
            _remove_empty(created)
            raise
    mixed = _mixed_batches(job, world, keep) if todo else None
    try:
        store.save_manifest(out, new)
        token = secrets.token_hex(8)  # every rank reads it back: one folder, shared (_check_shared_folder)
        store.atomic_write(out / store.RUN_TOKEN, token.encode())
    except OSError as e:
        _remove_empty(created)
        raise RenderError(f"out: cannot write in {str(out)!r}: {e.strerror or e}") from None
    removed = 0
    for name in temps + stale:
        try:
            os.unlink(out / name)
            removed += name in temps
        except FileNotFoundError:
            pass
    return {"todo": todo, "why": {i: why[i] for i in todo}, "kept": len(keep), "temp_removed": removed,
            "manifest": new, "token": token, "lock": held[0], "mixed": mixed}


def _mixed_batches(job: _Job, world: int, keep: dict) -> str | None:
    """The resume's warning when the kept items were made in other batches (batch size, workers) than this run makes:
    fast and off items depend on the batch they were in, so the folder will mix them. None otherwise."""
    if job.spec.mode == "deterministic":
        return None
    now = (job.spec.batch_size, world)
    made = {(e.get("batch_size"), e.get("world_size")) for e in keep.values()} - {now}
    if not made:
        return None
    what = ", ".join(f"batch {b} x {w} worker(s)" for b, w in sorted(made, key=str))
    return (f"{len(keep)} items kept were made with {what}, this run with batch {now[0]} x {now[1]} worker(s); in "
            f"mode {job.spec.mode!r} an item depends on the batch it was in, so the folder will hold items from "
            "different batches (README 'Render farm'); rerun with the same batch size and workers to keep one "
            "composition")


def _check_shared_folder(group: _Group, out: Path, token: str) -> None:
    """Every rank sees the run token rank 0 just wrote in ``out`` (store.RUN_TOKEN): the ranks write one folder. Ranks
    given node-local folders would each write their share apart, and rank 0 would list items it does not hold."""
    if group.world == 1:
        return
    problem = None
    if group.rank != 0:
        try:
            if (out / store.RUN_TOKEN).read_text(encoding="ascii", errors="replace") != token:
                problem = "it does not hold the run token rank 0 wrote for this run"
        except FileNotFoundError:
            problem = f"no {store.RUN_TOKEN} there"
        except OSError as e:
            problem = e.strerror or str(e)
    for r, p in enumerate(group.all_gather(problem)):
        if p is not None:
            raise RenderError(f"out: rank {r} does not see rank 0's folder at {str(out)!r} ({p}); every worker must "
                              "write into one folder on a file system they share")


# ------------------------------------------------------------------------------------------------ render


class _PlainProgress:
    """The progress line without tqdm: ``render: 5/12 items, 2.31 items/s`` at most once a second."""

    def __init__(self, total: int, initial: int, disable: bool):
        self.total, self.n, self.start_n, self.disable = total, initial, initial, disable
        self.t0 = self.last = time.perf_counter()

    def update(self, k: int) -> None:
        self.n += k
        now = time.perf_counter()
        if not self.disable and (now - self.last >= 1.0 or self.n >= self.total):
            self.last = now
            rate = (self.n - self.start_n) / max(now - self.t0, 1e-9)
            say(f"render: {self.n}/{self.total} items, {rate:.2f} items/s\n")

    def close(self) -> None:
        pass


def _progress(total: int, initial: int, disable: bool):
    disable = disable or not stderr_usable()  # (tqdm raised on a closed fd 2, stopping the job)
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainProgress(total, initial, disable)
    # rate_noinv_fmt: always items/s (tqdm's default flips to s/item below one item a second)
    fmt = "{l_bar}{bar}| {n_fmt}/{total_fmt} items [{elapsed}<{remaining}, {rate_noinv_fmt}]"
    return tqdm(total=total, initial=initial, unit="item", desc="render", disable=disable, file=sys.stderr,
                dynamic_ncols=True, bar_format=fmt)


def _sample(job: _Job, batch: list[Item]) -> torch.Tensor:
    import jetdet

    from ..models.sampling import sample

    cfg = job.model.config
    shape = (1, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"])
    noise = torch.cat([jetdet.randn(shape, it.seed, item_offset=it.stream, device=job.device) for it in batch])
    labels = torch.tensor([it.label for it in batch], dtype=torch.long, device=job.device)
    s = job.spec
    with jetdet.mode("deterministic" if s.mode == "deterministic" else "off"):
        return sample(job.model, labels, steps=s.steps, cfg=s.cfg, sampler=s.sampler, shift=s.shift, noise=noise)


def _render_rounds(group: _Group, job: _Job, out: Path, todo: list[int], manifest: dict | None, bar,
                   manifest_every_s: float) -> int:
    from ..verify import checksum, fingerprint

    by_index = {it.index: it for it in job.items}
    bs = job.spec.batch_size
    mine = todo[group.rank :: group.world]
    rounds = math.ceil(math.ceil(len(todo) / group.world) / bs) if todo else 0
    fp = fingerprint(job.device)
    fp_id = store.fingerprint_id(fp)
    rendered = 0
    last_save, save_s, unsaved = time.perf_counter(), 0.0, 0
    try:
        for r in range(rounds):
            batch = [by_index[i] for i in mine[r * bs : (r + 1) * bs]]
            reports = []
            if batch:
                images = _sample(job, batch)
                for slot, (it, image) in enumerate(zip(batch, images)):
                    meta = {"index": it.index, "label": it.label, "seed": it.seed, "stream": it.stream,
                            "spec_hash": job.hash}
                    data = store.item_bytes(image, meta)
                    name = store.item_name(it.index)
                    store.atomic_write(out / name, data, sync_dir=False)
                    reports.append({"index": it.index, "file": name, "label": it.label, "seed": it.seed,
                                    "stream": it.stream, "checksum": checksum(image),
                                    "sha256": hashlib.sha256(data).hexdigest(), "fingerprint": fp_id,
                                    "rank": group.rank, "world_size": group.world, "batch_size": bs, "slot": slot})
                store.fsync_dir(out)
            gathered = group.gather((fp_id, fp, reports))
            if group.rank == 0:
                n = 0
                for rid, rfp, reps in gathered:
                    if reps:
                        manifest["fingerprints"].setdefault(rid, rfp)
                    for rep in reps:
                        manifest["items"][str(rep.pop("index"))] = rep
                        n += 1
                manifest["complete"] = len(manifest["items"]) == manifest["total"]
                # the whole manifest is rewritten (and fsynced) at each save, which grows with the job (1.7 s at
                # 100k items): at most one save per manifest_every_s (0: every round), or per 20 saves' time when that
                # is longer, so that saving stays a small part of a large job; the caller saves at the end. A killed
                # job loses the reports since the last save, and the next run recomputes those items (their files
                # are there, unreported); an interrupted one saves them below.
                now = time.perf_counter()
                if manifest_every_s == 0 or now - last_save >= max(manifest_every_s, 20 * save_s):
                    store.save_manifest(out, manifest)
                    last_save = time.perf_counter()
                    save_s, unsaved = last_save - now, 0
                else:
                    unsaved += n
                rendered += n
                bar.update(n)
    finally:
        # an interrupted job (Ctrl-C, a dead worker) keeps the reports gathered since the last save; the caller saves
        # the finished job itself
        if unsaved and sys.exc_info()[0] is not None:
            try:
                store.save_manifest(out, manifest)
            except OSError:  # the error that interrupted the job is the one to report
                pass
    return rendered


def render(spec, out, *, force: bool = False, model=None, progress: bool = True,
           threads: int | None = None, manifest_every_s: float = store.MANIFEST_EVERY_S,
           join_timeout_s: float = 600.0) -> RenderResult:
    """Render a job into the folder ``out``; resume it if ``out`` holds the same job.

    Args:
        spec: a dict, a JSON file path or a :class:`JobSpec` (keys in :mod:`jetdet.render.spec`).
        out: the output folder (created if missing).
        force: replace the job in ``out`` instead of refusing one of another spec or resuming one of this spec
            (every item is rendered again; under torchrun a restart of the forced run resumes it).
        model: a model object to use instead of loading ``spec["model"]`` (same contract; used on its own device,
            not moved; its dtype must be the spec's). Under ``torchrun`` each rank passes its own.
        progress: the progress line and the resume/summary lines on rank 0 (stderr).
        threads: ``torch.set_num_threads`` for the run (restored afterwards).
        manifest_every_s: while rendering, the manifest is saved at most once per this many seconds (and at the
            end). After a crash the items finished since the last save are rendered again; 0 saves after every
            round, which costs a rewrite of the whole manifest per round.
        join_timeout_s: workers started by hand (RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set in each
            worker's environment, no torchrun) wait at most this long for one another, then stop with an error
            naming the missing ranks; while they wait they say so on stderr.

    Run under ``torchrun`` (or in an initialised process group) every rank calls this with the same arguments.
    Bad input raises :class:`RenderError` on every rank, with the folder unchanged.
    """
    spec = load_spec(spec)
    if not isinstance(force, bool):
        raise RenderError(f"force: expected True or False, got {force!r}")
    if (isinstance(manifest_every_s, bool) or not isinstance(manifest_every_s, (int, float))
            or not 0 <= manifest_every_s < math.inf):
        raise RenderError(f"manifest_every_s: expected a finite number of seconds >= 0, got {manifest_every_s!r}")
    if (isinstance(join_timeout_s, bool) or not isinstance(join_timeout_s, (int, float))
            or not 0 < join_timeout_s < math.inf):
        raise RenderError(f"join_timeout_s: expected a finite number of seconds > 0, got {join_timeout_s!r}")
    if not isinstance(out, (str, os.PathLike)) or not str(out):
        raise RenderError(f"out: expected a folder path, got {out!r}")
    out = Path(out)
    saved_threads = torch.get_num_threads()
    saved_cuda = None
    group = None
    lock = None
    try:
        if threads is not None:
            if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
                raise RenderError(f"threads: expected an int >= 1, got {threads!r}")
            torch.set_num_threads(threads)
        device = _device(spec.device, model)
        if device.type == "cuda":  # Triton launches on the current device; put it back afterwards
            saved_cuda = torch.cuda.current_device()
            torch.cuda.set_device(device)
        group = _Group(device, join_timeout_s)
        job = _check_everywhere(group, spec, device, model)
        show = progress and group.rank == 0

        plan = None
        if group.rank == 0:
            try:
                plan = _plan(out, job, force, group.world)
                lock = plan["lock"]
            except RenderError as e:
                plan = {"error": str(e)}
            except OSError as e:  # the path itself (a name too long, a folder that cannot be searched)
                plan = {"error": f"out: {str(out)!r}: {e.strerror or e}"}
        shared = group.broadcast({k: v for k, v in plan.items() if k not in ("manifest", "lock")} if plan else None)
        if "error" in shared:
            raise RenderError(shared["error"])
        _check_shared_folder(group, out, shared["token"])
        todo = shared["todo"]
        if show:
            _log_plan(out, len(job.items), shared)

        bar = _progress(len(job.items), len(job.items) - len(todo), not show) if group.rank == 0 else None
        manifest = plan["manifest"] if group.rank == 0 else None
        t0 = time.perf_counter()
        handle = None
        try:
            if spec.mode == "fast" and todo:
                import jetdet

                handle = jetdet.patch(job.model, mode="fast", budget=spec.budget, num_steps=spec.steps)
            rendered = _render_rounds(group, job, out, todo, manifest, bar, manifest_every_s)
        finally:
            if handle is not None:
                handle.remove()
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - t0

        summary = None
        if group.rank == 0:
            manifest["runs"].append({
                "world_size": group.world, "batch_size": spec.batch_size, "device": str(device),
                "threads": torch.get_num_threads(), "kept": shared["kept"], "rendered": rendered,
                "seconds": round(seconds, 4), "items_per_s": round(rendered / seconds, 4) if rendered else None,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            })
            manifest["complete"] = len(manifest["items"]) == manifest["total"]
            store.save_manifest(out, manifest)
            summary = {"rendered": rendered, "complete": manifest["complete"]}
        summary = group.broadcast(summary)
        result = RenderResult(
            out=str(out), spec_hash=job.hash, total=len(job.items), complete=summary["complete"],
            rendered=summary["rendered"], kept=shared["kept"],
            recomputed={i: w for i, w in shared["why"].items() if w != "not rendered yet"},
            temp_removed=shared["temp_removed"], seconds=seconds,
            items_per_s=summary["rendered"] / seconds if summary["rendered"] else 0.0, world_size=group.world,
            batch_size=spec.batch_size,
        )
        if show:
            _log_summary(result)
        return result
    finally:
        store.release_lock(lock)
        torch.set_num_threads(saved_threads)
        if group is not None:
            group.close()
        if saved_cuda is not None:
            torch.cuda.set_device(saved_cuda)


def _log_plan(out: Path, total: int, plan: dict) -> None:
    todo, why = plan["todo"], plan["why"]
    redo = {i: w for i, w in why.items() if w != "not rendered yet"}
    lines = [f"render: {out}: {total} items, {plan['kept']} done and verified, {len(todo)} to render"]
    if redo:
        shown = "; ".join(f"item {i}: {w}" for i, w in list(redo.items())[:8])
        more = f" (and {len(redo) - 8} more)" if len(redo) > 8 else ""
        lines.append(f"render: recomputing {len(redo)}: {shown}{more}")
    if plan["temp_removed"]:
        lines.append(f"render: removed {plan['temp_removed']} temp file(s) left by an interrupted run")
    if plan.get("mixed"):
        lines.append(f"render: warning: {plan['mixed']}")
    say("\n".join(lines) + "\n")


def _log_summary(r: RenderResult) -> None:
    rate = f"{r.items_per_s:.3f} items/s" if r.rendered else "nothing to render"
    say(f"render: done: {r.kept + r.rendered}/{r.total} items in {r.out}; this run rendered {r.rendered} in "
        f"{r.seconds:.2f} s: {rate} ({r.world_size} worker(s), batch {r.batch_size}; sampling and writing only, "
        "process start and model load not counted)\n")
