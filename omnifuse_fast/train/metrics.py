"""Classification metrics (accuracy, macro one-vs-rest AUROC) and a run's metrics file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch


def accuracy(proba: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """Fraction of samples whose most probable class is the label.

    Multilabel (``labels [N, C]`` indicators): the fraction of (sample, label) entries that
    ``proba >= 0.5`` gets right.
    """
    p, y = np.asarray(proba), np.asarray(labels)
    if y.size == 0:
        return math.nan
    if y.ndim == 2:
        return float(((p >= 0.5) == (y > 0.5)).mean())
    return float((p.argmax(axis=1) == y).mean())


def macro_auroc(proba: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """Macro one-vs-rest AUROC: the mean over classes of ``roc_auc_score(y == c, proba[:, c])``.

    Classes absent from ``labels`` (no positive) are left out of the mean, so a small split
    still gets a score; NaN when fewer than two classes occur. Multilabel (``labels [N, C]``):
    the mean over labels of each label's AUROC, over the labels that take both values.
    """
    from sklearn.metrics import roc_auc_score  # deferred: sklearn is slow to import

    p, y = np.asarray(proba, dtype=np.float64), np.asarray(labels)
    if y.ndim == 2:
        both = [c for c in range(y.shape[1]) if np.unique(y[:, c] > 0.5).size == 2]
        if not both:
            return math.nan
        return float(np.mean([roc_auc_score(y[:, c] > 0.5, p[:, c]) for c in both]))
    classes = np.unique(y)
    if classes.size < 2:
        return math.nan
    return float(np.mean([roc_auc_score(y == c, p[:, c]) for c in classes]))


METRICS = "metrics.json"
CURVE = "training_curve.png"


def write_metrics(
    out_dir: str | Path, result: dict[str, Any], config: dict[str, Any], history: list[dict]
) -> Path:
    """Write ``out_dir/metrics.json`` (the result, the config, the per-epoch history) and the
    training curve; returns the metrics file."""
    from omnifuse_fast.train.plot import save_training_curve

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / METRICS
    path.write_text(json.dumps({**result, "config": config, "history": history}, indent=2) + "\n")
    if history:
        save_training_curve(history, out_dir / CURVE, title=config.get("method", ""))
    return path


def add_to_metrics(out_dir: str | Path, info: dict[str, Any]) -> None:
    """Merge ``info`` into ``out_dir/metrics.json`` (nothing when there is none)."""
    path = Path(out_dir) / METRICS
    if path.is_file():
        path.write_text(json.dumps({**json.loads(path.read_text()), **info}, indent=2) + "\n")
