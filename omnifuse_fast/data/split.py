"""Train/validation/test splits (stratified by class) and z-scoring with training statistics.

One implementation serves the built-in data (:func:`omnifuse_fast.data.prepare_mfeat`) and
users' data (:class:`omnifuse_fast.OmniFuseClassifier`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def stratified_split(
    labels: np.ndarray, fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split sample indices into train/val/test with the class proportions kept in each.

    Sizes are ``round(N * f_val)`` for val, ``round(N * f_test)`` for test and the rest for
    train (:func:`split_rows`).

    Args:
        labels: int ``[N]`` class labels.
        fractions: (train, val, test), each > 0, summing to 1.
        seed: seed of the shuffle.

    Returns:
        ``(train_idx, val_idx, test_idx)``: sorted, disjoint int64 index arrays covering
        ``range(N)``.
    """
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
    return split_rows(labels, fr[1], fr[2], seed)


def split_rows(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train / validation / test rows: ``round(f * N)`` rows held out for each fraction ``f``
    (at least one when ``f > 0``, none when 0), the test rows first, then the validation rows
    from the rest, each with ``sklearn``'s ``train_test_split``.

    Args:
        labels: ``[N]`` class labels of any type (stratified when every class has two rows and
            the held-out and remaining sets can hold every class), or a ``[N, C]`` multilabel
            matrix (not stratified).
        val_fraction, test_fraction: in ``[0, 1)``.
        seed: seed of the shuffles.

    Returns:
        ``(train, val, test)``: sorted, disjoint int64 index arrays covering ``range(N)``.

    Raises:
        ValueError: the fractions leave no training row.
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    rest = np.arange(n, dtype=np.int64)
    rest, test = _hold_out(rest, labels, test_fraction, n, seed)
    train, val = _hold_out(rest, labels, val_fraction, n, seed)
    return np.sort(train), np.sort(val), np.sort(test)


def _hold_out(
    rows: np.ndarray, labels: np.ndarray, fraction: float, n: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(kept, held)``: ``round(fraction * n)`` of ``rows`` held out (in sklearn's order)."""
    from sklearn.model_selection import train_test_split  # deferred: sklearn is slow to import

    k = 0 if fraction == 0 else max(1, round(fraction * n))
    if k == 0:
        return rows, np.zeros(0, dtype=np.int64)
    if k >= rows.size:
        raise ValueError(f"held-out fractions leave no training rows of {n}")
    strat = None
    if labels.ndim == 1:
        _, counts = np.unique(labels[rows], return_counts=True)
        if counts.min() >= 2 and counts.size <= k and counts.size <= rows.size - k:
            strat = labels[rows]
    return train_test_split(rows, test_size=k, random_state=seed, stratify=strat)


def fit_scaler(
    views: Sequence[np.ndarray], train_idx: np.ndarray, observed: np.ndarray | None = None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-feature float64 mean and standard deviation of the training rows, per view.

    A feature that is constant on the training rows gets standard deviation 1 (it is only
    centered), so nothing divides by zero. With ``observed`` (bool ``[N, M]``), view m's
    statistics use only the training rows where it is observed (a missing view's values are
    not data); a view with no such row gets mean 0, std 1.
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
    means, stds = [], []
    for m, v in enumerate(views):
        v = np.asarray(v, dtype=np.float64)
        rows = train_idx if observed is None else train_idx[observed[train_idx, m]]
        if rows.size == 0:
            mean, std = np.zeros(v.shape[1]), np.ones(v.shape[1])
        else:
            mean, std = v[rows].mean(axis=0), v[rows].std(axis=0)
            std[std < 1e-12 * np.maximum(1.0, np.abs(mean))] = 1.0
        means.append(mean)
        stds.append(std)
    return means, stds


def scale(
    views: Sequence[np.ndarray], means: Sequence[np.ndarray], stds: Sequence[np.ndarray]
) -> list[np.ndarray]:
    """``(v - mean) / std`` per view, computed in float64, as new float32 arrays."""
    return [
        ((np.asarray(v, dtype=np.float64) - mean) / std).astype(np.float32)
        for v, mean, std in zip(views, means, stds)
    ]


def standardize(
    views: Sequence[np.ndarray],
    train_idx: np.ndarray,
    observed: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Z-score every feature with the statistics of the training rows (:func:`fit_scaler`).

    Args:
        views: one array ``[N, D_m]`` per view.
        train_idx: int indices of the training rows.
        observed: optional bool ``[N, M]``: view m's statistics use only the training rows
            where it is observed.

    Returns:
        New float32 arrays, one per view.
    """
    return scale(views, *fit_scaler(views, train_idx, observed))
