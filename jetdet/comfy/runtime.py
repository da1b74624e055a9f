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
        sys.path.append(stubs)
    cli_args = importlib.import_module("comfy.cli_args")
    cli_args.args.cpu = bool(cpu)
    for k, v in (extra_args or {}).items():
        if not hasattr(cli_args.args, k):
            raise ValueError(f"extra_args: ComfyUI has no command-line option {k!r}")
        setattr(cli_args.args, k, v)
    importlib.import_module("utils")  # ComfyUI's own utils package, imported first as main.py does
    return where
