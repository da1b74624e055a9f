"""The bench/ scripts as modules, for tests that assert on what a script computes (bench/ is not a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_bench(name: str):
    """``bench/<name>.py`` as the module ``jetdet_bench_<name>``, loaded once per process (registered in
    ``sys.modules`` before it runs, as an import would be)."""
    key = f"jetdet_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "bench" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]
