"""Public ops: ``jetdet.ops.<op>``, each backed by a ``torch.library`` custom op ``jetdet::<op>`` that
:mod:`jetdet.ops.registry` builds from its kernel folder's spec.

The wrappers of the deterministic ops are in :mod:`.core`, those of the fast-mode ops in :mod:`.fast`; a folder
whose ``op.py`` defines its own wrapper (``OpSpec.wrapper``) is exported here directly."""

from . import registry
from .core import *  # noqa: F401,F403
from .core import __all__ as _core_all
from .fast import *  # noqa: F401,F403
from .fast import __all__ as _fast_all

__all__ = [*_core_all, *_fast_all]
for _spec in registry.specs():
    if _spec.wrapper is not None and _spec.public not in __all__:
        globals()[_spec.public] = _spec.wrapper
        __all__.append(_spec.public)
del _spec
