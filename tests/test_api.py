"""``OmniFuseClassifier``: fit / predict / save / load, multilabel, early stopping, errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _harness import one_thread

from omnifuse_fast import OmniFuse, OmniFuseClassifier

FAST = dict(epochs=2, dim=8, hidden=16, num_blocks=2, batch_size=32)
DOC = Path(__file__).resolve().parents[1] / "docs" / "YOUR_DATA.md"


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():  # tiny models: one thread avoids oversubscription
        yield


def _data(n=120, seed=0, labels=("b", "a", "c")):
    rng = np.random.default_rng(seed)
    code = rng.integers(0, len(labels), size=n)
    a = rng.normal(size=(n, 6)) + code[:, None]
    b = rng.normal(size=(n, 4)) - code[:, None]
    b[::5] = np.nan  # every fifth row has no "b"
    return {"a": a, "b": b}, np.asarray(labels, dtype=object)[code], code


def test_roundtrip_gives_identical_probabilities(tmp_path):
    views, y, _ = _data()
    clf = OmniFuseClassifier(seed=3, **FAST).fit(views, y)
    assert list(clf.classes_) == ["a", "b", "c"] and clf.view_names_ == ["a", "b"]
    proba = clf.predict_proba(views)
    assert proba.shape == (120, 3) and np.allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert set(clf.predict(views)) <= {"a", "b", "c"}
    clf.save(tmp_path / "m")
    again = OmniFuseClassifier.load(tmp_path / "m")
    assert np.array_equal(proba, again.predict_proba(views))
    # a dict in another order and a list in the fitted order are the same input
    swapped = {"b": views["b"], "a": views["a"]}
    assert np.array_equal(proba, again.predict_proba(swapped))
    assert np.array_equal(proba, again.predict_proba([views["a"], views["b"]]))
    assert np.array_equal(again.predict(views), clf.predict(views))
    for m, s in zip(clf.mean_, again.std_):
        assert m.dtype == np.float64 and s.dtype == np.float64


def test_standardization_uses_training_rows_only(tmp_path):
    views, y, _ = _data(n=100)
    clf = OmniFuseClassifier(seed=0, validation_fraction=0.0, **FAST).fit(views, y)
    observed = ~np.isnan(views["b"]).all(axis=1)
    assert np.allclose(clf.mean_[1], views["b"][observed].mean(axis=0))
    assert np.allclose(clf.std_[0], views["a"].std(axis=0))
    assert clf.result_["selected_epoch"] == FAST["epochs"]  # no validation: the last epoch


def test_present_mask_and_tensors_equal_nan_rows():
    views, y, code = _data(n=90)
    present = np.stack([np.ones(90, bool), ~np.isnan(views["b"]).all(axis=1)], axis=1)
    garbage = views["b"].copy()
    garbage[~present[:, 1]] = 123.0  # ignored where present is False
    clf = OmniFuseClassifier(seed=1, **FAST).fit(views, code)
    assert clf.classes_.tolist() == [0, 1, 2]
    by_nan = clf.predict_proba(views)
    tensors = [torch.from_numpy(views["a"]).float(), torch.from_numpy(garbage)]
    by_mask = clf.predict_proba(tensors, present=torch.from_numpy(present))
    assert np.allclose(by_nan, by_mask, atol=1e-6)


def test_multilabel_fit_predict_roundtrip(tmp_path):
    views, _, code = _data(n=120)
    rng = np.random.default_rng(1)
    y = np.stack([code == 0, code == 2, rng.random(120) < 0.5], axis=1).astype(int)
    for tla_mode in ("observed", "subsets"):
        clf = OmniFuseClassifier(seed=0, tla_mode=tla_mode, **FAST).fit(views, y)
        assert clf.multilabel_ and clf.classes_.tolist() == [0, 1, 2]
        assert clf.history_[-1]["lazy"] is not None  # TLA mined on the joint BCE
        proba = clf.predict_proba(views)
        assert proba.shape == (120, 3) and ((proba >= 0) & (proba <= 1)).all()
        assert not np.allclose(proba.sum(axis=1), 1.0)  # sigmoids, not a softmax
        assert np.array_equal(clf.predict(views), (proba >= 0.5).astype(np.int64))
    clf.save(tmp_path)
    assert np.array_equal(proba, OmniFuseClassifier.load(tmp_path).predict_proba(views))


def test_multilabel_mimo_and_concat_train():
    views, _, code = _data(n=80)
    y = np.stack([code == 0, code == 1], axis=1).astype(float)
    for method in ("mimo", "concat"):
        clf = OmniFuseClassifier(method=method, seed=0, **FAST).fit(views, y)
        assert np.isfinite(clf.history_[-1]["train_loss"])


def test_multilabel_tla_statistics_are_per_combination_mean_bce():
    torch.manual_seed(0)
    model = OmniFuse([3, 2], 4, dim=4, hidden=8, num_blocks=1, multilabel=True)
    views = [torch.randn(10, 3), torch.randn(10, 2)]
    observed = torch.ones(10, 2, dtype=torch.bool)
    observed[:3, 1] = False
    observed[3:5, 0] = False
    labels = (torch.rand(10, 4) < 0.5).float()
    out = model(views, observed, labels, present=observed)
    model.tla_observe(out, observed, labels)
    d = F.binary_cross_entropy_with_logits(out.joint_logits, labels, reduction="none").mean(1)
    for comb, rows in ((1, slice(0, 3)), (2, slice(3, 5)), (3, slice(5, 10))):
        assert torch.allclose(model.miner.sums[comb].float(), d[rows].sum(), atol=1e-5)
        assert int(model.miner.counts[comb]) == rows.stop - rows.start
    worst = 1 + int(torch.stack([d[0:3].mean(), d[3:5].mean(), d[5:10].mean()]).argmax())
    assert model.miner.mine() == worst
    out = model(views, observed, labels, present=observed)
    mask = out.comb == worst
    expect = F.binary_cross_entropy_with_logits(out.joint_logits[mask], labels[mask])
    assert torch.allclose(out.losses["tla"], expect)


def test_early_stopping_on_validation_auroc():
    views, y, _ = _data(n=90)
    clf = OmniFuseClassifier(seed=0, epochs=30, lr=1e-12, patience=2, dim=8, num_blocks=2)
    clf.fit(views, y)
    assert len(clf.history_) == 3  # best at epoch 1 (nothing learns), two more, stop


def _bad(views, y, present=None):
    with pytest.raises(ValueError) as exc:
        OmniFuseClassifier(**FAST).fit(views, y, present)
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_error_views_with_different_row_counts():
    views, y, _ = _data()
    views["b"] = views["b"][:-7]
    assert re.search(r"view 'b' has 113 rows but view 'a' has 120", _bad(views, y))


def test_error_labels_with_one_class():
    views, y, _ = _data()
    assert "single class" in _bad(views, np.full(120, "a"))
    assert "single value" in _bad(views, np.ones((120, 3)))


def test_error_modality_missing_in_every_row():
    views, y, _ = _data()
    views["b"][:] = np.nan
    assert "view 'b' is missing in every row" in _bad(views, y)
    views, y, _ = _data()
    present = np.stack([np.zeros(120, bool), ~np.isnan(views["b"]).all(axis=1)], axis=1)
    assert "view 'a' is missing in every row" in _bad(views, y, present)


def test_error_nan_inside_a_present_row_names_view_and_row():
    views, y, _ = _data()
    views["a"][17, 2] = np.nan
    message = _bad(views, y)
    assert "view 'a' row 17" in message and "1 of 6" in message
    clf = OmniFuseClassifier(**FAST).fit(*_data()[:2])
    bad = {"a": views["a"][15:20], "b": views["b"][15:20]}
    with pytest.raises(ValueError, match="view 'a' row 2"):
        clf.predict_proba(bad)


def test_error_row_without_any_view_and_other_inputs():
    views, y, _ = _data()
    views["a"][4] = np.nan
    views["b"][4] = np.nan
    assert "row 4 has no observed view" in _bad(views, y)
    views, y, _ = _data()
    assert "2 to 8 modalities" in _bad([views["a"]], y)
    assert "y has 100 rows" in _bad(views, y[:100])
    with pytest.raises(ValueError, match="method 'mm'"):
        OmniFuseClassifier(method="mm", **FAST).fit(views, np.eye(3)[np.arange(120) % 3])
    with pytest.raises(ValueError, match="validation_fraction"):
        OmniFuseClassifier(validation_fraction=1.5)
    with pytest.raises(ValueError, match="patience"):
        OmniFuseClassifier(patience=0)


def test_predict_checks_views_against_the_fit():
    views, y, _ = _data(n=60)
    clf = OmniFuseClassifier(**FAST).fit(views, y)
    with pytest.raises(ValueError, match="views must be"):
        clf.predict({"a": views["a"], "c": views["b"]})
    with pytest.raises(ValueError, match="view 'b' has 5 features"):
        clf.predict({"a": views["a"], "b": np.zeros((60, 5))})
    with pytest.raises(RuntimeError, match="not fitted"):
        OmniFuseClassifier().predict(views)


def test_readme_example_runs_as_written(tmp_path, monkeypatch, capsys):
    block = DOC.read_text().split("```python\n", 1)[1].split("```", 1)[0]
    assert len([line for line in block.splitlines() if line.strip()]) <= 10
    monkeypatch.chdir(tmp_path)
    exec(compile(block, str(DOC), "exec"), {})
    printed = capsys.readouterr().out
    assert re.search(
        r"\['(healthy|flu|covid)' '(healthy|flu|covid)' '(healthy|flu|covid)'\]", printed
    )
    assert (tmp_path / "my_model" / "model.pt").is_file()
