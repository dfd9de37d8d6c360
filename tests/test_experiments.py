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


def _files(out, name):
    stem = name.replace("-", "_")
    paths = [out / f"{stem}.{ext}" for ext in ("json", "md", "png")]
    for p in paths:
        assert p.is_file() and p.stat().st_size > 0, p
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads(paths[0].read_text())
    assert payload["experiment"] == name
    assert payload["settings"]["quick"] is True
    assert payload["settings"]["seeds"] == list(range(SEEDS))
    assert {"torch", "cpu_count", "date"} <= set(payload["machine"])
    assert "ttest_rel" in payload["test"]
    assert "|" in paths[1].read_text()  # a Markdown table
    return payload


def _is_cell(c, paired: bool) -> None:
    assert {"mean", "std", "n"} <= set(c)
    assert c["n"] == SEEDS
    assert c["mean"] is not None and c["std"] is not None and c["std"] >= 0
    assert ("p_value" in c) == paired
    if paired and c["p_value"] is not None:
        assert 0.0 <= c["p_value"] <= 1.0


def test_names():
    assert NAMES == ("ablation", "missing-rate", "fusion", "balance", "imputation")
    with pytest.raises(ValueError, match="unknown experiment"):
        run("nope", "/tmp/never-written")


def test_ablation(tmp_path):
    run("ablation", tmp_path, quick=True)
    p = _files(tmp_path, "ablation")
    combos = ["fou+kar", "fou+kar+zer"]
    assert len(p["runs"]) == SEEDS * len(combos) * 6
    for metric in ("test_auroc", "test_accuracy"):
        assert list(p["summary"][metric]) == list("abcdef")
        for row, cols in p["summary"][metric].items():
            assert list(cols) == combos
            for c in cols.values():
                _is_cell(c, paired=row != "a")


def test_missing_rate(tmp_path):
    run("missing-rate", tmp_path, quick=True)
    p = _files(tmp_path, "missing-rate")
    assert len(p["runs"]) == SEEDS * (2 * 2 + 1 * 2)  # (rates x variants) + (view x rate x var)
    assert list(p["summary"]) == ["random", "view=fou"]
    assert list(p["summary"]["random"]) == ["0.0", "0.9"]
    for points in p["summary"].values():
        for e in points.values():
            assert 0.0 <= e["realized_rate"] < 0.9
            for metric in ("test_auroc", "test_accuracy"):
                _is_cell(e[metric]["imp"], paired=True)
                _is_cell(e[metric]["no-imp"], paired=False)
    # one-view missingness leaves the other two views complete
    view_runs = [r for r in p["runs"] if r["kind"] == "view=fou"]
    assert all(r["realized_rate"] <= 0.9 / 3 + 0.05 for r in view_runs)


def test_fusion(tmp_path):
    run("fusion", tmp_path, quick=True)
    p = _files(tmp_path, "fusion")
    assert len(p["runs"]) == SEEDS * 2 * (5 + 6)
    for cond in ("complete", "low-quality"):
        e = p["summary"][cond]
        assert e["best_unimodal"].startswith("uni:")
        for metric in ("test_accuracy", "test_auroc"):
            for m in ("concat", "sum", "late", "dwfuse", "omnifuse"):
                _is_cell(e[metric][m]["vs_concat"], paired=m != "concat")
                _is_cell(e[metric][m]["vs_best_unimodal"], paired=True)
            assert len(e[metric]["unimodal"]) == 6


def test_balance(tmp_path):
    run("balance", tmp_path, quick=True)
    p = _files(tmp_path, "balance")
    s = p["summary"]
    assert len(p["runs"]) == SEEDS * 5
    for m in ("concat", "uniform", "mimo", "mgda", "mm"):
        _is_cell(s[m]["test_accuracy"], paired=m != "uniform")
        _is_cell(s[m]["worst_modality_accuracy"], paired=m != "uniform")
        assert len(s[m]["probe_accuracy"]) == 6
        assert ("subroutine_ms_per_step" in s[m]) == (m in ("mimo", "mgda"))
    assert s["mimo"]["subroutine_ms_per_step"]["mean"] > 0
    assert s["mgda_over_mimo_subroutine_time"] > 0
    for r in p["runs"]:
        assert r["worst_modality_accuracy"] == min(r["probe_accuracy"].values())


def test_imputation_cli(tmp_path, capsys):
    from omnifuse_fast.cli import main

    assert main(["experiment", "imputation", "--quick", "--out", str(tmp_path)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(line)["experiment"] == "imputation"
    p = _files(tmp_path, "imputation")
    assert len(p["runs"]) == SEEDS * 2  # epochs 0 and 1
    for e in ("0", "1"):
        for k in ("imputed_cosine", "imputed_nmse", "missing_embedding_cosine", "test_auroc"):
            _is_cell(p["summary"][e][k], paired=False)
    for k in ("cosine", "mse", "nmse"):
        assert {"imputed", "missing_embedding", "p_value"} <= set(
            p["summary"]["imputed_vs_missing_embedding_last"][k]
        )
    for r in p["runs"]:
        assert -1.0 <= r["imputed_cosine"] <= 1.0 and r["imputed_mse"] >= 0


def test_cli_rejects_bad_args(capsys):
    from omnifuse_fast.cli import main

    with pytest.raises(SystemExit):
        main(["experiment", "nope", "--quick"])
    with pytest.raises(SystemExit):
        main(["experiment", "fusion", "--seeds", "0"])


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
    assert s.seeds == [0, 1, 2, 3, 4] and s.epochs == 8 and s.overrides == {}
    q = Settings.make(None, quick=True, epochs=None)
    assert q.seeds == [0, 1] and q.epochs == 1 and q.config(0).dim == 8
    assert Settings.make([3, 7], quick=True, epochs=4).seeds == [3, 7]
    with pytest.raises(ValueError, match="seeds"):
        Settings.make(0, quick=False, epochs=None)
    with pytest.raises(ValueError, match="epochs"):
        Settings.make(2, quick=False, epochs=0)
