"""Imputation, isolated: Imp vs No-imp where imputation can carry information.

OmniFuse Figs. 4-6 compare the full model ("Imp") with the model without IMP-forward /
IMP-backward ("No-imp"). Here No-imp gets the same modality-drop augmentation as Imp
(:class:`.models.DropAugment`), so the two differ in the imputation alone, and each model is
read two ways: ``joint`` (the paper's prediction, ``softmax(o)``) and ``imputed`` (the mean
of ``softmax(o)`` and the unimodal heads on ``v_full``, so that ``v'`` reaches the
prediction; see :meth:`omnifuse_fast.nn.OmniFuse.predict_proba`). Settings:

  - ``random r``: every view of every sample missing with probability r, in every split (each
    sample keeps one view);
  - ``strong-view``: train and validation complete (paired views), test with the strongest
    view (the best per-view logistic regression on the validation split: no test number
    chooses it) missing in 90% of the test rows: the imputer learned from paired data what
    the missing view looks like;
  - ``label-scarce``: views missing at 0.5, labels for 20% of the training rows only
    (:class:`.models.LabelScarce`: the classification terms on the labeled rows, the
    imputation losses on all of them; validation and test fully labeled).

Views: ``fou kar zer`` on the built-in data (``kar`` the strong one), all views of a file.
Paired t-test: Imp vs No-imp, per setting and reading.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnifuse_fast.data.corruption import Corruption
from omnifuse_fast.experiments._common import (
    Condition,
    Settings,
    Source,
    cell,
    fmt,
    lambdas,
    md_table,
    pyplot,
    record,
    train_eval,
    tuned,
    write_outputs,
)
from omnifuse_fast.experiments.models import DropAugment, LabelScarce

VIEWS = ("fou", "kar", "zer")
RATES = (0.5, 0.9)
QUICK_RATES = (0.5,)
STRONG_RATE = 0.9  # test rows that lose the strong view
SCARCE_RATE = 0.5  # missing rate of the label-scarce setting
LABELED = 0.2  # fraction of training rows with a label
VARIANTS = ("imp", "no-imp")
READINGS = ("joint", "imputed")


def strongest_view(splits: dict[str, Any]) -> int:
    """The view whose logistic regression (fitted on its observed training rows) has the
    highest accuracy on its observed validation rows."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    tr, va = splits["train"], splits["val"]
    best, best_acc = 0, -1.0
    with threadpool_limits(1):
        for m in range(tr.num_views):
            a, b = tr.observed[:, m].numpy(), va.observed[:, m].numpy()
            if a.sum() < 2 or b.sum() < 1:
                continue
            clf = LogisticRegression(max_iter=500).fit(tr.views[m][a].numpy(), tr.labels[a].numpy())
            acc = float(clf.score(va.views[m][b].numpy(), va.labels[b].numpy()))
            if acc > best_acc:
                best, best_acc = m, acc
    return best


def drop_view(split: Any, view: int, rate: float, seed: int) -> Any:
    """A copy of ``split`` where ``view`` is missing in a ``rate`` share of the rows that
    observe it and another view (each row keeps one view)."""
    rng = np.random.default_rng([seed, view, 7919])
    s = copy.copy(split)
    others = s.observed.sum(1) - s.observed[:, view].long() >= 1
    missing = torch.from_numpy(rng.random(len(s)) < rate) & others & s.observed[:, view]
    s.observed = s.observed.clone()
    s.observed[:, view] &= ~missing
    s.views = list(s.views)
    s.views[view] = s.views[view].masked_fill(missing.unsqueeze(1), 0.0)
    return s


def scarce_labels(split: Any, fraction: float, seed: int) -> Any:
    """A copy of ``split`` whose labels are -1 (unknown) outside a ``fraction`` of the rows
    (stratified by class where every class allows it)."""
    from sklearn.model_selection import train_test_split

    y = split.labels.numpy()
    idx = np.arange(len(y))
    try:
        keep = train_test_split(idx, train_size=fraction, random_state=seed, stratify=y)[0]
    except ValueError:  # a class too small to stratify: a plain random share
        keep = train_test_split(idx, train_size=fraction, random_state=seed)[0]
    labels = torch.full_like(split.labels, -1)
    labels[keep] = split.labels[keep]
    s = copy.copy(split)
    s.labels = labels
    return s


def realized_rate(splits: dict[str, Any]) -> float:
    """Fraction of missing (sample, view) entries over all splits."""
    obs = torch.cat([splits[k].observed for k in ("train", "val", "test")])
    return float(1.0 - obs.float().mean())


def run(
    out: str | Path,
    settings: Settings,
    views: tuple[str, ...] | None = None,
    rates: tuple[float, ...] | None = None,
) -> dict[str, Any]:
    """Run the settings and write ``missing_rate.{json,md,png}`` into ``out``."""
    source = Source(settings)
    if views is None:
        views = VIEWS if source.builtin and settings.data_views is None else None
    rates = rates or (QUICK_RATES if settings.quick else RATES)
    if settings.missing_rate is not None:
        rates = (settings.missing_rate,)
    corruption = settings.corruption or Corruption("none")
    names = list(views) if views is not None else source.view_names
    setups = [(f"random {r:g}", r) for r in rates]
    setups += [("strong-view", 0.0), ("label-scarce", SCARCE_RATE)]
    runs: list[dict[str, Any]] = []
    tuning: dict[str, dict[str, Any]] = {}
    strong: dict[int, str] = {}
    for setting, rate in setups:
        cond = Condition(setting, rate, corruption)
        tuning[setting] = {}

        def data(seed, setting=setting, cond=cond):
            splits = dict(source.splits(seed, cond, views))
            if setting == "strong-view":
                m = strongest_view(splits)
                strong[seed] = names[m]
                splits["test"] = drop_view(splits["test"], m, STRONG_RATE, seed)
            elif setting == "label-scarce":
                splits["train"] = scarce_labels(splits["train"], LABELED, seed)
            return splits

        for variant in VARIANTS:

            def run_one(seed, point, variant=variant, setting=setting, data=data):
                splits = data(seed)
                switches = {}
                if variant == "no-imp":
                    switches = {"use_imp_forward": False, "use_imp_backward": False}
                config = settings.config(seed, **switches, **lambdas(point))

                def factory(tr):
                    model = tr.model
                    if variant == "no-imp":
                        model = DropAugment(model, config.drop_rate)
                    return LabelScarce(model) if setting == "label-scarce" else model

                _, result = train_eval(config, splits, settings, factory, readings=READINGS)
                result["realized_rate"] = realized_rate(splits)
                return result

            results, tuning[setting][variant] = tuned(settings, True, run_one)
            point = tuning[setting][variant]["chosen"]
            for seed, result in results.items():
                r = record(result, point, seed=seed, setting=setting, variant=variant)
                r["realized_rate"] = result["realized_rate"]
                if setting == "strong-view":
                    r["strong_view"] = strong.get(seed)
                runs.append(r)
    summary: dict[str, Any] = {}
    for setting, _ in setups:
        entry: dict[str, Any] = {"tuning": tuning[setting]}
        entry["realized_rate"] = float(
            np.mean([r["realized_rate"] for r in runs if r["setting"] == setting])
        )
        for reading in READINGS:
            pre = "test_" if reading == "joint" else "test_imputed_"
            entry[reading] = {}
            for metric in ("accuracy", "auroc", "nll"):
                key, base = pre + metric, {"setting": setting}
                entry[reading][metric] = {
                    "imp": cell(
                        runs, key, {**base, "variant": "imp"}, {**base, "variant": "no-imp"}
                    ),
                    "no-imp": cell(runs, key, {**base, "variant": "no-imp"}),
                }
        if setting == "strong-view":
            entry["strong_view"] = sorted({v for v in strong.values()})
        summary[setting] = entry
    params = {
        "views": names,
        "settings": {s: r for s, r in setups},
        "strong_view_test_missing": STRONG_RATE,
        "labeled_fraction": LABELED,
        "corruption": corruption.to_dict(),
        "variants": {"imp": "full OmniFuse", "no-imp": "no IMP-fw/bw, same drop augmentation"},
        "readings": {
            "joint": "softmax(o) (the paper's prediction)",
            "imputed": "mean of softmax(o) and the M unimodal heads on v_full",
        },
        "data": source.describe(),
    }
    md = _markdown(summary, settings, params)
    write_outputs(out, "missing-rate", settings, params, runs, summary, md, _figure(summary))
    return {"summary": summary, "runs": runs}


def _markdown(summary, settings, params) -> str:
    parts = [
        f"# Imputation, isolated (OmniFuse Figs. 4-6) on {params['data']}",
        "",
        f"Views {'+'.join(params['views'])}; corruption {params['corruption']}; "
        f"{len(settings.seeds)} seeds, up to {settings.epochs} epochs (early stopping on "
        f"validation NLL, patience {settings.patience}), grid point per variant chosen on the "
        f"validation NLL of {settings.tune_seeds} tuning seed(s). No-imp has the same drop "
        "augmentation as Imp. p: paired t-test Imp vs No-imp. Readings: `joint` = softmax(o), "
        "the paper's; `imputed` = mean of softmax(o) and the unimodal heads on v_full.",
    ]
    rows = []
    for setting, e in summary.items():
        for reading in READINGS:
            r = e[reading]
            rows.append(
                [
                    setting,
                    f"{e['realized_rate']:.3f}",
                    reading,
                    fmt(r["accuracy"]["imp"]),
                    fmt(r["accuracy"]["no-imp"]),
                    fmt(r["auroc"]["imp"]),
                    fmt(r["auroc"]["no-imp"]),
                    fmt(r["nll"]["imp"]),
                    fmt(r["nll"]["no-imp"]),
                ]
            )
    parts += [
        "",
        md_table(
            [
                "setting",
                "missing",
                "reading",
                "acc Imp",
                "acc No-imp",
                "AUROC Imp",
                "AUROC No-imp",
                "NLL Imp",
                "NLL No-imp",
            ],
            rows,
        ),
    ]
    if "strong-view" in summary:
        parts += [
            "",
            f"Strong view (chosen on validation): {summary['strong-view']['strong_view']}.",
        ]
    return "\n".join(parts)


def _figure(summary):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    settings = list(summary)
    xs = np.arange(len(settings))
    for ax, reading in zip(axes, READINGS):
        for i, variant in enumerate(VARIANTS):
            cells = [summary[s][reading]["accuracy"][variant] for s in settings]
            ax.bar(
                xs + (i - 0.5) * 0.38,
                [c["mean"] for c in cells],
                0.38,
                yerr=[c["std"] for c in cells],
                capsize=2,
                label=variant,
            )
        ax.set_xticks(xs, settings, rotation=20, ha="right")
        ax.set(title=f"reading: {reading}", ylabel="test accuracy", ylim=(0.0, 1.0))
        ax.legend()
    fig.suptitle("Imp vs No-imp (same drop augmentation)")
    return fig
