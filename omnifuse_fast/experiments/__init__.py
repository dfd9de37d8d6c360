"""Paper-style experiments on the built-in data (one module each).

``run(name, out, seeds=None, quick=False, epochs=None)`` runs one of :data:`NAMES` and writes
``NAME.json`` (settings, machine, every run, the summary), ``NAME.md`` (tables) and
``NAME.png`` into ``out``. Every number is a mean ± std over seeds with a paired t-test
against the experiment's baseline.
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
    **params: Any,
) -> dict[str, Any]:
    """Run experiment ``name`` and write its outputs into ``out``.

    Args:
        name: one of :data:`NAMES`.
        out: output directory (created).
        seeds: a count (seeds 0..n-1) or a list of seeds; default 5 (2 with ``quick``).
        quick: a smoke run: 2 seeds, 1 epoch, a tiny model, fewer grid points.
        epochs: training epochs per run; default 8 (1 with ``quick``).
        backend: backend of the ops ("auto": the fastest available).
        **params: the experiment's own options (see its module's ``run``).

    Returns:
        ``{"summary": ..., "runs": [...]}``, as written to ``NAME.json``.
    """
    from omnifuse_fast.experiments._common import Settings

    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; expected one of {NAMES}")
    settings = Settings.make(seeds, quick, epochs, backend)
    module = importlib.import_module(f"omnifuse_fast.experiments.{EXPERIMENTS[name]}")
    return module.run(Path(out), settings, **params)


__all__ = ["EXPERIMENTS", "NAMES", "run"]
