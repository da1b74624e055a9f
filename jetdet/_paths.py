"""Make ``kernels/`` and ``autotune_configs/`` importable as ``jetdet.kernels`` / ``jetdet.autotune_configs``.

When jetdet is pip-installed, setuptools' ``package-dir`` copies those folders under the package. When the
repository is used as a checkout (cloned into ``ComfyUI/custom_nodes/`` or put on ``sys.path``), they sit
beside ``jetdet/``; this module registers them under the jetdet namespace without adding a top-level
``kernels`` package (which would shadow Hugging Face's ``kernels``).
"""

from __future__ import annotations

import importlib.util
import os
import sys

PKG_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(PKG_DIR)


def _alias(subname: str, folder: str) -> None:
    full = f"jetdet.{subname}"
    if full in sys.modules or os.path.isdir(os.path.join(PKG_DIR, subname)):
        return
    path = os.path.join(REPO_DIR, folder)
    init = os.path.join(path, "__init__.py")
    if not os.path.isfile(init):
        return
    spec = importlib.util.spec_from_file_location(full, init, submodule_search_locations=[path])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[full] = mod
    spec.loader.exec_module(mod)
    parent = sys.modules.get("jetdet")
    if parent is not None:
        setattr(parent, subname, mod)


def user_stacklevel(*modules) -> int:
    """The ``stacklevel`` that makes a warning issued by the caller of this function name the first frame outside
    jetdet (its package and ``kernels/``), torch, triton and the given ``modules``' packages: the user's line (or
    their model's) instead of ``torch/overrides.py`` or a jetdet helper, whatever the depth in between."""
    import torch

    skip = [PKG_DIR, os.path.join(REPO_DIR, "kernels"), os.path.dirname(torch.__file__)]
    skip += [os.path.dirname(m.__file__) for m in (sys.modules.get("triton"), *modules) if getattr(m, "__file__", None)]
    level, f = 1, sys._getframe(1)
    while f is not None:
        name = os.path.abspath(f.f_code.co_filename)
        if not any(name.startswith(p + os.sep) for p in skip):
            return level
        f, level = f.f_back, level + 1
    return 1


def install() -> None:
    _alias("kernels", "kernels")
    _alias("autotune_configs", "autotune_configs")


# os.environ's own bytes mapping: ``os.environ.get(name)`` goes through Mapping.get, __getitem__ and a decode, ~1.5 us,
# and the launch path reads a few variables on every kernel call. It stays in step with os.environ (its
# __setitem__/__delitem__ update it). Both attributes exist on CPython >= 3.2; other Pythons take os.environ.get.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEYS: dict[str, object] = {}


def getenv(name: str) -> str | None:
    """``os.environ.get(name)``, for the per-call path."""
    if _ENV_DATA is None or not hasattr(os.environ, "encodekey"):
        return os.environ.get(name)  # pragma: no cover - other Pythons
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = os.environ.encodekey(name)
    value = _ENV_DATA.get(key)
    return None if value is None else os.environ.decodevalue(value)


_shipped_dir: str | None = None


def configs_dir() -> str:
    """``$JETDET_CONFIG_DIR`` if set, else the shipped ``autotune_configs`` folder."""
    global _shipped_dir
    env = getenv("JETDET_CONFIG_DIR")
    if env:
        return env
    if _shipped_dir is None:
        install()
        import jetdet.autotune_configs as ac

        _shipped_dir = os.path.dirname(os.path.abspath(ac.__file__))
    return _shipped_dir
