"""OmniFuse Table 4: the components switched on one by one, read only where the premise holds.

Rows (a)-(f) as in the paper, on every view of the data. Row (a) is the concat baseline
(plain CE, as ``fusion``'s ``concat``); rows (b)-(f) are OmniFuse with components switched
on, and get the lambda2 grid as well as the learning-rate grid (docs/PROTOCOL.md). Each
condition also trains the late-fusion model, whose per-view branches are the unimodal models
of the premise check (concat vs the best single view, as in ``fusion``): the table of a
condition is interpreted only where the premise holds there.

Default condition (built-in data): ``swap`` (per sample 2 of the 6 views replaced by the same
view of a sample of another class); a user's file: ``swap`` with k = 1 (k = 2 from 4 views).
``--corruption`` / ``--missing-rate`` replace it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omnifuse_fast.data.corruption import Corruption
from omnifuse_fast.experiments import _common as common

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


def default_conditions(source: common.Source) -> list[common.Condition]:
    """One heterogeneous condition: ``swap`` (k = 2 from 4 views, else 1), nothing missing."""
    k = 2 if len(source.view_names) >= 4 else 1
    return [common.Condition(f"swap k={k}", 0.0, Corruption("swap", k=k))]


def run(
    out: str | Path, settings: common.Settings, conditions: list[common.Condition] | None = None
) -> dict[str, Any]:
    """Run the ablation and write ``ablation.{json,md,png}`` into ``out``."""
    source, conds = common.setup(settings, conditions, default_conditions)
    switches = {row: (dw, tla, fw, bw) for row, dw, tla, fw, bw in ROWS}

    def run_one(row, splits, seed, point):
        if row in ("a", "late"):
            config = settings.config(seed, method="concat", **common.lambdas(point))
        else:
            dw, tla, fw, bw = switches[row]
            config = settings.config(
                seed,
                use_dwfuse=dw,
                use_tla=tla,
                use_imp_forward=fw,
                use_imp_backward=bw,
                **common.lambdas(point),
            )
        if row != "late":
            return common.train_eval(config, splits, settings)[1]
        watch = common.BranchWatch(splits["val"])
        result = common.train_eval(config, splits, settings, common.branch_model(config), watch)[1]
        result["unimodal"] = common.branch_scores(watch.tracker, splits, source.view_names)
        return result

    runs: list[dict[str, Any]] = []
    rows = (*switches, "late")
    done, tuning = common.tune_rows(
        settings, source, conds, rows, run_one, lambda row: row not in ("a", "late")
    )
    for cond, row, point, results in done:
        for seed, result in results.items():
            base = {"seed": seed, "condition": cond.name}
            if row == "late":
                for name, r in result["unimodal"].items():
                    runs.append(common.record(r, point, **base, method=f"uni:{name}"))
            else:
                runs.append(common.record(result, point, **base, row=row, method=f"row:{row}"))
    summary: dict[str, Any] = {}
    for cond in conds:
        match = {"condition": cond.name}
        premise = common.premise_check(runs, match, source.view_names, fused="row:a")
        entry: dict[str, Any] = {"premise": premise}
        entry["interpreted"] = premise["verdict"] == "premise holds"
        for metric in ("test_accuracy", "test_auroc", "test_nll"):
            entry[metric] = {
                r: common.cell(
                    runs, metric, {**match, "row": r}, None if r == "a" else {**match, "row": "a"}
                )
                for r, *_ in ROWS
            }
        entry["tuning"] = tuning[cond.name]
        summary[cond.name] = entry
    params = {
        "conditions": {c.name: c.to_dict() for c in conds},
        "views": source.view_names,
        "rows": {r: LABELS[r] for r, *_ in ROWS},
        "data": source.describe(),
    }
    return common.conclude(
        out, "ablation", settings, conds, params, runs, summary, _markdown, _figure
    )


def _markdown(summary, settings, params, conds) -> str:
    parts = [
        f"# Ablation (OmniFuse Table 4) on {params['data']}",
        "",
        f"All views ({', '.join(params['views'])}); "
        + common.protocol(settings, "grid point per row chosen")
        + "; mean ± std, p: paired t-test against row (a).",
    ]
    for cond in conds:
        e = summary[cond.name]
        note = (
            "The premise holds: the rows below test the paper's claim."
            if e["interpreted"]
            else "The premise does not hold here: the rows below are reported, NOT interpreted "
            "as a test of the paper's claim."
        )
        rows = [
            [LABELS[r]]
            + [common.fmt(e[m][r]) for m in ("test_accuracy", "test_auroc", "test_nll")]
            + [", ".join(f"{k} {v:g}" for k, v in e["tuning"][r]["chosen"].items())]
            for r, *_ in ROWS
        ]
        parts += [
            *cond.heading(),
            *common.premise_markdown(e["premise"]),
            "",
            note,
            "",
            common.md_table(["components", "accuracy", "AUROC", "NLL", "grid point"], rows),
        ]
    return "\n".join(parts)


def _figure(summary, conds):
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(conds), figsize=(6 * len(conds), 3.8), constrained_layout=True)
    axes = [axes] if len(conds) == 1 else list(axes)
    for ax, cond in zip(axes, conds):
        cells = [summary[cond.name]["test_accuracy"][r] for r, *_ in ROWS]
        ax.bar(
            range(len(ROWS)), [c["mean"] for c in cells], yerr=[c["std"] for c in cells], capsize=2
        )
        ax.set_xticks(range(len(ROWS)), [f"({r})" for r, *_ in ROWS])
        lo = min(c["mean"] for c in cells)
        verdict = summary[cond.name]["premise"]["verdict"]
        ax.set(
            title=f"{cond.name}: {verdict}", ylabel="test accuracy", ylim=(max(0.0, lo - 0.1), 1.0)
        )
    fig.suptitle("Ablation (Table 4): rows (a)-(f)")
    return fig
