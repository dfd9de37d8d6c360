"""The UCI multiple-features data set (handwritten digits, six real feature views), built in.

2000 samples, 10 classes (digits 0-9, 200 each), six views: ``fou`` (76 Fourier
coefficients), ``fac`` (216 profile correlations), ``kar`` (64 Karhunen-Loeve coefficients),
``pix`` (240 pixel averages), ``zer`` (47 Zernike moments), ``mor`` (6 morphological
features). Stored as ``mfeat.npz`` next to this file (built by ``scripts/make_mfeat.py``);
citation and license (CC BY 4.0) in ``MFEAT_LICENSE.txt``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

import numpy as np

VIEW_NAMES: tuple[str, ...] = ("fou", "fac", "kar", "pix", "zer", "mor")
VIEW_DIMS: tuple[int, ...] = (76, 216, 64, 240, 47, 6)
NUM_CLASSES = 10


@dataclass
class MultiViewDataset:
    """A multi-view classification data set held in memory.

    Attributes:
        views: one float32 array ``[N, D_m]`` per view, rows aligned across views.
        labels: int64 ``[N]`` in ``[0, num_classes)``.
        view_names: one name per view, in the order of ``views``.
        num_classes: number of classes.
    """

    views: list[np.ndarray]
    labels: np.ndarray
    view_names: list[str]
    num_classes: int

    @property
    def num_samples(self) -> int:
        """N, the number of samples."""
        return int(self.labels.shape[0])

    @property
    def view_dims(self) -> list[int]:
        """Feature count ``D_m`` of each view."""
        return [int(v.shape[1]) for v in self.views]

    def select_views(self, views: Sequence[str | int]) -> MultiViewDataset:
        """A data set with only ``views`` (names or indices), in the order given."""
        idx = resolve_views(views, self.view_names, arg="views")
        return MultiViewDataset(
            views=[self.views[i] for i in idx],
            labels=self.labels,
            view_names=[self.view_names[i] for i in idx],
            num_classes=self.num_classes,
        )


def resolve_views(views: Sequence[str | int], names: Sequence[str], arg: str) -> list[int]:
    """Positions in ``names`` of ``views`` (names or integer indices); ValueError naming ``arg``.

    A single string is taken as one view. Duplicates and an empty selection are errors.
    """
    if isinstance(views, (str, int, np.integer)):
        views = [views]
    out: list[int] = []
    for v in views:
        if isinstance(v, str):
            if v not in names:
                raise ValueError(f"{arg}: unknown view name {v!r}; expected one of {list(names)}")
            i = list(names).index(v)
        elif isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            if not 0 <= v < len(names):
                raise ValueError(
                    f"{arg}: view index {v} out of range [0, {len(names)}) for views {list(names)}"
                )
            i = int(v)
        else:
            raise ValueError(f"{arg}: views are names or int indices, got {v!r}")
        if i in out:
            raise ValueError(f"{arg}: view {names[i]!r} selected twice")
        out.append(i)
    if not out:
        raise ValueError(f"{arg}: select at least one view")
    return out


def load_mfeat() -> MultiViewDataset:
    """Load the built-in UCI multiple-features data (fresh arrays on every call).

    Returns:
        A :class:`MultiViewDataset` with the six views in the order of :data:`VIEW_NAMES`
        (float32), labels int64 ``[2000]`` in the original UCI order (200 rows per digit,
        0 first), and ``num_classes = 10``.
    """
    ref = resources.files(__package__) / "mfeat.npz"
    with ref.open("rb") as f, np.load(f, allow_pickle=False) as npz:
        names = [str(n) for n in npz["view_names"]]
        views = [np.ascontiguousarray(npz[n], dtype=np.float32) for n in names]
        labels = npz["labels"].astype(np.int64, copy=False)
    return MultiViewDataset(views=views, labels=labels, view_names=names, num_classes=NUM_CLASSES)
