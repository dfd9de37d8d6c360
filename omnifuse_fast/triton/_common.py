"""Shared pieces of the Triton backend: the kernel decorator, the launcher, small jit helpers.

Interpreter or compiler is decided at *launch* time, not at import time: every kernel is a
``JITFunction`` (so ``wrap_triton`` and Inductor see an ordinary Triton kernel on GPU), and a
launch on CPU tensors (only possible with ``TRITON_INTERPRET=1``, see ``__init__._reason``) runs
its interpreted twin. So the backend works whether or not ``TRITON_INTERPRET`` was set when
this package was first imported (a test suite imports it while collecting other modules).
"""

from __future__ import annotations

import contextlib
import threading

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from triton.runtime.interpreter import InterpretedFunction, _patch_lang
from triton.runtime.jit import JITFunction

from omnifuse_fast import _dispatch


def jit(fn) -> JITFunction:
    """``triton.jit``, but always a ``JITFunction`` (even under ``TRITON_INTERPRET=1``): the
    interpreter is chosen per launch (see the module docstring)."""
    return JITFunction(fn)


# keyed by id: hashing a JITFunction computes its cache key, which fails mid-interpretation
_interpreted: dict[int, tuple[JITFunction, InterpretedFunction]] = {}
_interpret_lock = threading.Lock()


def _interpreted_twin(kernel: JITFunction) -> InterpretedFunction:
    entry = _interpreted.get(id(kernel))
    if entry is None:
        entry = _interpreted[id(kernel)] = (kernel, InterpretedFunction(kernel.fn))
    return entry[1]


def _call_interpreted(self: JITFunction, *args, **kwargs):
    # InterpretedFunction.__call__ patches triton.language for the callee and never restores it,
    # which would break every later *compiled* kernel in this process: patch, and restore.
    scope = _patch_lang(self.fn)
    try:
        return _interpreted_twin(self).rewrite()(*args, **kwargs)
    finally:
        scope.restore()


@contextlib.contextmanager
def _interpreting():
    """While an interpreted kernel runs, calls to ``@jit`` functions (ours, and Triton's own
    ``tl.zeros``, ``tl.max``, ... when Triton was imported without ``TRITON_INTERPRET``) run
    their interpreted twins. Outside a kernel such a call only ever raises, so nothing else
    changes meaning."""
    with _interpret_lock:
        original = JITFunction.__call__
        JITFunction.__call__ = _call_interpreted
        try:
            yield
        finally:
            JITFunction.__call__ = original


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _is_functional(t: torch.Tensor) -> bool:
    from torch._subclasses.functional_tensor import FunctionalTensor

    return isinstance(t, FunctionalTensor) or torch._is_functional_tensor(t)


def launch(kernel: JITFunction, grid: tuple, *args, **kwargs) -> None:
    """Launch ``kernel`` on ``grid``: compiled via ``wrap_triton`` on GPU, interpreted on CPU.

    ``wrap_triton`` makes the launch traceable by ``torch.compile`` (the kernel becomes a node of
    the graph). The interpreter cannot run on fake tensors: while ``torch.compile`` computes
    output shapes (fake tensors) the launch is skipped, which is exact because every op here
    allocates its outputs before launching. Functionalization would need the kernel in the graph,
    which the interpreter cannot provide: say so instead of producing a wrong graph.
    """
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    device = tensors[0].device
    if interpreting(tensors[0]):
        if any(_is_functional(t) for t in tensors):
            raise RuntimeError(
                "omnifuse_fast's Triton ops cannot be decomposed by torch.compile in "
                "TRITON_INTERPRET mode; compile with "
                "torch._functorch.config.patch(decompose_custom_triton_ops=False)"
            )
        if any(is_fake(t) for t in tensors):
            return
        with _interpreting():
            _interpreted_twin(kernel)[grid](*args, **kwargs)
        return
    with torch.cuda.device(device):
        torch.library.wrap_triton(kernel)[grid](*args, **kwargs)


def fallback_reason(*tensors: torch.Tensor) -> str | None:
    """Why these inputs go to the reference path: fp64 (the kernels accumulate in fp32, and the
    reference keeps fp64 inputs in fp64). ``None`` when the kernels take them."""
    if any(t.dtype == torch.float64 for t in tensors):
        return "fp64 inputs (the Triton kernels accumulate in fp32; the reference keeps fp64)"
    return None


def report_fallback(op: str, reason: str) -> None:
    """Report that this call of ``op`` runs the reference path instead, and why (recorded by
    the dispatcher, which also warns once per reason)."""
    _dispatch.fallback(op, "triton", "reference", reason)


def use_reference(op: str, *tensors: torch.Tensor) -> bool:
    """True (reported through the dispatcher) when ``op`` must run the reference for these."""
    reason = fallback_reason(*tensors)
    if reason is not None:
        report_fallback(op, reason)
    return reason is not None


def interpreting(t: torch.Tensor) -> bool:
    """True when kernels on ``t`` run in the interpreter (CPU tensors)."""
    return t.device.type == "cpu"


def fp32_dot_precision(t: torch.Tensor) -> str:
    """``tl.dot`` precision for fp32 operands: 3xTF32 (about fp32-accurate, on tensor cores)."""
    if t.device.type == "cuda" and torch.cuda.get_device_capability(t.device)[0] >= 8:
        return "tf32x3"
    return "ieee"


# ---------------------------------------------------------------- jit helpers (fp32 in, out)


@jit
def log1p(t):
    """``log(1 + t)`` accurate for tiny ``t >= 0`` (Goldberg's trick; no libdevice needed)."""
    u = 1.0 + t
    return tl.where(u == 1.0, t, tl.log(u) * (t / tl.where(u == 1.0, 1.0, u - 1.0)))


@jit
def softplus(a):
    """``log(1 + exp(a))`` without overflow."""
    return tl.maximum(a, 0.0) + log1p(tl.exp(-tl.abs(a)))


@jit
def sigmoid(a):
    e = tl.exp(-tl.abs(a))  # never overflows
    return tl.where(a >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))


@jit
def tanh(a):
    e = tl.exp(-2.0 * tl.abs(a))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(a < 0.0, -t, t)


@jit
def activation(a, ACT: tl.constexpr):
    """0 relu, 1 gelu (exact, erf), 2 silu, 3 tanh."""
    if ACT == 0:
        out = tl.maximum(a, 0.0)
    elif ACT == 1:
        out = 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))
    elif ACT == 2:
        out = a * sigmoid(a)
    else:
        out = tanh(a)
    return out


@jit
def activation_grad(a, ACT: tl.constexpr):
    """d act / d a, matching autograd (relu: 0 at a == 0)."""
    if ACT == 0:
        out = tl.where(a > 0.0, 1.0, 0.0)
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476))
        out = cdf + a * 0.3989422804014327 * tl.exp(-0.5 * a * a)
    elif ACT == 2:
        s = sigmoid(a)
        out = s * (1.0 + a * (1.0 - s))
    else:
        t = tanh(a)
        out = 1.0 - t * t
    return out


@jit
def online_lse(m_run, s_run, x, AXIS: tl.constexpr):
    """One step of a streaming logsumexp along ``AXIS``: masked entries of ``x`` are -inf.

    ``(m, s)`` stay NaN-free when every entry so far is masked (m = -inf, s = 0).
    """
    m_new = tl.maximum(m_run, tl.max(x, axis=AXIS, keep_dims=True))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    s_new = s_run * tl.exp(m_run - m_safe) + tl.sum(tl.exp(x - m_safe), axis=AXIS, keep_dims=True)
    return m_new, s_new


@jit
def lse_finish(m, s):
    """``(max, sum, log sum)`` of a streamed logsumexp, safe for empty rows (0, 1, 0).

    Callers use ``lse - z = (m - z) + log s`` and ``softmax = exp(z - m) / s`` rather than
    ``m + log s``: with logits near +-1e4, rounding ``m + log s`` costs ~5e-4 absolute.
    """
    ok = s > 0.0
    s_safe = tl.where(ok, s, 1.0)
    return tl.where(ok, m, 0.0), s_safe, tl.log(s_safe)


ACTIVATION_IDS = {"relu": 0, "gelu": 1, "silu": 2, "tanh": 3}
