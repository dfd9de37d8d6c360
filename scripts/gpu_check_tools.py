"""Helpers of scripts/gpu_check.sh: the benchmark subset, and the summary table.

python scripts/gpu_check_tools.py bench-subset [--providers reference,triton,cuda]
    prints the benchmark node ids to run: for every op benchmark (every family), the first
    forward+backward case (else the first case) with each of the given providers.
python scripts/gpu_check_tools.py summary DIR [--total-seconds N]
    reads DIR/steps.txt and the step outputs, writes DIR/summary.json and DIR/summary.md,
    prints the table; exits 1 unless every step passed.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def select_cases(node_ids: list[str], providers: list[str]) -> list[str]:
    """One case per benchmark function, run with each provider (ids ``file::fn[case-provider]``)."""
    chosen: dict[str, str] = {}  # function -> case id (without the provider)
    by_key: dict[tuple[str, str, str], str] = {}
    for node in node_ids:
        m = re.fullmatch(r"(.+?::\w+)\[(.+)-(\w+)\]", node)
        if m is None:
            continue
        fn, case, provider = m.groups()
        by_key[(fn, case, provider)] = node
        current = chosen.get(fn)
        if current is None or ("fwd_bwd" in case and "fwd_bwd" not in current):
            chosen[fn] = case
    return [
        by_key[(fn, case, p)]
        for fn, case in chosen.items()
        for p in providers
        if (fn, case, p) in by_key
    ]


def bench_subset(providers: list[str]) -> int:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "--collect-only", "-q"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    nodes = [line.strip() for line in proc.stdout.splitlines() if "::" in line]
    if proc.returncode != 0 or not nodes:
        print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
        return 1
    selected = select_cases(nodes, providers)
    families = {n.split("::")[0] for n in selected}
    print(f"{len(selected)} cases from {len(families)} benchmark files", file=sys.stderr)
    print("\n".join(selected))
    return 0 if selected else 1


def _details(out: Path) -> dict[str, str]:
    """One line of detail per step, from what the step wrote."""
    details: dict[str, str] = {}
    env = out / "env.txt"
    if env.exists():
        details["env"] = " | ".join(env.read_text().split("\n")[:3]).strip()[:160]
    build_log = out / "build.log"
    if build_log.exists():
        m = re.findall(
            r"^(\d+ ops, every one with a CPU and a CUDA kernel)$", build_log.read_text(), re.M
        )
        details["build"] = m[-1] if m else ""
    xml = out / "pytest_gpu.xml"
    if xml.exists():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        a = {k: suite.get(k, "0") for k in ("tests", "failures", "errors", "skipped")}
        details["pytest"] = ", ".join(f"{v} {k}" for k, v in a.items())
    san = out / "memcheck.log"
    if san.exists():
        m = re.findall(r"ERROR SUMMARY: (\d+) error", san.read_text())
        details["sanitizer"] = f"memcheck: {m[-1]} errors" if m else "no ERROR SUMMARY line"
    bench = out / "bench.json"
    if bench.exists():
        runs = json.loads(bench.read_text()).get("benchmarks", [])
        ops = sorted({b.get("name", "").split("[")[0].removeprefix("test_") for b in runs})
        details["bench"] = f"{len(runs)} runs, ops: {', '.join(ops)}"
    return details


def summary(out: Path, total_seconds: int | None) -> int:
    rows = []
    for line in (out / "steps.txt").read_text().splitlines():
        name, status, seconds = line.split()
        rows.append({"step": name, "status": status, "seconds": int(seconds)})
    details = _details(out)
    for row in rows:
        row["detail"] = details.get(row["step"], "")
        row["log"] = f"{row['step']}.log"
    ok = bool(rows) and all(r["status"] == "ok" for r in rows)
    result = {"ok": ok, "total_seconds": total_seconds, "steps": rows}
    (out / "summary.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["| step | status | seconds | detail | log |", "| --- | --- | --- | --- | --- |"]
    lines += [
        f"| {r['step']} | {r['status']} | {r['seconds']} | {r['detail']} | {r['log']} |"
        for r in rows
    ]
    lines.append(f"\n{'ALL PASSED' if ok else 'SOME STEPS FAILED'} in {total_seconds}s ({out})")
    text = "\n".join(lines)
    (out / "summary.md").write_text(text + "\n")
    print(text)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench-subset")
    b.add_argument("--providers", default="reference,triton,cuda")
    s = sub.add_parser("summary")
    s.add_argument("out", type=Path)
    s.add_argument("--total-seconds", type=int, default=None)
    args = parser.parse_args(argv)
    if args.cmd == "bench-subset":
        return bench_subset([p for p in args.providers.split(",") if p])
    return summary(args.out, args.total_seconds)


if __name__ == "__main__":
    sys.exit(main())
