"""jetdet: deterministic and fast Triton kernels for diffusion inference.

Public API::

    import jetdet
    with jetdet.mode("deterministic"):       # or set_mode()/get_mode()
        y = model(x)
    jetdet.ops.linear(x, w, b)               # batch-invariant ops (torch.library: jetdet::<op>)
    jetdet.randn(shape, seed, item_offset=0, step=0)
    jetdet.checksum(y); jetdet.match(a, b, "exact"); jetdet.fingerprint()
    jetdet.clear_weight_cache()              # after a few elements of a weight were written through .data

Importing jetdet probes no device and does not import triton; kernels load on first use.
"""

from . import _paths

_paths.install()

__version__ = "0.1.0"

from . import ops  # noqa: E402
from .kernels.matmul.torch_path import clear_weight_cache  # noqa: E402
from .mode import Mode, get_mode, mode, set_mode  # noqa: E402
from .noise import randn  # noqa: E402
from .patch import PatchHandle, patch, unpatch  # noqa: E402
from .verify import checksum, fingerprint, match  # noqa: E402

__all__ = [
    "Mode", "mode", "set_mode", "get_mode", "ops", "randn", "checksum", "fingerprint", "match",
    "patch", "unpatch", "PatchHandle", "clear_weight_cache",
]
