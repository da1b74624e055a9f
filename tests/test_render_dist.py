"""jetdet.render across real processes (``python -m torch.distributed.run``, gloo on CPU, a free port through
``--standalone``): 1, 2 and 3 workers at batch 1, 4 and 5 give byte-identical files; a worker SIGKILLed mid-job
loses nothing, whether a plain rerun or torchrun's own restart finishes the job. Everything on the CPU, also on a
GPU machine (``_render_util.env`` hides the GPU from the workers)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from _render_util import (
    REPO,
    TESTS,
    checksums,
    env,
    files,
    items,
    manifest,
    run,
    torchrun,
    wait_for_items,
    worker_pids,
)

from jetdet.models import bundled
from jetdet.render import render
from jetdet.render.__main__ import main
from jetdet.render.run import _C10dTraces, _TraceFilter
from jetdet.render.store import check_item, item_name

STEPS = 2  # the determinism runs
KILL_STEPS = 8  # the fault runs: slow enough per batch that a kill lands mid-job

pytestmark = [
    pytest.mark.skipif(not bundled.DIT_FILE.exists(), reason="the bundled weights are not there"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers through /proc"),
]


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory):
    """The 1-worker row, in this process: batch 1, 4 and 5."""
    root = tmp_path_factory.mktemp("one_worker")
    for bs in (1, 4, 5):
        render({"items": 12, "steps": STEPS, "batch_size": bs, "device": "cpu"}, root / f"b{bs}", threads=1,
               progress=False)
    return root


@pytest.fixture(scope="module")
def kill_ref(tmp_path_factory):
    """The uninterrupted fault job, in this process (one worker, batch 4)."""
    out = tmp_path_factory.mktemp("kill_ref") / "job"
    render({"items": 12, "steps": KILL_STEPS, "batch_size": 4, "device": "cpu"}, out, threads=1, progress=False)
    return items(out)


def test_worker_counts_and_batch_sizes_give_the_same_bytes(one_worker, tmp_path):
    """12 items, deterministic mode: {1, 2, 3} workers x batch {1, 4, 5}; every file byte-identical, every
    manifest checksum equal. 2 and 3 workers run tests/_render_worker.py under torchrun: one process group, the
    three jobs through the Python API (a user's own torchrun script)."""
    ref, ref_sums = items(one_worker / "b1"), checksums(one_worker / "b1")
    assert len(ref) == 12
    for bs in (4, 5):
        assert items(one_worker / f"b{bs}") == ref, f"1 worker, batch {bs}"
    for n in (2, 3):
        root = tmp_path / f"w{n}"
        p = run(torchrun(n, [str(TESTS / "_render_worker.py"), str(root), str(STEPS)], module=False))
        assert p.returncode == 0, _job_output(p.stdout, p.stderr)
        for bs in (1, 4, 5):
            out = root / f"b{bs}"
            assert items(out) == ref, f"{n} workers, batch {bs}"
            assert checksums(out) == ref_sums
            entries = manifest(out)["items"].values()
            assert {e["world_size"] for e in entries} == {n} and {e["rank"] for e in entries} == set(range(n))
            assert {e["batch_size"] for e in entries} == {bs}


def test_no_gloo_thread_outlives_the_job(tmp_path):
    """render() under torchrun creates and destroys its own group; afterwards no gloo worker thread is left. One
    that is left runs on into interpreter exit, where releasing a collective's tensors aborts the process
    ("terminate called without an active exception"): 1 in ~20 runs of the restart test below failed that way.
    Negative control: a script that first imports torch._dynamo (entering deterministic mode) while its own group
    exists keeps the group's threads after destroy_process_group()."""
    for extra, want in (([], 0), (["--user-group"], None)):
        p = run(torchrun(2, [str(TESTS / "_render_threads.py"), str(tmp_path / "job"), *extra], module=False))
        assert p.returncode == 0, _job_output(p.stdout, p.stderr)
        found = dict(re.findall(r"THREADS rank=(\d) before=\d+ after=\d+ gloo=(\d+)", p.stdout))
        assert sorted(found) == ["0", "1"], p.stdout
        gloo = [int(found[r]) for r in ("0", "1")]
        if want is not None:
            assert gloo == [want, want], p.stdout
        else:
            assert min(gloo) > 0, p.stdout


def _job_output(stdout: str, stderr: str) -> str:
    """What a failed torchrun job printed, for the assertion message: the workers' own Python tracebacks first
    (torchrun's error summary at the end of stderr would push them out of a plain tail), then the tails."""
    tracebacks = []
    at = stderr.find("Traceback (most recent call last)")
    while at >= 0 and len(tracebacks) < 4:
        end = stderr.find("Traceback (most recent call last)", at + 1)
        block = stderr[at : end if end >= 0 else len(stderr)]
        if "torch/distributed/run.py" not in block:  # torchrun's own ChildFailedError says nothing new
            tracebacks.append(block[:3000])
        at = end
    head = "\n--- worker tracebacks ---\n" + "\n".join(tracebacks) if tracebacks else ""
    return f"{head}\n--- stdout (tail) ---\n{stdout[-2000:]}\n--- stderr (tail) ---\n{stderr[-4000:]}"


def _start_fault_job(out, max_restarts: int) -> subprocess.Popen:
    # the manifest saved after every round, so that the kill lands while it lists some items and not others
    args = ["run", "--out", str(out), "--count", "12", "--steps", str(KILL_STEPS), "--batch-size", "1",
            "--no-progress", "--manifest-every", "0"]
    # a session of its own, so that a hung job can be killed with its workers (_finish)
    return subprocess.Popen(torchrun(2, args, max_restarts=max_restarts), env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=str(REPO), start_new_session=True)


def _kill_mid_job(proc: subprocess.Popen, out, rank: int) -> int:
    """SIGKILL worker ``rank`` once the manifest lists some items; returns how many it listed then."""
    n = wait_for_items(out, 1, proc)
    pids = worker_pids(proc.pid)
    assert rank in pids, f"torchrun's workers: {pids}"
    os.kill(pids[rank], signal.SIGKILL)
    return n


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[str, str]:
    """Wait for torchrun; past ``timeout`` kill its whole session (torchrun and its workers) and fail."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"the job hung for {timeout} s:\n{_job_output(stdout, stderr)}") from None


def test_sigkill_a_worker_then_rerun(kill_ref, tmp_path):
    """SIGKILL rank 1 mid-job (torchrun without restarts: the job fails). What the manifest lists is whole and
    right; a torn file and a temp file left where items were not reported are not taken as done; a plain rerun
    (one worker, the CLI in this process) finishes: no item lost or duplicated, the same bytes as the
    uninterrupted run."""
    out = tmp_path / "job"
    proc = _start_fault_job(out, max_restarts=0)
    try:
        listed = _kill_mid_job(proc, out, rank=1)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    _finish(proc)
    assert proc.returncode != 0, "the job survived the kill"
    done = sorted(int(k) for k in manifest(out)["items"])
    assert listed <= len(done) < 12, f"the manifest listed {listed} items at the kill and {len(done)} after it"
    for i in done:
        assert (out / item_name(i)).read_bytes() == kill_ref[item_name(i)]
    missing = sorted(set(range(12)) - set(done))
    # what a writer without rename would leave: a torn item file, and a temp file
    (out / item_name(missing[0])).write_bytes(kill_ref[item_name(missing[0])][:1000])
    (out / (item_name(missing[-1]) + ".tmp-99-beef")).write_bytes(b"half")

    assert main(["run", "--out", str(out), "--count", "12", "--steps", str(KILL_STEPS), "--batch-size", "1",
                 "--threads", "1", "--device", "cpu", "--no-progress"]) == 0
    assert files(out).keys() == set(kill_ref) | {"manifest.json", ".jetdet-run"}  # no temp file, nothing extra
    assert items(out) == kill_ref
    m = manifest(out)
    assert sorted(m["items"], key=int) == [str(i) for i in range(12)] and m["complete"]
    assert (m["runs"][-1]["kept"], m["runs"][-1]["rendered"]) == (len(done), 12 - len(done))


def test_sigkill_rank0_torchrun_restarts_and_finishes(kill_ref, tmp_path):
    """SIGKILL rank 0 (the manifest writer) mid-job under torchrun --max-restarts=1: torchrun restarts the group,
    the new group resumes from the manifest (it keeps what was reported) and the job ends with rc 0 and the
    uninterrupted run's bytes."""
    out = tmp_path / "job"
    proc = _start_fault_job(out, max_restarts=1)
    try:
        _kill_mid_job(proc, out, rank=0)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    stdout, stderr = _finish(proc)
    assert proc.returncode == 0, _job_output(stdout, stderr)
    assert items(out) == kill_ref
    assert files(out).keys() == set(kill_ref) | {"manifest.json", ".jetdet-run"}
    m = manifest(out)
    assert m["complete"] and len(m["runs"]) == 1  # the killed group never finished its run
    kept, rendered = m["runs"][0]["kept"], m["runs"][0]["rendered"]
    assert kept >= 1 and kept + rendered == 12, m["runs"]


def test_workers_with_other_weights_are_stopped_before_anything_is_written(tmp_path):
    """The README: every rank computes the spec hash (model weights included) and the ranks must agree, so a node
    with other weights stops the job before it starts. Rank 1's model has one bias nudged by 1e-3."""
    out = tmp_path / "job"
    p = run(torchrun(2, ["run", "--model", "_render_model:rank1_differs", "--out", str(out), "--count", "4",
                         "--steps", "1", "--no-progress"]))
    assert p.returncode != 0, _job_output(p.stdout, p.stderr)
    assert "the workers do not agree on the job" in p.stderr, _job_output(p.stdout, p.stderr)
    assert not out.exists()
    p = run(torchrun(2, ["run", "--model", "_render_model:factory", "--out", str(out), "--count", "4", "--steps", "1",
                         "--no-progress"]))  # the same factory without the nudge: the job runs
    assert p.returncode == 0, _job_output(p.stdout, p.stderr)
    assert len(items(out)) == 4


@pytest.mark.parametrize("what", ["out", "batch"])
def test_workers_given_their_own_folder_or_batch_size_stop_with_an_error(tmp_path, what):
    """A review's finds: ranks writing node-local folders each reported the job complete while rank 0's folder held
    half the items; ranks given different batch sizes hung until the process group's timeout (30 min). Both are now
    an error on every rank, before anything is rendered."""
    p = run(torchrun(2, [str(TESTS / "_render_mismatch.py"), what, str(tmp_path)], module=False), timeout=240)
    said = [tmp_path / f"rank{r}.txt" for r in range(2)]
    assert p.returncode == 0 and all(f.exists() for f in said), _job_output(p.stdout, p.stderr)
    lines = [f.read_text() for f in said]
    want = "does not see rank 0's folder" if what == "out" else "batch_size: the workers were given different"
    assert all("RenderError" in ln and want in ln for ln in lines), lines
    if what == "out":
        assert not items(tmp_path / "node0") and not items(tmp_path / "node1")
    else:
        assert not (tmp_path / "job").exists()


# ------------------------------------------------------------------------- workers started by hand, no torchrun


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def by_hand():
    """``start(rank, world, port, out, log, *extra)``: ``python -m jetdet.render run`` as a user starts worker
    ``rank`` by hand (the four variables, no torchrun), its stderr in ``log``. Workers still running when the test
    ends are killed."""
    started = []

    def start(rank: int, world: int, port: int, out, log, *extra: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "jetdet.render", "run", "--out", str(out), "--count", "12", "--steps",
               str(STEPS), "--batch-size", "4", "--threads", "1", "--no-progress", *extra]
        e = env(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        with open(log, "w") as err:  # the worker keeps its own copy of the file
            started.append(subprocess.Popen(cmd, env=e, stdout=subprocess.DEVNULL, stderr=err, text=True,
                                            cwd=str(REPO)))
        return started[-1]

    yield start
    for w in started:
        if w.poll() is None:
            w.kill()
            w.wait()


def _wait_for_text(log, text: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, f"exited {proc.returncode} before saying {text!r}: {log.read_text()}"
        assert time.monotonic() < end, f"never said {text!r}: {log.read_text()}"
        time.sleep(0.2)


def test_workers_started_by_hand_wait_for_rank0_and_give_the_same_bytes(one_worker, by_hand, tmp_path):
    """RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set by hand in two shells: rank 1, started first, says it is
    waiting for rank 0; once rank 0 comes the job runs and its items are the one-process run's bytes."""
    port, out = _free_port(), tmp_path / "job"
    w1 = by_hand(1, 2, port, out, tmp_path / "r1.txt")
    _wait_for_text(tmp_path / "r1.txt", f"rank 1 of 2: waiting for rank 0 at 127.0.0.1:{port}", w1)
    w0 = by_hand(0, 2, port, out, tmp_path / "r0.txt")
    assert w0.wait(timeout=240) == 0, (tmp_path / "r0.txt").read_text()
    assert w1.wait(timeout=60) == 0, (tmp_path / "r1.txt").read_text()
    assert items(out) == items(one_worker / "b4")
    assert manifest(out)["runs"][0]["world_size"] == 2


def test_a_missing_worker_is_named_after_the_join_timeout(by_hand, tmp_path):
    """Rank 0 of 3 started alone, and rank 2: before, rank 0 waited in C++ for gloo's 30 minutes without a word
    (still waiting, silent, after 75 s when tried), deaf to Ctrl-C and to ``timeout``'s SIGTERM. Now both say
    who is missing and stop at ``--join-timeout``, with nothing written."""
    port, out = _free_port(), tmp_path / "job"
    w0 = by_hand(0, 3, port, out, tmp_path / "r0.txt", "--join-timeout", "8")
    w2 = by_hand(2, 3, port, out, tmp_path / "r2.txt")
    assert w0.wait(timeout=120) == 2 and w2.wait(timeout=30) == 2
    said0, said2 = (tmp_path / "r0.txt").read_text(), (tmp_path / "r2.txt").read_text()
    assert "2 of 3 workers joined; waiting for RANK 1" not in said0  # (the wording below, with the address)
    assert f"2 of 3 workers joined at 127.0.0.1:{port} within 8 s; missing RANK 1: start them" in said0, said0
    assert "missing RANK 1: start them" in said2 and "Traceback" not in said2, said2
    assert "waiting for RANK 1" in said0, said0  # the note while waiting (rank 2 may come after it, under load)
    assert not out.exists()


def test_sigterm_while_waiting_for_workers_stops_at_once(by_hand, tmp_path):
    w0 = by_hand(0, 2, _free_port(), tmp_path / "job", tmp_path / "r0.txt")
    _wait_for_text(tmp_path / "r0.txt", "1 of 2 workers joined", w0)
    w0.send_signal(signal.SIGTERM)
    assert w0.wait(timeout=20) == 143, (tmp_path / "r0.txt").read_text()


def test_two_workers_with_one_rank_stop_every_worker(by_hand, tmp_path):
    port, out = _free_port(), tmp_path / "job"
    w = [by_hand(0, 3, port, out, tmp_path / "a.txt")]
    _wait_for_text(tmp_path / "a.txt", "1 of 3 workers joined", w[0])
    w.append(by_hand(1, 3, port, out, tmp_path / "b.txt"))
    _wait_for_text(tmp_path / "a.txt", "2 of 3 workers joined", w[0])
    w.append(by_hand(1, 3, port, out, tmp_path / "c.txt"))
    assert [p.wait(timeout=120) for p in w] == [2, 2, 2]
    for name in ("a", "b", "c"):
        said = (tmp_path / f"{name}.txt").read_text()
        assert "RANK=1: two workers were started with this rank" in said and "Traceback" not in said, said
    assert not out.exists()


def test_a_worker_whose_rank0_dies_says_so_in_one_line(by_hand, tmp_path):
    """Rank 0 killed while rank 1 waits for a third worker: before, rank 1 printed c10d's logged C++ stack trace
    (some 30 lines, "Exception raised from recvBytes", "frame #0" ...) above jetdet's one-line error. Now only the
    line, and rank 1's own waiting notes still come while it waits."""
    port, out = _free_port(), tmp_path / "job"
    w0 = by_hand(0, 3, port, out, tmp_path / "r0.txt")
    _wait_for_text(tmp_path / "r0.txt", "1 of 3 workers joined", w0)
    w1 = by_hand(1, 3, port, out, tmp_path / "r1.txt")
    _wait_for_text(tmp_path / "r1.txt", "rank 1 of 3: 2 of 3 workers joined", w1)  # a note while held back
    w0.kill()
    assert w1.wait(timeout=60) == 2, (tmp_path / "r1.txt").read_text()
    said = (tmp_path / "r1.txt").read_text()
    assert f"rank 0 at 127.0.0.1:{port} left before every worker joined" in said, said
    assert "frame #" not in said and "Exception raised from" not in said and "[c10d]" not in said, said


def test_a_worker_that_dies_mid_job_is_one_line_on_the_others(by_hand, tmp_path):
    """Rank 1 killed while the job renders: rank 0 failed in its next collective with gloo's Python traceback (some
    30 lines, exit 1). Now one line saying another worker left and that the same command resumes; the items it
    listed are whole."""
    port, out = _free_port(), tmp_path / "job"
    args = ("--count", "400", "--batch-size", "1", "--manifest-every", "0")
    w0 = by_hand(0, 2, port, out, tmp_path / "r0.txt", *args)
    w1 = by_hand(1, 2, port, out, tmp_path / "r1.txt", *args)
    wait_for_items(out, 2, w0)
    w1.kill()
    assert w0.wait(timeout=120) == 1, (tmp_path / "r0.txt").read_text()
    said = (tmp_path / "r0.txt").read_text()
    assert "Traceback" not in said and "rank 0 of 2: another worker left the job (" in said, said
    assert "the same command resumes the job" in said, said
    listed = manifest(out)["items"]
    assert len(listed) >= 2
    assert main(["verify", str(out)]) == 1  # incomplete, but every listed item is whole:
    assert all(check_item(out, int(k), e) is None for k, e in listed.items())


def test_a_worker_given_a_running_jobs_port_is_told_so(by_hand, tmp_path):
    """A second job started by hand on the MASTER_PORT of a job still running: its rank 1 reached the first job's
    store and was told "RANK=1: two workers were started with this rank". Now it names the port as another job's,
    as does a worker whose rank the first job does not have; the first job runs on."""
    port = _free_port()
    args = ("--count", "400", "--batch-size", "1", "--manifest-every", "0")
    a = [by_hand(r, 2, port, tmp_path / "a", tmp_path / f"a{r}.txt", *args) for r in (0, 1)]
    wait_for_items(tmp_path / "a", 2, a[0])
    b = [by_hand(r, w, port, tmp_path / "b", tmp_path / f"b{r}.txt") for r, w in ((1, 2), (2, 3))]
    assert [p.wait(timeout=60) for p in b] == [2, 2]
    for r in (1, 2):
        said = (tmp_path / f"b{r}.txt").read_text()
        assert f"MASTER_ADDR:MASTER_PORT = 127.0.0.1:{port}: another job's workers, already running" in said, said
    assert not (tmp_path / "b").exists() and [p.poll() for p in a] == [None, None]


@pytest.mark.parametrize("addr", ["nohost.invalid", "198.51.100.1"])
def test_rank0_given_an_address_not_its_own_says_so(tmp_path, addr):
    """Rank 0 with a MASTER_ADDR that does not resolve, or that is not this machine's (198.51.100.1: TEST-NET-2): its
    store's own connection waited in C++, silent, past --join-timeout and deaf to SIGTERM (a user trial: still
    waiting after 10 minutes). Now one line naming MASTER_ADDR, at once, nothing written."""
    cmd = [sys.executable, "-m", "jetdet.render", "run", "--out", str(tmp_path / "job"), "--count", "2", "--steps",
           "1", "--threads", "1", "--join-timeout", "5"]
    e = env(RANK="0", WORLD_SIZE="2", MASTER_ADDR=addr, MASTER_PORT=str(_free_port()))
    p = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=90, cwd=str(REPO))
    assert p.returncode == 2, p.stderr
    assert f"error: MASTER_ADDR={addr!r}: " in p.stderr and "rank 0 runs on the machine MASTER_ADDR names" in p.stderr
    assert not (tmp_path / "job").exists()


def test_rank0_accepts_an_address_that_leads_back_to_it(monkeypatch):
    """An address not on one of this machine's interfaces that still leads back to it (a NAT's public address, a
    cluster service in front of rank 0) works with torch's store: the check lets it through when a connection to it on
    MASTER_PORT arrives here, and refuses one whose connection does not. Stand-in: 127.0.0.1 with the interface test
    answering no."""
    from jetdet.render import run as render_run

    monkeypatch.setattr(render_run, "_binds_here", lambda infos: False)
    render_run._check_own_address("127.0.0.1", _free_port())  # comes back here: no error
    with pytest.raises(render_run._SetupError, match="did not come back here within 0.5 s"):
        render_run._check_own_address("198.51.100.1", _free_port(), probe_s=0.5)


def test_rank0_with_an_ipv6_master_addr_on_a_host_without_ipv6_is_told_so(monkeypatch):
    """A host with IPv6 off (``ipv6.disable=1``: an AF_INET6 socket cannot be made) and a MASTER_ADDR resolving to
    an IPv6 address first (another machine's name with an AAAA record): the probe's listener socket raised a bare
    OSError ("Address family not supported by protocol"), which the command line printed as a failed write that the
    same command resumes (exit 1). It is the check's one-line setup error now."""
    import errno

    from jetdet.render import run as render_run

    real = socket.socket

    class NoIPv6(real):
        def __init__(self, family=-1, *args, **kwargs):
            if family == socket.AF_INET6:
                raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
            super().__init__(family, *args, **kwargs)

    monkeypatch.setattr(socket, "socket", NoIPv6)
    with pytest.raises(render_run._SetupError, match="did not come back here"):
        render_run._check_own_address("2001:db8::1", _free_port(), probe_s=0.5)


def test_c10d_traces_are_dropped_and_everything_else_kept():
    text = (b"before\n[W1207 14:32:05.316364429 TCPStore.cpp:125] [c10d] recvValue failed: Connection reset\n"
            b"Exception raised from recvBytes at Utils.hpp:784 (most recent call first):\nframe #0: c10::Error\n"
            b"<omitting python frames>\nframe #28: _start\n\nafter\n[I1207 12:00:00.1 socket.cpp:955] [c10d] "
            b"connected\na line of something else\nframe #1 of a story\n")
    f = _TraceFilter()
    out = b"".join(b"".join(f.feed(line)) for line in text.splitlines(keepends=True)) + b"".join(f.flush())
    assert out == (b"before\nafter\n[I1207 12:00:00.1 socket.cpp:955] [c10d] connected\na line of something else\n"
                   b"frame #1 of a story\n")


def test_other_output_is_not_held_back_while_workers_join():
    """A review: the first capture held every write to fd 2 (other threads' too) until the join ended, up to its
    timeout, and lost it if the process was killed. Now it is forwarded as it comes: a line written inside the
    capture reaches the real fd 2 while the capture is still on, and fd 2 is the terminal's again afterwards."""
    import tempfile

    with tempfile.TemporaryFile() as real:
        saved = os.dup(2)
        os.dup2(real.fileno(), 2)
        try:
            with _C10dTraces():
                os.write(2, b"a line from another thread\n")
                end = time.monotonic() + 10
                while os.fstat(real.fileno()).st_size == 0 and time.monotonic() < end:
                    time.sleep(0.05)
                seen_during = os.fstat(real.fileno()).st_size
            os.write(2, b"after\n")
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        real.seek(0)
        assert seen_during > 0 and real.read() == b"a line from another thread\nafter\n"


def test_a_progress_bar_on_fd_2_is_not_held_back_while_workers_join():
    """A progress bar (another thread's tqdm) redraws its line with \\r and no \\n: the capture's thread split lines
    at \\n alone and, with updates coming faster than its 0.2 s quiet time, held every one of them until the join
    ended (2 s of updates: nothing on the real fd 2). A line now also ends at \\r: each update goes on when the next
    one comes; the bytes are the same. Negative control: the code before held all of them."""
    import tempfile

    updates = [f"\rrendering {i}/40".encode() for i in range(40)]
    with tempfile.TemporaryFile() as real:
        saved = os.dup(2)
        os.dup2(real.fileno(), 2)
        try:
            with _C10dTraces():
                for u in updates:  # never quiet for 0.2 s: measured before the old code's timed flush
                    os.write(2, u)
                    time.sleep(0.05)
                seen_during = os.fstat(real.fileno()).st_size
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        real.seek(0)
        assert seen_during > 0 and real.read() == b"".join(updates)


def test_output_during_the_join_reaches_fd_2_in_a_process_with_many_files_open():
    """The capture's thread waited on its pipe with ``select.select``, which refuses an fd past 1023: in a process
    with that many files open the thread died at once, fd 2 stayed on a pipe with no reader for the whole join, and
    every write to it was lost (a Python write raised BrokenPipeError). It polls now. Negative control: the code
    before (select) loses the line here and raises."""
    import resource
    import tempfile

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200 and (hard == resource.RLIM_INFINITY or hard >= 1200):
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 1200:
        pytest.skip("this process may not open 1200 files")
    hold = []
    try:
        while not hold or hold[-1] < 1030:
            hold.append(os.open(os.devnull, os.O_RDONLY))
        with tempfile.TemporaryFile() as real:
            saved = os.dup(2)
            os.dup2(real.fileno(), 2)
            try:
                with _C10dTraces():
                    time.sleep(0.3)  # the thread is up (before, it had died by now)
                    os.write(2, b"a line written while workers join\n")
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            real.seek(0)
            assert real.read() == b"a line written while workers join\n"
    finally:
        for fd in hold:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_closed_fd_2_stays_closed_while_workers_join():
    """A worker started with stderr closed (``2>&-``): ``os.pipe()`` took the free fd 2 as its read end, so during the
    join fd 2 was the pipe's write end with no one reading it, and a write past the pipe's 64 KiB blocked for good
    (c10d, Python's warnings: a hang instead of output dropped). Now fd 2 stays closed: a write fails at once, as it
    did without jetdet, and no fd is left behind. Negative control: before, fd 2 was open inside."""
    def open_fds():  # (listing them opens one more: the lowest free fd, 2 here)
        return sorted(int(f) for f in os.listdir("/proc/self/fd"))

    def closed(fd):
        try:
            os.fstat(fd)
        except OSError:
            return True
        return False

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("no /proc/self/fd")
    saved = os.dup(2)
    os.close(2)
    try:
        before = open_fds()
        with _C10dTraces():
            time.sleep(0.3)
            during, closed_during = open_fds(), closed(2)
            with pytest.raises(OSError):
                os.write(2, b"x")
        after, closed_after = open_fds(), closed(2)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    assert closed_during and closed_after
    assert during == before and after == before, (before, during, after)


def test_a_worker_leaving_at_its_timeout_as_the_last_one_comes_joins_after_all(monkeypatch):
    """The window a review found: rank 1 of 3 reaches its --join-timeout and leaves the count just as rank 2 comes.
    Had it left, rank 0 and rank 2 (who saw all three) would start the group and wait in gloo for it. Its leave is
    one ``add(-1)``: seeing that everyone had come by then, it joins after all. Here the store is slowed so that
    rank 2 always comes inside that window: rank 1's ``add(count, -1)`` first waits for the count to reach 3. Three
    threads of this process, each ``_join_held`` as a worker. Negative control: a leave that does not look at what
    ``add(-1)`` returns (the code before the review) gives up with an error here."""
    import threading

    from jetdet.render import run as run_mod

    port, key = _free_port(), "jetdet.render/join/count"
    real_store = run_mod.dist.TCPStore
    started = threading.Event()

    class SlowLeave:  # rank 1's client: its leave waits until rank 2 has joined
        def __init__(self, real):
            self._real = real

        def add(self, k, v):
            if k == key and v == -1:
                t = threading.Thread(target=worker, args=(2, 30.0))
                threads.append(t)
                t.start()
                end = time.monotonic() + 20
                while self._real.add(key, 0) < 3 and time.monotonic() < end:
                    time.sleep(0.02)
            return self._real.add(k, v)

        def __getattr__(self, name):
            return getattr(self._real, name)

    def store(addr, p, world, master, *a, **kw):
        s = real_store(addr, p, world, master, *a, **kw)
        if master:
            started.set()
        return SlowLeave(s) if threading.current_thread().name == "rank 1" else s

    monkeypatch.setattr(run_mod.dist, "TCPStore", store)
    monkeypatch.setattr(run_mod.dist, "PrefixStore", lambda prefix, s: ("joined", prefix))
    results, threads = {}, []

    def worker(rank, timeout):
        threading.current_thread().name = f"rank {rank}"
        try:
            results[rank] = run_mod._join_held(rank, 3, "127.0.0.1", port, timeout)
        except Exception as e:  # noqa: BLE001 (reported below)
            results[rank] = e

    threads.append(threading.Thread(target=worker, args=(0, 30.0)))
    threads[0].start()
    assert started.wait(20)
    threads.append(threading.Thread(target=worker, args=(1, 1.0)))
    threads[1].start()
    end = time.monotonic() + 60
    while len(results) < 3 and time.monotonic() < end:
        time.sleep(0.05)
    for t in threads:
        t.join(timeout=5)
    assert results == {r: ("joined", "jetdet.render/group") for r in range(3)}, results


@pytest.mark.parametrize("world", ["2", "1"])
def test_rank_and_world_size_without_the_address(tmp_path, monkeypatch, capsys, world):
    """RANK=1 WORLD_SIZE=2 and no MASTER_ADDR/MASTER_PORT: before, each such process ran the whole job as a world
    of one, and with RANK=1 its errors were not even printed. Now every rank says what is missing, and nothing is
    written. WORLD_SIZE=1 (the control) is a world of one and renders."""
    for k in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "1" if world == "2" else "0")
    monkeypatch.setenv("WORLD_SIZE", world)
    out = tmp_path / "job"
    rc = main(["run", "--out", str(out), "--count", "2", "--steps", "1", "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    if world == "1":
        assert rc == 0 and len(items(out)) == 2, err
        return
    assert rc == 2 and not out.exists()
    assert "MASTER_ADDR, MASTER_PORT: not set, but RANK, WORLD_SIZE are" in err, err


def test_a_worker_that_gives_up_waiting_stops_the_others(by_hand, tmp_path):
    """A review: rank 1 left at its own --join-timeout still counted as joined, so when the last worker came, rank 0
    and it started the group without rank 1 and waited in gloo for it. Now a worker that gives up stops every
    worker, saying which one gave up."""
    port, out = _free_port(), tmp_path / "job"
    w0 = by_hand(0, 3, port, out, tmp_path / "r0.txt", "--join-timeout", "120")
    _wait_for_text(tmp_path / "r0.txt", "1 of 3 workers joined", w0)
    w1 = by_hand(1, 3, port, out, tmp_path / "r1.txt", "--join-timeout", "3")
    assert w1.wait(timeout=90) == 2, (tmp_path / "r1.txt").read_text()
    assert w0.wait(timeout=30) == 2, (tmp_path / "r0.txt").read_text()
    said0 = (tmp_path / "r0.txt").read_text()
    assert "rank 1 of 3 gave up: 2 of 3 workers joined" in said0 and "missing RANK 2" in said0, said0
    assert not out.exists()
