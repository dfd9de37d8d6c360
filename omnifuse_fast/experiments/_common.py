"""Shared plumbing of the experiments: settings, one training run, statistics, outputs."""

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

from omnifuse_fast.train import TrainConfig, Trainer

# --quick: a tiny model and large batches, enough to exercise every code path in a second a run.
QUICK_MODEL = {
    "dim": 8,
    "hidden": 16,
    "num_blocks": 2,
    "encoder_hidden": 32,
    "head_hidden": 16,
    "batch_size": 256,
}
DEFAULT_EPOCHS = 8  # sized for a shared 2-core CPU: every experiment in minutes
DEFAULT_SEEDS = 5
QUICK_EPOCHS = 1
QUICK_SEEDS = 2


@dataclass
class Settings:
    """What every experiment shares: seeds, epochs, model size and the quick switch."""

    seeds: list[int]
    epochs: int
    quick: bool
    backend: str = "auto"
    overrides: dict[str, int] = field(default_factory=dict)  # TrainConfig fields

    @classmethod
    def make(
        cls,
        seeds: int | Sequence[int] | None,
        quick: bool,
        epochs: int | None,
        backend: str = "auto",
    ) -> Settings:
        """Defaults: 5 seeds and 8 epochs; ``quick``: 2 seeds, 1 epoch, a tiny model."""
        if seeds is None:
            seeds = QUICK_SEEDS if quick else DEFAULT_SEEDS
        seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
        if not seed_list or any(s < 0 for s in seed_list):
            raise ValueError(f"seeds must be a count >= 1 or a list of ints >= 0, got {seeds!r}")
        if epochs is None:
            epochs = QUICK_EPOCHS if quick else DEFAULT_EPOCHS
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
        overrides = dict(QUICK_MODEL) if quick else {}
        return cls(seed_list, epochs, bool(quick), backend, overrides)

    def config(self, seed: int, **values: Any) -> TrainConfig:
        """A TrainConfig with these settings (``values`` override)."""
        base = {"epochs": self.epochs, "seed": seed, "backend": self.backend, **self.overrides}
        return TrainConfig(**{**base, **values})

    def to_dict(self) -> dict[str, Any]:
        """Plain types, for the JSON output."""
        return asdict(self)


def train_run(
    config: TrainConfig,
    splits: dict[str, Any],
    model_factory: Callable[[Trainer], torch.nn.Module] | None = None,
) -> tuple[Trainer, dict[str, Any]]:
    """Train one model and test it (best validation AUROC); returns the trainer and result.

    ``model_factory(trainer)`` swaps in a model the trainer cannot build (a fusion variant,
    a wrapper): it must take ``model(views, observed, labels)`` returning an object with
    ``losses["total"]`` and ``modality_logits``, and have ``use_tla`` and ``predict_proba``.
    The optimizer is rebuilt on the new model with the config's settings.
    """
    trainer = Trainer(config, None, splits=splits)
    if model_factory is not None:
        trainer.model = model_factory(trainer).to(trainer.device)
        trainer.optimizer = torch.optim.AdamW(
            trainer.model.parameters(),
            lr=config.lr,
            weight_decay=config.weight_decay,
            foreach=True,
        )
    result = trainer.fit()
    if os.environ.get("OMNIFUSE_EXPERIMENT_LOG"):  # one line a run, for long sweeps
        print(
            f"[{datetime.datetime.now():%H:%M:%S}] {config.method} seed {config.seed}: "
            f"acc {result['test_accuracy']:.4f} auroc {result['test_auroc']:.4f} "
            f"({result['seconds']:.1f}s)",
            file=sys.stderr,
            flush=True,
        )
    return trainer, result


def use_best(trainer: Trainer) -> None:
    """Load the selected (best validation) weights into ``trainer.model``."""
    if trainer.config.select_best and trainer.best is not None:
        trainer.model.load_state_dict(trainer.best["model"])


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
    """Mean ± std of ``metric`` over the runs that ``match``; paired p against ``baseline``.

    Runs are paired by seed: ``baseline`` is a second filter (e.g. the baseline row in the same
    column) and only seeds present in both enter the test.
    """
    sel = {r["seed"]: r[metric] for r in runs if _matches(r, match)}
    mean, std = mean_std(list(sel.values()))
    out: dict[str, Any] = {"mean": mean, "std": std, "n": len(sel)}
    if baseline is not None:
        base = {r["seed"]: r[metric] for r in runs if _matches(r, baseline)}
        seeds = sorted(set(sel) & set(base))
        out["p_value"] = paired_p([sel[s] for s in seeds], [base[s] for s in seeds])
        out["diff_mean"] = mean_std([sel[s] - base[s] for s in seeds])[0]
    return out


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
        "summary": summary,
        "runs": runs,
    }
    paths["json"].write_text(json.dumps(_json_safe(payload), indent=1) + "\n")
    paths["md"].write_text(markdown.rstrip() + "\n")
    figure.savefig(paths["png"], dpi=110)
    plt.close(figure)
    return paths


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def noise_for(views: Sequence[str], noise_views: Sequence[str]) -> tuple[str, ...]:
    """The noisy views that are among ``views`` (prepare_mfeat resolves names among those)."""
    return tuple(v for v in noise_views if v in views)


__all__ = [
    "Settings",
    "cell",
    "fmt",
    "machine",
    "md_table",
    "mean_std",
    "noise_for",
    "paired_p",
    "pyplot",
    "train_run",
    "use_best",
    "write_outputs",
]
