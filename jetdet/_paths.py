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


def configs_dir() -> str:
    env = os.environ.get("JETDET_CONFIG_DIR")
    if env:
        return env
    install()
    import jetdet.autotune_configs as ac

    return os.path.dirname(os.path.abspath(ac.__file__))
