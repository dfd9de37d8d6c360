"""CRA: ``cra_forward`` (K residual autoencoders, fwd and fwd+bwd) per provider.

Matmul-bound: the floor is usually the FLOPs at the device's peak (TFLOP/s is reported).
"""

from __future__ import annotations

import math

import pytest
import torch
from _harness import FWD, FWD_BWD, Bench, Case, Inputs, params, pick, randn, run

import omnifuse_fast
from omnifuse_fast import reference
from omnifuse_fast.bench import floors

BF16, FP32 = torch.bfloat16, torch.float32


def _cra(b, m, d, h, k=5, mode=FWD_BWD, dtype=FP32, checks=False, act="relu"):
    return Case("cra_forward", {"B": b, "M": m, "D": d, "H": h, "K": k}, mode, dtype, checks, act)


def _cases() -> list[Case]:
    smoke = [
        _cra(256, 4, 16, 32, 2, FWD),
        _cra(256, 4, 16, 32, 2),
        _cra(128, 2, 8, 16, 2, act="gelu"),
    ]
    default = [
        _cra(2048, 4, 128, 256, mode=FWD),
        _cra(2048, 4, 128, 256),
        _cra(2048, 4, 128, 256, mode=FWD, checks=True),
        _cra(2048, 4, 128, 256, act="gelu"),
        _cra(2048, 4, 128, 256, dtype=BF16),
    ]
    shapes = [(1 << 16, 4, 128, 256), (1 << 14, 8, 256, 512), (1 << 18, 2, 64, 128)]
    large = [
        _cra(*s, mode=md, dtype=dt) for dt in (BF16, FP32) for s in shapes for md in (FWD, FWD_BWD)
    ]
    large += [_cra(1 << 16, 4, 128, 256, dtype=BF16, act="gelu")]
    large += [_cra(1 << 16, 4, 128, 256, mode=FWD, dtype=BF16, checks=True)]
    return pick(smoke, default, large)


def _make(case: Case) -> Inputs:
    b, m, d, h, k = (case.dims[n] for n in "BMDHK")
    f = m * d
    grad = case.mode == FWD_BWD
    # nn.Linear-like scales keep the residual sum bounded over K blocks.
    x = randn(b, f, dtype=case.dtype)
    w1 = randn(k, h, f, dtype=case.dtype, scale=1 / math.sqrt(f), seed=1)
    b1 = randn(k, h, dtype=case.dtype, scale=0.1, seed=2)
    w2 = randn(k, f, h, dtype=case.dtype, scale=0.5 / math.sqrt(h), seed=3)
    b2 = randn(k, f, dtype=case.dtype, scale=0.1, seed=4)
    tensors = [t.requires_grad_(grad) for t in (x, w1, b1, w2, b2)]
    # Both outputs (out, latents) feed later losses, so both get an upstream gradient.
    return Inputs((*tensors, case.variant), wrt=tensors, outputs=(0, 1))


CRA = Bench(
    public=omnifuse_fast.cra_forward,
    reference=reference.cra_forward,
    make=_make,
    cost=lambda c: floors.cra_forward(
        c.dims["B"], c.dims["M"] * c.dims["D"], c.dims["H"], c.dims["K"], c.itemsize, c.mode
    ),
)


@pytest.mark.parametrize("case,provider", params(_cases()))
def test_cra_forward(benchmark, case, provider):
    run(benchmark, case, provider, CRA)
