"""Imputation quality over training (OmniFuse Fig. 7).

After every epoch, on the held-out test split: each sample with at least two observed views
loses one of them (chosen at random, fixed per seed); the model runs with that view marked
missing, and its imputed embedding ``v'`` is compared with the encoder's embedding of the real
view (the ground truth of eq. 7) by cosine similarity, MSE, and normalized MSE (MSE over the
spread of the true embeddings around their per-view mean: 1 is no better than that mean). The
same numbers for the missing embedding ``u`` (what the model fills in without imputation) are
the reference. Test AUROC per epoch is Fig. 7's second curve. The full OmniFuse on the
low-quality data (built-in: missing 0.5, noise on two views; a file: missing 0.5 injected;
``--corruption`` / ``--missing-rate`` replace it), each epoch's weights (no selection).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from omnifuse_fast.data.corruption import Corruption
from omnifuse_fast.experiments._common import (
    Condition,
    Settings,
    Source,
    builtin_noise,
    cell,
    conditions_for,
    fmt,
    md_table,
    pyplot,
    write_outputs,
)
from omnifuse_fast.train import Trainer


def held_out_drop(observed: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, present)``: samples with >= 2 observed views, each with one of them dropped."""
    gen = torch.Generator().manual_seed(10_007 + seed)
    rows = torch.nonzero(observed.sum(1) >= 2).flatten()
    obs = observed[rows]
    score = torch.rand(obs.shape, generator=gen).masked_fill(~obs, -1.0)
    drop = F.one_hot(score.argmax(1), obs.shape[1]).bool()
    return rows, obs & ~drop


@torch.no_grad()
def similarity(model: torch.nn.Module, split: Any, rows: torch.Tensor, present: torch.Tensor):
    """Cosine, MSE and normalized MSE of imputed vs true embeddings (and of ``u`` vs true)."""
    model.eval()
    views = [v[rows] for v in split.views]
    observed = split.observed[rows]
    out = model(views, observed, present=present)
    dropped = observed & ~present  # [R, M], one True per row
    true = out.embeddings[dropped].float()  # [R, D], the real view's embedding
    imputed = out.v_full[dropped].float()
    u = model.missing_embeddings().float()[dropped.nonzero()[:, 1]]
    # per-view mean of the true embeddings over every observed test block
    full = model.embed(split.views).float()
    mu = torch.stack([full[split.observed[:, m], m].mean(0) for m in range(full.shape[1])])[
        dropped.nonzero()[:, 1]
    ]
    spread = (true - mu).square().sum(1).mean()

    def scores(pred):
        mse_rows = (pred - true).square().sum(1)
        return {
            "cosine": float(F.cosine_similarity(pred, true, dim=1).mean()),
            "mse": float(mse_rows.mean() / true.shape[1]),
            "nmse": float(mse_rows.mean() / spread),
        }

    return {"imputed": scores(imputed), "missing_embedding": scores(u)}


def default_conditions(source: Source) -> list[Condition]:
    """Missing 0.5 + noise std 1 on ``kar`` and ``pix`` (built-in), missing 0.5 (a file)."""
    if source.builtin:
        return [Condition("uniform", 0.5, builtin_noise())]
    return [Condition("missing 0.5", 0.5, Corruption("none"))]


def run(out: str | Path, settings: Settings) -> dict[str, Any]:
    """Run the curve and write ``imputation.{json,md,png}`` into ``out``.

    One condition (the first of ``--corruption`` / the defaults); every epoch up to
    ``settings.epochs`` (a curve: no early stopping, no grid, the default lr and lambdas).
    """
    source = Source(settings)
    cond = conditions_for(settings, source, default_conditions(source))[0]
    runs: list[dict[str, Any]] = []
    for seed in settings.seeds:
        splits = source.splits(seed, cond)
        test = splits["test"]
        rows, present = held_out_drop(test.observed, seed)
        if len(rows) == 0:
            raise ValueError("imputation: no test row has two observed views to drop one of")
        trainer = Trainer(settings.config(seed, select_best=False), None, splits=splits)
        for epoch in range(settings.epochs + 1):
            if epoch:
                trainer.train_epoch()
                if trainer.model.use_tla:
                    trainer.model.miner.mine()
                trainer.epoch = epoch
            auroc = trainer.evaluate(test)["auroc"]
            sim = similarity(trainer.model, test, rows, present)
            record = {"seed": seed, "epoch": epoch, "test_auroc": auroc, "held_out": len(rows)}
            for which, s in sim.items():
                for k, v in s.items():
                    record[f"{which}_{k}"] = v
            runs.append(record)
    metrics = [k for k in runs[0] if k.startswith(("imputed_", "missing_embedding_"))]
    metrics.append("test_auroc")
    summary = {
        str(e): {m: cell(runs, m, {"epoch": e}) for m in metrics}
        for e in range(settings.epochs + 1)
    }
    last = str(settings.epochs)
    summary["last_vs_first"] = {
        m: cell(runs, m, {"epoch": settings.epochs}, {"epoch": 0}) for m in metrics
    }
    final = {"epoch": settings.epochs}
    summary["imputed_vs_missing_embedding_last"] = {
        k: {
            "imputed": cell(runs, f"imputed_{k}", final),
            "missing_embedding": cell(runs, f"missing_embedding_{k}", final),
            "p_value": _paired(runs, k, settings.epochs),
        }
        for k in ("cosine", "mse", "nmse")
    }
    params = {
        "condition": {cond.name: cond.to_dict()},
        "held_out_per_seed": int(runs[0]["held_out"]),
        "data": source.describe(),
    }
    md = _markdown(summary, settings, params, last)
    write_outputs(
        out, "imputation", settings, params, runs, summary, md, _figure(summary, settings)
    )
    return {"summary": summary, "runs": runs}


def _paired(runs, k, epoch) -> float:
    from omnifuse_fast.experiments._common import paired_p

    sel = sorted((r for r in runs if r["epoch"] == epoch), key=lambda r: r["seed"])
    return paired_p([r[f"imputed_{k}"] for r in sel], [r[f"missing_embedding_{k}"] for r in sel])


def _markdown(summary, settings, params, last) -> str:
    rows = []
    for e in range(settings.epochs + 1):
        s = summary[str(e)]
        rows.append(
            [
                e,
                fmt(s["imputed_cosine"]),
                fmt(s["imputed_nmse"]),
                fmt(s["imputed_mse"]),
                fmt(s["missing_embedding_cosine"]),
                fmt(s["missing_embedding_nmse"]),
                fmt(s["test_auroc"]),
            ]
        )
    p = summary["imputed_vs_missing_embedding_last"]
    return "\n".join(
        [
            f"# Imputation quality over training (OmniFuse Fig. 7) on {params['data']}",
            "",
            f"Condition {params['condition']}; every epoch (no selection, default lr and "
            f"lambdas); {params['held_out_per_seed']} held-out test "
            f"samples per seed with one observed view dropped; {len(settings.seeds)} seeds; "
            "mean ± std. nMSE: MSE / spread of the true embeddings around their per-view mean "
            "(1 = no better than the mean embedding).",
            "",
            md_table(
                [
                    "epoch",
                    "cosine (imputed)",
                    "nMSE (imputed)",
                    "MSE (imputed)",
                    "cosine (u)",
                    "nMSE (u)",
                    "test AUROC",
                ],
                rows,
            ),
            "",
            f"Epoch {last}, imputed vs missing embedding u (paired t-test): "
            + ", ".join(f"{k} p={_fp(p[k]['p_value'])}" for k in ("cosine", "nmse", "mse")),
        ]
    )


def _fp(p) -> str:
    return "n/a" if p is None or p != p else f"{p:.3g}"


def _figure(summary, settings):
    plt = pyplot()
    epochs = list(range(settings.epochs + 1))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    for ax, key, title in (
        (axes[0], "cosine", "cosine similarity"),
        (axes[1], "nmse", "normalized MSE"),
    ):
        for which, style in (("imputed", "-o"), ("missing_embedding", "--")):
            c = [summary[str(e)][f"{which}_{key}"] for e in epochs]
            m, s = np.array([x["mean"] for x in c]), np.array([x["std"] for x in c])
            ax.plot(epochs, m, style, label="imputed v'" if which == "imputed" else "missing u")
            ax.fill_between(epochs, m - s, m + s, alpha=0.2)
        ax.set(xlabel="epoch", title=title)
        ax.legend()
    c = [summary[str(e)]["test_auroc"] for e in epochs]
    axes[2].plot(epochs, [x["mean"] for x in c], "-o", color="tab:blue")
    axes[2].set(xlabel="epoch", title="test AUROC")
    fig.suptitle("Imputed vs true embeddings of dropped held-out views")
    return fig
