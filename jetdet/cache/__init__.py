"""Step cache: skip model evaluations per batch row by forecasting their outputs.

* :class:`StepCacheController`: called with a :class:`jetdet.patch.call.ModelCall` per model evaluation,
  returns the ``[B, ...]`` output, running the model only on the rows that need it.
* :class:`CacheManager`: the byte budget, eviction and device → host → disk tiers behind it.
"""

from .controller import StepCacheController
from .manager import CacheManager

__all__ = ["StepCacheController", "CacheManager"]
