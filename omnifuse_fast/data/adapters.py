"""Users' multimodal files as views: ``.npz`` arrays and CSV / Parquet tables.

* ``.npz``: one array ``view_<name>`` per modality (``[N, D]`` numbers, or ``[N]`` strings for
  a text modality), labels ``y`` (``[N]`` any values, or ``[N, C]`` 0/1 for multilabel) and an
  optional ``present`` bool ``[N, M]`` (columns in the file's view order).
* CSV / Parquet: one column group per modality, by prefix ``<view>__<column>`` or an explicit
  ``columns={view: [column, ...]}``; the label column is ``label=`` (default ``y`` or
  ``label``; several columns make a multilabel target). A group of a single string column is a
  text modality, embedded by :func:`omnifuse_fast.data.text.embed_texts`.

A modality is missing in a row when ``present`` says so or when all of its values in that row
are empty (NaN; None or blank for text). :class:`omnifuse_fast.OmniFuseClassifier` checks the
rest (row counts, NaNs inside a present row, ...).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from omnifuse_fast.data.text import embed_texts

SEP = "__"  # "<view>__<column>"
DEFAULT_LABELS = ("y", "label")
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq")


@dataclass
class TableData:
    """A user's data set read from a file.

    Attributes:
        views: ``{name: float array [N, D]}`` in modality order; NaN rows where missing.
        y: labels ``[N]`` or ``[N, C]`` (a DataFrame for multilabel tables: its columns name
            the labels), or None when the file has none and none was required.
        present: bool ``[N, M]`` from the file, or None (missing rows are all-NaN then).
        spec: plain types describing the layout (how to read new data the same way).
    """

    views: dict[str, np.ndarray]
    y: Any
    present: np.ndarray | None
    spec: dict[str, Any] = field(default_factory=dict)


def load_data(
    path: str | os.PathLike,
    views: Sequence[str] | None = None,
    label: str | Sequence[str] | None = None,
    columns: Mapping[str, str | Sequence[str]] | None = None,
    text_encoder: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    require_label: bool = True,
) -> TableData:
    """Read ``path`` (``.npz``, ``.csv``, ``.tsv``, ``.parquet``) into views and labels.

    Args:
        path: the file.
        views: modality names to keep, in this order (None: all, in file order).
        label: label column (table) or array key (npz); a list of columns is multilabel.
            None: ``y`` or ``label``, whichever exists.
        columns: tables only: ``{view: columns}`` instead of the ``<view>__<col>`` prefixes.
        text_encoder: local transformers model directory for text modalities.
        cache_dir: where text embeddings are cached.
        require_label: raise when there is no label (False for prediction).

    Raises:
        ValueError: one line naming the file, view or column at fault.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        if columns is not None:
            raise ValueError("columns= applies to CSV / Parquet tables, not .npz files")
        data = _load_npz(path, label, require_label)
    elif suffix in TABLE_SUFFIXES:
        data = _load_table(path, label, columns, require_label)
    else:
        raise ValueError(
            f"data file {str(path)!r}: unknown format {suffix!r}; expected .npz, .csv, .tsv, "
            ".parquet"
        )
    data = _select(data, views)
    text = data.spec.get("text", {})
    for name in text:
        data.views[name] = embed_texts(
            list(data.views[name]), text_encoder, cache_dir, column=text[name]
        )
    data.spec["text_encoder"] = None if text_encoder is None else str(text_encoder)
    return data


# ----------------------------------------------------------------- npz
def _load_npz(path: Path, label: str | Sequence[str] | None, require: bool) -> TableData:
    if label is not None and not isinstance(label, str):
        raise ValueError("label: a .npz file holds its labels in one array; name its key")
    with np.load(path, allow_pickle=False) as npz:
        keys = list(npz.keys())
        names = [k[len("view_") :] for k in keys if k.startswith("view_")]
        if not names:
            raise ValueError(f"{path}: no view_<name> arrays (found {keys})")
        views, text = {}, {}
        for name in names:
            arr = npz[f"view_{name}"]
            if arr.dtype.kind in "US":  # strings: a text modality
                if arr.ndim != 1:
                    raise ValueError(f"{path}: text view {name!r} must be 1-D, got {arr.shape}")
                views[name], text[name] = arr.astype(object), f"view_{name}"
            elif arr.dtype.kind in "biuf":
                if arr.ndim != 2:
                    raise ValueError(f"{path}: view {name!r} must be [N, D], got {arr.shape}")
                views[name] = arr.astype(np.float64, copy=False)
            else:
                raise ValueError(f"{path}: view {name!r} has dtype {arr.dtype}, not numbers")
        key = label if label is not None else _first(DEFAULT_LABELS, keys)
        if key is not None and key not in keys and not require:
            key = None  # prediction without labels
        if key is not None and key not in keys:
            raise ValueError(
                f"{path}: no label array {key!r} (arrays: {keys}): name an existing key with "
                f"label=KEY (command line: --label KEY)"
            )
        if key is None and require:
            raise ValueError(
                f"{path}: no labels: store them as 'y' (or 'label'), or name their key with "
                f"label=KEY (command line: --label KEY); arrays are {keys}"
            )
        y = None if key is None else npz[key]
        present = npz["present"].astype(bool) if "present" in keys else None
    if present is not None and (present.ndim != 2 or present.shape[1] != len(names)):
        raise ValueError(
            f"{path}: present must be [N, {len(names)}] (one column per view), got {present.shape}"
        )
    spec = {"format": "npz", "views": names, "label": key, "text": text}
    return TableData(views, y, present, spec)


# ----------------------------------------------------------------- tables
def _read_table(path: Path):
    import pandas as pd

    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        try:
            return pd.read_parquet(path)
        except ImportError as exc:
            raise ValueError(f"reading {path.name} needs pyarrow: pip install pyarrow") from exc
    return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")


def _load_table(
    path: Path,
    label: str | Sequence[str] | None,
    columns: Mapping[str, str | Sequence[str]] | None,
    require: bool,
) -> TableData:
    from pandas.api.types import is_numeric_dtype

    df = _read_table(path)
    header = [str(c) for c in df.columns]
    df.columns = header
    labels = _label_columns(label, header, path, require)
    if require and not labels:
        raise ValueError(
            f"{path.name}: no label column: name it with label=COL (--label COL); "
            f"columns are {header[:8]}{' ...' if len(header) > 8 else ''}"
        )
    groups = _groups(columns, header, set(labels), path)
    views: dict[str, np.ndarray] = {}
    text: dict[str, str] = {}
    for name, cols in groups.items():
        numeric = [is_numeric_dtype(df[c]) or df[c].isna().all() for c in cols]
        if all(numeric):
            views[name] = df[cols].to_numpy(dtype=np.float64, na_value=np.nan)
        elif len(cols) == 1:  # one string column: a text modality
            views[name] = df[cols[0]].astype(object).to_numpy()
            text[name] = cols[0]
        else:
            bad = cols[numeric.index(False)]
            raise ValueError(
                f"{path.name}: view {name!r}: column {bad!r} is not numeric (a text modality "
                "is a group of exactly one string column)"
            )
    y = None
    if labels:
        y = df[labels].copy() if len(labels) > 1 else df[labels[0]].to_numpy()
    spec = {"format": "table", "columns": groups, "label": labels or None, "text": text}
    return TableData(views, y, None, spec)


def _label_columns(label, header: list[str], path: Path, require: bool) -> list[str]:
    if label is None:
        found = _first(DEFAULT_LABELS, header)
        return [] if found is None else [found]
    cols = [label] if isinstance(label, str) else list(label)
    if not require:  # prediction: the labels may be absent, but never taken as features
        return [c for c in cols if c in header] if all(c in header for c in cols) else []
    for c in cols:
        if c not in header:
            raise ValueError(f"{path.name}: no label column {c!r}")
    return cols


def _groups(
    columns: Mapping[str, str | Sequence[str]] | None,
    header: list[str],
    labels: set[str],
    path: Path,
) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    if columns is not None:
        for name, cols in columns.items():
            cols = [cols] if isinstance(cols, str) else list(cols)
            for c in cols:
                if c not in header:
                    raise ValueError(f"{path.name}: view {name!r}: no column {c!r}")
            if not cols:
                raise ValueError(f"{path.name}: view {name!r} has no columns")
            groups[str(name)] = cols
        return groups
    for c in header:
        if c in labels or SEP not in c:
            continue  # ids and other columns without a view prefix are not features
        view = c.split(SEP, 1)[0]
        if not view:
            raise ValueError(f"{path.name}: column {c!r} has an empty view prefix")
        groups.setdefault(view, []).append(c)
    if not groups:
        raise ValueError(
            f"{path.name}: no view columns: name them <view>{SEP}<column> or pass columns="
        )
    return groups


# ----------------------------------------------------------------- helpers
def _first(candidates: Sequence[str], keys: Sequence[str]) -> str | None:
    return next((c for c in candidates if c in keys), None)


def _select(data: TableData, views: Sequence[str] | None) -> TableData:
    """Keep ``views`` (in that order); ``present``'s columns follow."""
    names = list(data.views)
    if views is None:
        return data
    views = [views] if isinstance(views, str) else list(views)
    for v in views:
        if v not in names:
            raise ValueError(f"views: unknown view {v!r}; the data has {names}")
    if len(set(views)) != len(views):
        raise ValueError(f"views: a view is selected twice in {views}")
    present = None
    if data.present is not None:
        present = data.present[:, [names.index(v) for v in views]]
    spec = dict(data.spec)
    if spec["format"] == "npz":
        spec["views"] = list(views)
    else:
        spec["columns"] = {v: spec["columns"][v] for v in views}
    spec["text"] = {v: c for v, c in spec["text"].items() if v in views}
    return TableData({v: data.views[v] for v in views}, data.y, present, spec)


def load_like(
    path: str | os.PathLike,
    spec: Mapping[str, Any],
    text_encoder: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> TableData:
    """Read new data (labels optional) with the layout ``spec`` of the training data."""
    encoder = text_encoder if text_encoder is not None else spec.get("text_encoder")
    if spec.get("format") == "npz":
        return load_data(
            path, spec["views"], spec.get("label"), None, encoder, cache_dir, require_label=False
        )
    data = load_data(
        path, None, spec.get("label"), spec["columns"], encoder, cache_dir, require_label=False
    )
    return _select(data, list(spec["columns"]))
