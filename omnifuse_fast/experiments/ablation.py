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
from omnifuse_fast.experiments._common import (
    Condition,
    Settings,
    Source,
    cell,
    conditions_for,
    fmt,
    lambdas,
    md_table,
    nll,
    premise_check,
    premise_markdown,
    pyplot,
    record,
    train_eval,
    tuned,
    write_outputs,
)
from omnifuse_fast.experiments.models import BranchTracker, LateFusion
from omnifuse_fast.train.metrics import accuracy, macro_auroc

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


def default_conditions(source: Source) -> list[Condition]:
    """One heterogeneous condition: ``swap`` (k = 2 from 4 views, else 1), nothing missing."""
    k = 2 if len(source.view_names) >= 4 else 1
    return [Condition(f"swap k={k}", 0.0, Corruption("swap", k=k))]


def run(
    out: str | Path, settings: Settings, conditions: list[Condition] | None = None
) -> dict[str, Any]:
    """Run the ablation and write ``ablation.{json,md,png}`` into ``out``."""
    source = Source(settings)
    conds = conditions or conditions_for(settings, source, default_conditions(source))
    views = source.view_names
    runs: list[dict[str, Any]] = []
    tuning: dict[str, dict[str, Any]] = {}
    for cond in conds:
        tuning[cond.name] = {}
        for row, dw, tla, fw, bw in (*ROWS, ("late", None, None, None, None)):

            def run_one(seed, point, row=row, dw=dw, tla=tla, fw=fw, bw=bw, cond=cond):
                splits = source.splits(seed, cond)
                if row in ("a", "late"):
                    config = settings.config(seed, method="concat", **lambdas(point))
                else:
                    config = settings.config(
                        seed,
                        use_dwfuse=dw,
                        use_tla=tla,
                        use_imp_forward=fw,
                        use_imp_backward=bw,
                        **lambdas(point),
                    )
                if row != "late":
                    return train_eval(config, splits, settings)[1]
                holder: dict[str, Any] = {}

                def factory(tr):
                    return LateFusion(
                        tr.view_dims,
                        tr.num_classes,
                        config.dim,
                        config.encoder_hidden,
                        config.head_hidden,
                    )

                def on_epoch(tr):
                    holder.setdefault("t", BranchTracker(tr.model, splits["val"]))
                    return holder["t"](tr)

                result = train_eval(config, splits, settings, factory, on_epoch)[1]
                result["unimodal"] = {}
                for m, name in enumerate(views):
                    r = {}
                    for split in ("val", "test"):
                        p, y = holder["t"].proba(splits[split], m), splits[split].labels
                        r[f"{split}_accuracy"] = accuracy(p, y)
                        r[f"{split}_auroc"] = macro_auroc(p, y)
                        r[f"{split}_nll"] = nll(p, y)
                    result["unimodal"][name] = r
                return result

            results, tuning[cond.name][row] = tuned(settings, row not in ("a", "late"), run_one)
            point = tuning[cond.name][row]["chosen"]
            for seed, result in results.items():
                base = {"seed": seed, "condition": cond.name}
                if row == "late":
                    for name, r in result["unimodal"].items():
                        runs.append(record(r, point, **base, method=f"uni:{name}"))
                else:
                    runs.append(record(result, point, **base, row=row, method=f"row:{row}"))
    summary: dict[str, Any] = {}
    for cond in conds:
        match = {"condition": cond.name}
        premise = premise_check(runs, match, views, fused="row:a")
        entry: dict[str, Any] = {"premise": premise}
        entry["interpreted"] = premise["verdict"] == "premise holds"
        for metric in ("test_accuracy", "test_auroc", "test_nll"):
            entry[metric] = {
                r: cell(
                    runs, metric, {**match, "row": r}, None if r == "a" else {**match, "row": "a"}
                )
                for r, *_ in ROWS
            }
        entry["tuning"] = tuning[cond.name]
        summary[cond.name] = entry
    params = {
        "conditions": {c.name: c.to_dict() for c in conds},
        "views": views,
        "rows": {r: LABELS[r] for r, *_ in ROWS},
        "data": source.describe(),
    }
    md = _markdown(summary, settings, params, conds)
    write_outputs(out, "ablation", settings, params, runs, summary, md, _figure(summary, conds))
    return {"summary": summary, "runs": runs}


def _markdown(summary, settings, params, conds) -> str:
    parts = [
        f"# Ablation (OmniFuse Table 4) on {params['data']}",
        "",
        f"All views ({', '.join(params['views'])}); {len(settings.seeds)} seeds, up to "
        f"{settings.epochs} epochs (early stopping on validation NLL, patience "
        f"{settings.patience}); grid point per row chosen on the validation NLL of "
        f"{settings.tune_seeds} tuning seed(s); mean ± std, p: paired t-test against row (a).",
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
            + [fmt(e[m][r]) for m in ("test_accuracy", "test_auroc", "test_nll")]
            + [", ".join(f"{k} {v:g}" for k, v in e["tuning"][r]["chosen"].items())]
            for r, *_ in ROWS
        ]
        parts += [
            "",
            f"## {cond.name}",
            "",
            f"Missing rate {cond.missing_rate}, corruption {cond.corruption.to_dict()}.",
            "",
            *premise_markdown(e["premise"]),
            "",
            note,
            "",
            md_table(["components", "accuracy", "AUROC", "NLL", "grid point"], rows),
        ]
    return "\n".join(parts)


def _figure(summary, conds):
    plt = pyplot()
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
