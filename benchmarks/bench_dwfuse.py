"""DWFuse: ``dwfuse_loss`` (fwd, fwd+bwd) and ``dwfuse_weights`` (fwd) per provider."""

from __future__ import annotations

import pytest
import torch
from _harness import FWD, FWD_BWD, Bench, Case, Inputs, params, pick, randint, randn, run

import omnifuse_fast
from omnifuse_fast import reference
from omnifuse_fast.bench import floors

BF16, FP32 = torch.bfloat16, torch.float32
MULTILABEL, NO_DETACH = "multilabel", "no_detach"


def _explicit(op):
    """The public op with ``multilabel=True`` for float labels (SPEC section 8: explicit)."""

    def call(logits, labels, *args, **kwargs):
        return op(logits, labels, *args, multilabel=labels.is_floating_point(), **kwargs)

    return call


def _loss(b, m, c, mode=FWD_BWD, dtype=FP32, checks=True, variant=""):
    return Case("dwfuse_loss", {"B": b, "M": m, "C": c}, mode, dtype, checks, variant)


def _loss_cases() -> list[Case]:
    ref = (65536, 4, 25)  # the reference case
    default = [
        _loss(*ref, FWD),
        _loss(*ref),
        _loss(*ref, dtype=BF16),
        _loss(*ref, variant=NO_DETACH),
        _loss(8192, 8, 100),
        _loss(16384, 4, 25, variant=MULTILABEL),
    ]
    shapes = [(1 << 20, 2, 2), (1 << 20, 4, 25), (1 << 18, 8, 100), (1 << 16, 4, 1000)]
    large = [_loss(*s, mode, dt) for dt in (FP32, BF16) for s in shapes for mode in (FWD, FWD_BWD)]
    large += [_loss(1 << 18, 4, 25, dtype=dt, variant=MULTILABEL) for dt in (FP32, BF16)]
    large += [_loss(1 << 20, 4, 25, dtype=BF16, variant=NO_DETACH)]
    smoke = [
        _loss(512, 4, 25, FWD),
        _loss(512, 4, 25),
        _loss(256, 3, 8, variant=MULTILABEL),
    ]
    return pick(smoke, default, large)


def _weights_cases() -> list[Case]:
    large = [(1 << 20, 4, 25), (1 << 18, 8, 100)]
    shapes = pick([(512, 4, 25)], [(65536, 4, 25)], large)
    dtypes = pick((FP32,), (FP32,), (FP32, BF16))
    return [
        Case("dwfuse_weights", {"B": b, "M": m, "C": c}, FWD, dt)
        for b, m, c in shapes
        for dt in dtypes
    ]


def _logits_labels(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    b, m, c = case.dims["B"], case.dims["M"], case.dims["C"]
    logits = randn(b, m, c, dtype=case.dtype, scale=2.0)
    if case.variant == MULTILABEL:  # given in the logits' dtype, as the public op normalizes it
        labels = randint(0, 2, b, c).to(case.dtype)
    else:
        labels = randint(0, c, b)
    return logits.requires_grad_(case.mode == FWD_BWD), labels


def _make_loss(case: Case) -> Inputs:
    logits, labels = _logits_labels(case)
    return Inputs((logits, labels, 0.5, case.variant != NO_DETACH), wrt=[logits])


def _make_weights(case: Case) -> Inputs:
    logits, labels = _logits_labels(case)
    return Inputs((logits, labels, 0.5))


LOSS = Bench(
    public=_explicit(omnifuse_fast.dwfuse_loss),
    reference=reference.dwfuse_loss,
    make=_make_loss,
    cost=lambda c: floors.dwfuse_loss(
        c.dims["B"], c.dims["M"], c.dims["C"], c.itemsize, c.mode, c.variant == MULTILABEL
    ),
)
WEIGHTS = Bench(
    public=_explicit(omnifuse_fast.dwfuse_weights),
    reference=reference.dwfuse_weights,
    make=_make_weights,
    cost=lambda c: floors.dwfuse_weights(
        c.dims["B"], c.dims["M"], c.dims["C"], c.itemsize, c.variant == MULTILABEL
    ),
)


@pytest.mark.parametrize("case,provider", params(_loss_cases()))
def test_dwfuse_loss(benchmark, case, provider):
    run(benchmark, case, provider, LOSS)


@pytest.mark.parametrize("case,provider", params(_weights_cases()))
def test_dwfuse_weights(benchmark, case, provider):
    run(benchmark, case, provider, WEIGHTS)
