"""Balancing the modalities: MIMO vs uniform joint training vs MGDA vs MM learning.

Same backbone for every method (the concat baseline: per-view encoders, unimodal heads, a joint
head on the concatenated embeddings), six complete views with noise on two. Methods:
  - ``concat``: the fusion loss only (the heads get no gradient);
  - ``uniform``: ``L_0 + sum_m L_m`` with equal weights (:class:`.models.UniformJoint`);
  - ``mimo``: the fusion loss vs the worst modality, two-objective min-norm (SPEC section 6);
  - ``mgda``: all M+1 objectives, Frank-Wolfe min-norm (the paper's baseline);
  - ``mm``: MM learning's bilevel schedule (SPEC section 5).
Per-modality accuracy is a linear probe (logistic regression) on each encoder's embedding,
fitted on the training rows and tested on the test rows: how much each modality learned,
measured the same way whatever the method trains its heads with. The balancing subroutine's
time is :class:`~omnifuse_fast.nn.MIMOBalancer`'s (the combination of the gradients only).
p: paired t-test against ``uniform``.
"""

from __future__ import annotations

import math
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
    use_best,
    write_outputs,
)
from omnifuse_fast.experiments.models import UniformJoint

METHODS = ("concat", "uniform", "mimo", "mgda", "mm")


def probe_accuracy(model: torch.nn.Module, splits: dict[str, Any]) -> list[float]:
    """Test accuracy of a logistic regression on each modality's embedding (observed rows)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    def embed(split):
        model.eval()
        with torch.no_grad():
            return model.embed(split.views).float().cpu().numpy()

    tr, te = splits["train"], splits["test"]
    e_tr, e_te = embed(tr), embed(te)
    out = []
    with threadpool_limits(1):  # tiny problems: BLAS threads only contend on a shared CPU
        for m in range(e_tr.shape[1]):
            a, b = tr.observed[:, m].numpy(), te.observed[:, m].numpy()
            # standardized embeddings: lbfgs converges (raw ones can be far from unit scale)
            clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
            clf.fit(e_tr[a, m], tr.labels.numpy()[a])
            out.append(float(clf.score(e_te[b, m], te.labels.numpy()[b])))
    return out


def run(
    out: str | Path,
    settings: Settings,
    missing_rate: float = 0.0,
    noise_views: tuple[str, ...] = ("kar", "pix"),
    noise_std: float = 1.0,
) -> dict[str, Any]:
    """Run the comparison and write ``balance.{json,md,png}`` into ``out``."""
    runs: list[dict[str, Any]] = []
    view_names: list[str] = []
    for seed in settings.seeds:
        splits = prepare_mfeat(missing_rate, noise_views, noise_std, seed=seed)
        view_names = list(splits["train"].view_names)
        data = {"missing_rate": missing_rate, "noise_views": noise_views, "noise_std": noise_std}
        for method in METHODS:
            if method in ("mimo", "mgda"):
                config = settings.config(seed, method="mimo", mimo_mode=method, **data)
            elif method == "mm":
                config = settings.config(seed, method="mm", **data)
            else:
                config = settings.config(seed, method="concat", **data)
            factory = (lambda tr: UniformJoint(tr.model)) if method == "uniform" else None
            trainer, result = train_run(config, splits, factory)
            steps = config.epochs * math.ceil(len(splits["train"]) / config.batch_size)
            use_best(trainer)
            probes = probe_accuracy(trainer.model, splits)
            sub = None
            if trainer.balancer is not None:
                sub = trainer.balancer.subroutine_seconds / max(trainer.balancer.steps, 1)
            runs.append(
                {
                    "seed": seed,
                    "method": method,
                    "test_accuracy": result["test_accuracy"],
                    "test_auroc": result["test_auroc"],
                    "probe_accuracy": dict(zip(view_names, probes)),
                    "worst_modality_accuracy": min(probes),
                    "worst_modality": view_names[int(np.argmin(probes))],
                    "mean_modality_accuracy": float(np.mean(probes)),
                    "subroutine_ms_per_step": None if sub is None else 1e3 * sub,
                    "step_ms": 1e3 * result["seconds"] / steps,  # incl. the validation pass
                }
            )
    summary: dict[str, Any] = {}
    for method in METHODS:
        base = None if method == "uniform" else {"method": "uniform"}
        entry = {
            metric: cell(runs, metric, {"method": method}, base)
            for metric in (
                "test_accuracy",
                "test_auroc",
                "worst_modality_accuracy",
                "mean_modality_accuracy",
                "step_ms",
            )
        }
        if method in ("mimo", "mgda"):
            entry["subroutine_ms_per_step"] = cell(
                runs, "subroutine_ms_per_step", {"method": method}
            )
        entry["probe_accuracy"] = {
            v: float(np.mean([r["probe_accuracy"][v] for r in runs if r["method"] == method]))
            for v in view_names
        }
        summary[method] = entry
    mimo_t = [r["subroutine_ms_per_step"] for r in runs if r["method"] == "mimo"]
    mgda_t = [r["subroutine_ms_per_step"] for r in runs if r["method"] == "mgda"]
    if mimo_t and mgda_t:
        summary["mgda_over_mimo_subroutine_time"] = float(np.mean(mgda_t) / np.mean(mimo_t))
    params = {
        "missing_rate": missing_rate,
        "noise_views": list(noise_views),
        "noise_std": noise_std,
        "views": view_names,
        "probe": "StandardScaler + LogisticRegression(max_iter=2000) per modality embedding",
    }
    md = _markdown(summary, settings, params)
    write_outputs(out, "balance", settings, params, runs, summary, md, _figure(summary))
    return {"summary": summary, "runs": runs}


def _markdown(summary, settings, params) -> str:
    rows = []
    for m in METHODS:
        e = summary[m]
        sub = fmt(e["subroutine_ms_per_step"], 3, p=False) if "subroutine_ms_per_step" in e else ""
        rows.append(
            [
                m,
                fmt(e["test_accuracy"]),
                fmt(e["worst_modality_accuracy"]),
                fmt(e["mean_modality_accuracy"]),
                sub,
                fmt(e["step_ms"], 1, p=False),
            ]
        )
    probe_rows = [
        [m] + [f"{summary[m]['probe_accuracy'][v]:.3f}" for v in params["views"]] for m in METHODS
    ]
    ratio = summary.get("mgda_over_mimo_subroutine_time")
    parts = [
        "# Modality balancing on UCI multiple features (6 views)",
        "",
        f"Missing rate {params['missing_rate']}, noise std {params['noise_std']} on "
        f"{', '.join(params['noise_views'])}; {len(settings.seeds)} seeds, {settings.epochs} "
        "epochs; mean ± std; p: paired t-test against `uniform`. Modality accuracy: linear "
        "probe on each encoder's embedding. Subroutine: the gradient combination only; "
        "step: the whole training step (forward, backward(s), optimizer), per batch.",
        "",
        md_table(
            [
                "method",
                "fused accuracy",
                "worst-modality acc",
                "mean modality acc",
                "subroutine ms/step",
                "step ms",
            ],
            rows,
        ),
        "",
        "Probe accuracy per modality (mean over seeds):",
        "",
        md_table(["method", *params["views"]], probe_rows),
    ]
    if ratio is not None:
        parts += ["", f"MGDA / MIMO subroutine time: {ratio:.1f}x"]
    return "\n".join(parts)


def _figure(summary):
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    xs = range(len(METHODS))
    for ax, metric, title in (
        (axes[0], "test_accuracy", "fused accuracy"),
        (axes[1], "worst_modality_accuracy", "worst-modality probe accuracy"),
    ):
        cells = [summary[m][metric] for m in METHODS]
        ax.bar(xs, [c["mean"] for c in cells], yerr=[c["std"] for c in cells], capsize=2)
        lo = min(c["mean"] for c in cells)
        ax.set(title=title, ylim=(max(0.0, lo - 0.1), 1.0))
        ax.set_xticks(xs, METHODS)
    timed = [m for m in METHODS if "subroutine_ms_per_step" in summary[m]]
    cells = [summary[m]["subroutine_ms_per_step"] for m in timed]
    axes[2].bar(
        range(len(timed)),
        [c["mean"] for c in cells],
        yerr=[c["std"] for c in cells],
        color="tab:orange",
        capsize=2,
    )
    axes[2].set_xticks(range(len(timed)), timed)
    axes[2].set(title="balancing subroutine time", ylabel="ms per step")
    return fig
