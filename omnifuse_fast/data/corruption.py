"""Low-quality data: random missing views and Gaussian noise on chosen views.

Both draw from a ``numpy.random.Generator`` (or an int seed for one), so a seed fixes the
corruption exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def as_generator(rng: np.random.Generator | int | None) -> np.random.Generator:
    """``rng`` itself, or a new Generator seeded with it (an int or None)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or (isinstance(rng, (int, np.integer)) and not isinstance(rng, bool)):
        return np.random.default_rng(rng)
    raise TypeError(f"rng must be a numpy.random.Generator or an int seed, got {type(rng)}")


def missing_mask(
    n: int, num_views: int, rate: float, rng: np.random.Generator | int | None
) -> np.ndarray:
    """Draw which views of which samples are missing.

    Each of the ``n * num_views`` entries is missing independently with probability
    ``rate``; then every sample left with no view gets one view back, chosen uniformly, so that
    each sample keeps at least one view. The realized missing rate is therefore
    ``rate - rate**num_views / num_views`` in expectation (0.4974 for rate 0.5 over 6 views).

    Args:
        n: number of samples (>= 1).
        num_views: number of views M (>= 1).
        rate: probability in ``[0, 1)`` that a view is missing.
        rng: numpy Generator (or int seed).

    Returns:
        bool ``[n, num_views]``, True where the view is MISSING (the observed mask is ``~mask``).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if isinstance(num_views, bool) or not isinstance(num_views, (int, np.integer)) or num_views < 1:
        raise ValueError(f"num_views must be an int >= 1, got {num_views!r}")
    check_rate(rate, "rate")
    gen = as_generator(rng)
    mask = gen.random((n, num_views)) < rate
    empty = np.flatnonzero(mask.all(axis=1))
    if empty.size:
        mask[empty, gen.integers(0, num_views, size=empty.size)] = False
    return mask


def check_rate(rate: float, arg: str) -> None:
    """ValueError naming ``arg`` unless ``rate`` is a real number in [0, 1)."""
    ok = isinstance(rate, (int, float, np.integer, np.floating)) and not isinstance(rate, bool)
    if not ok or not math.isfinite(rate) or not 0.0 <= rate < 1.0:
        raise ValueError(f"{arg} must be a number in [0, 1), got {rate!r}")


def add_noise(
    views: Sequence[np.ndarray],
    view_indices: Sequence[int],
    std: float,
    rng: np.random.Generator | int | None,
) -> list[np.ndarray]:
    """Add zero-mean Gaussian noise of standard deviation ``std`` to the chosen views.

    Args:
        views: one array ``[N, D_m]`` per view.
        view_indices: positions in ``views`` to corrupt (each at most once).
        std: noise standard deviation (>= 0), in the units of the arrays.
        rng: numpy Generator (or int seed). Noise is drawn view by view in increasing index
            order, so the noise of a view does not depend on the order of ``view_indices``.

    Returns:
        A new list of new arrays (inputs untouched); each keeps its input's dtype.
    """
    if isinstance(std, bool) or not isinstance(std, (int, float, np.integer, np.floating)):
        raise ValueError(f"std must be a number >= 0, got {std!r}")
    if not math.isfinite(std) or std < 0:
        raise ValueError(f"std must be a finite number >= 0, got {std!r}")
    chosen = set()
    for i in view_indices:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise ValueError(f"view_indices must hold ints, got {i!r}")
        if not 0 <= i < len(views):
            raise ValueError(f"view_indices: {i} out of range [0, {len(views)})")
        if i in chosen:
            raise ValueError(f"view_indices: view {i} given twice")
        chosen.add(int(i))
    gen = as_generator(rng)
    out = []
    for i, v in enumerate(views):
        v = np.asarray(v)
        if i in chosen and std > 0:
            out.append((v + gen.normal(0.0, std, size=v.shape)).astype(v.dtype, copy=False))
        else:
            out.append(v.copy())
    return out
