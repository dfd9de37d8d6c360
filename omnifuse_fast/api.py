"""``OmniFuseClassifier``: fit / predict on your own multimodal arrays, scikit-learn style.

``views`` is a list (or a dict by name) of arrays ``[N, D_m]`` (numpy or torch), one per
modality. A modality is missing in a row when ``present[row, m]`` is False or when the whole
row of that view is NaN. Labels are any values ``[N]`` (multiclass: mapped to ``0..C-1`` and
back through ``classes_``) or a 0/1 indicator matrix ``[N, C]`` (multilabel). Features are
z-scored with statistics of the observed training rows, stored with the model.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = 1
MODEL_FILE = "model.pt"
EVAL_BATCH = 1024

ViewsLike = Sequence[Any] | Mapping[str, Any]


class OmniFuseClassifier:
    """OmniFuse (or a baseline) as an estimator for users' multimodal data.

    Args:
        method: ``"omnifuse"``, ``"concat"``, ``"mm"`` (multiclass only) or ``"mimo"``.
        epochs, batch_size, lr, weight_decay: AdamW training.
        backend: backend of the ops (``"auto"``: the fastest available).
        device: torch device of the model.
        seed: seed of the split, the initialization and the shuffles (also seeds the global
            torch / numpy / random generators, as the trainer does).
        dim, hidden, num_blocks, drop_rate: model size and the imputer's supervision drop.
        use_dwfuse, use_tla, use_imp_forward, use_imp_backward: OmniFuse's ablation switches.
        tla_mode: ``"observed"`` or ``"subsets"``.
        validation_fraction: rows held out to pick the best epoch (by validation AUROC) and
            for early stopping; 0 trains on every row and keeps the last epoch.
        test_fraction: rows held out and scored once at the end (``result_``); default 0.
        patience: stop after this many epochs without a better validation AUROC (None: never).
        **options: any other :class:`omnifuse_fast.train.TrainConfig` field (``alpha``,
            ``beta``, ``lambdas``, ``mm_stage1_epochs``, ``mimo_mode``, ``compile=True`` to
            ``torch.compile`` the training step, ``check_every`` to check the loss for
            NaN/inf every N steps, ``precision="bf16"`` to run the step's forward and losses
            under ``torch.autocast`` in bfloat16, ...).

    Attributes (after :meth:`fit`):
        classes_: the label values (multiclass) or label names (multilabel).
        multilabel_: whether ``y`` was an indicator matrix.
        view_names_, view_dims_: the modalities seen in training.
        model_: the trained :class:`omnifuse_fast.OmniFuse` (eval mode).
        history_: one record per epoch; ``result_``: the trainer's final metrics.
    """

    def __init__(
        self,
        method: str = "omnifuse",
        epochs: int = 40,
        batch_size: int = 64,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        backend: str = "auto",
        device: str = "cpu",
        seed: int = 0,
        dim: int = 32,
        hidden: int = 64,
        num_blocks: int = 5,
        drop_rate: float = 0.3,
        use_dwfuse: bool = True,
        use_tla: bool = True,
        use_imp_forward: bool = True,
        use_imp_backward: bool = True,
        tla_mode: str = "observed",
        validation_fraction: float = 0.2,
        test_fraction: float = 0.0,
        patience: int | None = 10,
        **options: Any,
    ) -> None:
        self.params: dict[str, Any] = dict(
            method=method,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            backend=backend,
            device=device,
            seed=seed,
            dim=dim,
            hidden=hidden,
            num_blocks=num_blocks,
            drop_rate=drop_rate,
            use_dwfuse=use_dwfuse,
            use_tla=use_tla,
            use_imp_forward=use_imp_forward,
            use_imp_backward=use_imp_backward,
            tla_mode=tla_mode,
            validation_fraction=validation_fraction,
            test_fraction=test_fraction,
            patience=patience,
            **options,
        )
        for name in ("validation_fraction", "test_fraction"):
            v = self.params[name]
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1), got {v!r}")
        if validation_fraction + test_fraction >= 1.0:
            raise ValueError("validation_fraction + test_fraction must leave training rows (< 1)")
        self._config(multilabel=False)  # bad options fail here, not after loading data
        self.model_: Any = None
        self.data_spec_: dict[str, Any] | None = None  # set by file adapters (CLI predict)

    # ----------------------------------------------------------------- config
    def get_params(self) -> dict[str, Any]:
        """The constructor's arguments."""
        return dict(self.params)

    def _config(self, multilabel: bool, has_val: bool = True):
        from omnifuse_fast.train import TrainConfig

        values = {
            k: v
            for k, v in self.params.items()
            if k not in ("validation_fraction", "test_fraction")
        }
        if multilabel and values["method"] == "mm":
            raise ValueError("method 'mm' needs class labels (y [N]), not a multilabel matrix")
        if not has_val:  # nothing to select or stop on
            values["select_best"], values["patience"] = False, None
        return TrainConfig(missing_rate=0.0, **values)

    # ----------------------------------------------------------------- fit
    def fit(
        self,
        views: ViewsLike,
        y: Any,
        present: Any = None,
        *,
        out_dir: str | os.PathLike | None = None,
        log: Callable[[str], None] | None = None,
    ) -> OmniFuseClassifier:
        """Train on ``views`` and labels ``y``; returns ``self``.

        Args:
            views: list or dict of arrays ``[N, D_m]`` (2 to 8 modalities).
            y: ``[N]`` labels of any type, or a 0/1 matrix ``[N, C]`` (multilabel; a
                DataFrame's columns name the labels).
            present: optional bool ``[N, M]``; otherwise all-NaN rows mark missing views.
            out_dir: also write the trainer's checkpoint, metrics.json and curve there.
            log: called with one line per epoch.

        Raises:
            ValueError: one line naming the view / row / argument at fault.
        """
        from omnifuse_fast.data.corruption import corrupt_for_config
        from omnifuse_fast.data.prepare import make_splits
        from omnifuse_fast.data.split import fit_scaler, split_rows
        from omnifuse_fast.train import Trainer

        seed = int(self.params["seed"])
        names, arrays = _as_views(views, None)
        n = _common_rows(names, arrays)
        observed = _observed(names, arrays, present, n, every_view=True)
        target, classes, multilabel = _encode_labels(y, n)
        train, val, test = split_rows(
            target, self.params["validation_fraction"], self.params["test_fraction"], seed
        )
        self.mean_, self.std_ = fit_scaler(arrays, train, observed)
        x = _transform(arrays, observed, self.mean_, self.std_)
        rows = {"train": train, "val": val, "test": test}
        splits = make_splits(x, target, observed, rows, names, len(classes))
        # no validation rows: select nothing, stop never; no test rows: report validation
        splits["val"] = splits["val"] if val.size else splits["train"]
        splits["test"] = splits["test"] if test.size else splits["val"]
        config = self._config(multilabel, has_val=val.size > 0)
        splits = corrupt_for_config(splits, config)  # corruption= (none: unchanged)
        trainer = Trainer(config, out_dir, splits=splits, log=log)
        self.result_ = trainer.fit()
        trainer.close()  # a no-op unless torchrun made a process group
        if config.select_best and trainer.best is not None:
            trainer.model.load_state_dict(trainer.best["model"])
        self.model_ = trainer.model.eval()
        self.history_ = trainer.history
        self.classes_ = classes
        self.multilabel_ = multilabel
        self.view_names_ = names
        self.view_dims_ = [int(a.shape[1]) for a in arrays]
        self.config_ = config.to_dict()
        self.num_rows_ = n
        self.missing_rate_ = float(1.0 - observed.mean())  # fraction of (row, view) missing
        return self

    # ----------------------------------------------------------------- predict
    def _check_fitted(self) -> None:
        if self.model_ is None:
            raise RuntimeError("this OmniFuseClassifier is not fitted: call fit() or load()")

    def predict_proba(self, views: ViewsLike, present: Any = None) -> np.ndarray:
        """Probabilities ``[N, C]``: softmax over ``classes_`` (sigmoid per label multilabel)."""
        self._check_fitted()
        names, arrays = _as_views(views, self.view_names_)
        for name, a, d in zip(names, arrays, self.view_dims_):
            if a.shape[1] != d:
                raise ValueError(f"view {name!r} has {a.shape[1]} features; the model has {d}")
        n = _common_rows(names, arrays)
        observed = _observed(names, arrays, present, n)
        x = _transform(arrays, observed, self.mean_, self.std_)
        device = next(self.model_.parameters()).device
        obs = torch.from_numpy(observed)
        chunks = []
        for i in range(0, n, EVAL_BATCH):
            batch = [torch.from_numpy(v[i : i + EVAL_BATCH]).to(device) for v in x]
            chunks.append(self.model_.predict_proba(batch, obs[i : i + EVAL_BATCH].to(device)))
        if not chunks:
            return np.zeros((0, len(self.classes_)), dtype=np.float32)
        return torch.cat(chunks).cpu().numpy()

    def predict(self, views: ViewsLike, present: Any = None) -> np.ndarray:
        """Labels ``[N]`` from ``classes_`` (multilabel: 0/1 ``[N, C]`` at probability 0.5)."""
        proba = self.predict_proba(views, present)
        if self.multilabel_:
            return (proba >= 0.5).astype(np.int64)
        return self.classes_[proba.argmax(axis=1)]

    # ----------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write the model to the directory ``path`` (``path/model.pt``); returns the file."""
        from omnifuse_fast.train.checkpoint import save_checkpoint

        self._check_fitted()
        state = {
            "format": FORMAT,
            "kind": "OmniFuseClassifier",
            "params": self.params,
            "config": self.config_,
            "view_names": list(self.view_names_),
            "view_dims": list(self.view_dims_),
            "classes": self.classes_.tolist(),
            "multilabel": bool(self.multilabel_),
            "mean": [torch.from_numpy(m) for m in self.mean_],
            "std": [torch.from_numpy(s) for s in self.std_],
            "model": self.model_.state_dict(),
            "data_spec": self.data_spec_,
            "history": self.history_,
        }
        return save_checkpoint(state, Path(path) / MODEL_FILE)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | None = None) -> OmniFuseClassifier:
        """A classifier saved by :meth:`save` (``path``: its directory or ``model.pt``)."""
        from omnifuse_fast.train import TrainConfig, build_model

        file = Path(path)
        if file.is_dir():
            file = file / MODEL_FILE
        if not file.is_file():
            raise ValueError(f"no saved model at {str(path)!r} (expected {MODEL_FILE})")
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{file} is not a readable saved model: {exc}") from exc
        if not isinstance(state, dict) or state.get("kind") != "OmniFuseClassifier":
            raise ValueError(f"{file} is not a saved OmniFuseClassifier")
        if state["format"] != FORMAT:
            raise ValueError(f"{file} has format {state['format']}, expected {FORMAT}")
        params = dict(state["params"])
        if device is not None:
            params["device"] = device
        clf = cls(**params)
        config = TrainConfig.from_dict({**state["config"], "device": params["device"]})
        model = build_model(config, state["view_dims"], len(state["classes"]), state["multilabel"])
        model.load_state_dict(state["model"])
        clf.model_ = model.to(torch.device(params["device"])).eval()
        clf.config_ = config.to_dict()
        clf.view_names_ = list(state["view_names"])
        clf.view_dims_ = list(state["view_dims"])
        clf.classes_ = np.asarray(state["classes"])
        clf.multilabel_ = bool(state["multilabel"])
        clf.mean_ = [m.numpy() for m in state["mean"]]
        clf.std_ = [s.numpy() for s in state["std"]]
        clf.data_spec_ = state["data_spec"]
        clf.history_ = list(state["history"])
        return clf


# --------------------------------------------------------------------- inputs
def _to_numpy(a: Any, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if a.dtype.kind not in "biuf":
        raise ValueError(f"view {name!r} must hold numbers, got dtype {a.dtype}")
    if a.ndim == 1:
        a = a[:, None]  # one feature
    if a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"view {name!r} must be [N, D] with D >= 1, got shape {a.shape}")
    return a.astype(np.float64, copy=False)


def _as_views(views: ViewsLike, fitted: Sequence[str] | None) -> tuple[list[str], list]:
    """Names and float64 arrays in model order (``fitted`` when predicting)."""
    if isinstance(views, Mapping):
        names = [str(k) for k in views]
        if fitted is not None:
            if set(names) != set(fitted):
                raise ValueError(f"views must be {list(fitted)}, got {names}")
            names = list(fitted)
        arrays = [_to_numpy(views[k], k) for k in names]
    elif isinstance(views, (list, tuple)):
        names = list(fitted) if fitted is not None else [f"view{i}" for i in range(len(views))]
        if len(views) != len(names):
            raise ValueError(f"views must hold {len(names)} arrays, got {len(views)}")
        arrays = [_to_numpy(v, n) for v, n in zip(views, names)]
    else:
        raise ValueError(f"views must be a list or dict of arrays, got {type(views).__name__}")
    if not 2 <= len(arrays) <= 8:
        raise ValueError(f"views: OmniFuse needs 2 to 8 modalities, got {len(arrays)}")
    return names, arrays


def _common_rows(names: list[str], arrays: list[np.ndarray]) -> int:
    n = arrays[0].shape[0]
    for name, a in zip(names, arrays):
        if a.shape[0] != n:
            raise ValueError(
                f"view {name!r} has {a.shape[0]} rows but view {names[0]!r} has {n} "
                "(one row per sample in every view)"
            )
    if n == 0:
        raise ValueError("views have no rows")
    return n


def _observed(names, arrays, present: Any, n: int, every_view: bool = False) -> np.ndarray:
    """bool ``[N, M]``: ``present``, or the rows not wholly NaN; NaN in a present row is an error.

    ``every_view`` (training): a view missing in every row is an error too.
    """
    finite = [np.isfinite(a) for a in arrays]
    if present is None:
        obs = np.stack([~np.isnan(a).all(axis=1) for a in arrays], axis=1)
    else:
        if isinstance(present, torch.Tensor):
            present = present.detach().cpu().numpy()
        obs = np.asarray(present)
        if obs.shape != (n, len(arrays)) or obs.dtype.kind not in "bui":
            raise ValueError(f"present must be bool [{n}, {len(arrays)}], got {obs.shape}")
        obs = obs.astype(bool)
    for m, (name, f) in enumerate(zip(names, finite)):
        bad = obs[:, m] & ~f.all(axis=1)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            count = int((~f[row]).sum())
            raise ValueError(
                f"view {name!r} row {row}: {count} of {f.shape[1]} values are NaN/inf in a "
                "present row (impute them, or mark the view missing: a whole-NaN row or "
                f"present[{row}, {m}] = False)"
            )
    for m, name in enumerate(names):
        if every_view and not obs[:, m].any():
            raise ValueError(f"view {name!r} is missing in every row: drop it or observe it")
    empty = ~obs.any(axis=1)
    if empty.any():
        raise ValueError(f"row {int(np.flatnonzero(empty)[0])} has no observed view")
    return obs


def _encode_labels(y: Any, n: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(target, classes, multilabel)``: int64 codes ``[N]`` or float32 ``[N, C]``."""
    names = list(getattr(y, "columns", [])) or None
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y, names = y[:, 0], None
    if y.shape[0] != n:
        raise ValueError(f"y has {y.shape[0]} rows but the views have {n}")
    if y.ndim == 2:
        if y.dtype.kind not in "biuf" or not np.isin(y, (0, 1)).all():
            raise ValueError("y: a 2-D y is a multilabel indicator matrix and must hold 0/1")
        if (y.min(axis=0) == y.max(axis=0)).all():
            raise ValueError("y: every label column takes a single value; nothing to learn")
        classes = np.asarray(names if names is not None else np.arange(y.shape[1]))
        return y.astype(np.float32), classes, True
    if y.ndim != 1:
        raise ValueError(f"y must be [N] labels or a [N, C] 0/1 matrix, got shape {y.shape}")
    if y.dtype.kind == "f" and np.isnan(y).any():
        raise ValueError(f"y row {int(np.flatnonzero(np.isnan(y))[0])} has no label (NaN)")
    if y.dtype == object and any(v is None for v in y):
        raise ValueError("y has rows with no label (None)")
    classes, codes = np.unique(y, return_inverse=True)
    if classes.size < 2:
        raise ValueError(f"y has a single class ({classes[0]!r}): a classifier needs two or more")
    return codes.astype(np.int64).reshape(-1), classes, False


def _transform(arrays, observed, means, stds) -> list[np.ndarray]:
    """Z-scored float32 views (:func:`~omnifuse_fast.data.split.scale`); missing rows are 0
    (the training mean)."""
    from omnifuse_fast.data.split import scale

    out = scale(arrays, means, stds)
    for m, z in enumerate(out):
        z[~observed[:, m]] = 0.0
    return out


# --------------------------------------------------------------------- files (the CLI's path)
def fit_file(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    views: Sequence[str] | None = None,
    label: str | Sequence[str] | None = None,
    text_encoder: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
    **params: Any,
) -> dict[str, Any]:
    """Train on a data file as ``omnifuse-fast train --data`` does; returns the metrics.

    The rows are split 60/20/20 (train / validation / test, stratified by class), as for the
    built-in data; ``out_dir`` gets the trainer's ``checkpoint.pt``, ``metrics.json`` and
    curve, plus ``model.pt`` (the best epoch, the scaling and the file layout) for
    :func:`predict_file`. ``params`` go to :class:`OmniFuseClassifier`.
    """
    from omnifuse_fast.data.adapters import load_data
    from omnifuse_fast.train.metrics import add_to_metrics

    data = load_data(path, views, label, None, text_encoder, cache_dir)
    params = {"validation_fraction": 0.2, "test_fraction": 0.2, "patience": None, **params}
    clf = OmniFuseClassifier(**params)
    clf.fit(data.views, data.y, data.present, out_dir=out_dir, log=log)
    clf.data_spec_ = data.spec
    clf.save(out_dir)
    info = {
        "data": str(path),
        "views": clf.view_names_,
        "rows": clf.num_rows_,
        "classes": [str(c) for c in clf.classes_],
        "multilabel": clf.multilabel_,
        "missing_rate": round(clf.missing_rate_, 6),  # realized in the data, not injected
    }
    add_to_metrics(out_dir, info)
    return {**clf.result_, **info}


def predict_file(
    model: str | os.PathLike,
    path: str | os.PathLike,
    out: str | os.PathLike | None = None,
    text_encoder: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
):
    """Predictions for a data file laid out like the training file, as a DataFrame.

    Columns: ``row``, ``prediction`` and ``proba_<class>`` (multilabel: ``pred_<label>``
    and ``proba_<label>``). Written to ``out`` (CSV) when given.
    """
    import pandas as pd

    from omnifuse_fast.data.adapters import load_like

    clf = OmniFuseClassifier.load(model)
    if clf.data_spec_ is None:
        raise ValueError(
            f"{model}: this model was not trained from a file; use predict() in Python"
        )
    data = load_like(path, clf.data_spec_, text_encoder, cache_dir)
    proba = clf.predict_proba(data.views, data.present)
    frame = pd.DataFrame({"row": np.arange(proba.shape[0])})
    names = [str(c) for c in clf.classes_]
    if clf.multilabel_:
        for j, name in enumerate(names):
            frame[f"pred_{name}"] = (proba[:, j] >= 0.5).astype(np.int64)
    else:
        frame["prediction"] = clf.classes_[proba.argmax(axis=1)]
    for j, name in enumerate(names):
        frame[f"proba_{name}"] = proba[:, j]
    if out is not None:
        frame.to_csv(out, index=False)
    return frame
