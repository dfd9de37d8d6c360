"""``omnifuse-fast experiment NAME``: the argparse subcommand (added by ``omnifuse_fast.cli``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omnifuse_fast.experiments import NAMES


def add_subparser(sub: argparse._SubParsersAction, prog: str) -> argparse.ArgumentParser:
    """Add the ``experiment`` subcommand to the parser's subcommands ``sub``."""
    e = sub.add_parser(
        "experiment",
        help="reproduce a paper experiment on the built-in data (JSON + Markdown + PNG)",
        prog=f"{prog} experiment",
        description="Run one experiment (mean ± std over seeds, paired t-tests) and write "
        "NAME.json, NAME.md and NAME.png into --out.",
    )
    e.add_argument("name", choices=NAMES, metavar="NAME", help=f"one of {', '.join(NAMES)}")
    e.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default runs/experiments)",
    )
    e.add_argument("--seeds", type=_positive, default=None, help="seeds 0..N-1 (default 5)")
    e.add_argument("--epochs", type=_positive, default=None, help="epochs per run (default 8)")
    e.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, 1 epoch, tiny model")
    e.add_argument("--backend", default="auto", help="backend of the ops (default auto)")
    e.add_argument("--threads", type=_positive, default=1, help="torch CPU threads (default 1)")
    e.set_defaults(handler=_experiment, subparser=e)
    return e


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _experiment(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import time

    import torch

    from omnifuse_fast.experiments import run

    torch.set_num_threads(args.threads)
    out = args.out if args.out is not None else Path("runs") / "experiments"
    start = time.perf_counter()
    try:
        run(
            args.name,
            out,
            seeds=args.seeds,
            quick=args.quick,
            epochs=args.epochs,
            backend=args.backend,
        )
    except ValueError as exc:
        parser.error(str(exc))
    stem = args.name.replace("-", "_")
    files = [str(out / f"{stem}.{ext}") for ext in ("json", "md", "png")]
    print(f"wrote {', '.join(files)}", file=sys.stderr)
    print(
        json.dumps(
            {
                "experiment": args.name,
                "out": str(out),
                "files": files,
                "wall_seconds": round(time.perf_counter() - start, 1),
            }
        ),
        flush=True,
    )
    return 0
