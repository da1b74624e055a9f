"""Models jetdet ships:

* :mod:`jetdet.models.toy`: small random-init reference architectures for the determinism tests and benchmark;
* :mod:`jetdet.models.bundled`: a small class-conditional DiT really trained on :mod:`jetdet.models.shapes`
  (rectified flow, CFG dropout; ``bench/train_bundled.py``) and its grading classifier, with the Euler/Heun CFG
  sampler in :mod:`jetdet.models.sampling`. The step cache is measured on it.
"""

from .bundled import BUNDLED_CLASSES, BundledDiT, load_bundled, load_classifier
from .toy import TinyDiT, TinyUNet, make_toy_inputs

__all__ = ["TinyUNet", "TinyDiT", "make_toy_inputs", "BundledDiT", "BUNDLED_CLASSES", "load_bundled",
           "load_classifier"]
