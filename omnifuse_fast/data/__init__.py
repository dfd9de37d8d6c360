"""Built-in multi-view data (UCI multiple features) and low-quality corruption.

``prepare_mfeat`` is the one-call path to train on; the pieces (loading, missing masks, noise,
stratified split, standardization) are exported for custom pipelines.
"""

from omnifuse_fast.data.corruption import (
    CORRUPTIONS,
    Corruption,
    add_noise,
    corrupt,
    corrupt_splits,
    missing_mask,
)
from omnifuse_fast.data.mfeat import (
    NUM_CLASSES,
    VIEW_DIMS,
    VIEW_NAMES,
    MultiViewDataset,
    load_mfeat,
)
from omnifuse_fast.data.prepare import MultiViewSplit, prepare_mfeat
from omnifuse_fast.data.split import (
    fit_scaler,
    scale,
    split_rows,
    standardize,
    stratified_split,
)

__all__ = [
    "CORRUPTIONS",
    "Corruption",
    "corrupt",
    "corrupt_splits",
    "NUM_CLASSES",
    "VIEW_DIMS",
    "VIEW_NAMES",
    "MultiViewDataset",
    "MultiViewSplit",
    "add_noise",
    "fit_scaler",
    "load_mfeat",
    "missing_mask",
    "prepare_mfeat",
    "scale",
    "split_rows",
    "standardize",
    "stratified_split",
]
