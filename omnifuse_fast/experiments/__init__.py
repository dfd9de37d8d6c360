"""Paper-style experiments on the built-in data or a user's file (one module each).

``run(name, out, seeds=None, quick=False, epochs=None)`` runs one of :data:`NAMES` and writes
``NAME.json`` (settings, machine, every run, the summary), ``NAME.md`` (tables) and
``NAME.png`` into ``out``. Every number is a mean ± std over seeds with a paired t-test
against the experiment's baseline. The protocol (budget, grid, seeds, what counts as a claim
held) is docs/PROTOCOL.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# name -> module (imported on demand: the CLI lists names without importing torch)
EXPERIMENTS = {
    "ablation": "ablation",
    "missing-rate": "missing_rate",
    "fusion": "fusion",
    "balance": "balance",
    "imputation": "imputation",
}
NAMES = tuple(EXPERIMENTS)


def run(
    name: str,
    out: str | Path,
    seeds: int | Sequence[int] | None = None,
    quick: bool = False,
    epochs: int | None = None,
    backend: str = "auto",
    data: str | Path | None = None,
    views: Sequence[str] | None = None,
    label: str | None = None,
    corruption: Any = None,
    missing_rate: float | None = None,
    patience: int | None = None,
    tune_seeds: int | None = None,
    grid: dict[str, Sequence[float]] | None = None,
    **params: Any,
) -> dict[str, Any]:
    """Run experiment ``name`` and write its outputs into ``out``.

    Args:
        name: one of :data:`NAMES`.
        out: output directory (created).
        seeds: a count (seeds 0..n-1) or a list of seeds; default 5 (2 with ``quick``).
        quick: a smoke run: 2 seeds, 2 epochs, a tiny model, fewer grid points.
        epochs: most training epochs per run (early stopping on validation NLL); default 40
            (2 with ``quick``).
        backend: backend of the ops ("auto": the fastest available).
        data: a user's file (``.npz``, CSV, Parquet: what ``train --data`` reads); None: the
            built-in data.
        views: the file's views to use (None: all).
        label: the file's label column / key (None: ``y`` or ``label``).
        corruption: a :class:`~omnifuse_fast.data.Corruption` (or its kind as a string) that
            replaces the experiment's own conditions (see docs/CORRUPTION.md).
        missing_rate: injected missing rate (replaces the experiment's own).
        patience: early stopping patience (default 5; 1 with ``quick``).
        tune_seeds: how many of the first seeds choose the grid point (default 2).
        grid: ``{"lr": [...], "lambda2": [...]}`` (default docs/PROTOCOL.md's).
        **params: the experiment's own options (see its module's ``run``).

    Returns:
        ``{"summary": ..., "runs": [...]}``, as written to ``NAME.json``.
    """
    from omnifuse_fast.experiments._common import Settings

    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; expected one of {NAMES}")
    from omnifuse_fast.data.corruption import Corruption

    if isinstance(corruption, str):
        corruption = Corruption(corruption)
    settings = Settings.make(
        seeds,
        quick,
        epochs,
        backend,
        patience,
        tune_seeds,
        grid,
        data,
        views,
        label,
        corruption,
        missing_rate,
    )
    module = importlib.import_module(f"omnifuse_fast.experiments.{EXPERIMENTS[name]}")
    return module.run(Path(out), settings, **params)


__all__ = ["EXPERIMENTS", "NAMES", "run"]
