"""Fusion operators and the premise check: concat vs the best single view, then DWFuse vs
concat, sum and late fusion.

OmniFuse's Table 2 starts from concat fusion being WORSE than the best single modality
("modality laziness"); its components are meant to fix that. So this experiment first checks
the premise in each condition: concat vs the best single view (chosen by validation accuracy)
in test accuracy, AUROC and NLL, with a verdict, ``"premise holds"`` (concat significantly
below, paired p < 0.05) or ``"does not hold"``. Then every fused model against concat.

Conditions (default, built-in data): ``uniform`` (views missing at 0.5, Gaussian noise std 1
on ``kar`` and ``pix``: the first results' low quality) and ``swap`` (per sample, 2 of the 6
views replaced by the same view of a sample of another class). A user's file: ``as-is`` and
``swap``. ``--corruption`` / ``--missing-rate`` replace them by one condition.

``dwfuse`` is Table 4's row (b), ``omnifuse`` the full model; ``sum`` and ``late`` are
:mod:`.models`. The unimodal models are the late-fusion model's per-view branches (no shared
parameter), each early-stopped at its own lowest validation NLL, tested alone on every test
sample (a missing view gives the branch's output on the missing embedding).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omnifuse_fast.data.corruption import Corruption
from omnifuse_fast.experiments._common import (
    BranchWatch,
    Condition,
    Settings,
    Source,
    branch_model,
    branch_scores,
    builtin_noise,
    cell,
    conclude,
    fmt,
    lambdas,
    md_table,
    premise_check,
    premise_markdown,
    protocol,
    pyplot,
    record,
    setup,
    train_eval,
    tune_rows,
)
from omnifuse_fast.experiments.models import LateFusion, SumFusion

FUSED = ("concat", "sum", "late", "dwfuse", "omnifuse")
OMNIFUSE_ROWS = ("dwfuse", "omnifuse")


def default_conditions(source: Source) -> list[Condition]:
    """``uniform`` + ``swap`` on the built-in data; ``as-is`` + ``swap`` on a file."""
    k = 2 if len(source.view_names) >= 4 else 1
    swap = Condition(f"swap k={k}", 0.0, Corruption("swap", k=k))
    if source.builtin:
        return [Condition("uniform", 0.5, builtin_noise()), swap]
    return [Condition("as-is", 0.0, Corruption("none")), swap]


def _values(method: str) -> dict[str, Any]:
    if method == "dwfuse":
        return {"use_tla": False, "use_imp_forward": False, "use_imp_backward": False}
    if method == "omnifuse":
        return {}
    return {"method": "concat"}  # concat; sum / late swap the model


def run(
    out: str | Path, settings: Settings, conditions: list[Condition] | None = None
) -> dict[str, Any]:
    """Run the comparison and write ``fusion.{json,md,png}`` into ``out``."""
    source, conds = setup(settings, conditions, default_conditions)

    def run_one(method, splits, seed, point):
        config = settings.config(seed, **_values(method), **lambdas(point))
        factory = None
        if method in ("sum", "late"):
            factory = branch_model(config, SumFusion if method == "sum" else LateFusion)
        watch = BranchWatch(splits["val"]) if method == "late" else None
        result = train_eval(config, splits, settings, factory, watch)[1]
        if watch is not None and watch.tracker is not None:
            # the unimodal models, each at its own best epoch
            result["unimodal"] = branch_scores(watch.tracker, splits, source.view_names)
        return result

    runs: list[dict[str, Any]] = []
    done, tuning = tune_rows(
        settings, source, conds, FUSED, run_one, lambda method: method in OMNIFUSE_ROWS
    )
    for cond, method, point, results in done:
        for seed, result in results.items():
            base = {"seed": seed, "condition": cond.name}
            runs.append(record(result, point, **base, method=method))
            for name, r in result.get("unimodal", {}).items():
                runs.append(record(r, point, **base, method=f"uni:{name}"))
    summary: dict[str, Any] = {}
    for cond in conds:
        match = {"condition": cond.name}
        entry: dict[str, Any] = {"premise": premise_check(runs, match, source.view_names)}
        for metric in ("test_accuracy", "test_auroc", "test_nll"):
            entry[metric] = {
                m: cell(
                    runs,
                    metric,
                    {**match, "method": m},
                    {**match, "method": "concat"} if m != "concat" else None,
                )
                for m in FUSED
            }
            entry[metric]["unimodal"] = {
                v: cell(runs, metric, {**match, "method": f"uni:{v}"}) for v in source.view_names
            }
        entry["tuning"] = tuning[cond.name]
        summary[cond.name] = entry
    summary["premise"] = {c.name: summary[c.name]["premise"]["verdict"] for c in conds}
    params = {"conditions": {c.name: c.to_dict() for c in conds}, "views": source.view_names}
    params["data"] = source.describe()
    return conclude(out, "fusion", settings, conds, params, runs, summary, _markdown, _figure)


def _markdown(summary, settings, params, conds) -> str:
    parts = [
        f"# Fusion operators and the premise check on {params['data']}",
        "",
        protocol(settings, "each row's grid point chosen")
        + "; mean ± std; p: paired t-test over seeds against concat.",
    ]
    for cond in conds:
        e = summary[cond.name]
        rows = []
        for m in FUSED:
            rows.append(
                [m]
                + [fmt(e[k][m]) for k in ("test_accuracy", "test_auroc", "test_nll")]
                + [_point(e["tuning"][m]["chosen"])]
            )
        for v, c in e["test_accuracy"]["unimodal"].items():
            star = " (best on val)" if v == e["premise"]["best_single_view"] else ""
            rows.append(
                [
                    f"uni:{v}{star}",
                    fmt(c),
                    fmt(e["test_auroc"]["unimodal"][v]),
                    fmt(e["test_nll"]["unimodal"][v]),
                    _point(e["tuning"]["late"]["chosen"]),
                ]
            )
        parts += [
            *cond.heading(),
            *premise_markdown(e["premise"]),
            "",
            md_table(["model", "accuracy", "AUROC", "NLL", "grid point"], rows),
        ]
    return "\n".join(parts)


def _point(p: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in p.items())


def _figure(summary, conds):
    plt = pyplot()
    fig, axes = plt.subplots(1, len(conds), figsize=(6 * len(conds), 4), constrained_layout=True)
    axes = [axes] if len(conds) == 1 else list(axes)
    for ax, cond in zip(axes, conds):
        acc = summary[cond.name]["test_accuracy"]
        names = list(FUSED) + [f"uni:{v}" for v in acc["unimodal"]]
        cells = [acc[m] for m in FUSED] + list(acc["unimodal"].values())
        colors = ["tab:blue"] * len(FUSED) + ["tab:gray"] * len(acc["unimodal"])
        ax.bar(
            range(len(names)),
            [c["mean"] for c in cells],
            yerr=[c["std"] for c in cells],
            color=colors,
            capsize=2,
        )
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        verdict = summary[cond.name]["premise"]["verdict"]
        ax.set(title=f"{cond.name}: {verdict}", ylabel="test accuracy", ylim=(0.0, 1.0))
    fig.suptitle("Fusion (blue) vs single views (gray)")
    return fig
