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
