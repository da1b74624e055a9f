"""Helpers for the render-farm tests: the subprocess environment, folder snapshots, torchrun and its workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"


def env(**extra) -> dict:
    """The environment for a child process: this checkout's jetdet (and the test helpers) first on the path, and no
    GPU: the workers run on the CPU with gloo, as the in-process references in the tests do (on a one-GPU machine
    two workers would otherwise share that GPU, which nccl refuses)."""
    e = dict(os.environ)
    e["CUDA_VISIBLE_DEVICES"] = ""
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS)] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    e.setdefault("PYTHONFAULTHANDLER", "1")  # a worker that dies of a signal prints where its threads were
    e.update(extra)
    return e


def torchrun(nproc: int, args: list[str], *, max_restarts: int = 0, module: bool = True) -> list[str]:
    """``python -m torch.distributed.run`` on a free port (``--standalone``) for ``-m jetdet.render ARGS`` or a
    script."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={max_restarts}"]
    return cmd + (["-m", "jetdet.render"] if module else []) + args


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout, cwd=str(REPO))


def files(folder) -> dict[str, bytes]:
    """``{name: bytes}`` of every file in ``folder``."""
    folder = Path(folder)
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def items(folder) -> dict[str, bytes]:
    return {k: v for k, v in files(folder).items() if k.startswith("item-") and k.endswith(".safetensors")}


def snapshot(path) -> dict:
    """Everything about a folder tree that an error must not change: names, bytes, modes and mtimes."""
    path = Path(path)
    if not path.exists():
        return {"exists": False}
    if path.is_file():
        st = path.stat()
        return {"file": path.read_bytes(), "mode": st.st_mode, "mtime": st.st_mtime_ns}
    out = {}
    for p in sorted(path.rglob("*")):
        st = p.stat()
        out[str(p.relative_to(path))] = (p.read_bytes() if p.is_file() else None, st.st_mode, st.st_mtime_ns)
    st = path.stat()
    out["."] = (None, st.st_mode, st.st_mtime_ns)
    return out


def manifest(folder) -> dict:
    return json.loads((Path(folder) / "manifest.json").read_text())


def checksums(folder) -> dict[str, str]:
    return {k: v["checksum"] for k, v in manifest(folder)["items"].items()}


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            out.append(int(d))
    return out


def worker_pids(launcher: int) -> dict[int, int]:
    """``{rank: pid}`` of the workers torchrun (pid ``launcher``) has running now (Linux /proc)."""
    out = {}
    for pid in _children(launcher):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env_vars = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if b"RANK" in env_vars:
            out[int(env_vars[b"RANK"])] = pid
    return out


def wait_for_items(folder, at_least: int, proc: subprocess.Popen, timeout: float = 240) -> int:
    """Poll the manifest until it lists ``at_least`` items; returns how many it lists."""
    t0 = time.monotonic()
    path = Path(folder) / "manifest.json"
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"the job ended (rc {proc.returncode}) before {at_least} items were reported")
        try:
            n = len(json.loads(path.read_text())["items"])
        except (OSError, ValueError, KeyError):
            n = 0
        if n >= at_least:
            return n
        time.sleep(0.01)
    raise AssertionError(f"no {at_least} items in {folder} after {timeout} s")
