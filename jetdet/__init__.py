"""jetdet: deterministic and fast Triton kernels for diffusion inference."""

from . import _paths

_paths.install()

__version__ = "0.1.0"
