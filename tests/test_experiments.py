"""Experiments: each runs in --quick mode and writes the promised files and keys.

The numbers of a one-epoch tiny run mean nothing; these tests check structure (files, keys,
run counts, mean/std/p bookkeeping), and the statistics helpers against scipy / numpy.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from omnifuse_fast.experiments import NAMES, run
from omnifuse_fast.experiments._common import Settings, cell, mean_std, paired_p

SEEDS = 2


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as the CLI runs experiments: on a small shared CPU, intra-op threads
    of these tiny models only wait on each other (about 8x slower with two)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ONE_POINT = {"lr": (1e-3,), "lambda2": (10.0,)}  # the grid machinery is tested on its own


def _files(out, name, seeds=SEEDS):
    stem = name.replace("-", "_")
    paths = [out / f"{stem}.{ext}" for ext in ("json", "md", "png")]
    for p in paths:
        assert p.is_file() and p.stat().st_size > 0, p
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads(paths[0].read_text())
    assert payload["experiment"] == name
    assert payload["settings"]["quick"] is True
    assert payload["settings"]["seeds"] == list(range(seeds))
    assert {"torch", "cpu_count", "date"} <= set(payload["machine"])
    assert "ttest_rel" in payload["test"] and "PROTOCOL" in payload["protocol"]
    md = paths[1].read_text()
    assert md.startswith("> QUICK RUN") and "|" in md  # a Markdown table, marked as a smoke run
    return payload


def _is_cell(c, paired: bool, n: int = SEEDS) -> None:
    assert {"mean", "std", "n"} <= set(c)
    assert c["n"] == n
    assert c["mean"] is not None and c["std"] is not None and c["std"] >= 0
    assert ("p_value" in c) == paired
    if paired and c["p_value"] is not None:
        assert 0.0 <= c["p_value"] <= 1.0


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    """A user's file: 3 views (one with missing rows), string labels, 120 rows."""
    rng = np.random.default_rng(0)
    n = 120
    y = rng.integers(0, 3, n)
    a = rng.normal(size=(n, 4)) + y[:, None]
    b = rng.normal(size=(n, 3)) - 0.5 * y[:, None]
    c = rng.normal(size=(n, 2)) + (y[:, None] == 1)
    b[::7] = np.nan
    path = tmp_path_factory.mktemp("data") / "mine.npz"
    np.savez(path, view_a=a, view_b=b, view_c=c, y=np.array(["x", "y", "z"])[y])
    return path


def test_names():
    assert NAMES == ("ablation", "missing-rate", "fusion", "balance", "imputation")
    with pytest.raises(ValueError, match="unknown experiment"):
        run("nope", "/tmp/never-written")


@pytest.mark.parametrize("name", NAMES)
def test_every_experiment_on_a_users_npz(name, tiny_npz, tmp_path, capsys):
    from omnifuse_fast.cli import main

    argv = ["experiment", name, "--quick", "--data", str(tiny_npz), "--out", str(tmp_path)]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["experiment"] == name
    p = _files(tmp_path, name)
    assert p["settings"]["data"] == str(tiny_npz)
    assert "mine.npz" in (tmp_path / f"{name.replace('-', '_')}.md").read_text()


@pytest.mark.parametrize("name", ["ablation", "missing-rate", "balance", "imputation"])
def test_every_experiment_on_the_builtin_data(name, tmp_path):
    run(name, tmp_path, quick=True, seeds=1, epochs=1, grid=ONE_POINT)
    p = _files(tmp_path, name, seeds=1)
    assert p["params"]["data"] == "UCI multiple features"


def test_fusion_premise_verdict(tmp_path):
    run("fusion", tmp_path, quick=True, epochs=1, grid=ONE_POINT)
    p = _files(tmp_path, "fusion")
    conds = ["uniform", "swap k=2"]
    assert list(p["summary"]["premise"]) == conds
    md = (tmp_path / "fusion.md").read_text()
    for cond in conds:
        e = p["summary"][cond]
        pr = e["premise"]
        assert pr["verdict"] in ("premise holds", "does not hold")
        assert p["summary"]["premise"][cond] == pr["verdict"]
        assert pr["chosen_by"] == "mean validation accuracy"
        # the best single view is the highest VALIDATION accuracy, not the test one
        val = {
            v: np.mean(
                [
                    r["val_accuracy"]
                    for r in p["runs"]
                    if r["condition"] == cond and r["method"] == f"uni:{v}"
                ]
            )
            for v in p["params"]["views"]
        }
        assert pr["best_single_view"] == max(val, key=val.get)
        for metric in ("test_accuracy", "test_auroc", "test_nll"):
            _is_cell(pr["metrics"][metric]["fused"], paired=True)
            for m in ("concat", "sum", "late", "dwfuse", "omnifuse"):
                _is_cell(e[metric][m], paired=m != "concat")
            assert len(e[metric]["unimodal"]) == 6
        assert f"**{pr['verdict']}**" in md
    assert len(p["runs"]) == SEEDS * 2 * (5 + 6)


def test_tuned_chooses_on_validation_only():
    from omnifuse_fast.experiments._common import tuned

    s = Settings.make(
        4,
        quick=True,
        epochs=1,
        tune_seeds=2,
        grid={"lr": (1.0, 2.0, 3.0), "lambda2": (10.0, 100.0)},
    )
    calls = []

    def run_one(seed, point):
        calls.append((seed, point["lr"], point["lambda2"]))
        # validation prefers lr 2 / lambda2 100; the test numbers would prefer lr 1
        val = abs(point["lr"] - 2.0) + (0 if point["lambda2"] == 100.0 else 0.5)
        return {"val_nll": val + 0.01 * seed, "test_accuracy": 1.0 / point["lr"]}

    results, tuning = tuned(s, True, run_one)
    assert tuning["chosen"] == {"lr": 2.0, "lambda2": 100.0}
    assert len(tuning["points"]) == 6 and len(tuning["val_nll"]) == 6
    assert sorted(results) == [0, 1, 2, 3]
    assert len(calls) == 6 * 2 + 2  # every point on the 2 tuning seeds, the choice on the rest
    assert {c[0] for c in calls[-2:]} == {2, 3} and all(c[1:] == (2.0, 100.0) for c in calls[-2:])
    concat = Settings.make(1, quick=False, epochs=1).grid_points(omnifuse=False)
    assert concat == [{"lr": 1e-3}, {"lr": 3e-3}]


def test_early_stopping_restores_the_lowest_validation_nll(tiny_npz):
    from omnifuse_fast.data import Corruption
    from omnifuse_fast.experiments._common import (
        Condition,
        Source,
        nll,
        predict,
        train_eval,
    )

    s = Settings.make(1, quick=True, epochs=12, patience=2, data=tiny_npz)
    splits = Source(s).splits(0, Condition("c", 0.0, Corruption("none")))
    trainer, r = train_eval(s.config(0, method="concat", lr=0.05), splits, s)
    assert 1 <= r["selected_epoch"] <= r["epochs_run"] <= 12
    assert r["epochs_run"] == 12 or r["epochs_run"] - r["selected_epoch"] == 2
    val = splits["val"]
    assert nll(predict(trainer.model, val), val.labels) == pytest.approx(r["val_nll"], rel=1e-5)
    assert r["test_nll"] > 0 and 0.0 <= r["test_accuracy"] <= 1.0


def test_mm_selection_selects_and_is_reported(tmp_path):
    from omnifuse_fast.experiments._common import Condition, Source, builtin_noise, train_eval

    s = Settings.make(1, quick=True, epochs=3)
    splits = Source(s).splits(0, Condition("c", 0.0, builtin_noise()))
    config = s.config(0, method="mm", mm_tau=None, mm_top_fraction=0.5)
    trainer, r = train_eval(config, splits, s)
    assert r["pool_size"] == 600 and r["pool_fraction"] == 0.5  # of 1200 training rows
    assert r["stage1_epochs"] >= 1 and r["stage2_epochs"] >= 1
    assert trainer.pool is not None and len(trainer.pool) == 600


def test_imputation_wrappers():
    import torch

    from omnifuse_fast.experiments.models import DropAugment, LabelScarce
    from omnifuse_fast.nn import OmniFuse

    torch.manual_seed(0)
    views = [torch.randn(64, d) for d in (5, 4, 3)]
    observed = torch.ones(64, 3, dtype=torch.bool)
    labels = torch.randint(0, 3, (64,))
    noimp = OmniFuse(
        [5, 4, 3], 3, dim=8, hidden=8, num_blocks=1, use_imp_forward=False, use_imp_backward=False
    )
    assert bool(noimp.train()(views, observed, labels).present.all())  # no drop without IMP
    aug = DropAugment(noimp, 0.5).train()
    out = aug(views, observed, labels)
    assert not bool(out.present.all()) and bool(out.present.any(1).all())  # the same drop
    imp = OmniFuse([5, 4, 3], 3, dim=8, hidden=8, num_blocks=1).train()
    scarce = LabelScarce(imp)
    part = labels.clone()
    part[16:] = -1  # 16 labeled rows
    for model, reaches in ((scarce, True), (LabelScarce(DropAugment(noimp, 0.3)), False)):
        xs = [v.clone().requires_grad_(True) for v in views]
        out = model.train()(xs, observed, part)
        assert out.joint_logits.shape[0] == 16 and torch.isfinite(out.losses["total"])
        out.losses["total"].backward()
        unlabeled = sum(float(x.grad[16:].abs().sum()) for x in xs)
        assert (unlabeled > 0) == reaches  # the imputation losses use the unlabeled rows
    # no unlabeled row: exactly the inner objective
    torch.manual_seed(1)
    a = scarce(views, observed, labels).losses["total"]
    torch.manual_seed(1)
    b = imp(views, observed, labels).losses["total"]
    assert torch.allclose(a, b)


def test_imputed_reading():
    import torch
    import torch.nn.functional as F

    from omnifuse_fast.nn import OmniFuse

    torch.manual_seed(0)
    model = OmniFuse([5, 4, 3], 3, dim=8, hidden=8, num_blocks=1).eval()
    views = [torch.randn(10, d) for d in (5, 4, 3)]
    observed = torch.tensor([[True, False, True]] * 10)
    out = model(views, observed)
    want = (F.softmax(out.joint_logits, 1) + F.softmax(out.modality_logits, 2).sum(1)) / 4
    got = model.predict_proba(views, observed, reading="imputed")
    assert torch.allclose(got, want, atol=1e-6) and torch.allclose(got.sum(1), torch.ones(10))
    assert torch.equal(model.predict_proba(views, observed), F.softmax(out.joint_logits, 1))
    with pytest.raises(ValueError, match="reading"):
        model.predict_proba(views, observed, reading="heads")


def test_cli_rejects_bad_args(capsys, tiny_npz):
    from omnifuse_fast.cli import main

    for argv in (
        ["experiment", "nope", "--quick"],
        ["experiment", "fusion", "--seeds", "0"],
        ["experiment", "fusion", "--corruption", "blur"],
        ["experiment", "fusion", "--views", "fou,kar"],  # --views needs --data
        ["experiment", "fusion", "--corrupt-std", "2"],  # needs --corruption
        ["experiment", "fusion", "--corruption", "swap", "--noise-views", "fou"],
        ["experiment", "fusion", "--missing-rate", "1.0"],
        ["experiment", "fusion", "--lr-grid", "0,1e-3"],
        ["experiment", "fusion", "--data", str(tiny_npz), "--views", "a,nope"],
    ):
        with pytest.raises(SystemExit):
            main(argv)


def test_stats_helpers():
    from scipy.stats import ttest_rel

    a, b = [0.9, 0.85, 0.88, 0.91], [0.8, 0.84, 0.83, 0.86]
    assert paired_p(a, b) == pytest.approx(ttest_rel(a, b).pvalue)
    assert paired_p(a, a) == 1.0  # no difference at all
    assert math.isnan(paired_p([1.0], [0.0]))
    m, s = mean_std(a)
    assert m == pytest.approx(np.mean(a)) and s == pytest.approx(np.std(a, ddof=1))
    runs = [{"seed": i, "x": a[i], "k": "A"} for i in range(4)]
    runs += [{"seed": i, "x": b[i], "k": "B"} for i in range(3)]  # seed 3 missing in B
    c = cell(runs, "x", {"k": "A"}, {"k": "B"})
    assert c["n"] == 4 and c["p_value"] == pytest.approx(ttest_rel(a[:3], b[:3]).pvalue)
    assert c["diff_mean"] == pytest.approx(np.mean(np.subtract(a[:3], b[:3])))


def test_settings():
    s = Settings.make(None, quick=False, epochs=None)
    assert s.seeds == list(range(10)) and s.epochs == 40 and s.overrides == {}
    assert s.patience == 5 and s.tune_seeds == 2
    assert s.grid == {"lr": (1e-3, 3e-3), "lambda2": (10.0, 100.0)}
    q = Settings.make(None, quick=True, epochs=None)
    assert q.seeds == [0, 1] and q.epochs == 2 and q.config(0).dim == 8 and q.tune_seeds == 1
    assert Settings.make([3, 7], quick=True, epochs=4).seeds == [3, 7]
    with pytest.raises(ValueError, match="seeds"):
        Settings.make(0, quick=False, epochs=None)
    with pytest.raises(ValueError, match="epochs"):
        Settings.make(2, quick=False, epochs=0)


def test_train_corruption_option():
    """`omnifuse-fast train --corruption`: parsed into TrainConfig, applied to the built-in
    data by the trainer (every split, seeded by the run's seed)."""
    import torch

    from omnifuse_fast.cli import _config_values, build_parser
    from omnifuse_fast.train import TrainConfig
    from omnifuse_fast.train.trainer import load_data

    args = build_parser().parse_args(
        ["train", "--corruption", "swap", "--corrupt-views", "2", "--missing-rate", "0"]
    )
    config = TrainConfig(**_config_values(args))
    assert (config.corruption, config.corrupt_views, config.corrupt_std) == ("swap", 2, None)
    clean = load_data(TrainConfig(missing_rate=0.0))
    dirty = load_data(config)
    for split in ("train", "val", "test"):
        changed = torch.stack(
            [(a != b).any(1) for a, b in zip(clean[split].views, dirty[split].views)], dim=1
        )
        assert torch.equal(changed.sum(1), torch.full((len(changed),), 2))
    again = load_data(config)
    assert all(torch.equal(a, b) for a, b in zip(dirty["test"].views, again["test"].views))
    with pytest.raises(ValueError, match="corruption"):
        TrainConfig(corruption="blur")
    with pytest.raises(ValueError, match="corrupt_views"):
        TrainConfig(corruption="swap", corrupt_views=0)
