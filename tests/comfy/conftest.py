"""Real ComfyUI for the node tests: they run when a ComfyUI checkout is given in ``$COMFYUI_DIR`` and skip otherwise.

``.ci/run`` sets it up (``../shared/comfyui/setup-comfyui``). By hand::

    export COMFYUI_DIR=$(../shared/comfyui/setup-comfyui | tail -1)
    python -m pytest -q tests/comfy

Without a working torchvision (torch 2.13.0+cpu has none) the import-only stub in ``../shared/comfyui/stubs`` (or
``$JETDET_COMFYUI_STUBS``) is put on ``sys.path``; ComfyUI only imports it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # tiny_models, _comfy_util
SKIP_REASON = ("ComfyUI node tests need a ComfyUI checkout: set COMFYUI_DIR to it (../shared/comfyui/setup-comfyui "
               "extracts one and prints its path; .ci/run does this)")


def _stub_dir() -> str | None:
    for p in (os.environ.get("JETDET_COMFYUI_STUBS"), str(ROOT.parent / "shared" / "comfyui" / "stubs")):
        if p and os.path.isdir(p):
            return p
    return None


def comfyui_dir() -> str | None:
    d = os.environ.get("COMFYUI_DIR")
    return d if d and os.path.isfile(os.path.join(d, "main.py")) else None


def _setup():
    d = comfyui_dir()
    if d is None:
        return None
    stub = _stub_dir()
    if stub and importlib.util.find_spec("torchvision") is None:
        os.environ.setdefault("JETDET_COMFYUI_STUBS", stub)  # import_comfyui puts it on sys.path
    from jetdet.comfy.runtime import import_comfyui

    import_comfyui(d)
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False  # no tqdm bars in the test log
    return d


AVAILABLE = _setup() is not None  # imported here, so test modules can import ComfyUI at collection


def require_comfyui():
    """Call at the top of a test module: skips the module, with how to enable it, when ComfyUI is not set up."""
    if not AVAILABLE:
        pytest.skip(SKIP_REASON, allow_module_level=True)


def pytest_collection_modifyitems(config, items):
    if AVAILABLE:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if Path(str(item.fspath)).resolve().parent == HERE:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def comfy_dir():
    d = _setup()
    if d is None:
        pytest.skip(SKIP_REASON)
    return d


@pytest.fixture(scope="session")
def shapes_patcher(comfy_dir):
    from jetdet.comfy import shapes_model as sm

    return sm.load_model()


@pytest.fixture(scope="session")
def shapes_conds(comfy_dir):
    from jetdet.comfy import shapes_model as sm

    return sm.class_conditioning(3), sm.null_conditioning()
