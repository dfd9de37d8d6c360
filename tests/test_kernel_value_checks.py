"""Value checks inside the C++ CPU kernels (SPEC section 7, issue 16).

The cpu backend checks label, comb and src ranges, multilabel 0/1 labels, empty ``present`` rows
and non-finite logits where its kernels read the data, and raises the same ValueError as the
Python checks, naming the argument: with value checks on, after ``set_value_checks(False)``
(the in-kernel checks always run) and inside a ``torch.compile`` graph (where the Python checks
cannot run). The Python pass over the data is skipped for this backend.
"""

from __future__ import annotations

import functools

import pytest
import torch

import omnifuse_fast as of
from omnifuse_fast import _checks, _dispatch

_REASON = _dispatch.unavailable_reason("dwfuse_loss", "cpu", torch.device("cpu"))
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"cpu backend: {_REASON}")

B, M, C, D = 6, 3, 5, 4


def z3():
    return torch.randn(B, M, C)


def z2():
    return torch.randn(B, C)


def y():
    return torch.arange(B) % C


def comb():
    return (torch.arange(B) % ((1 << M) - 1)) + 1


def src():
    return torch.stack([torch.randperm(B) for _ in range(M)])


def at(t, idx, value):
    t = t.clone()
    t.view(-1)[idx] = value
    return t


NAN, INF = float("nan"), float("inf")
# float 0/1 labels are multilabel only when said so (SPEC section 8)
dwfuse_loss_ml = functools.partial(of.dwfuse_loss, multilabel=True)
dwfuse_weights_ml = functools.partial(of.dwfuse_weights, multilabel=True)

# (id, op, args, regex naming the argument); every case has exactly one bad value
CASES = [
    ("dw-labels-high", of.dwfuse_loss, lambda: (z3(), at(y(), 2, C)), r"^labels class indices"),
    ("dw-labels-neg", of.dwfuse_weights, lambda: (z3(), at(y(), 5, -1)), r"^labels class"),
    ("dw-ml-half", dwfuse_loss_ml, lambda: (z3(), at(torch.ones(B, C), 3, 0.5)), r"^labels \("),
    ("dw-ml-two", dwfuse_weights_ml, lambda: (z3(), at(torch.ones(B, C), 9, 2.0)), r"^labels"),
    ("dw-nan", of.dwfuse_loss, lambda: (at(z3(), 7, NAN), y()), r"^modality_logits must be"),
    ("dw-inf", of.dwfuse_weights, lambda: (at(z3(), 80, INF), y()), r"^modality_logits must"),
    ("dw-neg-inf", of.dwfuse_loss, lambda: (at(z3(), 1, -INF), y()), r"^modality_logits"),
    (
        "dw-ml-nan",
        dwfuse_loss_ml,
        lambda: (at(z3(), 12, NAN), torch.ones(B, C)),
        r"^modality_logits",
    ),
    ("tla-labels", of.tla_stats, lambda: (z2(), at(y(), 0, C + 3), comb(), M), r"^labels class"),
    ("tla-comb-0", of.tla_stats, lambda: (z2(), y(), at(comb(), 4, 0), M), r"^comb combination"),
    ("tla-comb-2M", of.tla_stats, lambda: (z2(), y(), at(comb(), 1, 1 << M), M), r"^comb"),
    (
        "tla-comb-int32",
        of.tla_stats,
        lambda: (z2(), y(), at(comb().int(), 1, -2), M),
        r"^comb combination",
    ),
    ("tla-nan", of.tla_stats, lambda: (at(z2(), 11, NAN), y(), comb(), M), r"^logits must be"),
    ("tla-loss-labels", of.tla_loss, lambda: (z2(), at(y(), 5, -4), comb(), 1), r"^labels"),
    ("tla-loss-comb", of.tla_loss, lambda: (z2(), y(), at(comb(), 5, 256), 1), r"^comb"),
    ("tla-loss-inf", of.tla_loss, lambda: (at(z2(), 0, INF), y(), comb(), 1), r"^logits must"),
    (
        "mix-labels",
        of.modality_mix,
        lambda: (torch.randn(B, M, D), at(y(), 1, C), src(), C),
        r"^labels class",
    ),
    (
        "mix-src-high",
        of.modality_mix,
        lambda: (torch.randn(B, M, D), y(), at(src(), 4, B), C),
        r"^src source indices",
    ),
    (
        "mix-src-neg",
        of.modality_mix,
        lambda: (torch.randn(B, M, D), y(), at(src(), 0, -1), C),
        r"^src source",
    ),
    ("sce-nan", of.soft_cross_entropy, lambda: (at(z2(), 3, NAN), torch.rand(B, C)), r"^logits"),
    (
        "sce-soft-inf",
        of.soft_cross_entropy,
        lambda: (z2(), at(torch.rand(B, C), 2, INF)),
        r"^soft_labels must be finite",
    ),
    # logits that need a gradient: the CPU forward writes it as well (soft_cross_entropy_grad)
    (
        "sce-grad-nan",
        of.soft_cross_entropy,
        lambda: (at(z2(), 3, NAN).requires_grad_(), torch.rand(B, C)),
        r"^logits must be finite",
    ),
    (
        "sce-grad-soft-inf",
        of.soft_cross_entropy,
        lambda: (z2().requires_grad_(), at(torch.rand(B, C), 2, INF)),
        r"^soft_labels must be finite",
    ),
    (
        "present-row",
        of.combination_ids,
        lambda: (torch.arange(B * M).view(B, M).div(M, rounding_mode="floor") != 1,),
        r"^present has a sample with no present modality \(row 1\)",
    ),
]
IDS = [c[0] for c in CASES]


def _call(op, args, backend="cpu"):
    return op(*args, backend=backend)


@pytest.mark.parametrize("op,make,match", [c[1:] for c in CASES], ids=IDS)
def test_cpu_kernels_raise_with_checks_on(op, make, match):
    with pytest.raises(ValueError, match=match):
        _call(op, make())


@pytest.mark.parametrize("op,make,match", [c[1:] for c in CASES], ids=IDS)
def test_cpu_kernels_raise_with_checks_off(op, make, match):
    of.set_value_checks(False)
    with pytest.raises(ValueError, match=match):
        _call(op, make())


@pytest.mark.parametrize("op,make,match", [c[1:] for c in CASES], ids=IDS)
def test_cpu_kernels_raise_under_torch_compile(op, make, match):
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: op(*a, backend="cpu"), fullgraph=True)
    with pytest.raises(ValueError, match=match):
        compiled(*make())


@pytest.mark.parametrize("op,make,match", [c[1:] for c in CASES], ids=IDS)
def test_same_message_as_the_reference_checks(op, make, match):
    """The kernels' messages are the Python checks' messages, word for word."""
    args = make()
    with pytest.raises(ValueError) as cpu:
        _call(op, args)
    with pytest.raises(ValueError) as ref:
        _call(op, args, backend="reference")
    assert str(cpu.value) == str(ref.value)


def test_gradients_of_a_bad_batch_are_never_computed():
    z = at(z3(), 7, NAN).requires_grad_()
    with pytest.raises(ValueError, match="modality_logits"):
        of.dwfuse_loss(z, y(), backend="cpu").backward()
    assert z.grad is None


@pytest.mark.parametrize(
    "name", ["in_range", "finite", "multilabel_values", "present_rows"], ids=str
)
def test_the_python_value_pass_is_skipped_for_cpu(monkeypatch, name):
    """Good inputs on the cpu backend: no Python check reads the data a second time."""
    calls = []
    real = getattr(_checks, name)
    monkeypatch.setattr(_checks, name, lambda *a, **k: calls.append(a) or real(*a, **k))
    of.dwfuse_loss(z3(), y(), backend="cpu")
    of.dwfuse_loss(z3(), torch.ones(B, C), backend="cpu", multilabel=True)
    of.tla_stats(z2(), y(), comb(), M, backend="cpu")
    of.tla_loss(z2(), y(), comb(), 1, backend="cpu")
    of.modality_mix(torch.randn(B, M, D), y(), src(), C, backend="cpu")
    of.soft_cross_entropy(z2(), torch.rand(B, C), backend="cpu")
    of.combination_ids(torch.ones(B, M, dtype=torch.bool), backend="cpu")
    assert calls == []
    # ... while the reference backend still runs it
    of.dwfuse_loss(z3(), y(), backend="reference")
    of.dwfuse_loss(z3(), torch.ones(B, C), backend="reference", multilabel=True)
    of.tla_stats(z2(), y(), comb(), M, backend="reference")
    of.soft_cross_entropy(z2(), torch.rand(B, C), backend="reference")
    of.combination_ids(torch.ones(B, M, dtype=torch.bool), backend="reference")
    assert calls


def test_kernel_checked_backends_are_declared():
    assert not _checks.python_value_checks("cpu")
    assert _checks.python_value_checks("reference")
