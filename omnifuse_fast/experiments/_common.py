"""Shared plumbing of the experiments: settings, data, one training run, the grid, statistics,
outputs."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnifuse_fast.data.corruption import Corruption, corrupt_splits
from omnifuse_fast.experiments.models import BranchTracker, LateFusion
from omnifuse_fast.train import TrainConfig, Trainer
from omnifuse_fast.train.metrics import accuracy, macro_auroc
from omnifuse_fast.train.trainer import make_optimizer

# --quick: a tiny model and large batches, enough to exercise every code path in a second a run.
QUICK_MODEL = {
    "dim": 8,
    "hidden": 16,
    "num_blocks": 2,
    "encoder_hidden": 32,
    "head_hidden": 16,
    "batch_size": 256,
}
# The protocol (docs/PROTOCOL.md): up to 40 epochs, early stopping on the validation NLL, a
# small validation grid chosen on the tuning seeds, 10 seeds.
DEFAULT_EPOCHS = 40
DEFAULT_SEEDS = 10
DEFAULT_PATIENCE = 5
DEFAULT_TUNE_SEEDS = 2
GRID = {"lr": (1e-3, 3e-3), "lambda2": (10.0, 100.0)}
QUICK_EPOCHS = 2
QUICK_SEEDS = 2
QUICK_PATIENCE = 1
QUICK_TUNE_SEEDS = 1
QUICK_GRID = {"lr": (1e-3, 3e-3), "lambda2": (10.0,)}


@dataclass
class Settings:
    """What every experiment shares: seeds, the training budget, the grid, the data source.

    Attributes:
        seeds: the seeds (each draws its own split, corruption and initialization).
        epochs: the most epochs a run trains (early stopping usually ends it sooner).
        quick: the smoke mode (tiny model, few epochs).
        backend: backend of the ops.
        overrides: TrainConfig fields every run gets (the quick model size).
        patience: early stopping: epochs without a lower validation NLL.
        tune_seeds: the first ``tune_seeds`` seeds choose each row's grid point (validation
            NLL only); the other seeds train at the chosen point alone.
        grid: ``{"lr": (...), "lambda2": (...)}``; lambda2 applies to OmniFuse rows only.
        data: a user's data file (None: the built-in data).
        data_views: the file's views to use (None: all).
        label: the file's label column / key (None: ``y`` or ``label``).
        corruption: ``Corruption`` (None: each experiment's own conditions).
        missing_rate: injected missing rate (None: each experiment's own).
    """

    seeds: list[int]
    epochs: int
    quick: bool
    backend: str = "auto"
    overrides: dict[str, int] = field(default_factory=dict)  # TrainConfig fields
    patience: int = DEFAULT_PATIENCE
    tune_seeds: int = DEFAULT_TUNE_SEEDS
    grid: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(GRID))
    data: str | None = None
    data_views: list[str] | None = None
    label: str | None = None
    corruption: Corruption | None = None
    missing_rate: float | None = None

    @classmethod
    def make(
        cls,
        seeds: int | Sequence[int] | None,
        quick: bool,
        epochs: int | None,
        backend: str = "auto",
        patience: int | None = None,
        tune_seeds: int | None = None,
        grid: dict[str, Sequence[float]] | None = None,
        data: str | os.PathLike | None = None,
        data_views: Sequence[str] | None = None,
        label: str | None = None,
        corruption: Corruption | None = None,
        missing_rate: float | None = None,
    ) -> Settings:
        """Defaults: 10 seeds, up to 40 epochs, patience 5, the grid tuned on 2 seeds;
        ``quick``: 2 seeds, 2 epochs, patience 1, a 2-point grid on 1 seed, a tiny model."""
        if seeds is None:
            seeds = QUICK_SEEDS if quick else DEFAULT_SEEDS
        seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
        if not seed_list or any(s < 0 for s in seed_list):
            raise ValueError(f"seeds must be a count >= 1 or a list of ints >= 0, got {seeds!r}")
        if epochs is None:
            epochs = QUICK_EPOCHS if quick else DEFAULT_EPOCHS
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
        if patience is None:
            patience = QUICK_PATIENCE if quick else DEFAULT_PATIENCE
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an int >= 1, got {patience!r}")
        if tune_seeds is None:
            tune_seeds = QUICK_TUNE_SEEDS if quick else DEFAULT_TUNE_SEEDS
        if isinstance(tune_seeds, bool) or not isinstance(tune_seeds, int) or tune_seeds < 1:
            raise ValueError(f"tune_seeds must be an int >= 1, got {tune_seeds!r}")
        grid = dict(QUICK_GRID if quick else GRID) if grid is None else dict(grid)
        for key in ("lr", "lambda2"):
            values = tuple(float(v) for v in grid.get(key, ()))
            if not values or any(not math.isfinite(v) or v <= 0 for v in values):
                raise ValueError(f"grid[{key!r}] must be one or more numbers > 0, got {values}")
            grid[key] = values
        if data is None and (data_views is not None or label is not None):
            raise ValueError("views and label apply to a data file (data=...)")
        if missing_rate is not None and not 0.0 <= float(missing_rate) < 1.0:
            raise ValueError(f"missing_rate must be in [0, 1), got {missing_rate!r}")
        overrides = dict(QUICK_MODEL) if quick else {}
        return cls(
            seed_list,
            epochs,
            bool(quick),
            backend,
            overrides,
            patience,
            min(tune_seeds, len(seed_list)),
            grid,
            None if data is None else str(data),
            None if data_views is None else list(data_views),
            label,
            corruption,
            None if missing_rate is None else float(missing_rate),
        )

    def config(self, seed: int, **values: Any) -> TrainConfig:
        """A TrainConfig with these settings (``values`` override)."""
        base = {"epochs": self.epochs, "seed": seed, "backend": self.backend, **self.overrides}
        return TrainConfig(**{**base, **values})

    def grid_points(self, omnifuse: bool) -> list[dict[str, float]]:
        """The validation grid of a row: lr, and lambda2 for OmniFuse rows."""
        lams = self.grid["lambda2"] if omnifuse else (None,)
        return [
            {"lr": lr} if lam is None else {"lr": lr, "lambda2": lam}
            for lr in self.grid["lr"]
            for lam in lams
        ]

    def to_dict(self) -> dict[str, Any]:
        """Plain types, for the JSON output."""
        d = asdict(self)
        d["corruption"] = None if self.corruption is None else self.corruption.to_dict()
        return d


# ---------------------------------------------------------------------- data
@dataclass(frozen=True)
class Condition:
    """One data condition: injected missing rate + a corruption (the same on every split)."""

    name: str
    missing_rate: float
    corruption: Corruption

    def to_dict(self) -> dict[str, Any]:
        """Plain types, for JSON."""
        return {"missing_rate": self.missing_rate, "corruption": self.corruption.to_dict()}

    def heading(self) -> list[str]:
        """Markdown lines opening the condition's section of a report (blank line last)."""
        return [
            "",
            f"## {self.name}",
            "",
            f"Missing rate {self.missing_rate}, corruption {self.corruption.to_dict()}.",
            "",
        ]


class Source:
    """Where the rows come from: the built-in data or a user's file (read once).

    :meth:`splits` gives ``{"train", "val", "test"}`` ``MultiViewSplit`` for a seed and a
    condition: stratified 60/20/20, missing views injected at the condition's rate (on top of
    a file's own missing entries; each row keeps one observed view), z-scored with the
    observed training rows' statistics, then the condition's corruption.
    """

    def __init__(self, settings: Settings) -> None:
        self.path = settings.data
        self.table = None
        if self.path is not None:
            from omnifuse_fast.data.adapters import load_data

            self.table = load_data(self.path, settings.data_views, settings.label)
            y = np.asarray(self.table.y)
            if y.ndim != 1:
                raise ValueError(f"{self.path}: the experiments need one class label per row")
            self.classes, self.labels = np.unique(y, return_inverse=True)
            if self.classes.size < 2:
                raise ValueError(f"{self.path}: the labels hold a single class")
            self.view_names = list(self.table.views)
            if len(self.view_names) < 2:
                raise ValueError(f"{self.path}: the experiments need two or more views")
        else:
            from omnifuse_fast.data import VIEW_NAMES

            self.view_names = list(VIEW_NAMES)
        self._cache: dict[Any, dict[str, Any]] = {}

    @property
    def builtin(self) -> bool:
        """True for the built-in data."""
        return self.path is None

    def describe(self) -> str:
        """``UCI multiple features`` or the file's name."""
        return "UCI multiple features" if self.builtin else f"`{Path(self.path).name}`"

    def splits(
        self, seed: int, condition: Condition, views: Sequence[str] | None = None
    ) -> dict[str, Any]:
        """The splits of ``seed`` under ``condition`` (cached; do not modify them)."""
        key = (seed, condition, None if views is None else tuple(views))
        if key not in self._cache:
            self._cache[key] = self._make(seed, condition, views)
        return self._cache[key]

    def _make(self, seed, condition, views):
        if self.builtin:
            from omnifuse_fast.data import prepare_mfeat

            base = prepare_mfeat(condition.missing_rate, seed=seed, views=views)
        else:
            base = self._file_splits(seed, condition.missing_rate, views)
        return corrupt_splits(base, condition.corruption, seed)[0]

    def _file_splits(self, seed, rate, views):
        import torch

        from omnifuse_fast.data import MultiViewSplit, missing_mask, standardize, stratified_split

        names = list(views) if views is not None else self.view_names
        arrays = [np.asarray(self.table.views[v], dtype=np.float64) for v in names]
        n = arrays[0].shape[0]
        if self.table.present is not None:
            cols = [self.view_names.index(v) for v in names]
            observed = self.table.present[:, cols].copy()
        else:
            observed = np.stack([~np.isnan(a).all(axis=1) for a in arrays], axis=1)
        for j, a in enumerate(arrays):
            bad = observed[:, j] & ~np.isfinite(a).all(axis=1)
            if bad.any():
                raise ValueError(
                    f"{self.path}: view {names[j]!r} row {int(np.flatnonzero(bad)[0])} has "
                    "NaN/inf in a present row"
                )
        if not observed.any(axis=1).all():
            raise ValueError(f"{self.path}: a row has no observed view")
        mask_rng = np.random.default_rng([seed, 0x5EED])
        drop = missing_mask(n, len(names), rate, mask_rng) if rate > 0 else None
        if drop is not None:  # on top of the file's own missing entries; keep one view a row
            kept = observed & ~drop
            empty = np.flatnonzero(~kept.any(axis=1))
            for i in empty:
                kept[i, mask_rng.choice(np.flatnonzero(observed[i]))] = True
            observed = kept
        train, val, test = stratified_split(self.labels, seed=seed)
        x = standardize([np.nan_to_num(a) for a in arrays], train, observed=observed)
        for j in range(len(x)):
            x[j][~observed[:, j]] = 0.0

        def split(idx):
            return MultiViewSplit(
                views=[torch.from_numpy(np.ascontiguousarray(v[idx])) for v in x],
                labels=torch.from_numpy(self.labels[idx].astype(np.int64)),
                observed=torch.from_numpy(observed[idx].copy()),
                indices=torch.from_numpy(idx.astype(np.int64)),
                view_names=list(names),
                view_dims=[int(v.shape[1]) for v in x],
                num_classes=int(self.classes.size),
            )

        return {"train": split(train), "val": split(val), "test": split(test)}


def conditions_for(
    settings: Settings, source: Source, defaults: Sequence[Condition]
) -> list[Condition]:
    """The experiment's default conditions, or the one the options ask for.

    ``--corruption`` / ``--missing-rate`` replace the defaults by a single condition named after
    the corruption kind (the missing rate defaults to the first default condition's).
    """
    if settings.corruption is None and settings.missing_rate is None:
        return list(defaults)
    corruption = settings.corruption if settings.corruption is not None else Corruption("none")
    rate = settings.missing_rate if settings.missing_rate is not None else defaults[0].missing_rate
    _ = source
    name = corruption.kind if corruption.kind != "none" else "clean"
    return [Condition(f"{name}@{rate:g}", rate, corruption)]


def setup(
    settings: Settings,
    conditions: Sequence[Condition] | None,
    default_conditions: Callable[[Source], list[Condition]],
) -> tuple[Source, list[Condition]]:
    """The data source of ``settings`` and the conditions to run: ``conditions`` when given,
    else :func:`conditions_for` with the experiment's ``default_conditions(source)``."""
    source = Source(settings)
    conds = conditions or conditions_for(settings, source, default_conditions(source))
    return source, list(conds)


def builtin_noise(views: Sequence[str] = ("kar", "pix"), std: float = 1.0) -> Corruption:
    """The first results' uniform noise: std 1 on ``kar`` and ``pix``."""
    return Corruption("noise", std=std, views=tuple(views))


# ---------------------------------------------------------------------- training
def nll(proba: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the true classes (probabilities clamped at 1e-12)."""
    p = proba.float().gather(1, labels.view(-1, 1).to(proba.device)).clamp_min(1e-12)
    return float(-p.log().mean())


@torch.no_grad()
def predict(model: torch.nn.Module, split: Any, reading: str = "joint") -> torch.Tensor:
    """Class probabilities of every row of ``split`` (batches of 1024, eval mode).

    ``reading="joint"``: the model's prediction ``softmax(o)``; ``"imputed"``: OmniFuse's
    documented alternative in which the imputed embeddings reach the prediction (see
    :meth:`omnifuse_fast.nn.OmniFuse.predict_proba`).
    """
    chunks = []
    for i in range(0, len(split), 1024):
        views = [v[i : i + 1024] for v in split.views]
        observed = split.observed[i : i + 1024]
        if reading == "joint":
            chunks.append(model.predict_proba(views, observed))
        else:
            chunks.append(model.predict_proba(views, observed, reading=reading))
    return torch.cat(chunks).cpu()


def scores(model: torch.nn.Module, split: Any, reading: str = "joint") -> dict[str, float]:
    """Accuracy, macro AUROC and NLL of ``split``."""
    proba = predict(model, split, reading)
    labels = split.labels.cpu()
    return {
        "accuracy": accuracy(proba, labels),
        "auroc": macro_auroc(proba, labels),
        "nll": nll(proba, labels),
    }


def make_trainer(
    config: TrainConfig,
    splits: dict[str, Any],
    model_factory: Callable[[Trainer], torch.nn.Module] | None = None,
) -> Trainer:
    """A Trainer on ``splits``; ``model_factory(trainer)`` swaps in another model.

    The factory's model must take ``model(views, observed, labels)`` returning an object with
    ``losses["total"]`` and ``modality_logits``, and have ``use_tla`` and ``predict_proba``.
    The optimizer is rebuilt on the new model with the config's settings.
    """
    trainer = Trainer(config, None, splits=splits)
    if model_factory is not None:
        trainer.model = model_factory(trainer).to(trainer.device)
        trainer.optimizer = make_optimizer(trainer.model, config)
    return trainer


def fit_early(
    trainer: Trainer,
    patience: int,
    on_epoch: Callable[[Trainer], bool] | None = None,
    val_split: Any = None,
) -> dict[str, Any]:
    """Train up to ``config.epochs`` epochs, stop after ``patience`` epochs without a lower
    validation NLL, and restore the weights of the lowest one.

    MM learning (``method="mm"``): stage 1 (standard training) ends when its validation NLL
    stalls for ``patience`` epochs or at half the epochs; the best stage-1 weights are restored,
    the top ``mm_top_fraction`` of the training rows by predicted probability of the true
    class form the pool (``mm_tau`` is not used), and stage 2 (mixing) runs under the same
    stopping rule.

    ``on_epoch(trainer)`` runs after each epoch's validation; returning True counts as an
    improvement (training goes on), e.g. for per-branch early stopping.

    Returns:
        ``selected_epoch``, ``epochs_run``, ``val_nll`` (of the restored weights), ``seconds``,
        and for MM learning ``pool_size``, ``pool_fraction``, ``pool_threshold`` (the lowest
        selected probability) and ``stage2_epochs``, ``stage2_selected``.
    """
    import copy
    import time

    from omnifuse_fast.train.schedule import select_strong

    cfg, model = trainer.config, trainer.model
    val = trainer.splits["val"] if val_split is None else val_split
    mm = cfg.method == "mm"
    stage1_end = max(1, cfg.epochs // 2)
    best_nll, best_epoch, best_state = math.inf, 0, None
    last_gain, stage2_start = 0, None
    info: dict[str, Any] = {}
    start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        if mm and trainer.pool is None and (epoch > stage1_end or epoch - last_gain > patience):
            if best_state is not None:
                model.load_state_dict(best_state)
            train = trainer.splits["train"]
            p_true = trainer.predict_proba(train).gather(1, train.labels.view(-1, 1)).squeeze(1)
            trainer.pool = select_strong(p_true, None, cfg.mm_top_fraction, minimum=2)
            info.update(
                pool_size=int(trainer.pool.numel()),
                pool_fraction=float(trainer.pool.numel() / len(train)),
                pool_threshold=float(p_true[trainer.pool].min()),
                stage1_epochs=epoch - 1,
            )
            stage2_start = last_gain = epoch - 1
        elif not mm or trainer.pool is not None:
            if epoch - 1 - last_gain >= patience:
                break
        trainer.train_epoch()
        if getattr(model, "use_tla", False):
            model.miner.mine()
        trainer.epoch = epoch
        val_nll = nll(predict(model, val), val.labels)
        extra = bool(on_epoch(trainer)) if on_epoch is not None else False
        if val_nll < best_nll:
            best_nll, best_epoch = val_nll, epoch
            best_state = copy.deepcopy(model.state_dict())
            last_gain = epoch
        elif extra:
            last_gain = epoch
    if best_state is not None:
        model.load_state_dict(best_state)
    info.update(
        selected_epoch=best_epoch,
        epochs_run=trainer.epoch,
        val_nll=best_nll,
        seconds=time.perf_counter() - start,
    )
    if mm:
        info["stage2_epochs"] = 0 if stage2_start is None else trainer.epoch - stage2_start
        info["stage2_selected"] = stage2_start is not None and best_epoch > stage2_start
    return info


def train_eval(
    config: TrainConfig,
    splits: dict[str, Any],
    settings: Settings,
    model_factory: Callable[[Trainer], torch.nn.Module] | None = None,
    on_epoch: Callable[[Trainer], bool] | None = None,
    readings: Sequence[str] = ("joint",),
) -> tuple[Trainer, dict[str, Any]]:
    """Train one model (:func:`fit_early`) and test it; returns the trainer and a result with
    ``val_*`` and ``test_*`` accuracy / AUROC / NLL (other readings: ``test_READING_*``)."""
    trainer = make_trainer(config, splits, model_factory)
    info = fit_early(trainer, settings.patience, on_epoch)
    result = dict(info)
    for k, v in scores(trainer.model, splits["val"]).items():
        result[f"val_{k}"] = v
    for reading in readings:
        prefix = "test_" if reading == "joint" else f"test_{reading}_"
        for k, v in scores(trainer.model, splits["test"], reading).items():
            result[prefix + k] = v
    if os.environ.get("OMNIFUSE_EXPERIMENT_LOG"):  # one line a run, for long sweeps
        print(
            f"[{datetime.datetime.now():%H:%M:%S}] {config.method} seed {config.seed} "
            f"lr {config.lr:g} l2 {config.lambdas[1]:g}: acc {result['test_accuracy']:.4f} "
            f"nll {result['test_nll']:.4f} ({result['seconds']:.1f}s, "
            f"{result['epochs_run']} ep)",
            file=sys.stderr,
            flush=True,
        )
    return trainer, result


def tuned(
    settings: Settings,
    omnifuse: bool,
    run_one: Callable[[int, dict[str, float]], dict[str, Any]],
) -> tuple[dict[int, dict[str, Any]], dict[str, Any]]:
    """Run a row on every seed at the grid point chosen on validation.

    Every grid point (:meth:`Settings.grid_points`) trains on the tuning seeds (the first
    ``settings.tune_seeds``); the point with the lowest mean validation NLL is chosen, and
    the remaining seeds train at that point alone. No test number enters the choice.

    Args:
        run_one: ``run_one(seed, point) -> result`` with ``val_nll``.

    Returns:
        ``({seed: result}, {"points": [...], "val_nll": [...], "chosen": point})``.
    """
    points = settings.grid_points(omnifuse)
    tune = settings.seeds[: settings.tune_seeds]
    trials = [{s: run_one(s, p) for s in tune} for p in points]
    means = [float(np.mean([r["val_nll"] for r in t.values()])) for t in trials]
    best = int(np.argmin(means))
    results = dict(trials[best])
    for s in settings.seeds:
        if s not in results:
            results[s] = run_one(s, points[best])
    tuning = {"points": points, "val_nll": means, "chosen": points[best]}
    return {s: results[s] for s in settings.seeds}, tuning


def tune_rows(
    settings: Settings,
    source: Source,
    conds: Sequence[Condition],
    rows: Sequence[str],
    run_one: Callable[[str, dict[str, Any], int, dict[str, float]], dict[str, Any]],
    omnifuse: Callable[[str], bool],
) -> tuple[list[tuple[Condition, str, dict[str, float], dict[int, dict[str, Any]]]], dict]:
    """:func:`tuned` for every row of every condition, in that order.

    Args:
        run_one: ``run_one(row, splits, seed, point) -> result`` (the condition's splits of
            ``seed``).
        omnifuse: ``omnifuse(row)``: whether the row gets the lambda2 grid.

    Returns:
        ``([(condition, row, chosen point, {seed: result}), ...], {condition: {row: tuning}})``.
    """
    done = []
    tuning: dict[str, dict[str, Any]] = {}
    for cond in conds:
        tuning[cond.name] = {}
        for row in rows:

            def one(seed, point, row=row, cond=cond):
                return run_one(row, source.splits(seed, cond), seed, point)

            results, tuning[cond.name][row] = tuned(settings, omnifuse(row), one)
            done.append((cond, row, tuning[cond.name][row]["chosen"], results))
    return done, tuning


def branch_model(config: TrainConfig, cls: type = LateFusion) -> Callable[[Trainer], Any]:
    """A model factory: ``cls`` (one branch a view: :class:`.models.LateFusion`, or
    :class:`.models.SumFusion`) at ``config``'s sizes."""

    def factory(trainer):
        return cls(
            trainer.view_dims,
            trainer.num_classes,
            dim=config.dim,
            encoder_hidden=config.encoder_hidden,
            head_hidden=config.head_hidden,
        )

    return factory


class BranchWatch:
    """An ``on_epoch`` callback: a :class:`.models.BranchTracker` of the trained late-fusion
    model on ``val`` (made at the first epoch; ``tracker`` is None before)."""

    def __init__(self, val: Any) -> None:
        self.val = val
        self.tracker: BranchTracker | None = None

    def __call__(self, trainer: Trainer) -> bool:
        if self.tracker is None:
            self.tracker = BranchTracker(trainer.model, self.val)
        return self.tracker(trainer)


def branch_scores(
    tracker: BranchTracker, splits: dict[str, Any], views: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Each branch as a unimodal model at its own selected epoch: ``{view: {"val_accuracy",
    "val_auroc", "val_nll", "test_accuracy", ...}}``."""
    out = {}
    for m, name in enumerate(views):
        r = {}
        for split in ("val", "test"):
            p, y = tracker.proba(splits[split], m), splits[split].labels
            r[f"{split}_accuracy"] = accuracy(p, y)
            r[f"{split}_auroc"] = macro_auroc(p, y)
            r[f"{split}_nll"] = nll(p, y)
        out[name] = r
    return out


def lambdas(point: dict[str, float]) -> dict[str, Any]:
    """TrainConfig values of a grid point (lambda2 goes into ``lambdas``)."""
    out: dict[str, Any] = {"lr": point["lr"]}
    if "lambda2" in point:
        out["lambdas"] = (1.0, point["lambda2"], 0.5)
    return out


# ---------------------------------------------------------------------- statistics
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return math.nan, math.nan
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def paired_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided paired t-test p-value (``scipy.stats.ttest_rel``) of ``a`` vs ``b``.

    NaN with fewer than two pairs; with identical differences the t statistic is undefined:
    1.0 when they are all zero, else NaN.
    """
    from scipy.stats import ttest_rel

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.size != y.size:
        raise ValueError(f"paired samples differ in size: {x.size} vs {y.size}")
    if x.size < 2:
        return math.nan
    d = x - y
    if np.allclose(d, d[0], rtol=0.0, atol=1e-15):
        return 1.0 if abs(d[0]) < 1e-15 else math.nan
    return float(ttest_rel(x, y).pvalue)


def cell(
    runs: list[dict[str, Any]],
    metric: str,
    match: dict[str, Any],
    baseline: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Mean ± std of ``metric`` over the runs that ``match`` (and have it); paired p against
    ``baseline``.

    Runs are paired by seed: ``baseline`` is a second filter (e.g. the baseline row in the same
    column) and only seeds present in both enter the test.
    """
    sel = {r["seed"]: r[metric] for r in runs if _matches(r, match) and metric in r}
    mean, std = mean_std(list(sel.values()))
    out: dict[str, Any] = {"mean": mean, "std": std, "n": len(sel)}
    if baseline is not None:
        base = {r["seed"]: r[metric] for r in runs if _matches(r, baseline) and metric in r}
        seeds = sorted(set(sel) & set(base))
        out["p_value"] = paired_p([sel[s] for s in seeds], [base[s] for s in seeds])
        diffs = [sel[s] - base[s] for s in seeds]
        out["diff_mean"], sd = mean_std(diffs)
        out["diff_ci95"] = _ci95(out["diff_mean"], sd, len(diffs))
    return out


def _ci95(mean: float, sd: float, n: int) -> list[float] | None:
    """95% t interval of a mean paired difference (None below two pairs)."""
    if n < 2 or not math.isfinite(mean):
        return None
    from scipy.stats import t

    half = float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return [mean - half, mean + half]


def _matches(run: dict[str, Any], match: dict[str, Any]) -> bool:
    return all(run.get(k) == v for k, v in match.items())


def fmt(c: dict[str, Any], digits: int = 3, p: bool = True) -> str:
    """``0.912 ± 0.010 (p=0.031)`` for a :func:`cell`."""
    if c["n"] == 0 or math.isnan(c["mean"]):
        return "n/a"
    text = f"{c['mean']:.{digits}f} ± {c['std']:.{digits}f}"
    if p and "p_value" in c:
        pv = c["p_value"]
        text += " (p=n/a)" if pv is None or math.isnan(pv) else f" (p={pv:.3g})"
    return text


def protocol(settings: Settings, choice: str) -> str:
    """The report's protocol sentence: seeds, epochs, early stopping, and ``choice`` (what of
    the grid is chosen, e.g. "lr chosen per method") on the tuning seeds' validation NLL (no
    closing punctuation)."""
    return (
        f"{len(settings.seeds)} seeds, up to {settings.epochs} epochs (early stopping on "
        f"validation NLL, patience {settings.patience}); {choice} on the validation NLL of "
        f"{settings.tune_seeds} tuning seed(s)"
    )


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------- outputs
def machine() -> dict[str, Any]:
    """Where the numbers come from."""
    return {
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def _json_safe(x: Any) -> Any:
    if isinstance(x, float):
        return None if not math.isfinite(x) else x
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return _json_safe(x.item())
    return x


def write_outputs(
    out: str | Path,
    name: str,
    settings: Settings,
    params: dict[str, Any],
    runs: list[dict[str, Any]],
    summary: dict[str, Any],
    markdown: str,
    figure: Any,
) -> dict[str, Path]:
    """Write ``NAME.json`` (everything), ``NAME.md`` (the tables) and ``NAME.png`` into ``out``.

    NaN (e.g. an undefined p-value) is written as JSON ``null``.
    """
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = name.replace("-", "_")
    paths = {k: out / f"{stem}.{k}" for k in ("json", "md", "png")}
    payload = {
        "experiment": name,
        "settings": settings.to_dict(),
        "params": params,
        "machine": machine(),
        "test": "two-sided paired t-test over seeds (scipy.stats.ttest_rel)",
        "protocol": "docs/PROTOCOL.md: early stopping on validation NLL, the grid chosen on "
        "the tuning seeds' validation NLL, test numbers of the restored weights",
        "summary": summary,
        "runs": runs,
    }
    paths["json"].write_text(json.dumps(_json_safe(payload), indent=1) + "\n")
    if settings.quick:  # a smoke run must never be read as a result
        markdown = (
            "> QUICK RUN (smoke test: tiny model, few epochs); the numbers mean nothing.\n\n"
            + markdown
        )
    paths["md"].write_text(markdown.rstrip() + "\n")
    figure.savefig(paths["png"], dpi=110)
    plt.close(figure)
    return paths


def conclude(
    out: str | Path,
    name: str,
    settings: Settings,
    conds: Sequence[Condition],
    params: dict[str, Any],
    runs: list[dict[str, Any]],
    summary: dict[str, Any],
    markdown: Callable[..., str],
    figure: Callable[..., Any],
) -> dict[str, Any]:
    """Write an experiment over conditions (:func:`write_outputs` with ``markdown(summary,
    settings, params, conds)`` and ``figure(summary, conds)``); returns ``{"summary", "runs"}``."""
    md = markdown(summary, settings, params, conds)
    write_outputs(out, name, settings, params, runs, summary, md, figure(summary, conds))
    return {"summary": summary, "runs": runs}


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def noise_for(views: Sequence[str], noise_views: Sequence[str]) -> tuple[str, ...]:
    """The noisy views that are among ``views`` (prepare_mfeat resolves names among those)."""
    return tuple(v for v in noise_views if v in views)


ALPHA = 0.05  # significance level of every verdict
RECORD_KEYS = (
    "val_accuracy",
    "val_auroc",
    "val_nll",
    "test_accuracy",
    "test_auroc",
    "test_nll",
    "selected_epoch",
    "epochs_run",
    "seconds",
)


def record(result: dict[str, Any], point: dict[str, float] | None, **keys: Any) -> dict[str, Any]:
    """One JSON run: ``keys`` (seed, row, ...), the grid point and the standard metrics."""
    out = dict(keys)
    if point is not None:
        out.update(point)
    out.update({k: result[k] for k in RECORD_KEYS if k in result})
    out.update({k: v for k, v in result.items() if k.startswith("test_") and k not in out})
    return out


def premise_check(
    runs: list[dict[str, Any]], match: dict[str, Any], views: Sequence[str], fused: str = "concat"
) -> dict[str, Any]:
    """Is ``fused`` (concat) worse than the best single view? (OmniFuse Table 2's premise.)

    The runs hold ``method`` = ``fused`` and ``uni:VIEW`` rows with ``val_accuracy`` and
    ``test_accuracy`` / ``test_auroc`` / ``test_nll``. The best single view is the one with the
    highest mean VALIDATION accuracy (no test number chooses it). Verdict: ``"premise
    holds"`` when ``fused``'s test accuracy is lower than the best single view's with a
    paired p < 0.05; else ``"does not hold"`` (the reason says which way and how sure).
    """
    unis = [f"uni:{v}" for v in views]
    best = max(unis, key=lambda u: cell(runs, "val_accuracy", {**match, "method": u})["mean"])
    metrics = {
        m: {
            "fused": cell(runs, m, {**match, "method": fused}, {**match, "method": best}),
            "best_single_view": cell(runs, m, {**match, "method": best}),
        }
        for m in ("test_accuracy", "test_auroc", "test_nll")
    }
    acc = metrics["test_accuracy"]["fused"]
    p, diff = acc.get("p_value"), acc.get("diff_mean", math.nan)
    if p is None or not math.isfinite(p):
        verdict, reason = "does not hold", "not testable: fewer than two paired seeds"
    elif diff < 0 and p < ALPHA:
        verdict, reason = "premise holds", f"{fused} below the best single view (p={p:.3g})"
    elif diff < 0:
        verdict, reason = "does not hold", f"{fused} lower, not significantly (p={p:.3g})"
    else:
        verdict, reason = "does not hold", f"{fused} at or above the best single view (p={p:.3g})"
    return {
        "fused": fused,
        "best_single_view": best.removeprefix("uni:"),
        "chosen_by": "mean validation accuracy",
        "metrics": metrics,
        "verdict": verdict,
        "reason": reason,
    }


def premise_markdown(check: dict[str, Any]) -> list[str]:
    """Lines: the verdict and a table of fused vs best single view."""
    rows = []
    for m, c in check["metrics"].items():
        rows.append([m.removeprefix("test_"), fmt(c["fused"]), fmt(c["best_single_view"], p=False)])
    return [
        f"**Premise check** ({check['fused']} vs the best single view, "
        f"`{check['best_single_view']}`, chosen by {check['chosen_by']}): "
        f"**{check['verdict']}** ({check['reason']}).",
        "",
        md_table(
            [
                "metric",
                f"{check['fused']} (p vs best view)",
                f"best single view ({check['best_single_view']})",
            ],
            rows,
        ),
    ]


__all__ = [
    "ALPHA",
    "record",
    "BranchWatch",
    "Condition",
    "Settings",
    "Source",
    "branch_model",
    "branch_scores",
    "builtin_noise",
    "cell",
    "conclude",
    "conditions_for",
    "fit_early",
    "fmt",
    "lambdas",
    "machine",
    "make_trainer",
    "md_table",
    "mean_std",
    "nll",
    "noise_for",
    "paired_p",
    "predict",
    "premise_check",
    "premise_markdown",
    "protocol",
    "pyplot",
    "scores",
    "setup",
    "train_eval",
    "tune_rows",
    "tuned",
    "write_outputs",
]
