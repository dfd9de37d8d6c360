"""Classification metrics: accuracy and macro one-vs-rest AUROC."""

from __future__ import annotations

import math

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
