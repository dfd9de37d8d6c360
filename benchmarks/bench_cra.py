"""CRA: ``cra_forward`` (K residual autoencoders, fwd and fwd+bwd) per provider.

Matmul-bound: the floor is usually the FLOPs at the device's peak (TFLOP/s is reported).

``python benchmarks/bench_cra.py [--threads 2] [--reps 15] [--activation relu]`` runs the CPU
acceptance check of benchmarks/NOTES.md instead: fwd+bwd at B=2048, F=512, H=256, K=5 (fp32) for
the eager reference, ``torch.compile`` of the reference and ``backend="cpu"``, interleaved in one
process (medians), beside the machine's measured GEMM rate and the FLOP floor it implies.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

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


def _interleaved(threads: int, reps: int, activation: str) -> None:
    """Print medians (ms) and ratios of fwd+bwd, the providers run in turn each repetition."""
    torch.set_num_threads(threads)
    b, f, h, k = 2048, 512, 256, 5
    inputs = _make(_cra(b, 4, f // 4, h, k, act=activation))
    params, grads = inputs.args[:5], (randn(b, f, seed=5), randn(b, k * h, seed=6))
    compiled = torch.compile(reference.cra_forward)

    def step(fn):
        def run():
            out = fn(*params, activation)
            torch.autograd.backward(out, grads)
            for t in params:
                t.grad = None

        return run

    a, w = randn(b, f), randn(h, f, seed=1)
    calls = {
        "eager": step(lambda *t: omnifuse_fast.cra_forward(*t, backend="reference")),
        "compile": step(compiled),
        "cpu": step(lambda *t: omnifuse_fast.cra_forward(*t, backend="cpu")),
        "gemm": lambda: torch.mm(a, w.t()),  # one of the 6K GEMMs of fwd+bwd
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    for fn in calls.values():  # warm-up (and compile)
        fn()
        fn()
    for _ in range(reps):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    flops = 12 * b * f * h * k  # fwd 4BFHK, bwd twice that
    rate = 2 * b * f * h / med["gemm"] * 1e-6  # GFLOP/s
    print(f"threads {threads}, {activation}, B {b} F {f} H {h} K {k}, median of {reps}")
    print(f"GEMM [B,F]x[F,H]: {med['gemm']:.2f} ms = {rate:.0f} GFLOP/s")
    print(f"floor fwd+bwd: {flops / 1e9:.1f} GFLOP at that rate = {flops / rate * 1e-6:.1f} ms")
    for name in ("eager", "compile", "cpu"):
        print(f"{name:8s} {med[name]:8.1f} ms  eager/this {med['eager'] / med[name]:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--activation", default="relu")
    cli = parser.parse_args()
    _interleaved(cli.threads, cli.reps, cli.activation)
