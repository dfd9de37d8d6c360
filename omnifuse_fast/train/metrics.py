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

    Raises:
        ValueError: ``proba`` holds NaN or infinite values.
    """
    p, y = np.asarray(proba, dtype=np.float64), np.asarray(labels)
    if not np.isfinite(p).all():
        raise ValueError("proba: expected finite probabilities, got NaN or infinite values")
    if y.ndim == 2:
        positive = y > 0.5
        both = positive.any(axis=0) & ~positive.all(axis=0)
        if not both.any():
            return math.nan
        return float(column_auroc(positive[:, both], p[:, both]).mean())
    classes = np.unique(y)
    if classes.size < 2:
        return math.nan
    return float(column_auroc(y[:, None] == classes[None, :], p[:, classes]).mean())


def column_auroc(positive: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Each column's ROC AUC, as ``sklearn.metrics.roc_auc_score`` gives it, in one pass.

    The area under the ROC curve is the Mann-Whitney statistic: the sum of the positives'
    ranks (ties share their mean rank, the curve's diagonal steps) less its minimum, over
    ``n_pos * n_neg``. One ``rankdata`` over all columns takes 0.1 ms where ten
    ``roc_auc_score`` calls take 25 ms, paid by every epoch's validation.

    Args:
        positive: ``[N, K]`` bool, each column with at least one positive and one negative.
        scores: ``[N, K]`` float.
    """
    from scipy.stats import rankdata  # deferred: scipy is slow to import

    ranks = rankdata(scores, axis=0)
    n_pos = positive.sum(axis=0).astype(np.float64)
    n_neg = positive.shape[0] - n_pos
    u = (ranks * positive).sum(axis=0) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


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
