"""Triton kernels (imported as ``jetdet.kernels``). Only this package holds ``@triton.jit`` code.

Each op lives in ``kernels/<op>/``: ``kernel.py`` (``@triton.jit`` only), ``launch.py`` (checks the
already-validated inputs, allocates, picks the config with ``config(...)``, launches), ``specs.py``
(``compile_specs()`` for ``jetdet.static_report``) and ``reference.py`` (literal fp32 torch math). Launch
tables are read through ``jetdet.configs``. Importing a kernel module imports triton; set
``TRITON_INTERPRET=1`` before that to run kernels on CPU.

This folder is never a top-level ``kernels`` package. When the repository root is on ``sys.path`` (``python -m
pytest`` or ``python -c`` run from a checkout puts the current directory there), ``import kernels`` would find
this folder and shadow Hugging Face's ``kernels`` (a dependency of transformers, which diffusers imports when it
sees that distribution installed). Imported under that name, this module hands over to the real ``kernels``
when one is installed elsewhere on ``sys.path``, and otherwise raises ImportError, as if it were not here.
"""

if __name__ == "kernels":  # imported as a top-level package: step aside
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _here = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _rest = [p for p in _sys.path if _os.path.abspath(p or _os.getcwd()) != _here]
    _spec = _machinery.PathFinder.find_spec("kernels", _rest)
    if _spec is None or _spec.loader is None:
        del _sys.modules["kernels"]
        raise ImportError("No module named 'kernels' (jetdet's kernels/ folder is imported as jetdet.kernels)",
                          name="kernels")
    _real = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _real  # the import statement returns what sys.modules holds after this runs
    try:
        _spec.loader.exec_module(_real)
    except BaseException:
        del _sys.modules["kernels"]
        raise
