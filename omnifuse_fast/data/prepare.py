"""The built-in data made ready to train on: split, standardized, corrupted, as tensors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from omnifuse_fast.data.corruption import add_noise, check_rate, missing_mask
from omnifuse_fast.data.mfeat import load_mfeat, resolve_views
from omnifuse_fast.data.split import standardize, stratified_split

SPLITS = ("train", "val", "test")


@dataclass
class MultiViewSplit:
    """One split of a multi-view data set, as tensors.

    Attributes:
        views: one float32 tensor ``[N, D_m]`` per view; entries of missing views are 0.
        labels: int64 ``[N]``.
        observed: bool ``[N, M]``, True where the view is real data (every row has one).
        indices: int64 ``[N]``, the rows of the full data set this split holds.
        view_names: name of each view.
        view_dims: ``D_m`` of each view.
        num_classes: number of classes.
    """

    views: list[torch.Tensor]
    labels: torch.Tensor
    observed: torch.Tensor
    indices: torch.Tensor
    view_names: list[str]
    view_dims: list[int]
    num_classes: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_views(self) -> int:
        """M, the number of views."""
        return len(self.views)

    def subset(self, idx: torch.Tensor | np.ndarray | Sequence[int]) -> MultiViewSplit:
        """The rows ``idx`` (positions in this split) as a new split, e.g. a mini-batch."""
        idx = torch.as_tensor(idx, dtype=torch.int64)
        return MultiViewSplit(
            views=[v[idx] for v in self.views],
            labels=self.labels[idx],
            observed=self.observed[idx],
            indices=self.indices[idx],
            view_names=list(self.view_names),
            view_dims=list(self.view_dims),
            num_classes=self.num_classes,
        )


def prepare_mfeat(
    missing_rate: float = 0.5,
    noise_views: Sequence[str | int] = (),
    noise_std: float = 0.0,
    seed: int = 0,
    views: Sequence[str | int] | None = None,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    noise_splits: Sequence[str] = SPLITS,
) -> dict[str, MultiViewSplit]:
    """Load the UCI multiple-features data and make it low-quality, reproducibly.

    Steps, in this order (everything random is drawn from ``seed``):
      1. select ``views`` (names or indices into ``fou fac kar pix zer mor``; None: all six);
      2. stratified split by ``fractions`` (train, val, test);
      3. a missing mask for all 2000 samples (:func:`missing_mask` with ``missing_rate``:
         every sample keeps at least one view);
      4. z-score each feature with the statistics of the OBSERVED training rows;
      5. Gaussian noise on ``noise_views`` in the rows of ``noise_splits``. Noise comes AFTER
         standardization, so ``noise_std`` is in units of each feature's training standard
         deviation (the raw views' scales differ by four orders of magnitude; std 1 means noise
         as large as the signal's spread, whatever the view). The noise is drawn for all rows,
         so ``noise_splits`` does not change which noise a row gets;
      6. zero-fill the missing entries (0 is the training mean after step 4); ``observed``
         says which entries are real.

    Args:
        missing_rate: probability in [0, 1) that a view of a sample is missing.
        noise_views: views to corrupt, names or positions among the SELECTED views.
        noise_std: noise standard deviation (>= 0), in standardized units.
        seed: seed of the split, the mask and the noise.
        views: subset of views to keep, in the order given; None keeps all six.
        fractions: (train, val, test) fractions, each > 0, summing to 1.
        noise_splits: which of "train", "val", "test" get the noise.

    Returns:
        ``{"train": MultiViewSplit, "val": ..., "test": ...}``; each split also carries
        ``view_names``, ``view_dims`` and ``num_classes``.
    """
    check_rate(missing_rate, "missing_rate")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if isinstance(noise_splits, str):
        noise_splits = (noise_splits,)
    for s in noise_splits:
        if s not in SPLITS:
            raise ValueError(f"noise_splits: unknown split {s!r}; expected some of {SPLITS}")
    data = load_mfeat()
    if views is not None:
        data = data.select_views(resolve_views(views, data.view_names, arg="views"))
    noisy = resolve_views(noise_views, data.view_names, arg="noise_views") if noise_views else []
    num_views = len(data.views)

    # Independent streams, so that e.g. changing noise_std leaves the mask unchanged.
    mask_rng, noise_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    train, val, test = stratified_split(data.labels, fractions, seed=seed)
    missing = missing_mask(data.num_samples, num_views, missing_rate, mask_rng)
    observed = ~missing
    x = standardize(data.views, train, observed=observed)
    noisy_x = add_noise(x, noisy, noise_std, noise_rng)
    rows = {"train": train, "val": val, "test": test}
    in_noise = np.zeros(data.num_samples, dtype=bool)
    for s in noise_splits:
        in_noise[rows[s]] = True
    for m in noisy:
        x[m] = np.where(in_noise[:, None], noisy_x[m], x[m])
    for m in range(num_views):
        x[m][missing[:, m]] = 0.0

    return make_splits(x, data.labels, observed, rows, data.view_names, data.num_classes)


def make_splits(
    views: Sequence[np.ndarray],
    labels: np.ndarray,
    observed: np.ndarray,
    rows: Mapping[str, np.ndarray],
    view_names: Sequence[str],
    num_classes: int,
) -> dict[str, MultiViewSplit]:
    """``{name: MultiViewSplit}`` of the rows ``rows[name]`` of full-data arrays.

    Args:
        views: one float32 array ``[N, D_m]`` per view (missing entries already filled).
        labels: ``[N]`` class indices or ``[N, C]`` multilabel indicators.
        observed: bool ``[N, M]``.
        rows: each split's int row indices.
        view_names, num_classes: carried by every split.
    """

    def split(idx: np.ndarray) -> MultiViewSplit:
        return MultiViewSplit(
            views=[torch.from_numpy(v[idx]) for v in views],  # fancy indexing: new arrays
            labels=torch.from_numpy(labels[idx]),
            observed=torch.from_numpy(observed[idx]),
            indices=torch.from_numpy(np.asarray(idx, dtype=np.int64)),
            view_names=list(view_names),
            view_dims=[int(v.shape[1]) for v in views],
            num_classes=num_classes,
        )

    return {name: split(idx) for name, idx in rows.items()}
