"""``omnifuse-fast``: the command line (also ``python -m omnifuse_fast``).

``omnifuse-fast train`` trains on the built-in UCI multiple-features data made low-quality
(missing views, noise), prints progress on stderr and, as the LAST line of stdout, one JSON
object with the test metrics; it writes ``checkpoint.pt``, ``metrics.json`` and
``training_curve.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omnifuse_fast._dispatch import BACKENDS
from omnifuse_fast.train.config import METHODS, PRECISIONS, TrainConfig

PROG = "omnifuse-fast"


def _number(kind: type, lo: float | None = None, hi: float | None = None, hi_open=False):
    """An argparse type: a finite int/float within [lo, hi] (or [lo, hi))."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        too_high = hi is not None and (value >= hi if hi_open else value > hi)
        if (lo is not None and value < lo) or too_high:
            if hi is None:
                raise argparse.ArgumentTypeError(f"must be >= {lo}, got {text}")
            close = ")" if hi_open else "]"
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi}{close}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _views(text: str) -> tuple[str | int, ...]:
    """Comma-separated view names or indices, e.g. ``fou,pix`` or ``0,3``."""
    from omnifuse_fast.data.mfeat import VIEW_NAMES, resolve_views

    items = [t.strip() for t in text.split(",") if t.strip()]
    parsed = tuple(int(t) if t.isdigit() else t for t in items)
    try:
        idx = resolve_views(parsed, VIEW_NAMES, arg="--noise-views")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--noise-views: ")) from None
    return tuple(VIEW_NAMES[i] for i in idx)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="OmniFuse, MM learning and MIMO on low-quality multi-view data.",
        usage=f"{PROG} COMMAND [options]",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    t = _command(
        sub,
        "train [options]  (see --help)",
        "train OmniFuse (or a baseline) on the built-in multi-view data",
        "Train on the built-in UCI multiple-features data (6 views, 10 classes). With --resume, "
        "the run's settings come from its checkpoint: settings given again must equal them, "
        "except --epochs (the new end).",
    )
    rate = _number(float, 0.0, 1.0, hi_open=True)  # a probability in [0, 1)
    d = t.add_argument_group("data")
    d.add_argument(
        "--missing-rate",
        type=rate,
        help="probability that a view of a sample is missing, in [0, 1) (default 0.5)",
    )
    d.add_argument(
        "--noise-views",
        type=_views,
        help="comma-separated views (names fou,fac,kar,pix,zer,mor or indices) "
        "to corrupt with Gaussian noise",
    )
    d.add_argument(
        "--noise-std",
        type=_number(float, 0.0),
        help="noise standard deviation in standardized units (default 0)",
    )
    _add_data_args(d, train=True)
    _add_corruption_args(d)
    o = t.add_argument_group("optimization")
    o.add_argument("--epochs", type=_number(int, 1), help="epochs (default 40)")
    o.add_argument("--batch-size", type=_number(int, 1), help="default 64")
    o.add_argument("--lr", type=_number(float, 0.0), help="AdamW learning rate (default 1e-3)")
    o.add_argument("--weight-decay", type=_number(float, 0.0))
    o.add_argument("--seed", type=_number(int, 0), help="seed of data and model")
    m = t.add_argument_group("method")
    m.add_argument(
        "--method",
        choices=METHODS,
        help="omnifuse (default), concat (baseline), mm (MM learning), mimo (MIMO)",
    )
    m.add_argument("--no-dwfuse", action="store_true", help="omnifuse without DWFuse")
    m.add_argument("--no-tla", action="store_true", help="omnifuse without TLA")
    m.add_argument("--no-imp-forward", action="store_true", help="omnifuse without IMP-forward")
    m.add_argument("--no-imp-backward", action="store_true", help="omnifuse without IMP-backward")
    m.add_argument("--tla-mode", choices=("observed", "subsets"))
    m.add_argument("--dim", type=_number(int, 1), help="embedding width D")
    m.add_argument("--num-blocks", type=_number(int, 1), help="RAs per cascade K")
    m.add_argument(
        "--drop-rate", type=rate, help="imputer's supervision drop rate in training, in [0, 1)"
    )
    m.add_argument(
        "--mm-stage1-epochs",
        type=_number(int, 0),
        help="mm: standard epochs before MM learning (default: half)",
    )
    m.add_argument(
        "--mm-top-fraction",
        type=_number(float, 0.0, 1.0),
        help="mm: stage 2 mixes this top fraction of the training rows by p(true class) "
        "(default 0.5)",
    )
    m.add_argument(
        "--mm-tau",
        type=_number(float, 0.0, 1.0),
        help="mm: mix the rows with p(true class) >= TAU instead (the top fraction when "
        "fewer than 2 qualify); default: off, since training p(true) saturates near 1",
    )
    m.add_argument(
        "--mimo-mode",
        choices=("mimo", "mgda"),
        help="mimo: two-objective closed form, or the (M+1)-objective MGDA baseline",
    )
    r = t.add_argument_group("run")
    r.add_argument("--out", type=Path, help="output directory (default runs/METHOD)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out")
    r.add_argument(
        "--backend",
        choices=("auto", *BACKENDS),
        help="backend of the ops (default auto: the fastest available)",
    )
    r.add_argument("--device", help="torch device (default cpu)")
    r.add_argument(
        "--threads",
        type=_number(int, 1),
        default=1,
        help="torch CPU threads (default 1: the ops are small, more threads only "
        "add synchronization)",
    )
    r.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the training step (forward and losses; backward via AOT autograd)",
    )
    r.add_argument(
        "--check-every",
        type=_number(int, 1),
        help="check the loss for NaN/inf every N steps (default 1; more: fewer host syncs)",
    )
    r.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="precision of the training step's forward and losses: fp32 (default) or bf16 "
        "(torch.autocast; parameters and optimizer stay fp32)",
    )
    r.add_argument("--quiet", action="store_true", help="no progress output")
    t.set_defaults(handler=_train, subparser=t)
    _add_predict_parser(sub)
    from omnifuse_fast.experiments.cli import add_subparser as add_experiment

    add_experiment(sub, PROG)  # `experiment NAME`: omnifuse_fast/experiments/cli.py
    return parser


def _add_corruption_args(group) -> None:
    """``--corruption KIND --corrupt-views K --corrupt-std S`` (docs/CORRUPTION.md)."""
    from omnifuse_fast.data.corruption import CORRUPTIONS

    group.add_argument(
        "--corruption",
        choices=CORRUPTIONS,
        default=None,
        help="per-sample low quality on every split: swap, heavy-noise, or noise on all views "
        "(default none; see docs/CORRUPTION.md)",
    )
    group.add_argument(
        "--corrupt-views", type=_number(int, 1), default=None, help="views per sample (default 1)"
    )
    group.add_argument(
        "--corrupt-std",
        type=_number(float, 0.0),
        default=None,
        help="noise std in standardized units (default: noise 1, heavy-noise 5)",
    )


def _command(sub, usage: str, help: str, description: str) -> argparse.ArgumentParser:
    """The subcommand ``PROG NAME`` whose usage line is ``PROG USAGE`` (NAME: its first word)."""
    name = usage.split()[0]
    return sub.add_parser(
        name, help=help, prog=f"{PROG} {name}", usage=f"{PROG} {usage}", description=description
    )


def _add_data_args(group, train: bool) -> None:
    """``--data`` (your own file) and how to read it; see docs/YOUR_DATA.md."""
    group.add_argument(
        "--data",
        type=Path,
        required=not train,
        help="your data: .npz (view_<name> arrays, y, present) or .csv/.parquet "
        "(<view>__<column> groups)" + ("; default: the built-in data" if train else ""),
    )
    if train:
        group.add_argument("--views", help="--data: comma-separated views to use")
        group.add_argument(
            "--label",
            help="--data: label column (several, comma-separated: multilabel)",
        )
    group.add_argument(
        "--text-encoder",
        help="local transformers model directory that embeds text columns (never downloads)",
    )


def _add_predict_parser(sub) -> None:
    p = _command(
        sub,
        "predict --model DIR --data FILE [--out preds.csv]",
        "predict a data file with a model trained by `train --data`",
        "Write each row's prediction and class probabilities as CSV (to --out, else stdout). "
        "FILE is laid out like the training file; labels may be absent.",
    )
    p.add_argument("--model", type=Path, required=True, help="the --out directory of the run")
    _add_data_args(p, train=False)
    p.add_argument("--out", type=Path, help="CSV file (default: stdout)")
    p.add_argument("--threads", type=_number(int, 1), default=1, help="torch CPU threads")
    p.set_defaults(handler=_predict, subparser=p)


def _given_settings(args: argparse.Namespace) -> dict[str, tuple[str, Any]]:
    """The run settings given on the command line: ``{"--flag": (TrainConfig field, value)}``.

    A flag is a setting when its destination is a :class:`TrainConfig` field (``--lr`` ->
    ``lr``) or an ablation ``--no-X`` (-> ``use_X = False``): the parser is the one list.
    """
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {}
    for dest, value in vars(args).items():
        field = "use_" + dest.removeprefix("no_") if dest.startswith("no_") else dest
        if field in fields and value is not None and value is not False:
            given["--" + dest.replace("_", "-")] = (field, False if field != dest else value)
    return given


def _config_values(args: argparse.Namespace) -> dict:
    given = _given_settings(args)
    values = {field: value for field, value in given.values()}
    values.setdefault("method", "omnifuse")
    ablations = [flag for flag, (field, _) in given.items() if field.startswith("use_")]
    if values["method"] != "omnifuse" and ablations:
        raise ValueError(f"{ablations[0]} only applies to --method omnifuse")
    return values


def _resume_conflict(args: argparse.Namespace, stored: dict[str, Any]) -> str | None:
    """The first setting given with ``--resume`` that differs from the run's checkpoint.

    Settings equal to the checkpoint's are accepted (the same command with ``--resume``
    appended continues the run); ``--epochs`` is the new end and may change.
    """
    run = TrainConfig.from_dict(stored).to_dict()
    for flag, (field, value) in _given_settings(args).items():
        if field == "epochs":
            continue
        try:  # compare as the config stores it (tuples, floats, the baselines' fixed fields)
            asked = TrainConfig.from_dict({**stored, field: value}).to_dict()[field]
        except ValueError:
            asked = value
        if asked != run[field]:
            shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
            given = flag if value is False else f"{flag} {shown}"
            return (
                f"{given} conflicts with the run being resumed ({field} = {run[field]!r} in its "
                "checkpoint); drop it, or train a new run in another --out"
            )
    return None


def _check_backend(backend: str, device: str, parser: argparse.ArgumentParser) -> None:
    """Refuse an unusable --device or --backend up front, in one line."""
    import torch

    from omnifuse_fast import _dispatch

    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        parser.error(f"--device {device!r}: {exc}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device}: CUDA is not available here")
    if backend != "auto":
        reason = _dispatch.unavailable_reason("cra_forward", backend, dev)
        if reason is not None:
            parser.error(f"--backend {backend} cannot run on {dev}: {reason}")


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import time

    import torch

    from omnifuse_fast.train import CheckpointError, Trainer, load_checkpoint
    from omnifuse_fast.train.checkpoint import CHECKPOINT

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    progress = not args.quiet
    if args.data is not None:
        return _train_data(args, parser, log, started)
    for flag in ("views", "label", "text_encoder"):
        if getattr(args, flag) is not None:
            parser.error(f"--{flag.replace('_', '-')} needs --data FILE")
    if args.resume:
        if args.out is None:
            parser.error("--resume needs --out DIR (the run to continue)")
        try:
            stored = load_checkpoint(args.out / CHECKPOINT)["config"]
        except CheckpointError as exc:
            print(f"{PROG} train: error: {exc}", file=sys.stderr)
            return 1
        conflict = _resume_conflict(args, stored)
        if conflict is not None:
            parser.error(conflict)
        trainer = Trainer.resume(args.out, args.epochs, progress=progress, log=log)
        if trainer.epoch >= trainer.config.epochs and log is not None:
            log(f"the run in {args.out} already has {trainer.epoch} epochs; testing it")
    else:
        try:
            config = TrainConfig(**_config_values(args))
        except ValueError as exc:
            parser.error(str(exc))
        _check_backend(config.backend, config.device, parser)
        out = args.out if args.out is not None else Path("runs") / config.method
        trainer = Trainer(config, out, progress=progress, log=log)
    try:
        result = trainer.fit()
    except FloatingPointError as exc:  # NonFiniteLossError: names the step and the term
        print(f"{PROG} train: error: {exc}", file=sys.stderr)
        return 1
    trainer.close()  # under torchrun: wait for every rank, leave the process group
    if not trainer.dist.is_main:  # rank 0 alone reports (one JSON line per job)
        return 0
    result["wall_seconds"] = round(time.perf_counter() - started, 3)  # data + training + test
    result["out"] = str(trainer.out_dir)
    if log is not None:
        log(f"wrote {trainer.out_dir / 'metrics.json'} and the training curve")
    print(json.dumps(result), flush=True)
    return 0


def _train_data(args, parser, log, started: float) -> int:
    """``train --data FILE``: the same outputs and JSON line as the built-in data."""
    import time

    from omnifuse_fast.api import fit_file

    for flag in ("resume", "missing_rate", "noise_views", "noise_std"):
        if getattr(args, flag) not in (None, False):
            parser.error(f"--{flag.replace('_', '-')} applies to the built-in data, not --data")
    try:
        values = _config_values(args)
        values.pop("missing_rate", None)
        _check_backend(values.get("backend", "auto"), values.get("device", "cpu"), parser)
        out = args.out if args.out is not None else Path("runs") / values["method"]
        views = None if args.views is None else [v.strip() for v in args.views.split(",")]
        label = args.label
        if label is not None and "," in label:
            label = [c.strip() for c in label.split(",")]
        result = fit_file(args.data, out, views, label, args.text_encoder, log=log, **values)
    except ValueError as exc:
        print(f"{PROG} train: error: {exc}", file=sys.stderr)
        return 2
    result["wall_seconds"] = round(time.perf_counter() - started, 3)
    result["out"] = str(out)
    if log is not None:
        log(f"wrote {out / 'metrics.json'}, {out / 'model.pt'} and the training curve")
    print(json.dumps(result), flush=True)
    return 0


def _predict(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from omnifuse_fast.api import predict_file

    torch.set_num_threads(args.threads)
    try:
        frame = predict_file(args.model, args.data, args.out, args.text_encoder)
    except ValueError as exc:
        print(f"{PROG} predict: error: {exc}", file=sys.stderr)
        return 2
    if args.out is None:
        sys.stdout.write(frame.to_csv(index=False))
    else:
        print(json.dumps({"out": str(args.out), "rows": len(frame)}), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``omnifuse-fast`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.handler(args, args.subparser)


if __name__ == "__main__":
    sys.exit(main())
