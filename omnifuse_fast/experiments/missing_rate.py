"""Accuracy / AUROC vs missing rate, with and without imputation (OmniFuse Figs. 4-6).

Two kinds of missingness on a 3-view set (train, validation and test alike):
  - ``random``: every view of every sample missing with probability r (each sample keeps at
    least one view, so the realized rate is below r at high r: see ``realized_rate``);
  - ``view=NAME``: only that view is missing, with probability r; the others are complete.
"Imp" is the full OmniFuse; "No-imp" is OmniFuse without IMP-forward / IMP-backward (the
missing blocks keep their missing embeddings). Paired t-test: Imp vs No-imp, per point.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnifuse_fast.data import prepare_mfeat
from omnifuse_fast.experiments._common import (
    Settings,
    cell,
    fmt,
    md_table,
    pyplot,
    train_run,
    write_outputs,
)

VIEWS = ("fou", "kar", "zer")
RATES = (0.0, 0.3, 0.6, 0.9)
VIEW_RATES = (0.9,)
QUICK_RATES = (0.0, 0.9)
QUICK_VIEW_RATES = (0.9,)
VARIANTS = {"imp": {}, "no-imp": {"use_imp_forward": False, "use_imp_backward": False}}


def mask_one_view(splits: dict[str, Any], view: int, rate: float, seed: int) -> dict[str, Any]:
    """Copies of complete ``splits`` where ``view`` is missing with probability ``rate``."""
    rng = np.random.default_rng([seed, view, 7919])  # its own stream: independent of the split
    out = {}
    for name in ("train", "val", "test"):
        s = copy.copy(splits[name])
        missing = torch.from_numpy(rng.random(len(s)) < rate)
        s.observed = s.observed.clone()
        s.observed[:, view] &= ~missing
        s.views = list(s.views)
        s.views[view] = s.views[view].masked_fill(missing.unsqueeze(1), 0.0)  # zero-fill
        out[name] = s
    return out


def realized_rate(splits: dict[str, Any]) -> float:
    """Fraction of missing (sample, view) entries over all splits."""
    obs = torch.cat([splits[k].observed for k in ("train", "val", "test")])
    return float(1.0 - obs.float().mean())


def run(
    out: str | Path,
    settings: Settings,
    views: tuple[str, ...] = VIEWS,
    rates: tuple[float, ...] | None = None,
    view_rates: tuple[float, ...] | None = None,
) -> dict[str, Any]:
    """Run the sweep and write ``missing_rate.{json,md,png}`` into ``out``."""
    rates = rates or (QUICK_RATES if settings.quick else RATES)
    view_rates = view_rates or (QUICK_VIEW_RATES if settings.quick else VIEW_RATES)
    view_list = views[:1] if settings.quick else views
    runs: list[dict[str, Any]] = []

    def train_all(splits, seed, kind, rate, config_rate):
        for variant, switches in VARIANTS.items():
            config = settings.config(seed, missing_rate=config_rate, **switches)
            _, result = train_run(config, splits)
            runs.append(
                {
                    "seed": seed,
                    "kind": kind,
                    "rate": rate,
                    "realized_rate": realized_rate(splits),
                    "variant": variant,
                    "test_auroc": result["test_auroc"],
                    "test_accuracy": result["test_accuracy"],
                    "seconds": result["seconds"],
                }
            )

    for seed in settings.seeds:
        for rate in rates:
            splits = prepare_mfeat(rate, seed=seed, views=views)
            train_all(splits, seed, "random", rate, rate)
        complete = prepare_mfeat(0.0, seed=seed, views=views)
        for name in view_list:
            for rate in view_rates:
                splits = mask_one_view(complete, views.index(name), rate, seed)
                train_all(splits, seed, f"view={name}", rate, 0.0)

    kinds = ["random"] + [f"view={v}" for v in view_list]
    summary: dict[str, Any] = {}
    for kind in kinds:
        # rate 0 is the same complete data whatever the kind: reuse the random sweep's runs
        pts = sorted({r["rate"] for r in runs if r["kind"] == kind} | ({0.0} & set(rates)))
        summary[kind] = {}
        for rate in pts:
            src = "random" if rate == 0 else kind
            entry: dict[str, Any] = {
                "realized_rate": float(
                    np.mean(
                        [r["realized_rate"] for r in runs if r["kind"] == src and r["rate"] == rate]
                    )
                )
            }
            for metric in ("test_auroc", "test_accuracy"):
                base = {"kind": src, "rate": rate}
                entry[metric] = {
                    "imp": cell(
                        runs, metric, {**base, "variant": "imp"}, {**base, "variant": "no-imp"}
                    ),
                    "no-imp": cell(runs, metric, {**base, "variant": "no-imp"}),
                }
            summary[kind][str(rate)] = entry
    params = {
        "views": list(views),
        "rates": list(rates),
        "view_rates": list(view_rates),
        "per_view": list(view_list),
        "variants": {k: v for k, v in VARIANTS.items()},
    }
    md = _markdown(summary, settings, params)
    write_outputs(out, "missing-rate", settings, params, runs, summary, md, _figure(summary))
    return {"summary": summary, "runs": runs}


def _markdown(summary, settings, params) -> str:
    parts = [
        "# Missing rate (OmniFuse Figs. 4-6) on UCI multiple features",
        "",
        f"Views {'+'.join(params['views'])}, no noise; {len(settings.seeds)} seeds, "
        f"{settings.epochs} epochs; mean ± std over seeds; p: paired t-test Imp vs No-imp. "
        "`realized` is the fraction of missing (sample, view) entries actually drawn "
        "(random missing keeps one view per sample).",
    ]
    for kind, points in summary.items():
        rows = []
        for rate, e in points.items():
            rows.append(
                [
                    rate,
                    f"{e['realized_rate']:.3f}",
                    fmt(e["test_auroc"]["imp"]),
                    fmt(e["test_auroc"]["no-imp"]),
                    fmt(e["test_accuracy"]["imp"]),
                    fmt(e["test_accuracy"]["no-imp"]),
                ]
            )
        parts += [
            "",
            f"## Missing: {kind}",
            "",
            md_table(
                ["rate", "realized", "AUROC Imp", "AUROC No-imp", "acc Imp", "acc No-imp"], rows
            ),
        ]
    return "\n".join(parts)


def _figure(summary):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes, ("test_auroc", "test_accuracy")):
        for i, (kind, points) in enumerate(summary.items()):
            xs = [float(r) for r in points]
            for variant, style in (("imp", "-o"), ("no-imp", "--x")):
                cells = [points[r][metric][variant] for r in points]
                ax.errorbar(
                    xs,
                    [c["mean"] for c in cells],
                    yerr=[c["std"] for c in cells],
                    fmt=style,
                    color=colors[i % len(colors)],
                    capsize=2,
                    label=f"{kind} {variant}",
                )
        ax.set(xlabel="missing rate", ylabel=metric.replace("_", " "))
    axes[1].legend(fontsize=7)
    fig.suptitle("Missing rate: with (solid) and without (dashed) imputation")
    return fig
