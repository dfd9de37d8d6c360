"""``omnifuse-fast train --data`` and ``omnifuse-fast predict``: outputs and one-line errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
from test_adapters import frame, tiny_text_encoder
from test_cli import _last_json, _restore_threads  # noqa: F401 (an autouse fixture)

from omnifuse_fast import OmniFuseClassifier
from omnifuse_fast.cli import main

QUICK = ["--epochs", "2", "--dim", "8", "--num-blocks", "2", "--quiet"]
KEYS = {"test_accuracy", "test_auroc", "val_accuracy", "val_auroc", "epochs", "method", "backend"}


def test_train_csv_then_predict(tmp_path, capsys):
    frame().to_csv(tmp_path / "d.csv", index=False)
    out = tmp_path / "run"
    argv = ["train", "--data", str(tmp_path / "d.csv"), "--label", "outcome", "--out", str(out)]
    assert main([*argv, *QUICK]) == 0
    result = _last_json(capsys.readouterr().out)
    assert KEYS <= set(result) and result["epochs"] == 2 and result["views"] == ["img", "lab"]
    assert result["rows"] == 120 and result["classes"] == ["sick", "well"]
    assert result["missing_rate"] == pytest.approx(30 / 240)  # lab missing in every 4th row
    files = set(os.listdir(out))
    assert {"checkpoint.pt", "metrics.json", "training_curve.png", "model.pt"} <= files
    stored = json.loads((out / "metrics.json").read_text())
    assert stored["test_auroc"] == result["test_auroc"] and stored["data"] == result["data"]

    frame(n=30, seed=5).drop(columns=["outcome"]).to_csv(tmp_path / "new.csv", index=False)
    preds = tmp_path / "preds.csv"
    argv = ["predict", "--model", str(out), "--data", str(tmp_path / "new.csv")]
    assert main([*argv, "--out", str(preds)]) == 0
    assert _last_json(capsys.readouterr().out) == {"out": str(preds), "rows": 30}
    table = pd.read_csv(preds)
    assert list(table.columns) == ["row", "prediction", "proba_sick", "proba_well"]
    clf = OmniFuseClassifier.load(out)
    new = frame(n=30, seed=5)
    views = {
        "img": new[["img__f0", "img__f1", "img__f2"]].to_numpy(),
        "lab": new[["lab__g0", "lab__g1"]].to_numpy(),
    }
    proba = clf.predict_proba(views)
    assert np.allclose(table[["proba_sick", "proba_well"]].to_numpy(), proba, atol=1e-6)
    assert (table["prediction"] == clf.predict(views)).all()
    assert main(argv) == 0  # no --out: CSV on stdout
    assert capsys.readouterr().out.splitlines()[0] == "row,prediction,proba_sick,proba_well"


def test_train_npz_views_and_text_encoder(tmp_path, capsys):
    encoder = tiny_text_encoder(tmp_path / "bert")
    frame(text=True).to_csv(tmp_path / "t.csv", index=False)
    out = tmp_path / "run"
    argv = ["train", "--data", str(tmp_path / "t.csv"), "--label", "outcome", "--out", str(out)]
    assert main([*argv, "--text-encoder", str(encoder), "--views", "note,img", *QUICK]) == 0
    assert _last_json(capsys.readouterr().out)["views"] == ["note", "img"]
    argv = ["predict", "--model", str(out), "--data", str(tmp_path / "t.csv")]
    assert main([*argv, "--out", str(tmp_path / "p.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "p.csv")) == 120

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=80)
    labels = np.stack([y, 1 - y, rng.integers(0, 2, size=80)], axis=1)
    np.savez(
        tmp_path / "m.npz",
        view_a=rng.normal(size=(80, 3)) + y[:, None],
        view_b=rng.normal(size=(80, 2)),
        y=labels,
    )
    assert main(["train", "--data", str(tmp_path / "m.npz"), "--out", str(out), *QUICK]) == 0
    assert _last_json(capsys.readouterr().out)["multilabel"] is True
    assert main(["predict", "--model", str(out), "--data", str(tmp_path / "m.npz")]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header == "row,pred_0,pred_1,pred_2,proba_0,proba_1,proba_2"


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def _bad_data(tmp_path):
    rng = np.random.default_rng(0)
    a, b, y = rng.normal(size=(40, 3)), rng.normal(size=(40, 2)), np.arange(40) % 2
    nan_b = b.copy()
    nan_b[:] = np.nan
    hole = a.copy()
    hole[9, 1] = np.nan
    frame(text=True).to_csv(tmp_path / "t.csv", index=False)
    return [
        (_npz(tmp_path / "r.npz", view_a=a, view_b=b[:30], y=y), "view 'b' has 30 rows"),
        (_npz(tmp_path / "c.npz", view_a=a, view_b=b, y=np.zeros(40)), "single class"),
        (_npz(tmp_path / "m.npz", view_a=a, view_b=nan_b, y=y), "missing in every row"),
        (str(tmp_path / "t.csv"), "text column 'note__text' needs a text encoder"),
        (_npz(tmp_path / "n.npz", view_a=hole, view_b=b, y=y), "view 'a' row 9"),
    ]


def test_data_errors_exit_2_with_one_line(tmp_path, capsys):
    for path, needle in _bad_data(tmp_path):
        argv = ["train", "--data", path, "--label", "outcome" if path.endswith("csv") else "y"]
        assert main([*argv, "--out", str(tmp_path / "run"), *QUICK]) == 2
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert len(err) == 1 and "error:" in err[0] and needle in err[0], (needle, err)
        assert captured.out == ""


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["train", "--views", "a,b"], "--views needs --data"),
        (["train", "--data", "x.csv", "--missing-rate", "0.2"], "--missing-rate"),
        (["train", "--data", "x.csv", "--resume"], "--resume"),
        (["predict", "--model", "m"], "--data"),
    ],
)
def test_bad_arguments_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "error:" in err[-1] and needle in err[-1]


def test_predict_errors_are_one_line(tmp_path, capsys):
    frame().to_csv(tmp_path / "d.csv", index=False)
    assert main(["predict", "--model", str(tmp_path), "--data", str(tmp_path / "d.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no saved model" in err[0]
