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
        help="test a paper's claim on the built-in data or your file (JSON + Markdown + PNG)",
        prog=f"{prog} experiment",
        description="Run one experiment (mean ± std over seeds, paired t-tests) and write "
        "NAME.json, NAME.md and NAME.png into --out. The protocol (early stopping on "
        "validation NLL, the validation grid, seeds, claims) is docs/PROTOCOL.md.",
    )
    e.add_argument("name", choices=NAMES, metavar="NAME", help=f"one of {', '.join(NAMES)}")
    e.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default runs/experiments)",
    )
    e.add_argument("--seeds", type=_positive, default=None, help="seeds 0..N-1 (default 10)")
    e.add_argument(
        "--epochs", type=_positive, default=None, help="most epochs per run (default 40)"
    )
    e.add_argument(
        "--patience", type=_positive, default=None, help="early stopping patience (default 5)"
    )
    e.add_argument(
        "--tune-seeds",
        type=_positive,
        default=None,
        help="the first N seeds choose each row's grid point on validation NLL (default 2)",
    )
    e.add_argument("--lr-grid", type=_floats, default=None, help="e.g. 1e-3,3e-3 (the default)")
    e.add_argument(
        "--lambda2-grid", type=_floats, default=None, help="OmniFuse rows, e.g. 10,100 (default)"
    )
    e.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, 2 epochs, tiny model")
    d = e.add_argument_group("data (default: the built-in data; see docs/CORRUPTION.md)")
    d.add_argument(
        "--data",
        type=Path,
        default=None,
        help="your data, as `train --data` reads it: .npz or .csv/.tsv/.parquet",
    )
    d.add_argument("--views", default=None, help="--data: comma-separated views to use")
    d.add_argument("--label", default=None, help="--data: the label column / key")
    add_corruption_args(d)
    e.add_argument("--backend", default="auto", help="backend of the ops (default auto)")
    e.add_argument("--threads", type=_positive, default=1, help="torch CPU threads (default 1)")
    e.set_defaults(handler=_experiment, subparser=e)
    return e


def add_corruption_args(group) -> None:
    """``--corruption KIND``, ``--corrupt-views K``, ``--corrupt-std S``, ``--noise-views``,
    ``--missing-rate R`` (replace the experiment's own conditions)."""
    from omnifuse_fast.data.corruption import CORRUPTIONS

    group.add_argument(
        "--corruption",
        choices=CORRUPTIONS,
        default=None,
        help="per-sample low quality on every split: swap, heavy-noise, noise (uniform) or none "
        "(default: the experiment's own conditions)",
    )
    group.add_argument(
        "--corrupt-views",
        type=_positive,
        default=1,
        help="swap / heavy-noise: views corrupted per sample (default 1)",
    )
    group.add_argument(
        "--corrupt-std",
        type=_nonneg_float,
        default=None,
        help="noise std in standardized units (default: noise 1, heavy-noise 5)",
    )
    group.add_argument(
        "--noise-views",
        default=None,
        help="--corruption noise: comma-separated views (default: all)",
    )
    group.add_argument(
        "--missing-rate",
        type=_rate,
        default=None,
        help="views missing at random with this probability (default: the experiment's)",
    )


def corruption_from_args(args: argparse.Namespace):
    """The :class:`~omnifuse_fast.data.Corruption` the options ask for (None: not given)."""
    from omnifuse_fast.data.corruption import Corruption

    if args.corruption is None:
        for flag in ("corrupt_std", "noise_views"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} needs --corruption KIND")
        return None
    views = () if args.noise_views is None else tuple(_split(args.noise_views))
    if views and args.corruption != "noise":
        raise ValueError("--noise-views applies to --corruption noise")
    return Corruption(args.corruption, args.corrupt_views, args.corrupt_std, views)


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in _split(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not values or any(not v > 0 or v == float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"expected numbers > 0, got {text!r}")
    return values


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _rate(text: str) -> float:
    value = _nonneg_float(text)
    if value >= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


# options handed to ``experiments.run`` under their own names, as parsed
PASSED_AS_IS = (
    "seeds",
    "quick",
    "epochs",
    "backend",
    "data",
    "label",
    "missing_rate",
    "patience",
    "tune_seeds",
)


def _experiment(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import time

    import torch

    from omnifuse_fast.experiments import run

    torch.set_num_threads(args.threads)
    out = args.out if args.out is not None else Path("runs") / "experiments"
    start = time.perf_counter()
    grid = None
    if args.lr_grid is not None or args.lambda2_grid is not None:
        from omnifuse_fast.experiments._common import GRID, QUICK_GRID

        grid = dict(QUICK_GRID if args.quick else GRID)
        grid["lr"] = args.lr_grid or grid["lr"]
        grid["lambda2"] = args.lambda2_grid or grid["lambda2"]
    try:
        if args.data is None and (args.views is not None or args.label is not None):
            raise ValueError("--views and --label need --data FILE")
        run(
            args.name,
            out,
            **{key: getattr(args, key) for key in PASSED_AS_IS},
            views=None if args.views is None else _split(args.views),
            corruption=corruption_from_args(args),
            grid=grid,
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
