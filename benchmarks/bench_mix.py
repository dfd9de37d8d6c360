"""MM learning: ``modality_mix`` and ``soft_cross_entropy`` (fwd, fwd+bwd) per provider."""

from __future__ import annotations

import pytest
import torch
from _harness import DEVICE, FWD, FWD_BWD, Bench, Case, Inputs, params, pick, randint, randn, run

import omnifuse_fast
from omnifuse_fast import reference
from omnifuse_fast.bench import floors
from omnifuse_fast.reference.mix import random_sources

BF16, FP32 = torch.bfloat16, torch.float32
WEIGHTED = "sample_weights"


def _mix(b, m, d, c, mode=FWD_BWD, dtype=FP32, checks=True, variant=""):
    return Case("modality_mix", {"B": b, "M": m, "D": d, "C": c}, mode, dtype, checks, variant)


def _mix_cases() -> list[Case]:
    ref = (65536, 4, 128, 25)  # the reference case
    smoke = [
        _mix(512, 4, 16, 25, FWD),
        _mix(512, 4, 16, 25),
        _mix(256, 3, 8, 5, variant=WEIGHTED),
    ]
    default = [
        _mix(*ref, FWD),
        _mix(*ref),
        _mix(*ref, dtype=BF16),
        _mix(*ref, variant=WEIGHTED),
        _mix(8192, 8, 64, 100),
    ]
    shapes = [(1 << 20, 2, 128, 2), (1 << 20, 4, 128, 25), (1 << 18, 8, 256, 100)]
    large = [_mix(*s, mode, dt) for dt in (FP32, BF16) for s in shapes for mode in (FWD, FWD_BWD)]
    large += [_mix(1 << 20, 4, 128, 25, dtype=BF16, variant=WEIGHTED)]
    return pick(smoke, default, large)


def _sce_cases() -> list[Case]:
    def sce(b, c, mode=FWD_BWD, dtype=FP32, checks=True):
        return Case("soft_cross_entropy", {"B": b, "C": c}, mode, dtype, checks)

    smoke = [sce(512, 25, FWD), sce(512, 25)]
    default = [sce(65536, 25, FWD), sce(65536, 25)]
    large = [
        sce(b, c, mode, dt)
        for dt in (FP32, BF16)
        for b, c in [(1 << 20, 25), (1 << 16, 1000)]
        for mode in (FWD, FWD_BWD)
    ]
    return pick(smoke, default, large)


def _make_mix(case: Case) -> Inputs:
    b, m, d, c = (case.dims[k] for k in "BMDC")
    v = randn(b, m, d, dtype=case.dtype).requires_grad_(case.mode == FWD_BWD)
    labels = randint(0, c, b)
    src = random_sources(b, m, torch.Generator().manual_seed(3), device=DEVICE)
    weights = None
    if case.variant == WEIGHTED:  # per-sample proportions, fp32 [B, M] as the public op passes
        weights = torch.softmax(randn(b, m, seed=4), dim=1).contiguous()
    # Only v_mix (output 0) has a gradient; the soft labels come from integer labels.
    return Inputs((v, labels, src, c, weights), wrt=[v], outputs=(0,))


def _make_sce(case: Case) -> Inputs:
    b, c = case.dims["B"], case.dims["C"]
    logits = randn(b, c, dtype=case.dtype, scale=2.0).requires_grad_(case.mode == FWD_BWD)
    soft = torch.softmax(randn(b, c, seed=5) * 3, dim=1).to(case.dtype)
    return Inputs((logits, soft), wrt=[logits])


MIX = Bench(
    public=omnifuse_fast.modality_mix,
    reference=reference.modality_mix,
    make=_make_mix,
    cost=lambda c: floors.modality_mix(
        *(c.dims[k] for k in "BMDC"), c.itemsize, c.mode, weights=c.variant == WEIGHTED
    ),
)
SCE = Bench(
    public=omnifuse_fast.soft_cross_entropy,
    reference=reference.soft_cross_entropy,
    make=_make_sce,
    cost=lambda c: floors.soft_cross_entropy(c.dims["B"], c.dims["C"], c.itemsize, c.mode),
)


@pytest.mark.parametrize("case,provider", params(_mix_cases()))
def test_modality_mix(benchmark, case, provider):
    run(benchmark, case, provider, MIX)


@pytest.mark.parametrize("case,provider", params(_sce_cases()))
def test_soft_cross_entropy(benchmark, case, provider):
    run(benchmark, case, provider, SCE)
