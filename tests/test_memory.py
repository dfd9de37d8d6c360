"""No memory growth: 1000 repeated calls of each op (forward and backward) on every backend.

Memory in use is glibc's ``mallinfo2`` count of allocated heap and mmap bytes: unlike the
resident set size (``/proc/self/statm``, the fallback), it grows with a leak even when the
heap holds free memory left by earlier tests, which would absorb a leak without RSS moving. Each op
is warmed up first (allocator caches, lazy loading, autograd's first-call setup), then called
1000 more times; RSS may not grow by more than ``BOUND_MB`` over those calls. A leak of even
1 KB per call would show as about 1 MB; a held autograd graph or a retained output per call
is far more. ``test_the_probe_sees_a_leak`` shows the probe catches a real one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os

import pytest
import torch

import omnifuse_fast as of

BOUND_MB = 2.0
CALLS = 1000
WARMUP = 100
STATM = "/proc/self/statm"

pytestmark = pytest.mark.skipif(not os.path.exists(STATM), reason="needs /proc/self/statm")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _mallinfo2():
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    except (OSError, AttributeError):  # not glibc >= 2.33
        return None
    fn.restype = _Mallinfo2
    return fn


_MALLINFO2 = _mallinfo2()


def rss_mb() -> float:
    """Bytes in use (mallinfo2: heap in use + mmapped chunks), else the resident set, in MB."""
    if _MALLINFO2 is not None:
        info = _MALLINFO2()
        return (info.uordblks + info.hblkhd) / 2**20
    with open(STATM) as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _inputs():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 3, 5, generator=g)
    y = torch.randint(0, 5, (16,), generator=g)
    comb = torch.randint(1, 8, (16,), generator=g)
    present = torch.rand(16, 3, generator=g) < 0.7
    present[:, 0] = True
    v = torch.randn(16, 3, 4, generator=g)
    src = torch.randint(0, 16, (3, 16), generator=g)
    x = torch.randn(16, 12, generator=g)
    w = [torch.randn(s, generator=g) * 0.3 for s in ((2, 8, 12), (2, 8), (2, 12, 8), (2, 12))]
    q = torch.softmax(torch.randn(16, 5, generator=g), 1)
    grads = [[torch.randn(7, 3, generator=g), torch.randn(5, generator=g)] for _ in range(3)]
    return z, y, comb, present, v, src, x, w, q, grads


def _calls(backend: str):
    """One closure per op: a forward (and a backward where the op is differentiable)."""
    z, y, comb, present, v, src, x, w, q, grads = _inputs()

    def grad_of(fn, *leaves):
        leaves = [t.detach().requires_grad_() for t in leaves]
        out = fn(*leaves)
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward()

    return {
        "combination_ids": lambda: of.combination_ids(present, backend=backend),
        "cra_forward": lambda: grad_of(
            lambda a, *ws: of.cra_forward(a, *ws, backend=backend), x, *w
        ),
        "dwfuse_weights": lambda: grad_of(lambda a: of.dwfuse_weights(a, y, backend=backend), z),
        "dwfuse_loss": lambda: grad_of(lambda a: of.dwfuse_loss(a, y, backend=backend), z),
        "tla_stats": lambda: of.tla_stats(z[:, 0], y, comb, 3, backend=backend),
        "tla_loss": lambda: grad_of(lambda a: of.tla_loss(a, y, comb, 3, backend=backend), z[:, 0]),
        "modality_mix": lambda: grad_of(
            lambda a: of.modality_mix(a, y, src, 5, backend=backend), v
        ),
        "soft_cross_entropy": lambda: grad_of(
            lambda a, b: of.soft_cross_entropy(a, b, backend=backend), z[:, 0], q
        ),
        "mimo_combine": lambda: of.mimo_combine(grads[0], grads[1], backend=backend),
        "mgda_min_norm": lambda: of.mgda_min_norm(grads, backend=backend),
    }


def growth_mb(call, calls: int = CALLS) -> float:
    """RSS growth over ``calls`` calls, after a warm-up."""
    for _ in range(WARMUP):
        call()
    gc.collect()
    before = rss_mb()
    for _ in range(calls):
        call()
    gc.collect()
    return rss_mb() - before


MEASURED: dict[tuple[str, str], float] = {}


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_no_growth_over_1000_calls_of_each_op(backend):
    if backend not in of.available_backends("cpu"):
        pytest.skip(f"{backend} is not available here")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # no thread-pool warm-up noise in the measurement
    try:
        for op, call in _calls(backend).items():
            MEASURED[(op, backend)] = grown = growth_mb(call)
            assert grown < BOUND_MB, f"{op} on {backend}: RSS grew {grown:.2f} MB in {CALLS} calls"
    finally:
        torch.set_num_threads(threads)
    print(
        "\nRSS growth over 1000 calls (MB): "
        + ", ".join(f"{op} {MEASURED[(op, backend)]:+.2f}" for op, _ in _calls(backend).items())
    )


def test_the_probe_sees_a_leak():
    """A 4 KB-per-call leak grows RSS by ~4 MB over 1000 calls: above the bound."""
    kept = []
    assert growth_mb(lambda: kept.append(torch.ones(1024))) > BOUND_MB
