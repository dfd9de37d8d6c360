"""Summarize a pytest-benchmark JSON (``pytest benchmarks --benchmark-json results.json``).

Prints one row per case and provider (median, GB/s or TFLOP/s, % of the roofline floor,
speedups against the reference and compile providers of the same case, memory), the MIMO
subroutine ratios, and optionally draws the speedups and % of floor into a PNG.

Speedups are recomputed here from the medians in the file (the run's extra_info holds them
too, but only for providers that ran after reference/compile in the same session).

Every provider is compared with the default settings (value checks on): a case id ending in
``checks_on`` is the default run, and the same case ending in ``checks_off`` (a fast backend
after ``set_value_checks(False)``) is folded into its row as a second column, with its own
speedup against compile. Baselines (reference, compile) come from the default run.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

BASELINES = ("reference", "compile")


@dataclass
class Row:
    """One benchmark of the JSON: a case of an op on a provider."""

    op: str
    case: str
    provider: str
    median_ms: float
    gbps: float | None = None
    tflops: float | None = None
    pct_of_floor: float | None = None
    mem_bytes: int | None = None
    mem_kind: str = ""
    pair: str | None = None
    speedup_vs_reference: float | None = None
    speedup_vs_compile: float | None = None
    checks_off_ms: float | None = None  # the same case and provider with value checks off
    checks_off_vs_compile: float | None = None


def _split_name(name: str) -> tuple[str, str, str]:
    """``test_op[case-provider]`` -> (op, case, provider), for entries without extra_info."""
    base, _, rest = name.partition("[")
    op = base.removeprefix("test_")
    param = rest.rstrip("]")
    case, _, provider = param.rpartition("-")
    return op, case or param, provider or "?"


def load(path: str | Path) -> dict:
    """The JSON written by ``--benchmark-json``."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or "benchmarks" not in data:
        raise ValueError(f"{path} is not a pytest-benchmark JSON (no 'benchmarks' list)")
    return data


def rows(data: dict) -> list[Row]:
    """The benchmarks of ``data`` as rows, with speedups filled from the same case's medians."""
    out: list[Row] = []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info") or {}
        op, case, provider = _split_name(bench.get("name", ""))
        mem_kind = "peak" if info.get("mem_peak_bytes") is not None else "saved"
        out.append(
            Row(
                op=info.get("op", op),
                case=info.get("case", case),
                provider=info.get("provider", provider),
                median_ms=float(bench["stats"]["median"]) * 1e3,
                gbps=info.get("gbps"),
                tflops=info.get("tflops"),
                pct_of_floor=info.get("pct_of_floor"),
                mem_bytes=info.get("mem_peak_bytes", info.get("mem_saved_bytes")),
                mem_kind=mem_kind,
                pair=info.get("pair"),
            )
        )
    # keyed by the case without its checks part: baselines from the default (checks on) run
    medians: dict[tuple[str, str], dict[tuple[str, bool], float]] = defaultdict(dict)
    for r in out:
        base, checks = split_checks(r.case)
        medians[(r.op, base)][(r.provider, checks)] = r.median_ms
    for r in out:
        base, _ = split_checks(r.case)
        same = medians[(r.op, base)]
        ref = _baseline(same, "reference")
        comp = _baseline(same, "compile")
        if r.median_ms > 0:
            if ref is not None:
                r.speedup_vs_reference = ref / r.median_ms
            if comp is not None:
                r.speedup_vs_compile = comp / r.median_ms
    return out


def split_checks(case: str) -> tuple[str, bool]:
    """``(case without its checks part, checks on)``; ids without one count as on."""
    base, _, last = case.rpartition("-")
    if last in ("checks_on", "checks_off"):
        return base, last == "checks_on"
    return case, True


def _baseline(same: dict[tuple[str, bool], float], provider: str) -> float | None:
    for checks in (True, False):  # the default settings first
        if (provider, checks) in same:
            return same[(provider, checks)]
    return None


def fold_checks_off(table: Sequence[Row]) -> list[Row]:
    """Rows with the default settings, each carrying its checks-off twin as a second column;
    a checks-off row without a default twin stays a row of its own."""
    default = {}
    for r in table:
        base, checks = split_checks(r.case)
        if checks:
            default[(r.op, base, r.provider)] = r
    out = []
    for r in table:
        base, checks = split_checks(r.case)
        twin = None if checks else default.get((r.op, base, r.provider))
        if twin is None:
            out.append(r)
        else:
            twin.checks_off_ms = r.median_ms
            twin.checks_off_vs_compile = r.speedup_vs_compile
    return out


def mimo_ratios(table: Sequence[Row]) -> list[tuple[str, str, float]]:
    """``(case, provider, mgda median / mimo_combine median)`` for every matched pair."""
    combine = {(r.pair, r.provider): r.median_ms for r in table if r.op == "mimo_combine"}
    out = []
    for r in table:
        if r.op == "mgda_min_norm" and (r.pair, r.provider) in combine:
            out.append((r.case, r.provider, r.median_ms / combine[(r.pair, r.provider)]))
    return out


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:{spec}}{suffix}"


def _mem(r: Row) -> str:
    if r.mem_bytes is None:
        return "-"
    return f"{r.mem_bytes / 2**20:.1f} ({r.mem_kind})"


COLUMNS = (
    "op",
    "case",
    "provider",
    "median ms",
    "GB/s",
    "TFLOP/s",
    "% floor",
    "x ref",
    "x compile",
    "mem MiB",
    "ms checks off",
    "x compile off",
)


def format_table(table: Sequence[Row]) -> str:
    """A plain-text table, one line per row (checks-off twins folded in), columns aligned."""
    table = fold_checks_off(table)
    lines = [
        (
            r.op,
            r.case,
            r.provider,
            _fmt(r.median_ms, ".4g"),
            _fmt(r.gbps, ".1f"),
            _fmt(r.tflops, ".3f"),
            _fmt(r.pct_of_floor, ".1f", "%"),
            _fmt(r.speedup_vs_reference, ".2f", "x"),
            _fmt(r.speedup_vs_compile, ".2f", "x"),
            _mem(r),
            _fmt(r.checks_off_ms, ".4g"),
            _fmt(r.checks_off_vs_compile, ".2f", "x"),
        )
        for r in table
    ]
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(COLUMNS)]
    fmt = "  ".join(f"{{:{'<' if i < 3 else '>'}{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*COLUMNS), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


def _geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summary(table: Sequence[Row]) -> dict[str, dict[str, dict[str, float]]]:
    """Per op and provider, default settings: geometric-mean speedup vs reference, median % of
    floor."""
    speed: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    floor: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in fold_checks_off(table):  # the default settings only
        if r.speedup_vs_reference:
            speed[r.op][r.provider].append(r.speedup_vs_reference)
        if r.pct_of_floor is not None:
            floor[r.op][r.provider].append(r.pct_of_floor)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for op in sorted(set(speed) | set(floor)):
        out[op] = {}
        for provider in sorted(set(speed[op]) | set(floor[op]), key=_provider_order):
            entry = {}
            if speed[op][provider]:
                entry["speedup_vs_reference"] = _geomean(speed[op][provider])
            if floor[op][provider]:
                values = sorted(floor[op][provider])
                entry["pct_of_floor"] = values[len(values) // 2]
            out[op][provider] = entry
    return out


def _provider_order(p: str) -> tuple[int, str]:
    return (BASELINES.index(p) if p in BASELINES else len(BASELINES), p)


def plot(table: Sequence[Row], png: str | Path, title: str = "") -> None:
    """Two panels: geometric-mean speedup vs reference, and median % of floor, per op and
    provider (grouped bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = summary(table)
    ops = list(stats)
    providers = sorted({p for op in ops for p in stats[op]}, key=_provider_order)
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 1.4 * len(ops) + 2), 7), squeeze=False)
    width = 0.8 / max(len(providers), 1)
    panels = (
        ("speedup_vs_reference", "speedup vs reference (geomean)", True),
        ("pct_of_floor", "% of roofline floor (median)", False),
    )
    for ax, (key, label, log) in zip(axes[:, 0], panels):
        for j, provider in enumerate(providers):
            xs, ys = [], []
            for i, op in enumerate(ops):
                value = stats[op].get(provider, {}).get(key)
                if value is not None and value > 0:
                    xs.append(i + (j - (len(providers) - 1) / 2) * width)
                    ys.append(value)
            ax.bar(xs, ys, width, label=provider)
        ax.set_xticks(range(len(ops)), ops, rotation=20, ha="right")
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
            ax.axhline(1.0, color="black", linewidth=0.8)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize="small", ncol=max(1, len(providers)))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def describe_machine(data: dict) -> str:
    """One line naming the device, versions and date of the run."""
    env = (data.get("machine_info") or {}).get("omnifuse_fast") or {}
    if not env:
        return f"machine: {(data.get('machine_info') or {}).get('node', '?')}"
    return (
        f"device {env.get('device')} ({env.get('device_name')}), torch {env.get('torch')}, "
        f"triton {env.get('triton')}, size {env.get('size')}, {env.get('date_utc')}"
    )


def report(path: str | Path, png: str | Path | None = None) -> str:
    """The text report of ``path``; draws ``png`` when given."""
    data = load(path)
    table = rows(data)
    parts = [describe_machine(data), format_table(table)]
    ratios = mimo_ratios(table)
    if ratios:
        parts.append("MIMO subroutine: mgda_min_norm (M+1 objectives) / mimo_combine time")
        parts += [f"  {case}  {provider}: {ratio:.2f}x" for case, provider, ratio in ratios]
    if png is not None:
        plot(table, png, title=describe_machine(data))
        parts.append(f"wrote {png}")
    return "\n".join(parts)
