"""Low-quality data: random missing views, Gaussian noise, and per-sample corruption.

:func:`missing_mask` and :func:`add_noise` build the built-in data's uniform low quality;
:class:`Corruption` + :func:`corrupt` add heterogeneous, per-sample low quality (``swap``,
``heavy-noise``) to any split. Everything draws from a ``numpy.random.Generator`` (or an int
seed for one), so a seed fixes the corruption exactly. See docs/CORRUPTION.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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


# ---------------------------------------------------------------------- per-sample low quality
CORRUPTIONS = ("none", "noise", "swap", "heavy-noise")
DEFAULT_STD = {"noise": 1.0, "heavy-noise": 5.0}


@dataclass(frozen=True)
class Corruption:
    """Which low quality to inflict on standardized views (see docs/CORRUPTION.md).

    Kinds:
      - ``"none"``: the data as they are.
      - ``"noise"``: uniform noise, the corruption the first results used: Gaussian noise of
        standard deviation ``std`` (default 1) on every observed entry of the views ``views``
        (all views when empty), for every sample alike.
      - ``"swap"``: per sample, ``k`` of its observed views, chosen at random, are replaced by
        the same view of a random sample of ANOTHER class from the same split (misaligned,
        contradictory evidence: the view looks clean but points to a wrong class).
      - ``"heavy-noise"``: per sample, ``k`` of its observed views, chosen at random, are
        drowned in Gaussian noise of standard deviation ``std`` (default 5, i.e. 25 times the
        variance of a standardized feature).

    For ``swap`` and ``heavy-noise`` a sample with fewer than ``k`` observed views has all of
    them corrupted. Missing views stay missing.

    Attributes:
        kind: one of :data:`CORRUPTIONS`.
        k: views corrupted per sample (``swap``, ``heavy-noise``), >= 1.
        std: noise standard deviation in standardized units (None: the kind's default).
        views: ``noise`` only: the views to corrupt, by name (empty: all).
    """

    kind: str = "none"
    k: int = 1
    std: float | None = None
    views: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in CORRUPTIONS:
            raise ValueError(f"corruption must be one of {CORRUPTIONS}, got {self.kind!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)) or self.k < 1:
            raise ValueError(f"corrupt_views (k) must be an int >= 1, got {self.k!r}")
        if self.std is not None:
            ok = isinstance(self.std, (int, float, np.integer, np.floating))
            if isinstance(self.std, bool) or not ok or not math.isfinite(self.std) or self.std < 0:
                raise ValueError(f"corrupt_std must be a finite number >= 0, got {self.std!r}")
        object.__setattr__(self, "views", tuple(str(v) for v in self.views))

    @property
    def noise_std(self) -> float:
        """``std``, or the kind's default (0 for kinds without noise)."""
        return float(self.std) if self.std is not None else DEFAULT_STD.get(self.kind, 0.0)

    def to_dict(self) -> dict:
        """Plain types, for JSON."""
        return {
            "kind": self.kind,
            "k": int(self.k),
            "std": self.noise_std,
            "views": list(self.views),
        }


def pick_views(observed: np.ndarray, k: int, rng: np.random.Generator | int | None) -> np.ndarray:
    """Per sample, ``min(k, observed views)`` of its observed views chosen uniformly at random.

    Returns:
        bool ``[N, M]``, True at the chosen (sample, view) entries (always within ``observed``).
    """
    observed = np.asarray(observed, dtype=bool)
    if observed.ndim != 2:
        raise ValueError(f"observed must be bool [N, M], got shape {observed.shape}")
    gen = as_generator(rng)
    score = np.where(observed, gen.random(observed.shape), -1.0)
    rank = np.argsort(np.argsort(-score, axis=1, kind="stable"), axis=1, kind="stable")
    return observed & (rank < k)


def _class_ids(labels: np.ndarray) -> np.ndarray:
    """One id per distinct label (a row of a multilabel matrix is one label)."""
    labels = np.asarray(labels)
    if labels.ndim == 1:
        return np.unique(labels, return_inverse=True)[1].reshape(-1)
    return np.unique(labels.reshape(labels.shape[0], -1), axis=0, return_inverse=True)[1].reshape(
        -1
    )


def corrupt(
    views: Sequence[np.ndarray],
    labels: np.ndarray,
    observed: np.ndarray,
    corruption: Corruption,
    rng: np.random.Generator | int | None,
    view_names: Sequence[str] | None = None,
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Apply ``corruption`` to one split (donors of ``swap`` come from the same split).

    Args:
        views: one array ``[N, D_m]`` per view (standardized; missing rows are ignored).
        labels: ``[N]`` classes (or ``[N, C]`` multilabel rows: another label row is another
            class).
        observed: bool ``[N, M]``.
        corruption: what to do.
        rng: numpy Generator or int seed: the same seed gives the same corruption.
        view_names: names of the views (``noise`` with named ``views``).

    Returns:
        ``(new views, corrupted [N, M] bool, donors [N, M] int64)``: which entries were
        changed, and for ``swap`` the row each swapped entry came from (-1 elsewhere). A swap
        entry with no candidate donor (no observed row of another class) is left unchanged
        and not marked.
    """
    observed = np.asarray(observed, dtype=bool)
    n, m = observed.shape
    if len(views) != m:
        raise ValueError(f"views: {len(views)} arrays for an observed mask of {m} views")
    gen = as_generator(rng)
    out = [np.array(v, copy=True) for v in views]
    donors = np.full((n, m), -1, dtype=np.int64)
    kind = corruption.kind
    if kind == "none" or n == 0:
        return out, np.zeros((n, m), dtype=bool), donors
    if kind == "noise":
        names = list(view_names) if view_names is not None else [str(i) for i in range(m)]
        unknown = [v for v in corruption.views if v not in names]
        if unknown:
            raise ValueError(f"corruption views: unknown view {unknown[0]!r}; the data has {names}")
        chosen = np.zeros((n, m), dtype=bool)
        for j in range(m):
            if not corruption.views or names[j] in corruption.views:
                chosen[:, j] = observed[:, j]
    else:
        chosen = pick_views(observed, corruption.k, gen)
    if kind in ("noise", "heavy-noise"):
        std = corruption.noise_std
        for j in range(m):  # drawn for every row of a view: a row's noise ignores the others
            noise = gen.normal(0.0, std, size=out[j].shape).astype(out[j].dtype, copy=False)
            out[j] = np.where(chosen[:, j : j + 1], out[j] + noise, out[j])
        return out, chosen, donors
    cls = _class_ids(labels)
    if cls.shape[0] != n:
        raise ValueError(f"labels has {cls.shape[0]} rows but the views have {n}")
    marked = np.zeros((n, m), dtype=bool)
    for j in range(m):
        for c in np.unique(cls[chosen[:, j]]):
            rows = np.flatnonzero(chosen[:, j] & (cls == c))
            pool = np.flatnonzero(observed[:, j] & (cls != c))
            if pool.size == 0:
                continue
            picked = pool[gen.integers(0, pool.size, size=rows.size)]
            donors[rows, j] = picked
            marked[rows, j] = True
        rows = np.flatnonzero(marked[:, j])
        out[j][rows] = np.asarray(views[j])[donors[rows, j]]  # from the clean views
    return out, marked, donors


SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}


def corrupt_splits(splits: dict, corruption: Corruption, seed: int) -> tuple[dict, dict]:
    """Apply ``corruption`` to each split of ``{"train", "val", "test"}`` alike.

    The splits are ``MultiViewSplit``-like (``views`` float tensors, ``labels``, ``observed``,
    ``view_names``); they are not modified: the result holds shallow copies with new view
    tensors. Each split draws from its own stream of ``seed`` (so the train corruption does
    not depend on the size of the test split), and ``swap`` takes donors from the same split
    only (no row of one split leaks into another).

    Returns:
        ``(new splits, info)``; ``info[split]`` holds ``corrupted`` (bool ``[N, M]`` numpy) and
        ``donors`` (int64 ``[N, M]``, -1 where nothing was swapped).
    """
    import copy

    import torch

    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    out, info = {}, {}
    for name, split in splits.items():
        stream = SPLIT_STREAMS.get(name, len(SPLIT_STREAMS))
        rng = np.random.default_rng([int(seed), stream, 0xC0FFEE])
        views = [v.detach().cpu().numpy() for v in split.views]
        new, chosen, donors = corrupt(
            views,
            split.labels.cpu().numpy(),
            split.observed.cpu().numpy(),
            corruption,
            rng,
            getattr(split, "view_names", None),
        )
        s = copy.copy(split)
        s.views = [torch.from_numpy(np.ascontiguousarray(v)) for v in new]
        out[name], info[name] = s, {"corrupted": chosen, "donors": donors}
    return out, info


def corrupt_for_config(splits: dict, config) -> dict:
    """``splits`` with a TrainConfig's corruption (``corruption``, ``corrupt_views``,
    ``corrupt_std``) applied, seeded by ``config.seed``; unchanged for ``"none"``.

    The hook of ``omnifuse-fast train --corruption`` (built-in data and ``--data``).
    """
    kind = getattr(config, "corruption", "none")
    if kind == "none":
        return splits
    corruption = Corruption(kind, config.corrupt_views, config.corrupt_std)
    return corrupt_splits(splits, corruption, config.seed)[0]
