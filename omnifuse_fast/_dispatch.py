"""Backend registry and the one place that decides which backend runs an op.

Every public op calls :func:`resolve` with the backend the user asked for and the device
of its tensors. Backends register their implementations with :func:`register`, from the
module that owns them (``omnifuse_fast.reference``, ``omnifuse_fast.compiled`` for the compiled
C++/CUDA custom ops, ``omnifuse_fast.triton``); callers never change when a backend is added.

An implementation takes the op's arguments in the public order, already validated, without
``backend``; it returns what the public function returns and supports autograd.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib
import os
import threading
import warnings
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
_LOADERS: dict[str, tuple[str, ...]] = {
    "reference": ("omnifuse_fast.reference._register",),
    "cpu": ("omnifuse_fast.compiled",),
    "cuda": ("omnifuse_fast.compiled", "omnifuse_fast.compiled._cuda_cra"),
    "triton": ("omnifuse_fast.triton",),
}

_impls: dict[tuple[str, str], Callable] = {}
# (op, backend) -> check(*args) giving why these inputs must go to the reference (or None)
_guards: dict[tuple[str, str], Callable[..., str | None]] = {}
_availability: dict[str, Callable[[torch.device], str | None]] = {}
_load_errors: dict[str, str] = {}
_loaded: set[str] = set()
_ready: set[str] = set()  # loaded (or failed): checked without the lock, which dynamo can't trace
_lock = threading.RLock()
# family -> backend -> calls it ran since the last reset_backend_usage() (a count, so that a
# fallback can move its call from the backend chosen to the one that really ran)
_usage: dict[str, collections.Counter] = {}
_fallbacks: dict[tuple[str, str], str] = {}  # (op, backend) -> why it handed over to another
_warned: set[tuple[str, str, str]] = set()  # (op, backend, reason) already warned about


def register(op: str, backend: str, fn: Callable) -> None:
    """Register ``fn`` as ``backend``'s implementation of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    with _lock:
        _impls[(op, backend)] = fn


def register_guard(op: str, backend: str, check: Callable[..., str | None]) -> None:
    """Register ``check(*args)``: why ``backend``'s ``op`` cannot take these inputs, or ``None``.

    For limits that depend on the inputs (dtype, widths, alignment) rather than on the device:
    when ``check`` gives a reason the call runs the reference instead, reported through
    :func:`fallback`, so the decision is made (and recorded) here, not inside the backend.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    with _lock:
        _guards[(op, backend)] = check


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
            for module in _LOADERS[backend]:
                importlib.import_module(module)
        except Exception as exc:  # reported by load_error(); the test suite fails on it when
            # OMNIFUSE_EXPECT_BACKENDS names this backend (tests/conftest.py)
            _load_errors[backend] = f"{type(exc).__name__}: {exc}"
        finally:
            _ready.add(backend)


def load_error(backend: str) -> str | None:
    """Why ``backend`` failed to load (its import raised), or ``None`` when it loaded."""
    _load(backend)
    return _load_errors.get(backend)


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
    impl = _impls[(op, backend)]
    guard = _guards.get((op, backend))
    if guard is not None:
        impl = functools.partial(_guarded, op, backend, guard, impl)
    return Choice(backend, impl)


def _guarded(op: str, backend: str, guard: Callable, impl: Callable, *args):
    reason = guard(*args)
    if reason is None:
        return impl(*args)
    fallback(op, backend, "reference", reason)
    return _impls[(op, "reference")](*args)


def _record(op: str, backend: str) -> None:
    if torch.compiler.is_compiling():
        _record_traced(op, backend)  # once per trace: the compiled graph calls this backend
    else:
        _usage.setdefault(OPS.get(op, op), collections.Counter())[backend] += 1


@torch.compiler.assume_constant_result
def _record_traced(op: str, backend: str) -> bool:
    """Record a choice made while dynamo traces: run for real at trace time (dynamo would
    otherwise trace the bookkeeping, or break the graph on it), so a compiled step's backends
    show in :func:`backend_usage` of the call that compiled it."""
    _usage.setdefault(OPS.get(op, op), collections.Counter())[backend] += 1
    return True


def fallback(op: str, backend: str, to: str, reason: str) -> None:
    """Report that ``backend`` handed this call of ``op`` to ``to``, and why.

    Backends call this instead of falling back silently: the usage record moves the call from
    ``backend`` to ``to`` (it names the path that really ran), :func:`fallback_reasons` says
    why, and the first time for each reason a ``UserWarning`` says so.
    """
    if torch.compiler.is_compiling():
        _fallback_traced(op, backend, to, reason)
        return
    _fallback_now(op, backend, to, reason)


@torch.compiler.assume_constant_result
def _fallback_traced(op: str, backend: str, to: str, reason: str) -> bool:
    """:func:`fallback` at trace time (see :func:`_record_traced`)."""
    _fallback_now(op, backend, to, reason)
    return True


def _fallback_now(op: str, backend: str, to: str, reason: str) -> None:
    with _lock:
        _fallbacks[(op, backend)] = reason
        counts = _usage.setdefault(OPS.get(op, op), collections.Counter())
        if counts[backend] > 0:  # the call resolve() recorded for backend did not run there
            counts[backend] -= 1
        counts[to] += 1
        first = (op, backend, reason) not in _warned
        _warned.add((op, backend, reason))
    if first:
        warnings.warn(f"{backend} {op} falls back to the {to}: {reason}", stacklevel=4)


def fallback_reasons() -> dict[tuple[str, str], str]:
    """``(op, backend) -> reason`` for every in-backend fallback reported so far."""
    return dict(_fallbacks)


def clear_fallbacks() -> None:
    """Forget the fallbacks reported so far (their reasons, and which were warned about)."""
    with _lock:
        _fallbacks.clear()
        _warned.clear()


def backend_usage() -> dict[str, str]:
    """Per op family, the backend(s) that ran since :func:`reset_backend_usage` ("a+b")."""
    out = {}
    for family in FAMILIES:
        ran = sorted(b for b, n in _usage.get(family, {}).items() if n > 0)
        if ran:
            out[family] = "+".join(ran)
    return out


def reset_backend_usage() -> None:
    """Start a new usage record (e.g. at the start of training, or of evaluation)."""
    _usage.clear()


@contextlib.contextmanager
def unrecorded():
    """Ops run inside are left out of the usage record (a probe, not the work reported)."""
    saved = {family: collections.Counter(counts) for family, counts in _usage.items()}
    try:
        yield
    finally:
        _usage.clear()
        _usage.update(saved)


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
