"""Roofline floors for the benchmarks: bytes and FLOPs each op must move, and device peaks.

A floor is the time an op cannot beat on a device: ``max(bytes / peak bandwidth,
flops / peak FLOP/s)``. ``bytes`` counts the unavoidable DRAM traffic of one call (every
input read once, every output written once), so a fused kernel can reach it and an eager
chain of kernels cannot. The formulas are documented, with their reasoning, in
benchmarks/NOTES.md; keep the two in step.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

FWD, FWD_BWD = "fwd", "fwd+bwd"
I64 = 8  # int64 labels / indices / combination ids


@dataclass(frozen=True)
class Cost:
    """Unavoidable traffic (bytes) and arithmetic (FLOPs) of one call."""

    bytes: int
    flops: int = 0


def _check_mode(mode: str) -> None:
    if mode not in (FWD, FWD_BWD):
        raise ValueError(f"mode must be {FWD!r} or {FWD_BWD!r}, got {mode!r}")


def dwfuse_loss(b: int, m: int, c: int, itemsize: int, mode: str, multilabel=False) -> Cost:
    """Read the logits once (+ labels); fwd+bwd also writes ``d logits`` once.

    The backward needs no second read: a fused forward can write the gradient of the
    scalar loss (Liger-style) and the backward only scales it.
    """
    _check_mode(mode)
    logits = b * m * c * itemsize
    labels = b * c * itemsize if multilabel else b * I64
    return Cost(labels + logits * (2 if mode == FWD_BWD else 1))


def dwfuse_weights(b: int, m: int, c: int, itemsize: int, multilabel=False) -> Cost:
    """Read the logits and labels, write omega ``[B, M]`` (``[B, M, C]`` multilabel)."""
    labels = b * c * itemsize if multilabel else b * I64
    omega = b * m * (c if multilabel else 1) * itemsize
    return Cost(b * m * c * itemsize + labels + omega)


def combination_ids(b: int, m: int) -> Cost:
    """Read the bool mask ``[B, M]``, write int64 ids ``[B]``."""
    return Cost(b * m + b * I64)


def tla_stats(b: int, c: int, m: int, itemsize: int) -> Cost:
    """Read logits, labels and combination ids; write ``2**M`` fp32 sums + int64 counts."""
    return Cost(b * c * itemsize + 2 * b * I64 + (1 << m) * (4 + I64))


def tla_loss(b: int, c: int, itemsize: int, mode: str) -> Cost:
    """Read logits, labels, comb; fwd+bwd also writes ``d logits``."""
    _check_mode(mode)
    return Cost(b * c * itemsize * (2 if mode == FWD_BWD else 1) + 2 * b * I64)


def modality_mix(
    b: int, m: int, d: int, c: int, itemsize: int, mode: str, weights: bool = False
) -> Cost:
    """fwd: read v and src, gather labels, write v_mix and soft labels.

    bwd: read ``d v_mix`` and src, write ``d v`` once (a permutation per modality makes the
    scatter-add conflict-free, so no zero-fill pass is needed in the minimum).
    """
    _check_mode(mode)
    emb = b * m * d * itemsize
    fwd = 2 * emb + m * b * I64 + b * I64 + b * c * itemsize + (b * m * 4 if weights else 0)
    bwd = 2 * emb + m * b * I64
    return Cost(fwd + (bwd if mode == FWD_BWD else 0))


def soft_cross_entropy(b: int, c: int, itemsize: int, mode: str) -> Cost:
    """Read logits and soft labels; fwd+bwd also writes ``d logits``."""
    _check_mode(mode)
    return Cost(b * c * itemsize * (3 if mode == FWD_BWD else 2))


def cra_forward(b: int, f: int, h: int, k: int, itemsize: int, mode: str) -> Cost:
    """K residual autoencoders ``F -> H -> F``: 4·B·F·H FLOPs each forward, 3x for fwd+bwd.

    Bytes, fwd: x, the weights and biases, out and latents once. fwd+bwd adds reading
    ``d out``, ``d latents``, x and the weights again, and writing ``d x`` and the weight
    gradients (intermediates recomputed on chip, not stored).
    """
    _check_mode(mode)
    w = k * (2 * f * h + h + f)
    flops = 4 * b * f * h * k
    if mode == FWD:
        return Cost((2 * b * f + b * k * h + w) * itemsize, flops)
    return Cost((5 * b * f + 2 * b * k * h + 3 * w) * itemsize, 3 * flops)


def mimo_combine(numel: int, itemsize: int) -> Cost:
    """Two fused passes: read g0 and gw for the 2x2 Gram, read both again and write d."""
    return Cost(5 * numel * itemsize)  # bandwidth-bound: its FLOPs never set the floor


def mgda_min_norm(numel: int, itemsize: int, objectives: int) -> Cost:
    """T objectives: one fused Gram pass reads T gradients, the direction pass reads T, writes 1."""
    return Cost((2 * objectives + 1) * numel * itemsize)


# ---------------------------------------------------------------- device peaks

# Vendor datasheet peaks (SXM parts). Dense (no sparsity) tensor-core rates for bf16/fp16;
# fp32 is the non-tensor-core rate, since torch's default fp32 matmul does not use TF32.
_GPU_PEAKS: dict[str, tuple[float, dict[torch.dtype, float]]] = {
    "H200": (4.8e12, {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12}),
    "H100": (3.35e12, {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12}),
}


@dataclass(frozen=True)
class Peaks:
    """Peak bandwidth (bytes/s) and FLOP/s of a device for one dtype, and where they come from."""

    bandwidth: float
    flops: float
    source: str


def gpu_datasheet_peaks(name: str, dtype: torch.dtype) -> Peaks | None:
    """Datasheet peaks for a known GPU name (e.g. ``"NVIDIA H100 80GB HBM3"``), else None."""
    if "PCIe" in name or "NVL" in name:  # other memory and clocks than the SXM parts
        return None
    for key, (bw, flops) in _GPU_PEAKS.items():
        if key in name:
            return Peaks(bw, flops.get(dtype, flops[torch.float32]), f"datasheet {key}")
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(device: torch.device, nbytes: int = 256 << 20, repeats: int = 10) -> float:
    """Best copy bandwidth (bytes/s, read + write counted) of a large ``copy_`` on ``device``."""
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 4 / best


def measure_matmul_flops(device: torch.device, dtype=torch.float32, n=1024, repeats=10) -> float:
    """Best FLOP/s of an ``n x n`` matmul in ``dtype`` on ``device``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # first call pays for library setup
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def device_peaks(device: torch.device, dtype: torch.dtype, cache: dict | None = None) -> Peaks:
    """Peaks for ``device``: env overrides, else GPU datasheet, else measured (cached in ``cache``).

    ``OMNIFUSE_BENCH_PEAK_GBPS`` and ``OMNIFUSE_BENCH_PEAK_TFLOPS`` override either value.
    """
    cache = {} if cache is None else cache
    known = None
    if device.type == "cuda":
        known = gpu_datasheet_peaks(torch.cuda.get_device_name(device), dtype)
    if known is not None:
        bw, flops, source = known.bandwidth, known.flops, known.source
    else:
        # Unknown device (CPU, other GPUs): measure once per (device, dtype) and reuse.
        if ("bw", device.type) not in cache:
            small = os.environ.get("OMNIFUSE_BENCH_SIZE") == "smoke"
            cache[("bw", device.type)] = measure_bandwidth(device, (32 if small else 256) << 20)
        # CPU: the fp32 rate for every dtype (bf16 matmul support varies by CPU).
        mm_dtype = dtype if device.type == "cuda" else torch.float32
        if ("flops", device.type, mm_dtype) not in cache:
            cache[("flops", device.type, mm_dtype)] = measure_matmul_flops(device, mm_dtype)
        bw, flops = cache[("bw", device.type)], cache[("flops", device.type, mm_dtype)]
        source = "measured (copy_ bandwidth, matmul FLOP/s)"
    if os.environ.get("OMNIFUSE_BENCH_PEAK_GBPS"):
        bw, source = float(os.environ["OMNIFUSE_BENCH_PEAK_GBPS"]) * 1e9, source + ", GB/s from env"
    if os.environ.get("OMNIFUSE_BENCH_PEAK_TFLOPS"):
        flops = float(os.environ["OMNIFUSE_BENCH_PEAK_TFLOPS"]) * 1e12
        source += ", TFLOP/s from env"
    return Peaks(bw, flops, source)


def floor_seconds(cost: Cost, peaks: Peaks) -> float:
    """The roofline floor: the slower of moving the bytes and doing the FLOPs at peak."""
    return max(cost.bytes / peaks.bandwidth, cost.flops / peaks.flops if cost.flops else 0.0)
