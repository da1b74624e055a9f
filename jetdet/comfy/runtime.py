"""Use a ComfyUI checkout from a plain Python process (tests, ``bench/`` scripts), the way ``main.py`` sets it up.

Inside ComfyUI (the server, or a node pack loaded by it) none of this is needed: ComfyUI is already imported.
Outside it, ComfyUI's modules expect their checkout on ``sys.path``, the CLI arguments parsed, and ComfyUI's own
``utils`` package imported before ``nodes.py`` (which puts ``comfy/`` on ``sys.path``)::

    from jetdet.comfy.runtime import import_comfyui
    comfy_dir = import_comfyui()            # $COMFYUI_DIR, or a path
    import comfy.sample, nodes              # now importable

Nothing here is imported by ``import jetdet``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

ENV = "COMFYUI_DIR"
STUBS_ENV = "JETDET_COMFYUI_STUBS"


def find_comfyui(path: str | os.PathLike | None = None) -> str:
    """The ComfyUI checkout to use: ``path``, else ``$COMFYUI_DIR``. Raises ``FileNotFoundError`` naming what is
    missing."""
    where = path if path is not None else os.environ.get(ENV)
    if not where:
        raise FileNotFoundError(f"ComfyUI: no checkout given; pass its folder or set {ENV} (the folder holding "
                                "ComfyUI's main.py)")
    where = os.path.abspath(os.fspath(where))
    if not os.path.isfile(os.path.join(where, "main.py")) or not os.path.isdir(os.path.join(where, "comfy")):
        raise FileNotFoundError(f"ComfyUI: {where} is not a ComfyUI checkout (expected main.py and comfy/ there)")
    return where


def import_comfyui(path: str | os.PathLike | None = None, *, cpu: bool = True, extra_args: dict | None = None) -> str:
    """Make ComfyUI importable in this process and return its folder.

    ``cpu``: run ComfyUI on the CPU (``--cpu``). ``extra_args``: other parsed command-line options to set before
    ComfyUI's modules read them (for example ``{"use_pytorch_cross_attention": True}``). Idempotent; a second call
    with another folder raises, since one process can hold one ComfyUI.
    """
    where = find_comfyui(path)
    loaded = sys.modules.get("comfy")
    if loaded is not None:
        have = os.path.dirname(os.path.dirname(os.path.abspath(loaded.__file__ or "")))
        if getattr(loaded, "__file__", None) and have != where:
            raise RuntimeError(f"ComfyUI: this process already imported ComfyUI from {have}; cannot switch to {where}")
        return where
    if where not in sys.path:
        sys.path.insert(0, where)
    if importlib.util.find_spec("torchvision") is None:  # comfy/sd.py imports it even for models that never use it
        stubs = os.environ.get(STUBS_ENV)
        if not stubs or not os.path.isdir(stubs):
            raise ImportError(f"ComfyUI imports torchvision, which is not installed here: install it, or set "
                              f"{STUBS_ENV} to a folder with an import-only torchvision stub (in this project's "
                              "workspace: ../shared/comfyui/stubs)")
        # diffusers and transformers decide once, at import, whether torchvision is installed; after the stub goes
        # on sys.path they would take it for the real one and fail importing torchvision.transforms.* (diffusers'
        # peft loader does). Let them see the truth first.
        for name in ("transformers.utils.import_utils", "diffusers.utils.import_utils"):
            try:
                importlib.import_module(name)
            except ImportError:
                pass
        sys.path.append(stubs)
    cli_args = importlib.import_module("comfy.cli_args")
    cli_args.args.cpu = bool(cpu)
    for k, v in (extra_args or {}).items():
        if not hasattr(cli_args.args, k):
            raise ValueError(f"extra_args: ComfyUI has no command-line option {k!r}")
        setattr(cli_args.args, k, v)
    importlib.import_module("utils")  # ComfyUI's own utils package, imported first as main.py does
    return where


def start_server(base_dir: str | os.PathLike, path: str | os.PathLike | None = None, port: int | None = None,
                 timeout: float = 300.0, extra_args: tuple[str, ...] = ()) -> tuple:
    """Start ComfyUI's HTTP server on loopback with ``base_dir`` for its models, custom nodes, input, output and
    database (offline: no browser, no API nodes), and wait until it answers. Returns ``(process, url, log_path)``;
    stop it with :func:`stop_server`. Raises ``RuntimeError`` with the end of its log if it exits or times out."""
    import socket
    import subprocess
    import time
    import urllib.request

    where = find_comfyui(path)
    base = os.path.abspath(os.fspath(base_dir))
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    env = dict(os.environ)
    stubs = env.get(STUBS_ENV)
    spec = importlib.util.find_spec("torchvision")
    found = os.path.realpath(spec.origin) if spec is not None and spec.origin else None
    if stubs and (found is None or found.startswith(os.path.realpath(stubs) + os.sep)):  # none, or only the stub
        env["PYTHONPATH"] = os.pathsep.join(p for p in (stubs, env.get("PYTHONPATH")) if p)
    log_path = os.path.join(base, "server.log")
    log = open(log_path, "w")  # noqa: SIM115 - handed to the child; closed when it stops
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
         "--base-directory", base, "--database-url", f"sqlite:///{os.path.join(base, 'comfyui.db')}",
         "--disable-api-nodes", *extra_args], cwd=where, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.jetdet_log = log
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            log.close()
            raise RuntimeError(f"ComfyUI exited with {proc.returncode}:\n{open(log_path).read()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/system_stats", timeout=10):
                return proc, url, log_path
        except OSError:
            if time.time() > deadline:
                stop_server(proc)
                raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n"
                                   f"{open(log_path).read()[-3000:]}") from None
            time.sleep(1)


def stop_server(proc) -> None:
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log = getattr(proc, "jetdet_log", None)
    if log is not None:
        log.close()
