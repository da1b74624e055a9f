"""ComfyUI custom-node entry for a git clone of jetdet into ``ComfyUI/custom_nodes/jetdet``.

ComfyUI imports this file under a name of its own, so the ``jetdet`` package next to it is loaded explicitly (no
``sys.path`` change, nothing else in the checkout becomes importable); a jetdet already imported in the process
(a pip install) is used as it is. Outside ComfyUI this file is not used: ``import jetdet`` is the library.
"""

import importlib.util as _util
import os as _os
import sys as _sys

if "jetdet" not in _sys.modules:
    _pkg = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "jetdet")
    _spec = _util.spec_from_file_location("jetdet", _os.path.join(_pkg, "__init__.py"),
                                          submodule_search_locations=[_pkg])
    _mod = _util.module_from_spec(_spec)
    _sys.modules["jetdet"] = _mod
    try:
        _spec.loader.exec_module(_mod)
    except BaseException:
        del _sys.modules["jetdet"]
        raise

from jetdet.comfy import NODE_IDS, comfy_entrypoint  # noqa: E402

__all__ = ["comfy_entrypoint", "NODE_IDS"]
