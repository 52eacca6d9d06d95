"""Kernel backends: the row-op contract, the registry, and the choice of a backend for a device.

Both ops reduce their vocabulary work to two row primitives, ``row_lse`` and ``row_grad``, whose
contract ``RowOps`` states. A backend is one module of this package implementing them, named after
the backend: "triton" (``triton.py``: CUDA, or CPU tensors under Triton's interpreter), "cpu"
(``cpu.py``: the C++ kernel of ``csrc/``), "torch" (``torch.py``: the chunked numerical reference
path, any device). ``_REGISTRY`` lists them with the devices they run on.

"auto" takes the first backend of the registry that runs natively on the tensors' device and is
usable here: "triton" for CUDA tensors; on CPU the C++ kernel when it builds, else "torch".
``usable_backends(device)`` lists every backend that works on a device here (the interpreted
"triton" included); the self-check, the tests and the benchmarks enumerate backends through it.

Backend modules are imported on first use, so importing ``elbokto_kernels`` does not import
triton. Triton's interpreter (``TRITON_INTERPRET=1``, which lets "triton" take CPU tensors) is
decided when triton is first imported, by anyone (transformers imports it): set the variable
before that, and at the latest before the first use of the triton backend.

Adding a backend: write ``backends/<name>.py`` with ``row_lse`` and ``row_grad`` as ``RowOps``
states them (plus ``available() -> bool`` if it can fail to load on some machines, e.g. a missing
compiler), and add one entry to ``_REGISTRY``: its module and the device types it runs on. Its
position there decides where "auto" ranks it. ``BACKENDS``, ``usable_backends`` and with them the
backend-parametrised tests (``tests/test_row_ops.py``, ``tests/test_kernels.py``), the self-check
and the benchmarks pick it up.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Literal, Protocol, cast, get_args

# Not `import torch`: importing the submodule `.torch` (or `.triton`) binds its name in this
# package's namespace, which would then no longer be the torch package.
import torch as _torch
from torch import Tensor


class RowOps(Protocol):
    """The two row primitives every backend module implements.

    Both take ``x`` [N, V] logits of N rows, any float dtype and any strides (a column slice, every
    other row, a transpose), and work on the rows ``rows`` (int64 [M] row ids into x), or on all N
    rows when ``rows`` is None (then M = N). ``targets`` is int64 [M]: the column of each row's
    clean token, or a value outside [0, V) when it lies in another vocabulary chunk (the linear op
    walks the vocabulary in chunks). With ``softcap`` s the logits are z = s * tanh(x / s), else
    z = x. Arithmetic is float32 whatever x's dtype; M = 0 is allowed and does nothing.

    ``fused_elbo`` calls them with the masked rows of its [C * L, V] logits; ``fused_linear_elbo``
    with ``rows=None`` on each float32 [M, Vc] logit chunk, targets shifted by the chunk's start.
    """

    def row_lse(
        self,
        x: Tensor,
        rows: Tensor | None,
        targets: Tensor,
        softcap: float | None,
        row_max: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(lse, target_logit), float32 [M] each: the log-sum-exp of z over each row, and z at the
        row's target (0 where the target is outside [0, V)). ``row_max``, a contiguous float32
        [M] when given, receives the largest z of each row (the online log-sum-exp has it anyway;
        gradient filtering reads it)."""

    def row_grad(
        self,
        x: Tensor,
        rows: Tensor | None,
        targets: Tensor,
        lse: Tensor,
        scale: Tensor,
        softcap: float | None,
        out: Tensor,
    ) -> None:
        """Writes ``out[rows] = scale * (onehot(target) - exp(z - lse)) * dz/dx`` in out's dtype.

        lse, scale: float32 [M] (lse as row_lse returned it). out: contiguous [N, V], of x's dtype
        or another float dtype; rows not in ``rows`` are left untouched. out may be x itself: the
        gradient then overwrites the logits it comes from.
        """


@dataclass(frozen=True)
class _Backend:
    """One registry entry: where a backend lives and which tensors it takes."""

    module: str  # relative to this package; implements RowOps
    devices: tuple[str, ...] | None  # device types it runs on natively; None for any
    interpreted: tuple[str, ...] = ()  # device types it also takes under TRITON_INTERPRET=1


# The names a user passes as ``backend=``: "auto" and the registry's (a test holds them equal).
Backend = Literal["auto", "triton", "cpu", "torch"]
BACKENDS: tuple[str, ...] = get_args(Backend)

# In the order "auto" prefers them.
_REGISTRY: dict[str, _Backend] = {
    "triton": _Backend(".triton", devices=("cuda",), interpreted=("cpu",)),
    "cpu": _Backend(".cpu", devices=("cpu",)),
    "torch": _Backend(".torch", devices=None),
}


def resolve_backend(backend: str, device: _torch.device) -> str:
    """Turns a user's ``backend=`` into a concrete backend name for tensors on ``device``.

    An explicit name is checked against the device only: a "cpu" whose C++ kernel did not build
    raises when it is first used, with the build error."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return next(
            name
            for name, entry in _REGISTRY.items()
            if _runs_on(entry, device, interpreted=False) and _loads(name)
        )
    entry = _REGISTRY[backend]
    if not _runs_on(entry, device):
        wanted = " or ".join(f"{kind.upper()} tensors" for kind in entry.devices or ())
        if entry.interpreted:
            wanted += ", or " + " or ".join(f"{kind.upper()} tensors" for kind in entry.interpreted)
            wanted += " with TRITON_INTERPRET=1 set before triton is first imported"
        raise ValueError(f"backend {backend!r} needs {wanted}, got {device}")
    return backend


def row_ops(backend: str) -> RowOps:
    """The module implementing ``RowOps`` for a concrete backend name (imported on first call)."""
    if backend not in _REGISTRY:
        raise ValueError(f"no backend {backend!r}; concrete backends: {tuple(_REGISTRY)}")
    return importlib.import_module(_REGISTRY[backend].module, __name__)


def usable_backends(device: _torch.device | str) -> list[Backend]:
    """The concrete backends that work on ``device`` on this machine, in registry order.

    "triton" with CUDA, or on CPU under TRITON_INTERPRET=1; "cpu" on CPU when the C++ kernel
    builds (the first call may compile it); "torch" always. Empty for a device this machine does
    not have."""
    device = _torch.device(device)
    try:
        _torch.empty(0, device=device)
    except (RuntimeError, AssertionError):  # AssertionError: torch built without that device
        return []
    return [
        cast(Backend, name)
        for name, entry in _REGISTRY.items()
        if _runs_on(entry, device) and _loads(name)
    ]


def _runs_on(entry: _Backend, device: _torch.device, interpreted: bool = True) -> bool:
    if entry.devices is None or device.type in entry.devices:
        return True
    return (
        interpreted
        and device.type in entry.interpreted
        and os.environ.get("TRITON_INTERPRET") == "1"
    )


def _loads(name: str) -> bool:
    """Whether the backend's module imports here and, if it has ``available()``, says yes."""
    try:
        module = row_ops(name)
    except ImportError:
        return False
    available = getattr(module, "available", None)
    return available is None or available()
