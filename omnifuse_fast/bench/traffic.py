"""Count the memory traffic of an eager call, op by op (a prediction tool, not a timer).

Every ATen op that is not a view reads its tensor arguments and writes its outputs once;
the sum is what an unfused eager chain moves when nothing stays in cache. Set against an
op's floor (:mod:`.floors`) it predicts how much a fused kernel can gain on a
bandwidth-bound op: ``eager bytes / floor bytes``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# Ops that allocate or describe memory without moving data.
_FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach"}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.kernels: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.is_view or name in _FREE:
            return out
        ins = [a for a in tree_flatten((args, kwargs or {}))[0] if isinstance(a, torch.Tensor)]
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        self.bytes += sum(_nbytes(t) for t in ins) + sum(_nbytes(t) for t in outs)
        self.kernels[name] += 1
        return out


def eager_traffic(step: Callable[[], object]) -> tuple[int, Counter[str]]:
    """Bytes read + written by the non-view ATen ops of ``step()``, and the op counts.

    Autograd's backward ops run inside the mode too when ``step`` calls ``backward`` or
    ``torch.autograd.grad``.
    """
    counter = _Counter()
    with counter:
        step()
    return counter.bytes, counter.kernels


def reference_cases(b: int = 65536, m: int = 4, c: int = 25, d: int = 128, numel: int = 3_000_000):
    """``(name, step, floor bytes)`` of each op's reference path at the issue's reference
    case (fp32, value checks off): the eager chains the fast paths replace."""
    import omnifuse_fast as of
    from omnifuse_fast.bench import floors
    from omnifuse_fast.reference.mix import random_sources

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, c, (b,), generator=g)
    z3 = torch.randn(b, m, c, generator=g).requires_grad_()
    z2 = torch.randn(b, c, generator=g).requires_grad_()
    comb = torch.randint(1, 1 << m, (b,), generator=g)
    v = torch.randn(b, m, d, generator=g).requires_grad_()
    src = random_sources(b, m, g)
    q = torch.softmax(torch.randn(b, c, generator=g), dim=1)
    gv = torch.randn(b, m, d, generator=g)
    f, h, k = m * d, 256, 5
    x = torch.randn(2048, f, generator=g).requires_grad_()
    w = [
        (torch.randn(k, h, f, generator=g) / f**0.5).requires_grad_(),
        torch.zeros(k, h, requires_grad=True),
        (torch.randn(k, f, h, generator=g) / h**0.5).requires_grad_(),
        torch.zeros(k, f, requires_grad=True),
    ]
    objectives = [[torch.randn(numel // 4, generator=g) for _ in range(4)] for _ in range(m + 1)]
    ref = {"backend": "reference"}

    def grad(out, wrt, go=None):
        return lambda: torch.autograd.grad(out(), wrt, go)

    return [
        (
            "dwfuse_loss fwd",
            lambda: of.dwfuse_loss(z3.detach(), y, **ref),
            floors.dwfuse_loss(b, m, c, 4, "fwd").bytes,
        ),
        (
            "dwfuse_loss fwd+bwd",
            grad(lambda: of.dwfuse_loss(z3, y, **ref), z3),
            floors.dwfuse_loss(b, m, c, 4, "fwd+bwd").bytes,
        ),
        (
            "tla_stats fwd",
            lambda: of.tla_stats(z2.detach(), y, comb, m, **ref),
            floors.tla_stats(b, c, m, 4).bytes,
        ),
        (
            "tla_loss fwd+bwd",
            grad(lambda: of.tla_loss(z2, y, comb, 5, **ref), z2),
            floors.tla_loss(b, c, 4, "fwd+bwd").bytes,
        ),
        (
            "modality_mix fwd",
            lambda: of.modality_mix(v.detach(), y, src, c, **ref),
            floors.modality_mix(b, m, d, c, 4, "fwd").bytes,
        ),
        (
            "modality_mix fwd+bwd",
            grad(lambda: of.modality_mix(v, y, src, c, **ref)[0], v, gv),
            floors.modality_mix(b, m, d, c, 4, "fwd+bwd").bytes,
        ),
        (
            "soft_cross_entropy fwd+bwd",
            grad(lambda: of.soft_cross_entropy(z2, q, **ref), z2),
            floors.soft_cross_entropy(b, c, 4, "fwd+bwd").bytes,
        ),
        (
            "cra_forward fwd (B=2048, H=256, K=5)",
            lambda: of.cra_forward(x.detach(), *[t.detach() for t in w], **ref),
            floors.cra_forward(2048, f, h, k, 4, "fwd").bytes,
        ),
        (
            "mimo_combine",
            lambda: of.mimo_combine(objectives[0], objectives[1], **ref),
            floors.mimo_combine(numel, 4).bytes,
        ),
        (
            f"mgda_min_norm T={m + 1}",
            lambda: of.mgda_min_norm(objectives, **ref),
            floors.mgda_min_norm(numel, 4, m + 1).bytes,
        ),
    ]


def traffic_table() -> str:
    """The eager traffic of :func:`reference_cases` against each floor, as text."""
    import omnifuse_fast as of

    was = of.value_checks_enabled()
    of.set_value_checks(False)
    try:
        lines = [
            f"{'op (reference path)':<40} {'ops':>5} {'eager MB':>10} {'floor MB':>9} {'ratio':>6}"
        ]
        for name, step, floor in reference_cases():
            nbytes, kernels = eager_traffic(step)
            lines.append(
                f"{name:<40} {sum(kernels.values()):>5} {nbytes / 1e6:>10.1f} "
                f"{floor / 1e6:>9.2f} {nbytes / floor:>6.1f}"
            )
    finally:
        of.set_value_checks(was)
    return "\n".join(lines)
