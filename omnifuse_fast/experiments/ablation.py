"""OmniFuse Table 4 on the built-in data: the components switched on one by one.

Rows (a)-(f) as in the paper; columns are view combinations (a 2-view, a 3-view and the
all-view set). The data is made low-quality: views missing at ``missing_rate`` and Gaussian
noise on ``noise_views``. Each cell: test AUROC / accuracy, mean ± std over seeds, with a
paired t-test against row (a) in the same column.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omnifuse_fast.data import VIEW_NAMES, prepare_mfeat
from omnifuse_fast.experiments._common import (
    Settings,
    cell,
    fmt,
    md_table,
    noise_for,
    pyplot,
    train_run,
    write_outputs,
)

# (row, use_dwfuse, use_tla, use_imp_forward, use_imp_backward): Table 4's rows.
ROWS = (
    ("a", False, False, False, False),
    ("b", True, False, False, False),
    ("c", True, True, False, False),
    ("d", True, True, True, False),
    ("e", True, False, True, True),
    ("f", True, True, True, True),
)
LABELS = {
    "a": "(a) concat baseline",
    "b": "(b) +DWFuse",
    "c": "(c) +DWFuse +TLA",
    "d": "(d) +DWFuse +TLA +IMP-fw",
    "e": "(e) +DWFuse +IMP-fw +IMP-bw (no TLA)",
    "f": "(f) all (OmniFuse)",
}
COMBOS = (("fou", "kar"), ("fou", "kar", "zer"), tuple(VIEW_NAMES))
QUICK_COMBOS = (("fou", "kar"), ("fou", "kar", "zer"))


def combo_name(views: tuple[str, ...]) -> str:
    """``fou+kar``; the six views are ``all6``."""
    return "all6" if tuple(views) == tuple(VIEW_NAMES) else "+".join(views)


def run(
    out: str | Path,
    settings: Settings,
    missing_rate: float = 0.5,
    noise_views: tuple[str, ...] = ("kar", "pix"),
    noise_std: float = 1.0,
    combos: tuple[tuple[str, ...], ...] | None = None,
) -> dict[str, Any]:
    """Run the ablation and write ``ablation.{json,md,png}`` into ``out``."""
    combos = combos or (QUICK_COMBOS if settings.quick else COMBOS)
    runs: list[dict[str, Any]] = []
    for seed in settings.seeds:
        for views in combos:
            splits = prepare_mfeat(
                missing_rate, noise_for(views, noise_views), noise_std, seed=seed, views=views
            )
            for row, dw, tla, fw, bw in ROWS:
                config = settings.config(
                    seed,
                    missing_rate=missing_rate,
                    noise_views=noise_for(views, noise_views),
                    noise_std=noise_std,
                    use_dwfuse=dw,
                    use_tla=tla,
                    use_imp_forward=fw,
                    use_imp_backward=bw,
                )
                _, result = train_run(config, splits)
                runs.append(
                    {
                        "seed": seed,
                        "row": row,
                        "combo": combo_name(views),
                        "test_auroc": result["test_auroc"],
                        "test_accuracy": result["test_accuracy"],
                        "seconds": result["seconds"],
                        "selected_epoch": result["selected_epoch"],
                        "backend": result["backend"],
                    }
                )
    names = [combo_name(v) for v in combos]
    summary: dict[str, Any] = {}
    for metric in ("test_auroc", "test_accuracy"):
        summary[metric] = {
            row: {
                c: cell(
                    runs,
                    metric,
                    {"row": row, "combo": c},
                    None if row == "a" else {"row": "a", "combo": c},
                )
                for c in names
            }
            for row, *_ in ROWS
        }
    params = {
        "missing_rate": missing_rate,
        "noise_views": list(noise_views),
        "noise_std": noise_std,
        "combos": [list(v) for v in combos],
        "rows": {r: LABELS[r] for r, *_ in ROWS},
    }
    md = _markdown(summary, names, settings, params)
    write_outputs(out, "ablation", settings, params, runs, summary, md, _figure(summary, names))
    return {"summary": summary, "runs": runs}


def _markdown(summary, names, settings, params) -> str:
    parts = [
        "# Ablation (OmniFuse Table 4) on UCI multiple features",
        "",
        f"Missing rate {params['missing_rate']}, Gaussian noise std {params['noise_std']} on "
        f"{', '.join(params['noise_views'])} (where in the combination); "
        f"{len(settings.seeds)} seeds, {settings.epochs} epochs; mean ± std over seeds, "
        "p: paired t-test against row (a) in the same column.",
    ]
    for metric, title in (("test_auroc", "Test macro AUROC"), ("test_accuracy", "Test accuracy")):
        rows = [[LABELS[r]] + [fmt(summary[metric][r][c]) for c in names] for r, *_ in ROWS]
        parts += ["", f"## {title}", "", md_table(["components", *names], rows)]
    return "\n".join(parts)


def _figure(summary, names):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
    width = 0.8 / len(ROWS)
    for ax, metric in zip(axes, ("test_auroc", "test_accuracy")):
        for i, (row, *_) in enumerate(ROWS):
            cells = [summary[metric][row][c] for c in names]
            xs = [j + (i - (len(ROWS) - 1) / 2) * width for j in range(len(names))]
            ax.bar(
                xs,
                [c["mean"] for c in cells],
                width,
                yerr=[c["std"] for c in cells],
                label=LABELS[row],
                capsize=2,
            )
        lo = min(summary[metric][r][c]["mean"] for r, *_ in ROWS for c in names)
        ax.set_ylim(max(0.0, lo - 0.08), 1.0)
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel(metric.replace("_", " "))
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle("Ablation (Table 4): components vs view combination")
    return fig
