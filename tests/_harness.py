"""The one test harness: tolerances, a backend checked against the reference, and which
backends this run expects.

- ``check(op, args, backend, ...)`` runs a public op on ``backend`` and on the reference and
  compares the outputs (count, shape, dtype, device, values) and the gradients of a fixed random
  projection of them; every backend test file uses it.
- ``require_backend(backend, device)`` is the one place that decides between *optional* and
  *expected*: a backend that cannot run skips the test, unless ``OMNIFUSE_EXPECT_BACKENDS``
  (a comma list, e.g. ``cpu,triton``; CI sets it) names it, then the test fails with the cause.
  The ``backend`` marker (``pytest.mark.backend("cpu")``) calls it before each test.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

import omnifuse_fast as of
from omnifuse_fast import _dispatch

OPS: tuple[str, ...] = tuple(_dispatch.OPS)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOW = (torch.bfloat16, torch.float16)

# Tolerances of a fast path against the fp32-accumulating reference, per input dtype.
TOLERANCES = {
    torch.float64: dict(rtol=1e-7, atol=1e-9),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}

EXPECT_ENV = "OMNIFUSE_EXPECT_BACKENDS"


def tol(dtype: torch.dtype) -> dict:
    return TOLERANCES[dtype]


# ------------------------------------------------------------------------ expected backends


def expected_backends() -> frozenset[str]:
    """The backends ``OMNIFUSE_EXPECT_BACKENDS`` names (a misspelt one is an error)."""
    names = {n.strip() for n in os.environ.get(EXPECT_ENV, "").split(",") if n.strip()}
    unknown = names - set(_dispatch.BACKENDS)
    if unknown:
        raise pytest.UsageError(
            f"{EXPECT_ENV} names unknown backends {sorted(unknown)}; "
            f"known: {', '.join(_dispatch.BACKENDS)}"
        )
    return frozenset(names)


@contextlib.contextmanager
def triton_interpreter():
    """Triton kernels on CPU tensors run in the interpreter while this is active."""
    # triton.language's own @jit helpers (tl.cdiv, ...) are made interpreter-only when it is
    # first imported under TRITON_INTERPRET=1, which breaks later real compiles in the process
    # (the sm_90 compile test); import it outside (our jit picks the interpreter per launch)
    with contextlib.suppress(ImportError):
        import triton.language  # noqa: F401
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


def cpu_backend(backend: str, monkeypatch) -> str:
    """``backend`` on CPU for the calling test (Triton in the interpreter, set through
    ``monkeypatch``); skips the test when it cannot run here."""
    if backend == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    reason = _dispatch.unavailable_reason("cra_forward", backend, torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    return backend


@contextlib.contextmanager
def one_thread():
    """torch on one thread inside (tiny models: no oversubscription, identical results); the
    thread count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def compiled_opaque(fn, backend: str):
    """``torch.compile(fn, fullgraph=True, backend=backend)``, called with the custom Triton ops
    kept opaque (the interpreter cannot provide the kernels to functionalization)."""
    import torch._functorch.config as functorch_config

    compiled = torch.compile(fn, fullgraph=True, backend=backend)

    def call(*args):
        with functorch_config.patch(decompose_custom_triton_ops=False):
            return compiled(*args)

    return call


def compile_as_aot_eager(seen: list | None = None):
    """A stand-in for ``torch.compile`` with the ``aot_eager`` backend: dynamo's trace and AOT
    autograd without inductor's C++ code generation (minutes on a small CPU). Inductor's
    ``options`` are dropped; ``seen`` collects the compiled functions."""
    real_compile = torch.compile

    def compile_(fn, **kw):
        kw.pop("options", None)
        if seen is not None:
            seen.append(fn)
        return real_compile(fn, **{**kw, "backend": "aot_eager"})

    return compile_


def tiny_omnifuse(view_dims, num_classes: int, dim: int, backend: str, **kw) -> of.OmniFuse:
    """A tiny OmniFuse initialized from seed 0 (hidden 5, two blocks, encoder 6, head 5;
    ``kw``: other constructor arguments) whose miner goes live early (``lazy = 3``)."""
    torch.manual_seed(0)
    model = of.OmniFuse(
        view_dims,
        num_classes,
        dim=dim,
        hidden=5,
        num_blocks=2,
        encoder_hidden=6,
        head_hidden=5,
        backend=backend,
        **kw,
    )
    model.miner.lazy = 3
    return model


def home_device(backend: str) -> str:
    """Where a backend is checked: CUDA for "cuda", and for "triton" when a GPU is here."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def backend_reason(backend: str, device: str = "cpu") -> str | None:
    """Why ``backend`` cannot run on ``device`` here (Triton on CPU: in the interpreter)."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        return "there is no CUDA GPU here (torch.cuda.is_available() is False)"
    interp = triton_interpreter() if backend == "triton" else contextlib.nullcontext()
    with interp:
        return _dispatch.unavailable_reason("dwfuse_loss", backend, torch.device(device))


def missing_expected() -> dict[str, str]:
    """Expected backend -> why it cannot run on its home device (empty when all can)."""
    reasons = {b: backend_reason(b, home_device(b)) for b in sorted(expected_backends())}
    return {b: r for b, r in reasons.items() if r is not None}


def require_backend(backend: str, device: str = "cpu") -> None:
    """Skip the calling test when ``backend`` cannot run on ``device``; fail it instead when
    the backend is expected (``OMNIFUSE_EXPECT_BACKENDS``), naming the cause."""
    reason = backend_reason(backend, device)
    if reason is None:
        return
    gpu_missing = torch.device(device).type == "cuda" and not torch.cuda.is_available()
    # a missing GPU is a broken setup only where the cuda backend is expected
    expected = "cuda" if gpu_missing else backend
    if expected in expected_backends():
        pytest.fail(
            f"the {backend!r} backend is expected ({EXPECT_ENV}="
            f"{os.environ.get(EXPECT_ENV)}) but cannot run on {device}: {reason}",
            pytrace=False,
        )
    pytest.skip(f"{backend} on {device}: {reason}")


# ------------------------------------------------------------------------------ comparing


def assert_close(actual, expected, dtype=torch.float32, msg: str = "") -> None:
    """Compare in fp32 with the dtype's tolerance (lists: the same count, element by element)."""
    if isinstance(actual, (list, tuple)):
        assert len(actual) == len(expected), f"{msg} {len(actual)} items, want {len(expected)}"
        for a, e in zip(actual, expected):
            assert_close(a, e, dtype, msg)
        return
    torch.testing.assert_close(
        actual.float() if actual.is_floating_point() else actual,
        expected.float() if expected.is_floating_point() else expected,
        msg=msg or None,
        **tol(dtype),
    )


def close_scaled(actual, expected, dtype, msg: str = "") -> None:
    """Low precision after long reductions (matmuls over F, sums over B, a K-deep cascade):
    the error is bounded relative to the tensor's scale, not each element's (an element summing
    to ~0 keeps the others' absolute error). fp32 and fp64 are compared element by element."""
    if dtype not in LOW:
        assert_close(actual, expected, dtype, msg)
        return
    t = tol(dtype)
    err = (actual.float() - expected.float()).abs().max().item() if actual.numel() else 0.0
    scale = expected.float().abs().max().item() if expected.numel() else 0.0
    bound = t["rtol"] * scale + t["atol"]
    assert err <= bound, f"{msg} max error {err} > {bound}"


def flat(out) -> list[torch.Tensor]:
    """The tensors of an op's output (nested tuples and lists), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in flat(o)]


def gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed(seed)


def randn(*shape, seed=0, scale=1.0, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Seeded normal values, drawn in fp32 then cast to ``dtype``."""
    t = torch.randn(shape, generator=gen(seed, device), device=device) * scale
    return t.to(dtype)


def randint(lo: int, hi: int, shape, seed=0, device="cpu") -> torch.Tensor:
    return torch.randint(lo, hi, shape, generator=gen(seed, device), device=device)


def run(op: str, args: list, diff=(), backend: str = "reference", **kw):
    """Outputs of ``op`` and the gradients of a fixed random projection of its float outputs
    with respect to ``args[i]`` for ``i in diff`` (tensors or lists of tensors)."""
    args = list(args)
    leaves = []
    for i in diff:
        if isinstance(args[i], list):
            args[i] = [t.detach().clone().requires_grad_() for t in args[i]]
            leaves += args[i]
        else:
            args[i] = args[i].detach().clone().requires_grad_()
            leaves.append(args[i])
    outs = flat(getattr(of, op)(*args, backend=backend, **kw))
    grads = []
    terms = [
        (o.float() * randn(*o.shape, seed=100 + j).to(o.device)).sum()
        for j, o in enumerate(outs)
        if o.is_floating_point() and o.requires_grad
    ]
    if leaves and terms:
        grads = list(torch.autograd.grad(sum(terms), leaves, allow_unused=True))
    return [o.detach() for o in outs], grads


def to64(a):
    """Floating tensors (also in lists) in fp64; anything else as is."""
    if isinstance(a, list):
        return [to64(t) for t in a]
    return a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a


def check(
    op: str,
    args: list,
    backend: str,
    diff=(),
    dtype=torch.float32,
    *,
    scaled: bool = False,
    fp64_reference: bool = False,
    magnitude: float = 1.0,
    finite: bool = False,
    **kw,
) -> None:
    """``op`` on ``backend`` equals the reference: outputs and gradients, within ``dtype``'s
    tolerance.

    - ``scaled``: low-precision values compared against the tensor's scale (:func:`close_scaled`).
    - ``fp64_reference``: the reference runs in fp64 (extreme inputs, where the fp32 reference
      itself loses digits that the kernels keep); dtypes may then differ.
    - ``magnitude``: the inputs' largest |value| where an output is a cancelling sum of them
      (MIMO's direction): the outputs' absolute tolerance scales with it.
    - ``finite``: every float output and gradient must be finite.
    """
    ref_args = [to64(a) for a in args] if fp64_reference else args
    want, want_g = run(op, ref_args, diff, "reference", **kw)
    got, got_g = run(op, args, diff, backend, **kw)
    where = f"({backend}, {dtype})"
    assert len(got) == len(want), f"{op}: {len(got)} outputs, the reference gives {len(want)}"
    assert len(got_g) == len(want_g), f"{op}: {len(got_g)} gradients, want {len(want_g)}"
    t = tol(dtype)
    for i, (a, e) in enumerate(zip(got, want)):
        name = f"{op} output {i} {where}"
        assert a.shape == e.shape and a.device == e.device, name
        assert fp64_reference or a.dtype == e.dtype, f"{name}: {a.dtype} != {e.dtype}"
        if finite and a.is_floating_point():
            assert torch.isfinite(a).all(), f"{name} is not finite"
        if scaled:
            close_scaled(a, e, dtype, name)
        elif magnitude > 1.0 and a.is_floating_point():
            torch.testing.assert_close(
                a.float(), e.float(), rtol=t["rtol"], atol=t["atol"] * magnitude, msg=name
            )
        else:
            assert_close(a, e, dtype, msg=name)
    for i, (a, e) in enumerate(zip(got_g, want_g)):
        name = f"{op} grad {i} {where}"
        if e is None:
            assert a is None or not a.any(), f"{name} should be zero"
            continue
        assert a is not None and a.shape == e.shape, name
        assert fp64_reference or a.dtype == e.dtype, f"{name}: {a.dtype} != {e.dtype}"
        if finite:
            assert torch.isfinite(a).all(), f"{name} is not finite"
        (close_scaled if scaled else assert_close)(a, e, dtype, name)


@contextlib.contextmanager
def no_fallback(op: str, backend: str):
    """The calls inside that asked ``backend`` for ``op`` ran it there: no in-backend fallback
    was reported (``_dispatch.fallback``), and the usage record of its family names it."""
    _dispatch.reset_backend_usage()
    _dispatch.clear_fallbacks()
    yield
    reasons = _dispatch.fallback_reasons()
    assert (op, backend) not in reasons, f"{op} on {backend} fell back: {reasons}"
    ran = _dispatch.backend_usage().get(_dispatch.OPS[op], "")
    assert backend in ran.split("+"), _dispatch.backend_usage()


@contextlib.contextmanager
def falls_back(op: str, backend: str, match: str = ""):
    """The calls inside hand ``op`` from ``backend`` to the reference, reported with a reason
    containing ``match``, and the usage record says the reference ran. Yields the record of
    every warning raised inside."""
    _dispatch.reset_backend_usage()
    _dispatch.clear_fallbacks()
    with pytest.warns(UserWarning, match="falls back to the reference") as caught:
        yield caught
    reason = _dispatch.fallback_reasons().get((op, backend))
    assert reason is not None and match in reason, _dispatch.fallback_reasons()
    assert _dispatch.backend_usage().get(_dispatch.OPS[op]) == "reference"
