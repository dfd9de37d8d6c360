"""Backend registry and the one place that decides which backend runs an op.

Every public op calls :func:`resolve` with the backend the user asked for and the device
of its tensors. Backends register their implementations with :func:`register`, from the
module that owns them (``omnifuse_fast.reference``, ``omnifuse_fast.compiled`` for the compiled
C++/CUDA custom ops, ``omnifuse_fast.triton``); callers never change when a backend is added.

An implementation takes the op's arguments in the public order, already validated, without
``backend``; it returns what the public function returns and supports autograd.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable
from typing import NamedTuple

import torch

BACKENDS: tuple[str, ...] = ("reference", "cpu", "triton", "cuda")
"""Every backend name a public op accepts, besides ``"auto"``."""

OPS: dict[str, str] = {
    "combination_ids": "tla",
    "cra_forward": "cra",
    "dwfuse_weights": "dwfuse",
    "dwfuse_loss": "dwfuse",
    "tla_stats": "tla",
    "tla_loss": "tla",
    "modality_mix": "mix",
    "soft_cross_entropy": "mix",
    "mimo_combine": "mimo",
    "mgda_min_norm": "mimo",
}
"""The public ops (SPEC section 8), each with its family: the one list of their names."""

FAMILIES: tuple[str, ...] = ("cra", "dwfuse", "tla", "mix", "mimo")


class Choice(NamedTuple):
    """What :func:`resolve` decided: the backend's name and its implementation."""

    backend: str
    impl: Callable


# "auto" tries these in order for a device type; "reference" always closes the list.
_AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}

# (op, backend, device type) that "auto" passes over when gradients are needed, because a
# measured run found them slower than the next choice for fwd+bwd (benchmarks/NOTES.md).
# Empty since the C++ CRA cascade saves what its backward needs (it used to recompute the
# chain and lose to autograd on CPU); kept as the one place for such a measured exception.
_AUTO_SKIP_WITH_GRAD: set[tuple[str, str, str]] = set()

# Modules whose import registers a backend's implementations (imported lazily, once).
_LOADERS: dict[str, str] = {
    "reference": "omnifuse_fast.reference._register",
    "cpu": "omnifuse_fast.compiled",
    "cuda": "omnifuse_fast.compiled",
    "triton": "omnifuse_fast.triton",
}

_impls: dict[tuple[str, str], Callable] = {}
_availability: dict[str, Callable[[torch.device], str | None]] = {}
_load_errors: dict[str, str] = {}
_loaded: set[str] = set()
_ready: set[str] = set()  # loaded (or failed): checked without the lock, which dynamo can't trace
_lock = threading.RLock()
# family -> backends that actually ran it since the last reset_backend_usage()
_usage: dict[str, set[str]] = {}
_fallbacks: dict[tuple[str, str], str] = {}  # (op, backend) -> why it handed over to another


def register(op: str, backend: str, fn: Callable) -> None:
    """Register ``fn`` as ``backend``'s implementation of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    with _lock:
        _impls[(op, backend)] = fn


def set_availability(backend: str, check: Callable[[torch.device], str | None]) -> None:
    """Register ``check(device)``: ``None`` when ``backend`` can run there, else the reason."""
    with _lock:
        _availability[backend] = check


def _load(backend: str) -> None:
    if backend in _ready:  # fast path, lock-free so that torch.compile traces resolve()
        return
    with _lock:
        if backend in _loaded:
            return
        _loaded.add(backend)
        try:
            importlib.import_module(_LOADERS[backend])
        except Exception as exc:  # a missing backend is reported, never fatal
            _load_errors[backend] = f"{type(exc).__name__}: {exc}"
        finally:
            _ready.add(backend)


def unavailable_reason(op: str, backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run ``op`` on ``device`` (``None`` when it can)."""
    _load(backend)
    if backend in _load_errors:
        return f"it failed to load ({_load_errors[backend]})"
    check = _availability.get(backend)
    reason = check(device) if check is not None else None
    if reason is not None:
        return reason
    if (op, backend) not in _impls:
        return f"it has no implementation of {op!r}"
    return None


def resolve(op: str, backend: str, device: torch.device, needs_grad: bool = False) -> Choice:
    """Decide which backend runs ``op`` on ``device``: returns its name and implementation.

    ``"auto"`` picks the first available backend of the device's order (falling back to
    ``"reference"``), passing over those measured slower for fwd+bwd when ``needs_grad``;
    an explicit backend that cannot run raises ``RuntimeError`` saying why. The choice is
    recorded per family (:func:`backend_usage`).
    """
    if backend == "auto":
        for name in _AUTO_ORDER.get(device.type, ("reference",)):
            if needs_grad and (op, name, device.type) in _AUTO_SKIP_WITH_GRAD:
                continue
            if unavailable_reason(op, name, device) is None:
                return _chosen(op, name)
        raise RuntimeError(f"no backend can run {op!r} on {device}")  # reference always can
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    reason = unavailable_reason(op, backend, device)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} is not available for {op} on {device}: {reason}")
    return _chosen(op, backend)


def _chosen(op: str, backend: str) -> Choice:
    _record(op, backend)
    return Choice(backend, _impls[(op, backend)])


def _record(op: str, backend: str) -> None:
    # plain Python bookkeeping: done eagerly, and at trace time under torch.compile
    if not torch.compiler.is_compiling():
        _usage.setdefault(OPS.get(op, op), set()).add(backend)


def fallback(op: str, backend: str, to: str, reason: str) -> None:
    """Report that ``backend`` handed ``op`` to ``to`` for this call, and why.

    Backends call this instead of falling back silently: the usage record then names the
    path that really ran, and :func:`fallback_reasons` says why.
    """
    if not torch.compiler.is_compiling():
        _fallbacks[(op, backend)] = reason
        family = OPS.get(op, op)
        _usage.setdefault(family, set()).add(to)


def fallback_reasons() -> dict[tuple[str, str], str]:
    """``(op, backend) -> reason`` for every in-backend fallback reported so far."""
    return dict(_fallbacks)


def backend_usage() -> dict[str, str]:
    """Per op family, the backend(s) that ran since :func:`reset_backend_usage` ("a+b")."""
    return {f: "+".join(sorted(_usage[f])) for f in FAMILIES if f in _usage}


def reset_backend_usage() -> None:
    """Start a new usage record (e.g. at the start of training, or of evaluation)."""
    _usage.clear()


def available_backends(device: torch.device | str = "cpu", op: str = "dwfuse_loss") -> list[str]:
    """The backends that can run ``op`` on ``device`` right now."""
    device = torch.device(device)
    return [b for b in BACKENDS if unavailable_reason(op, b, device) is None]


def preload() -> None:
    """Load the backends a process will use, at import time rather than at first call.

    A first call made inside a ``torch.compile`` trace could not take the loader's lock or
    import a module without breaking the graph; loading here keeps ``fullgraph=True`` true
    from the very first call. Triton is loaded only where it can run on a GPU (its import is
    slow, and on CPU it serves only the interpreter, which loads it lazily).
    """
    for backend in ("reference", "cpu"):
        _load(backend)
    if torch.cuda.is_available():
        _load("triton")


def triton_interpret() -> bool:
    """True when Triton kernels run in the interpreter (CPU tensors, for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


set_availability("reference", lambda device: None)
