"""Public ops: ``jetdet.ops.<op>``, each backed by a ``torch.library`` custom op ``jetdet::<op>``."""

from .core import *  # noqa: F401,F403
from .core import __all__ as _core_all

__all__ = list(_core_all)
try:  # the fast-path ops (linear attention, block-sparse attention, forecasting)
    from . import fast as _fast
    from .fast import *  # noqa: F401,F403

    __all__ += list(_fast.__all__)
except ImportError as _e:  # pragma: no cover - only while fast.py is absent
    if "fast" not in str(_e):
        raise
