"""Fusion operators: DWFuse vs concat, sum and late fusion, and the best single view.

All on the six views, in two conditions: ``complete`` (no missing view, noise on two views)
and ``low-quality`` (views missing at 0.5 as well). ``dwfuse`` is Table 4's row (b) (DWFuse
alone), ``omnifuse`` the full model; ``sum`` and ``late`` are :mod:`.models`. The unimodal
models are the late-fusion model's per-view encoder + head, each trained only on its own view
(no parameter is shared), tested alone on every test sample (a missing view gives the
model's output on the missing embedding). p: paired t-test against concat, and of each fused
model against the best single view (the view with the highest mean accuracy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omnifuse_fast.data import prepare_mfeat
from omnifuse_fast.experiments._common import (
    Settings,
    cell,
    fmt,
    md_table,
    pyplot,
    train_run,
    use_best,
    write_outputs,
)
from omnifuse_fast.experiments.models import LateFusion, SumFusion
from omnifuse_fast.train.metrics import accuracy, macro_auroc

CONDITIONS = {"complete": 0.0, "low-quality": 0.5}
FUSED = ("concat", "sum", "late", "dwfuse", "omnifuse")


def _config(settings: Settings, seed: int, method: str, rate: float, noise, std):
    data = {"missing_rate": rate, "noise_views": noise, "noise_std": std}
    if method == "dwfuse":
        return settings.config(
            seed, use_tla=False, use_imp_forward=False, use_imp_backward=False, **data
        )
    if method == "omnifuse":
        return settings.config(seed, **data)
    return settings.config(seed, method="concat", **data)  # concat; sum / late swap the model


def run(
    out: str | Path,
    settings: Settings,
    noise_views: tuple[str, ...] = ("kar", "pix"),
    noise_std: float = 1.0,
) -> dict[str, Any]:
    """Run the comparison and write ``fusion.{json,md,png}`` into ``out``."""
    runs: list[dict[str, Any]] = []
    view_names: list[str] = []
    for seed in settings.seeds:
        for cond, rate in CONDITIONS.items():
            splits = prepare_mfeat(rate, noise_views, noise_std, seed=seed)
            view_names = list(splits["train"].view_names)
            test = splits["test"]
            for method in FUSED:
                config = _config(settings, seed, method, rate, noise_views, noise_std)
                factory = None
                if method in ("sum", "late"):
                    cls = SumFusion if method == "sum" else LateFusion
                    size = {k: getattr(config, k) for k in ("dim", "encoder_hidden", "head_hidden")}

                    def factory(tr, cls=cls, size=size):
                        return cls(tr.view_dims, tr.num_classes, **size)

                trainer, result = train_run(config, splits, factory)
                base = {"seed": seed, "condition": cond, "seconds": result["seconds"]}
                runs.append(
                    {
                        **base,
                        "method": method,
                        "test_accuracy": result["test_accuracy"],
                        "test_auroc": result["test_auroc"],
                    }
                )
                if method == "late":  # the unimodal models, at the selected epoch
                    use_best(trainer)
                    for m, name in enumerate(view_names):
                        proba = trainer.model.predict_view_proba(test.views, test.observed, m)
                        runs.append(
                            {
                                **base,
                                "method": f"uni:{name}",
                                "test_accuracy": accuracy(proba, test.labels),
                                "test_auroc": macro_auroc(proba, test.labels),
                            }
                        )
    summary: dict[str, Any] = {}
    for cond in CONDITIONS:
        unis = [f"uni:{v}" for v in view_names]
        best = max(
            unis,
            key=lambda u: cell(runs, "test_accuracy", {"condition": cond, "method": u})["mean"],
        )
        entry: dict[str, Any] = {"best_unimodal": best}
        for metric in ("test_accuracy", "test_auroc"):
            entry[metric] = {
                m: {
                    "vs_concat": cell(
                        runs,
                        metric,
                        {"condition": cond, "method": m},
                        {"condition": cond, "method": "concat"} if m != "concat" else None,
                    ),
                    "vs_best_unimodal": cell(
                        runs,
                        metric,
                        {"condition": cond, "method": m},
                        {"condition": cond, "method": best},
                    ),
                }
                for m in FUSED
            }
            entry[metric]["unimodal"] = {
                u: cell(runs, metric, {"condition": cond, "method": u}) for u in unis
            }
        summary[cond] = entry
    params = {
        "conditions": CONDITIONS,
        "noise_views": list(noise_views),
        "noise_std": noise_std,
        "views": view_names,
    }
    md = _markdown(summary, settings, params)
    write_outputs(out, "fusion", settings, params, runs, summary, md, _figure(summary))
    return {"summary": summary, "runs": runs}


def _markdown(summary, settings, params) -> str:
    parts = [
        "# Fusion operators on UCI multiple features (6 views)",
        "",
        f"Noise std {params['noise_std']} on {', '.join(params['noise_views'])}; missing rate "
        f"per condition {params['conditions']}; {len(settings.seeds)} seeds, "
        f"{settings.epochs} epochs; mean ± std; p: paired t-test over seeds.",
    ]
    for cond, e in summary.items():
        rows = []
        for m in FUSED:
            a, r = e["test_accuracy"][m], e["test_auroc"][m]
            rows.append(
                [m, fmt(a["vs_concat"]), f"p={_p(a['vs_best_unimodal'])}", fmt(r["vs_concat"])]
            )
        for u, c in e["test_accuracy"]["unimodal"].items():
            star = " (best)" if u == e["best_unimodal"] else ""
            rows.append([u + star, fmt(c), "", fmt(e["test_auroc"]["unimodal"][u])])
        parts += [
            "",
            f"## {cond}",
            "",
            md_table(
                [
                    "model",
                    "accuracy (p vs concat)",
                    "acc p vs best single view",
                    "AUROC (p vs concat)",
                ],
                rows,
            ),
        ]
    return "\n".join(parts)


def _p(c) -> str:
    pv = c.get("p_value")
    return "n/a" if pv is None or pv != pv else f"{pv:.3g}"


def _figure(summary):
    plt = pyplot()
    fig, axes = plt.subplots(1, len(summary), figsize=(12, 4), constrained_layout=True)
    for ax, (cond, e) in zip(axes, summary.items()):
        acc = e["test_accuracy"]
        names = list(FUSED) + list(acc["unimodal"])
        cells = [acc[m]["vs_concat"] for m in FUSED] + list(acc["unimodal"].values())
        colors = ["tab:blue"] * len(FUSED) + ["tab:gray"] * len(acc["unimodal"])
        ax.bar(
            range(len(names)),
            [c["mean"] for c in cells],
            yerr=[c["std"] for c in cells],
            color=colors,
            capsize=2,
        )
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set(title=cond, ylabel="test accuracy", ylim=(0.0, 1.0))
    fig.suptitle("Fusion (blue) vs single views (gray)")
    return fig
