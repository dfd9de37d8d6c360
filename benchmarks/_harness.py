"""The benchmark harness shared by every bench_<family>.py: providers, sizes, timing, floors.

A benchmark is a :class:`Case` (op, sizes, mode, dtype, value checks) run by a *provider*:

- ``reference``: the eager reference path through the public API (``backend="reference"``);
- ``compile``: ``torch.compile`` of the reference function, compiled once per case outside the
  timed region (the compiled graph has no value checks: they are skipped while tracing);

Every provider runs with the default settings (value checks on); the fast backends also run
each case with the checks off (a second column of the report).
- every fast backend of ``omnifuse_fast.BACKENDS`` (``cpu``, ``triton``, ``cuda``), through the
  public API. A new backend shows up here by itself; an unavailable one is skipped with the
  dispatcher's reason, never dropped silently.

Each case records in ``benchmark.extra_info`` the bytes/FLOPs it must move (see
``omnifuse_fast.bench.floors`` and NOTES.md), the achieved GB/s (TFLOP/s for matmul ops), the
roofline floor and the fraction of it reached, speedups against the reference and compile
providers of the same case (these run first), and memory.

Environment:
    OMNIFUSE_BENCH_SIZE     smoke | default | large (default: default; OMNIFUSE_BENCH_LARGE=1
                            means large)
    OMNIFUSE_BENCH_DEVICE   cpu | cuda (default: cuda when available)
    OMNIFUSE_BENCH_WARMUP   untimed calls before timing (default 2)
    OMNIFUSE_BENCH_THREADS  torch.set_num_threads for the session (default: torch's choice)
    OMNIFUSE_BENCH_NO_COMPILE=1   skip the compile provider
    OMNIFUSE_BENCH_PEAK_GBPS / OMNIFUSE_BENCH_PEAK_TFLOPS   override the device peaks
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import pytest
import torch

import omnifuse_fast
from omnifuse_fast import _dispatch
from omnifuse_fast.bench import floors

FWD, FWD_BWD = floors.FWD, floors.FWD_BWD
SIZES = ("smoke", "default", "large")
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _size() -> str:
    size = os.environ.get("OMNIFUSE_BENCH_SIZE", "").strip().lower()
    if not size:
        large = os.environ.get("OMNIFUSE_BENCH_LARGE", "0").strip() not in ("", "0")
        size = "large" if large else "default"
    if size not in SIZES:
        raise ValueError(f"OMNIFUSE_BENCH_SIZE must be one of {SIZES}, got {size!r}")
    return size


SIZE = _size()
DEVICE = torch.device(
    os.environ.get("OMNIFUSE_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
)
WARMUP = int(os.environ.get("OMNIFUSE_BENCH_WARMUP", "2"))
PROVIDERS: tuple[str, ...] = ("reference", "compile") + tuple(
    b for b in omnifuse_fast.BACKENDS if b != "reference"
)

# Session state: medians per (op, case id) and provider, filled as cases run, for speedups.
MEDIANS: dict[tuple[str, str], dict[str, float]] = {}
_PEAKS_CACHE: dict = {}


def pick(smoke, default, large):
    """The value for the selected size."""
    return {"smoke": smoke, "default": default, "large": large}[SIZE]


def device_name(device: torch.device = DEVICE) -> str:
    """The GPU's name, or the CPU model (``/proc/cpuinfo`` on Linux)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass
class Case:
    """One benchmark configuration of an op (sizes in ``dims``, e.g. ``{"B": 65536, "M": 4}``)."""

    op: str
    dims: dict[str, int]
    mode: str = FWD_BWD
    dtype: torch.dtype = torch.float32
    checks: bool = True  # the default settings: value checks on
    variant: str = ""

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def id(self) -> str:
        parts = [f"{k}{v}" for k, v in self.dims.items()]
        parts += [DTYPE_NAMES[self.dtype], self.mode.replace("+", "_")]
        if self.variant:
            parts.append(self.variant)
        parts.append("checks_on" if self.checks else "checks_off")
        return "-".join(parts)

    @property
    def base_id(self) -> str:
        """The id without the value-checks part: the same case with checks on and off."""
        return self.id.rpartition("-")[0]


@dataclass
class Inputs:
    """Positional arguments of the op (public order, no ``backend``), and what to differentiate.

    For ``fwd+bwd``, gradients of ``outputs`` (indices into the op's result, 0 for a single
    tensor) are taken with respect to ``wrt``, with fixed random output gradients.
    """

    args: tuple
    wrt: list[torch.Tensor] = field(default_factory=list)
    outputs: tuple[int, ...] = (0,)


@dataclass
class Bench:
    """How to benchmark one op: its public and reference functions, inputs and cost."""

    public: Callable
    reference: Callable
    make: Callable[[Case], Inputs]
    cost: Callable[[Case], floors.Cost]


def provider_reason(op: str, provider: str, device: torch.device = DEVICE) -> str | None:
    """Why ``provider`` cannot run ``op`` on ``device`` here (None when it can)."""
    if provider == "reference":
        return None
    if provider == "compile":
        if os.environ.get("OMNIFUSE_BENCH_NO_COMPILE", "0") not in ("", "0"):
            return "disabled by OMNIFUSE_BENCH_NO_COMPILE"
        return None
    reason = _dispatch.unavailable_reason(op, provider, device)
    if reason is None and provider == "triton" and device.type == "cpu":
        return "on CPU it runs in the Triton interpreter, whose timings mean nothing"
    return reason


def params(
    cases: Sequence[Case], skip: dict[str, str] | None = None, ops: Sequence[str] | None = None
) -> list:
    """``(case, provider)`` pytest params, reference and compile first within each case.

    A case with value checks on (the default settings) also runs each fast backend with the
    checks off (the same case with ``checks=False``), the report's second column; the
    reference and compile providers run with the default settings only.

    ``skip`` maps a provider to the reason it is not benchmarked for these cases; ``ops`` are
    the ops a provider must run (default: the case's own op).
    """
    out = []
    for case in cases:
        for provider in PROVIDERS:
            reasons = [(op, provider_reason(op, provider)) for op in (ops or (case.op,))]
            missing = [f"{op}: {r}" if ops else r for op, r in reasons if r]
            reason = (skip or {}).get(provider) or (missing[0] if missing else None)
            marks = [pytest.mark.skip(reason=f"{provider}: {reason}")] if reason else []
            variants = [case]
            if case.checks and provider not in ("reference", "compile"):
                variants.append(replace(case, checks=False))
            for c in variants:
                out.append(pytest.param(c, provider, id=f"{c.id}-{provider}", marks=marks))
    return out


def randn(*shape: int, dtype=torch.float32, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Deterministic normal tensor made on the benchmark device."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    return (torch.randn(*shape, generator=g, device=DEVICE) * scale).to(dtype)


def randint(low: int, high: int, *shape: int, seed: int = 1) -> torch.Tensor:
    """Deterministic int64 tensor in ``[low, high)`` on the benchmark device."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    return torch.randint(low, high, shape, generator=g, device=DEVICE)


def provider_fn(provider: str, public: Callable, reference: Callable) -> Callable:
    """The callable a provider times; ``compile`` returns a fresh, not yet compiled wrapper."""
    if provider == "compile":
        # Fresh dynamo caches: each case compiles once for its own shapes (no recompile limit,
        # no automatic dynamic shapes carried over from an earlier case).
        torch._dynamo.reset()
        return torch.compile(reference, dynamic=False)

    def call(*args):
        return public(*args, backend=provider)

    return call


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def _selected(out, indices: tuple[int, ...]) -> list[torch.Tensor]:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [outs[i] for i in indices]


def make_step(fn: Callable, inputs: Inputs, mode: str, device: torch.device = DEVICE):
    """The timed function: one forward (and backward); synchronizes on CUDA before returning."""
    args, sync = inputs.args, _sync(device)
    if mode == FWD:

        def fwd():
            out = fn(*args)
            sync()
            return out

        return fwd

    # Fixed output gradients, made once outside the timed region (this call also compiles).
    grad_outputs = [
        None if o.dim() == 0 else torch.randn_like(o) for o in _selected(fn(*args), inputs.outputs)
    ]

    def fwd_bwd():
        outs = _selected(fn(*args), inputs.outputs)
        grads = torch.autograd.grad(outs, inputs.wrt, grad_outputs)
        sync()
        return grads

    return fwd_bwd


def saved_bytes(forward: Callable[[], object], exclude: Sequence[torch.Tensor] = ()) -> int:
    """Bytes of the tensors autograd keeps for backward after ``forward()``, ``exclude`` not
    counted (inputs and parameters live anyway).

    Counted once per storage via ``saved_tensors_hooks``: the activation memory a fwd+bwd
    holds between its forward and backward (on CPU torch keeps no allocator statistics).
    """
    own = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values())


def measure_memory(step: Callable, forward: Callable | None, exclude=()) -> dict:
    """CUDA: ``mem_peak_bytes``, the peak allocated during one ``step()`` above what was
    allocated before it. With a ``forward`` (fwd+bwd cases, any device): ``mem_saved_bytes``
    (:func:`saved_bytes`)."""
    info: dict = {}
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(DEVICE)
        base = torch.cuda.memory_allocated(DEVICE)
        step()
        info["mem_peak_bytes"] = torch.cuda.max_memory_allocated(DEVICE) - base
    if forward is not None:
        info["mem_saved_bytes"] = saved_bytes(forward, exclude)
    return info


def run(benchmark, case: Case, provider: str, bench: Bench, extra: dict | None = None) -> float:
    """Time ``case`` of an op on ``provider`` and record its extra_info; returns the median."""
    inputs = bench.make(case)
    fn = provider_fn(provider, bench.public, bench.reference)
    omnifuse_fast.set_value_checks(case.checks)
    step = make_step(fn, inputs, case.mode)
    for _ in range(WARMUP):
        step()
    forward = (lambda: fn(*inputs.args)) if case.mode == FWD_BWD else None
    tensors = [t for t in inputs.args if isinstance(t, torch.Tensor)] + inputs.wrt
    memory = measure_memory(step, forward, tensors)
    return record(benchmark, case, provider, step, bench.cost(case), {**memory, **(extra or {})})


def record(
    benchmark,
    case: Case,
    provider: str,
    step: Callable,
    cost: floors.Cost | None,
    extra: dict | None = None,
) -> float:
    """Time the warmed-up ``step`` and fill ``benchmark.extra_info``; returns the median (s).

    Without a ``cost`` (e.g. a whole training step) the floor fields are left out.
    """
    benchmark.group = f"{case.op} {case.id}"
    benchmark(step)
    if benchmark.stats is None:  # --benchmark-disable: nothing was timed
        return float("nan")
    median = float(benchmark.stats.stats.median)

    # checks on and off of one case share the baselines (run with the default settings)
    same_case = MEDIANS.setdefault((case.op, case.base_id), {})
    same_case[provider if case.checks else f"{provider}/checks_off"] = median
    ref = same_case.get("reference") or same_case.get("reference/checks_off")
    comp = same_case.get("compile") or same_case.get("compile/checks_off")
    info = {
        "op": case.op,
        "case": case.id,
        "provider": provider,
        "mode": case.mode,
        "dtype": DTYPE_NAMES[case.dtype],
        "checks": case.checks,
        "dims": dict(case.dims),
        "size": SIZE,
        "device": str(DEVICE),
        "device_name": device_name(),
        "median_ms": median * 1e3,
        "speedup_vs_reference": ref / median if ref else None,
        "speedup_vs_compile": comp / median if comp else None,
    }
    if cost is not None:
        peaks = floors.device_peaks(DEVICE, case.dtype, _PEAKS_CACHE)
        floor_s = floors.floor_seconds(cost, peaks)
        info.update(
            {
                "bytes": cost.bytes,
                "flops": cost.flops,
                "gbps": cost.bytes / median / 1e9,
                "tflops": cost.flops / median / 1e12 if cost.flops else None,
                "peak_gbps": peaks.bandwidth / 1e9,
                "peak_tflops": peaks.flops / 1e12,
                "peak_source": peaks.source,
                "floor_ms": floor_s * 1e3,
                "pct_of_floor": 100.0 * floor_s / median,
            }
        )
    info.update(extra or {})
    benchmark.extra_info.update(info)
    return median
