"""``python -m omnifuse_fast.bench report results.json [--png out.png]`` and
``python -m omnifuse_fast.bench traffic`` (eager traffic of the reference paths vs floors)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from omnifuse_fast.bench.report import report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m omnifuse_fast.bench", description="omnifuse_fast benchmark tools"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="summarize a pytest-benchmark JSON")
    rep.add_argument("json", help="file written by pytest --benchmark-json")
    rep.add_argument("--png", help="also draw speedups and %% of floor into this PNG")
    sub.add_parser(
        "traffic", help="count the eager reference paths' memory traffic against the floors"
    )
    args = parser.parse_args(argv)
    if args.command == "traffic":
        from omnifuse_fast.bench.traffic import traffic_table

        print(traffic_table())
        return 0
    try:
        print(report(args.json, args.png))
    except (OSError, ValueError) as exc:  # unreadable or not a pytest-benchmark JSON
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
