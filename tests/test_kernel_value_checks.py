"""Value checks inside the kernels (SPEC section 7, issue 16), on the cpu and triton backends.

The cpu backend checks label, comb and src ranges, multilabel 0/1 labels, empty ``present`` rows,
mixing weights and non-finite logits where its kernels read the data, and raises the same
ValueError as the Python checks, naming the argument. The triton backend's kernels set device
flags; on CPU tensors (the interpreter) the flag is read and the flagged rule's Python check
raises the same ValueError. MIMO's gradients are checked through the Gram both compute anyway.
Both hold with value checks on, after ``set_value_checks(False)`` (the in-kernel checks always
run) and inside a ``torch.compile`` graph (where the Python checks cannot run); the Python pass
over the data is skipped for both backends (only the reference reads the data twice).
"""

from __future__ import annotations

import functools

import pytest
import torch
from _harness import compiled_opaque, cpu_backend

import omnifuse_fast as of
from omnifuse_fast import _checks

BACKENDS = ["cpu", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """A kernel-checked backend on CPU tensors (triton: in the interpreter), or skip."""
    return cpu_backend(request.param, monkeypatch)


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
        "mix-weights-neg",
        of.modality_mix,
        lambda: (torch.randn(B, M, D), y(), src(), C, torch.tensor([1.5, -0.5, 0.0])),
        r"^weights must be on the simplex",
    ),
    (
        "mix-weights-rows",
        of.modality_mix,
        lambda: (torch.randn(B, M, D), y(), src(), C, at(torch.full((B, M), 1 / M), 7, 0.5)),
        r"^weights must be on the simplex",
    ),
    (
        "mimo-g0-nan",
        of.mimo_combine,
        lambda: ([torch.randn(3), at(torch.randn(2, 2), 3, NAN)], [torch.randn(3), z2()[:2, :2]]),
        r"^g0\[1\] must be finite",
    ),
    (
        "mimo-gw-inf",
        of.mimo_combine,
        lambda: ([torch.randn(4)], [at(torch.randn(4), 0, -INF)]),
        r"^gw\[0\] must be finite",
    ),
    (
        "mgda-inf",
        of.mgda_min_norm,
        lambda: ([[torch.randn(5)], [torch.randn(5)], [at(torch.randn(5), 2, INF)]],),
        r"^grads\[2\]\[0\] must be finite",
    ),
    (
        "present-row",
        of.combination_ids,
        lambda: (torch.arange(B * M).view(B, M).div(M, rounding_mode="floor") != 1,),
        r"^present has a sample with no present modality \(row 1\)",
    ),
]
IDS = [c[0] for c in CASES]


def _call(op, args, backend):
    return op(*args, backend=backend)


@pytest.mark.parametrize("op,make,match", [c[1:] for c in CASES], ids=IDS)
def test_kernels_raise_with_checks_on(backend, op, make, match):
    with pytest.raises(ValueError, match=match):
        _call(op, make(), backend)


@pytest.mark.parametrize("op,make,match", [c[1:] for c in CASES], ids=IDS)
def test_kernels_raise_with_checks_off(backend, op, make, match):
    of.set_value_checks(False)
    with pytest.raises(ValueError, match=match):
        _call(op, make(), backend)


@pytest.mark.parametrize("op,make,match", [c[1:] for c in CASES], ids=IDS)
def test_kernels_raise_under_torch_compile(backend, op, make, match):
    """The default compiler (inductor), one graph: the ValueError comes from inside it."""
    torch._dynamo.reset()
    fn = lambda *a: op(*a, backend=backend)  # noqa: E731
    if backend == "cpu" and op is of.mgda_min_norm:
        # the C++ path's Frank-Wolfe loop (the reference solver) reads the Gram on the host:
        # not one graph, whatever the checks do; the checked Gram still raises in the graph
        compiled = torch.compile(fn, backend="inductor")
    else:
        compiled = compiled_opaque(fn, "inductor")
    with pytest.raises(ValueError, match=match):
        compiled(*make())


@pytest.mark.parametrize("op,make,match", [c[1:] for c in CASES], ids=IDS)
def test_same_message_as_the_reference_checks(backend, op, make, match):
    """The kernels' messages are the Python checks' messages, word for word."""
    args = make()
    with pytest.raises(ValueError) as fast:
        _call(op, args, backend)
    with pytest.raises(ValueError) as ref:
        _call(op, args, backend="reference")
    assert str(fast.value) == str(ref.value)
    if backend != "cpu":  # the C++ kernels' TORCH_CHECK_VALUE is a plain ValueError, where the
        # reference raises its subclass NonFiniteInputError for non-finite inputs
        assert type(fast.value) is type(ref.value)


def test_fp64_on_triton_keeps_the_checks(monkeypatch):
    """Triton hands fp64 to the reference: the Python pass the ops skipped runs there."""
    cpu_backend("triton", monkeypatch)
    with pytest.warns(UserWarning, match="fp64"):
        with pytest.raises(ValueError, match=r"^labels class indices"):
            of.dwfuse_loss(z3().double(), at(y(), 2, C), backend="triton")
    with pytest.raises(ValueError, match=r"^src source indices"):
        of.modality_mix(torch.randn(B, M, D).double(), y(), at(src(), 4, B), C, backend="triton")
    with pytest.raises(ValueError, match=r"^comb combination ids"):
        of.tla_stats(z2().double(), y(), at(comb(), 1, 0), M, backend="triton")


def test_gradients_of_a_bad_batch_are_never_computed(backend):
    z = at(z3(), 7, NAN).requires_grad_()
    with pytest.raises(ValueError, match="modality_logits"):
        of.dwfuse_loss(z, y(), backend=backend).backward()
    assert z.grad is None


@pytest.mark.parametrize(
    "name",
    ["in_range", "finite", "finite_list", "multilabel_values", "present_rows", "simplex_weights"],
    ids=str,
)
def test_the_python_value_pass_is_skipped(backend, monkeypatch, name):
    """Good inputs on a kernel-checked backend: no Python check reads the data a second time."""
    calls = []
    real = getattr(_checks, name)
    monkeypatch.setattr(_checks, name, lambda *a, **k: calls.append(a) or real(*a, **k))
    w = torch.full((B, M), 1 / M)
    g = [torch.randn(3), torch.randn(2)]
    for b in (backend, "reference"):
        if b == "reference":
            assert calls == [], f"the Python pass ran for {backend}"
        of.dwfuse_loss(z3(), y(), backend=b)
        of.dwfuse_loss(z3(), torch.ones(B, C), backend=b, multilabel=True)
        of.tla_stats(z2(), y(), comb(), M, backend=b)
        of.tla_loss(z2(), y(), comb(), 1, backend=b)
        of.modality_mix(torch.randn(B, M, D), y(), src(), C, w, backend=b)
        of.soft_cross_entropy(z2(), torch.rand(B, C), backend=b)
        of.combination_ids(torch.ones(B, M, dtype=torch.bool), backend=b)
        of.mimo_combine(g, g, backend=b)
        of.mgda_min_norm([g, g], backend=b)
    assert calls  # ... while the reference backend still runs it


def test_kernel_checked_backends_are_declared():
    for backend in ("cpu", "triton", "cuda"):
        assert not _checks.python_value_checks(backend)
        assert not _checks.python_value_checks(backend, "weights")
    # CRA's input x: flagged by the Triton kernel; a Python pass on cpu, a device pass on cuda
    assert _checks.python_value_checks("cpu", "x")
    assert not _checks.python_value_checks("triton", "x")
    assert not _checks.device_value_checks("triton", "x")
    assert not _checks.python_value_checks("cuda", "x")
    assert _checks.device_value_checks("cuda", "x")
    assert _checks.python_value_checks("reference")
    assert _checks.python_value_checks("reference", "weights")
    assert _checks.python_value_checks("reference", "x")


def _cra_args(x: torch.Tensor) -> tuple:
    k, h, f = 2, 3, x.shape[1]
    w1, w2 = torch.randn(k, h, f) * 0.1, torch.randn(k, f, h) * 0.1
    return x, w1, torch.zeros(k, h), w2, torch.zeros(k, f)


@pytest.mark.parametrize("mode", ["on", "off", "compile"])
def test_triton_cra_flags_a_non_finite_x(monkeypatch, mode):
    """The Triton CRA kernel checks x where it reads it: the reference's error, checks on or
    off, eager or compiled (the cpu backend still checks x in the Python pass)."""
    cpu_backend("triton", monkeypatch)
    args = _cra_args(at(torch.randn(B, 8), 13, NAN))
    with pytest.raises(ValueError) as ref:
        of.cra_forward(*args, backend="reference")
    if mode == "off":
        of.set_value_checks(False)
    call = lambda *a: of.cra_forward(*a, backend="triton")  # noqa: E731
    if mode == "compile":
        torch._dynamo.reset()
        call = compiled_opaque(call, "inductor")
    with pytest.raises(ValueError) as got:
        call(*args)
    assert str(got.value) == str(ref.value)
    assert str(got.value).startswith("x must be finite")
