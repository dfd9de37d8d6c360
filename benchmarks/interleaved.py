"""Interleaved A/B timing of the issue-16 ops in one process (noisy shared machines).

Each repetition runs one step of every provider in turn, so drifts in machine load hit all of
them alike; the medians over many repetitions and their ratios are the figures to quote. The
order rotates every repetition: a step runs faster when the step before it left its inputs in
the (large) last-level cache, and with a fixed order modality_mix's ``cpu`` step, always after
``compile``'s, ran 2-3x slower than the same kernel as ``cpu_off`` (benchmarks/NOTES.md,
2026-12-02). Use a multiple of the number of providers for ``--reps``.

Ops: the four bandwidth ops at B=65536, M=4, C=25, D=128 (fwd+bwd where there is a backward)
and the CRA cascade fwd+bwd at B=2048, F=512, H=256, K=5 (relu, fp32; issue 16's CPU targets:
each bandwidth op >= 1.5x compile, CRA >= 1.2x eager).

Providers: ``eager`` (the public op on the reference backend, value checks on), ``compile``
(``torch.compile`` of the reference function), ``cpu`` (value checks on: the default) and
``cpu_off`` (after ``set_value_checks(False)``).

    PYTHONPATH=. python benchmarks/interleaved.py [--reps 40] [--threads 2] [--ops dwfuse_loss,...]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_cra  # noqa: E402
import bench_dwfuse  # noqa: E402
import bench_mix  # noqa: E402
import bench_tla  # noqa: E402
from _harness import FWD, FWD_BWD, Case, make_step, provider_fn  # noqa: E402

import omnifuse_fast  # noqa: E402

CASES = {
    "dwfuse_loss": (bench_dwfuse.LOSS, Case("dwfuse_loss", {"B": 65536, "M": 4, "C": 25})),
    "soft_cross_entropy": (bench_mix.SCE, Case("soft_cross_entropy", {"B": 65536, "C": 25})),
    "tla_stats": (
        bench_tla.STATS,
        Case("tla_stats", {"B": 65536, "M": 4, "C": 25}, FWD, variant="ce"),
    ),
    "modality_mix": (
        bench_mix.MIX,
        Case("modality_mix", {"B": 65536, "M": 4, "D": 128, "C": 25}, FWD_BWD),
    ),
    # default settings (value checks on), as a user calls it; F = M D = 512
    "cra_forward": (bench_cra.CRA, bench_cra._cra(2048, 4, 128, 256, checks=True)),
}
PROVIDERS = ("eager", "compile", "cpu", "cpu_off")


def steps(name: str):
    bench, case = CASES[name]
    inputs = bench.make(case)
    out = {}
    for p in PROVIDERS:
        backend = {"eager": "reference", "cpu_off": "cpu"}.get(p, p)
        fn = provider_fn(backend, bench.public, bench.reference)
        checks = p != "cpu_off"
        omnifuse_fast.set_value_checks(checks)
        step = make_step(fn, inputs, case.mode)
        step()
        out[p] = (step, checks)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ops", default=",".join(CASES))
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    providers = args.providers.split(",")
    print(f"threads {torch.get_num_threads()}, reps {args.reps}, medians in ms")
    rows = {}
    for name in args.ops.split(","):
        st = steps(name)
        times = {p: [] for p in providers}
        for r in range(args.reps):
            # rotate the order: a step's time depends on what the step before it left in the
            # cache, so no provider may always follow the same one
            for p in providers[r % len(providers) :] + providers[: r % len(providers)]:
                step, checks = st[p]
                omnifuse_fast.set_value_checks(checks)
                t0 = time.perf_counter()
                step()
                times[p].append(time.perf_counter() - t0)
        omnifuse_fast.set_value_checks(True)
        med = {p: 1e3 * statistics.median(v) for p, v in times.items()}
        rows[name] = med
        line = "  ".join(f"{p} {med[p]:8.3f}" for p in providers)
        ratios = ""
        if "compile" in med and "cpu" in med:
            ratios += f"  compile/cpu {med['compile'] / med['cpu']:.2f}x"
        if "eager" in med and "cpu" in med:
            ratios += f"  eager/cpu {med['eager'] / med['cpu']:.2f}x"
        print(f"{name:20s} {line}{ratios}", flush=True)
    three = ("dwfuse_loss", "tla_stats", "modality_mix")
    if all(n in rows for n in three) and {"eager", "cpu"} <= set(providers):
        geo = [rows[n]["eager"] / rows[n]["cpu"] for n in three]
        print(f"geomean eager/cpu (dwfuse, tla_stats, mix): {math.prod(geo) ** (1 / 3):.2f}x")


if __name__ == "__main__":
    main()
