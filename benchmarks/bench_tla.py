"""TLA: ``tla_stats`` (fwd: a mining statistic, not differentiable), ``tla_loss`` (fwd,
fwd+bwd) and ``combination_ids`` (fwd) per provider."""

from __future__ import annotations

import pytest
import torch
from _harness import FWD, FWD_BWD, Bench, Case, Inputs, params, pick, randint, randn, run

import omnifuse_fast
from omnifuse_fast import reference
from omnifuse_fast.bench import floors

BF16, FP32 = torch.bfloat16, torch.float32


def _stats(b, m, c, dtype=FP32, checks=True, distance="ce"):
    return Case("tla_stats", {"B": b, "M": m, "C": c}, FWD, dtype, checks, distance)


def _stats_cases() -> list[Case]:
    ref = (65536, 4, 25)  # the reference case (forward only: no gradient exists)
    smoke = [_stats(512, 4, 25), _stats(512, 3, 8, distance="l2")]
    default = [
        _stats(*ref),
        _stats(*ref, distance="l2"),
        _stats(*ref, dtype=BF16),
        _stats(16384, 8, 100),
    ]
    shapes = [(1 << 20, 2, 2), (1 << 20, 4, 25), (1 << 18, 8, 100), (1 << 16, 4, 1000)]
    large = [_stats(*s, dtype=dt) for dt in (FP32, BF16) for s in shapes]
    large += [_stats(1 << 20, 4, 25, distance="l1")]
    return pick(smoke, default, large)


def _loss_cases() -> list[Case]:
    def loss(b, m, c, mode=FWD_BWD, dtype=FP32, checks=True):
        return Case("tla_loss", {"B": b, "M": m, "C": c}, mode, dtype, checks)

    smoke = [loss(512, 4, 25, FWD), loss(512, 4, 25)]
    default = [loss(65536, 4, 25, FWD), loss(65536, 4, 25)]
    large = [
        loss(b, m, c, mode, dt)
        for dt in (FP32, BF16)
        for b, m, c in [(1 << 20, 4, 25), (1 << 16, 4, 1000)]
        for mode in (FWD, FWD_BWD)
    ]
    return pick(smoke, default, large)


def _ids_cases() -> list[Case]:
    shapes = pick([(512, 4)], [(65536, 4)], [(1 << 20, 2), (1 << 20, 8)])
    return [Case("combination_ids", {"B": b, "M": m}, FWD) for b, m in shapes]


def _logits_labels_comb(case: Case):
    b, m, c = case.dims["B"], case.dims["M"], case.dims["C"]
    logits = randn(b, c, dtype=case.dtype, scale=2.0).requires_grad_(case.mode == FWD_BWD)
    return logits, randint(0, c, b), randint(1, 1 << m, b, seed=2)


def _make_stats(case: Case) -> Inputs:
    logits, labels, comb = _logits_labels_comb(case)
    return Inputs((logits, labels, comb, case.dims["M"], case.variant))


def _make_loss(case: Case) -> Inputs:
    logits, labels, comb = _logits_labels_comb(case)
    lazy = 5  # one combination of 2**M - 1, about 1/15 of the samples when M = 4
    return Inputs((logits, labels, comb, lazy), wrt=[logits])


def _make_ids(case: Case) -> Inputs:
    present = randint(0, 2, case.dims["B"], case.dims["M"]).bool()
    present[:, 0] |= ~present.any(dim=1)  # no all-missing sample (bad input)
    return Inputs((present,))


STATS = Bench(
    public=omnifuse_fast.tla_stats,
    reference=reference.tla_stats,
    make=_make_stats,
    cost=lambda c: floors.tla_stats(c.dims["B"], c.dims["C"], c.dims["M"], c.itemsize),
)
LOSS = Bench(
    public=omnifuse_fast.tla_loss,
    reference=reference.tla_loss,
    make=_make_loss,
    cost=lambda c: floors.tla_loss(c.dims["B"], c.dims["C"], c.itemsize, c.mode),
)
IDS = Bench(
    public=omnifuse_fast.combination_ids,
    reference=reference.combination_ids,
    make=_make_ids,
    cost=lambda c: floors.combination_ids(c.dims["B"], c.dims["M"]),
)


@pytest.mark.parametrize("case,provider", params(_stats_cases()))
def test_tla_stats(benchmark, case, provider):
    run(benchmark, case, provider, STATS)


@pytest.mark.parametrize("case,provider", params(_loss_cases()))
def test_tla_loss(benchmark, case, provider):
    run(benchmark, case, provider, LOSS)


@pytest.mark.parametrize("case,provider", params(_ids_cases()))
def test_combination_ids(benchmark, case, provider):
    run(benchmark, case, provider, IDS)
