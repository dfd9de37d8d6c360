"""torch.library.opcheck on every custom op of csrc/ops.cpp (forward and backward ops).

Checks each op's schema against its CPU kernel (no input mutated or aliased), that the fake
impl matches the kernel's outputs, that autograd is registered where inputs require grad, and
that AOT dispatch (the torch.compile path, dynamic shapes) works.
"""

from __future__ import annotations

import pytest
import torch

from omnifuse_fast import _dispatch

_REASON = _dispatch.unavailable_reason("dwfuse_loss", "cpu", torch.device("cpu"))
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"cpu backend: {_REASON}")

if _REASON is None:
    import omnifuse_fast.ops._compiled  # noqa: F401  (fake impls and autograd formulas)


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, grad=False, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=_g(seed), dtype=dtype).requires_grad_(grad)


def _samples():
    """(op name, args) pairs: every op, forward ops with inputs that require grad."""
    b, m, c, d = 5, 3, 4, 6
    y = torch.randint(0, c, (b,), generator=_g(1))
    yml = (torch.rand(b, c, generator=_g(2)) > 0.5).float()
    comb = torch.tensor([1, 3, 7, 3, 2])
    src = torch.randint(0, b, (m, b), generator=_g(3))
    x, k, h = _randn(b, 7, grad=True), 2, 3
    cra = [x, _randn(k, h, 7, grad=True), _randn(k, h, grad=True)]
    cra += [_randn(k, 7, h, grad=True), _randn(k, 7, grad=True)]
    g0 = [_randn(3, 2, grad=True), _randn(5, grad=True, dtype=torch.float64)]
    gw = [_randn(3, 2, grad=True, seed=4), _randn(5, grad=True, dtype=torch.float64, seed=5)]
    lam = torch.tensor(0.25)
    one = torch.tensor(1.3)
    z3 = _randn(b, m, c)
    z2 = _randn(b, c)
    q = torch.softmax(_randn(b, c, seed=6), -1)
    return [
        ("combination_ids", (torch.rand(b, m, generator=_g(7)) > 0.3,)),
        ("cra_forward", (*cra, "gelu")),
        ("cra_backward", (_randn(b, 7), _randn(b, k * h), *[t.detach() for t in cra], "silu")),
        ("dwfuse_weights", (_randn(b, m, c, grad=True), y, 0.5)),
        ("dwfuse_weights", (_randn(b, m, c, grad=True), yml, 0.5)),
        ("dwfuse_weights_backward", (_randn(b, m), z3, y, 0.5)),
        ("dwfuse_weights_backward", (_randn(b, m, c), z3, yml, 0.5)),
        ("dwfuse_loss", (_randn(b, m, c, grad=True), y, 0.5, False)),
        ("dwfuse_loss", (_randn(b, m, c, grad=True), yml, 0.5, True)),
        ("dwfuse_loss_backward", (one, z3, y, 0.5, False)),
        ("dwfuse_loss_backward", (one, z3, yml, 0.5, True)),
        ("tla_stats", (z2, y, comb, 3, "l2")),
        ("tla_loss", (_randn(b, c, grad=True), y, comb, 3)),
        ("tla_loss_backward", (one, z2, y, comb, 3)),
        ("modality_mix", (_randn(b, m, d, grad=True), y, src, c, None)),
        ("modality_mix", (_randn(b, m, d, grad=True), y, src, c, torch.full((b, m), 1.0 / m))),
        ("modality_mix_backward", (_randn(b, m, d), src, b)),
        ("soft_cross_entropy", (_randn(b, c, grad=True), q.clone().requires_grad_(True))),
        ("soft_cross_entropy_backward", (one, z2, q)),
        ("soft_cross_entropy", (_randn(b, c, grad=True), q.clone())),  # d logits only
        ("soft_cross_entropy_backward_logits", (one, z2, q)),
        ("mimo_gram", (g0, gw)),
        ("mimo_direction", (g0, gw, lam)),
    ]


def test_every_schema_has_a_sample():
    """A new schema in csrc/ops.cpp must get an opcheck sample here."""
    sampled = {name for name, _ in _samples()}
    schemas = {
        s.name.split("::")[1]
        for s in torch._C._jit_get_all_schemas()
        if s.name.startswith("omnifuse_fast::")
    }
    assert schemas and schemas <= sampled, sorted(schemas - sampled)


@pytest.mark.parametrize(
    "name,args", _samples(), ids=[f"{n}-{i}" for i, (n, _) in enumerate(_samples())]
)
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.omnifuse_fast, name).default, args)
