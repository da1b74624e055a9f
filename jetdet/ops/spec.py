"""What a kernel folder's ``op.py`` declares for each op it serves (:mod:`jetdet.ops.registry` builds the op)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class OpSpec:
    """Everything jetdet needs to know about one op.

    ``name``: the op is ``torch.ops.jetdet.<name>``. ``schema``: its ``torch.library`` schema without the
    name, e.g. ``"(Tensor a, Tensor b, Tensor? bias) -> Tensor"``. ``fake``: output metadata for tracing.
    ``torch_path``: the batch-invariant torch implementation (CPU). ``launcher``: the Triton path, as
    ``"<function name>"`` in ``jetdet.kernels.<folder>.launch`` or a callable (imported on first use, so
    importing jetdet never imports triton). ``reference``: a plain fp32 torch implementation with the same
    arguments, the ground truth for the tests. ``folder``: the kernel folder, whose ``specs.compile_specs()``
    the static report compiles. ``table``: the ``autotune_configs/<table>/`` launch tables the op reads
    (None: no table). ``routed``: the torch functions the deterministic-mode router may send to this op.
    ``sample(batch, dtype, gen)``: example arguments whose tensors in ``batched`` (argument positions; a
    list argument counts each of its tensors) carry the batch in dim 0, for the registry-wide invariance
    and reference tests. ``device_arg``: the argument whose device picks the path. ``public``: the name of
    the public wrapper in ``jetdet.ops`` (None: only ``torch.ops.jetdet.<name>``).
    """

    name: str
    schema: str
    fake: Callable
    torch_path: Callable
    launcher: str | Callable
    reference: Callable
    folder: str
    sample: Callable
    batched: tuple[int, ...] = (0,)
    table: str | None = None
    routed: tuple = ()
    device_arg: int = 0
    public: str | None = None
    wrapper: Callable | None = field(default=None, compare=False)
