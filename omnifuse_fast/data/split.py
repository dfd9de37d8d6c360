"""Stratified train/val/test split and z-scoring with training-split statistics."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def stratified_split(
    labels: np.ndarray, fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split sample indices into train/val/test with the class proportions kept in each.

    Sizes are ``round(N * f_val)`` for val, ``round(N * f_test)`` for test and the rest for
    train. Uses ``sklearn.model_selection.train_test_split`` with ``stratify`` twice.

    Args:
        labels: int ``[N]`` class labels.
        fractions: (train, val, test), each > 0, summing to 1.
        seed: seed of the shuffle.

    Returns:
        ``(train_idx, val_idx, test_idx)``: sorted, disjoint int64 index arrays covering
        ``range(N)``.
    """
    from sklearn.model_selection import train_test_split  # deferred: sklearn is slow to import

    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    fr = tuple(fractions)
    if len(fr) != 3 or not all(
        isinstance(f, (int, float, np.integer, np.floating)) and not isinstance(f, bool) for f in fr
    ):
        raise ValueError(f"fractions must be three numbers (train, val, test), got {fractions!r}")
    if not all(math.isfinite(f) and f > 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be > 0 and sum to 1, got {fractions!r}")
    n = labels.size
    n_val, n_test = round(n * fr[1]), round(n * fr[2])
    if min(n_val, n_test, n - n_val - n_test) < 1:
        raise ValueError(f"fractions {fractions!r} leave an empty split of {n} samples")
    idx = np.arange(n, dtype=np.int64)
    rest, test = train_test_split(idx, test_size=n_test, random_state=seed, stratify=labels)
    train, val = train_test_split(rest, test_size=n_val, random_state=seed, stratify=labels[rest])
    return np.sort(train), np.sort(val), np.sort(test)


def standardize(
    views: Sequence[np.ndarray],
    train_idx: np.ndarray,
    observed: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Z-score every feature with the mean and standard deviation of the training rows.

    Statistics are computed in float64. A feature that is constant on the training rows gets
    standard deviation 1 (it is only centered), so nothing divides by zero.

    Args:
        views: one array ``[N, D_m]`` per view.
        train_idx: int indices of the training rows.
        observed: optional bool ``[N, M]``; if given, view m's statistics use only the training
            rows where it is observed (a missing view's values are not data). A view with no
            observed training row is left unscaled (mean 0, std 1).

    Returns:
        New float32 arrays, one per view.
    """
    train_idx = np.asarray(train_idx)
    if train_idx.ndim != 1 or train_idx.size == 0 or not np.issubdtype(train_idx.dtype, np.integer):
        raise ValueError(f"train_idx must be a non-empty 1-D int array, got {train_idx!r}")
    n = views[0].shape[0] if len(views) else 0
    if train_idx.min() < 0 or train_idx.max() >= n:
        raise ValueError(f"train_idx holds indices outside [0, {n})")
    if observed is not None:
        observed = np.asarray(observed, dtype=bool)
        if observed.shape != (n, len(views)):
            raise ValueError(f"observed must have shape {(n, len(views))}, got {observed.shape}")
    out = []
    for m, v in enumerate(views):
        v = np.asarray(v, dtype=np.float64)
        rows = train_idx if observed is None else train_idx[observed[train_idx, m]]
        if rows.size == 0:
            mean, std = np.zeros(v.shape[1]), np.ones(v.shape[1])
        else:
            mean, std = v[rows].mean(axis=0), v[rows].std(axis=0)
            std[std < 1e-12 * np.maximum(1.0, np.abs(mean))] = 1.0
        out.append(((v - mean) / std).astype(np.float32))
    return out
