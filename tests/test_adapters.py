"""File adapters: .npz, CSV / Parquet column groups, and text columns via a local encoder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _harness import one_thread

from omnifuse_fast import OmniFuseClassifier
from omnifuse_fast.data import text as text_mod
from omnifuse_fast.data.adapters import load_data, load_like
from omnifuse_fast.data.text import cache_key, embed_texts

FAST = dict(epochs=2, dim=8, hidden=16, num_blocks=2, batch_size=32)
WORDS = ["good", "bad", "fever", "cough", "fine", "very", "no", "the", "patient", "is"]


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def tiny_text_encoder(directory: Path) -> Path:
    """A randomly initialized 1-layer BERT and its WordPiece tokenizer, saved locally."""
    from transformers import BertConfig, BertModel, BertTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "##s"]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(directory / "vocab.txt")).save_pretrained(str(directory))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    BertModel(config).save_pretrained(str(directory))
    return directory


def frame(n=120, seed=0, text=False) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    code = rng.integers(0, 2, size=n)
    df = pd.DataFrame({"id": np.arange(n) + 1000})
    a = rng.normal(size=(n, 3)) + code[:, None]
    b = rng.normal(size=(n, 2)) - code[:, None]
    b[::4] = np.nan
    for i in range(3):
        df[f"img__f{i}"] = a[:, i]
    for i in range(2):
        df[f"lab__g{i}"] = b[:, i]
    if text:
        notes = np.where(code == 1, "the patient is fever cough", "the patient is fine good")
        notes = notes.astype(object)
        notes[::5] = ""  # no note: the text modality is missing
        notes[1::7] = None
        df["note__text"] = notes
    df["outcome"] = np.where(code == 1, "sick", "well")
    return df


def test_npz_end_to_end_with_present(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=90)
    a, b = rng.normal(size=(90, 4)) + y[:, None], rng.normal(size=(90, 3)) - y[:, None]
    present = np.ones((90, 2), bool)
    present[::3, 1] = False
    b[::3] = 7.0  # ignored: marked missing by present
    np.savez(tmp_path / "d.npz", view_a=a, view_b=b, y=y, present=present)
    data = load_data(tmp_path / "d.npz")
    assert list(data.views) == ["a", "b"] and data.present.shape == (90, 2)
    clf = OmniFuseClassifier(seed=0, **FAST).fit(data.views, data.y, data.present)
    assert clf.view_names_ == ["a", "b"]
    # --views reorders and selects; present follows
    sel = load_data(tmp_path / "d.npz", views=["b", "a"])
    assert list(sel.views) == ["b", "a"] and np.array_equal(sel.present, present[:, ::-1])
    clf.data_spec_ = data.spec
    new = load_like(tmp_path / "d.npz", data.spec)
    assert np.array_equal(
        clf.predict_proba(new.views, new.present), clf.predict_proba(data.views, data.present)
    )


def test_csv_prefix_groups_end_to_end(tmp_path):
    frame().to_csv(tmp_path / "d.csv", index=False)
    data = load_data(tmp_path / "d.csv", label="outcome")
    assert list(data.views) == ["img", "lab"] and data.views["lab"].shape == (120, 2)
    assert data.spec["columns"]["img"] == ["img__f0", "img__f1", "img__f2"]  # "id" ignored
    assert np.isnan(data.views["lab"][::4]).all() and data.present is None
    clf = OmniFuseClassifier(seed=0, **FAST).fit(data.views, data.y)
    assert list(clf.classes_) == ["sick", "well"]
    # predict-time file without the label column, laid out by the stored spec
    frame().drop(columns=["outcome"]).to_csv(tmp_path / "new.csv", index=False)
    new = load_like(tmp_path / "new.csv", data.spec)
    assert new.y is None
    assert np.array_equal(clf.predict_proba(new.views), clf.predict_proba(data.views))


def test_csv_explicit_columns_and_multilabel_label(tmp_path):
    df = frame()
    df["flag"] = (df["img__f0"] > 0.5).astype(int)
    df["sick"] = (df["outcome"] == "sick").astype(int)
    df.to_csv(tmp_path / "d.csv", index=False)
    columns = {"x": ["img__f0", "img__f1"], "z": "lab__g0"}
    data = load_data(tmp_path / "d.csv", label=["flag", "sick"], columns=columns)
    assert data.views["x"].shape == (120, 2) and data.views["z"].shape == (120, 1)
    clf = OmniFuseClassifier(seed=0, **FAST).fit(data.views, data.y)
    assert clf.multilabel_ and list(clf.classes_) == ["flag", "sick"]


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pyarrow not installed")
def test_parquet_end_to_end(tmp_path):
    frame().to_parquet(tmp_path / "d.parquet")
    data = load_data(tmp_path / "d.parquet", label="outcome")
    clf = OmniFuseClassifier(seed=0, **FAST).fit(data.views, data.y)
    assert clf.predict_proba(data.views).shape == (120, 2)


def test_text_column_embedded_once_and_cached(tmp_path, monkeypatch):
    encoder = tiny_text_encoder(tmp_path / "bert")
    frame(text=True).to_csv(tmp_path / "d.csv", index=False)
    cache = tmp_path / "cache"
    data = load_data(tmp_path / "d.csv", label="outcome", text_encoder=encoder, cache_dir=cache)
    note = data.views["note"]
    assert note.shape == (120, 16) and data.spec["text"] == {"note": "note__text"}
    missing = np.isnan(note).all(axis=1)
    assert missing[::5].all() and missing[1::7].all() and np.isfinite(note[~missing]).all()
    assert len(list(cache.glob("*.npy"))) == 1
    # same rows, same embeddings: rows with the same text get the same vector
    sick = frame(text=True)["outcome"].to_numpy() == "sick"
    assert np.allclose(note[~missing & sick], note[~missing & sick][0])

    def boom(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(text_mod, "_encode", boom)
    again = load_data(tmp_path / "d.csv", label="outcome", text_encoder=encoder, cache_dir=cache)
    assert np.array_equal(again.views["note"], note, equal_nan=True)
    monkeypatch.undo()
    clf = OmniFuseClassifier(seed=0, **FAST).fit(data.views, data.y)
    assert clf.view_names_ == ["img", "lab", "note"] and clf.view_dims_ == [3, 2, 16]


def test_text_embedding_matches_the_frozen_encoder(tmp_path):
    from transformers import AutoTokenizer

    from omnifuse_fast.nn import FrozenTextEncoder

    encoder = tiny_text_encoder(tmp_path / "bert")
    texts = ["the patient is good", None, "very bad cough"]
    got = embed_texts(texts, encoder, cache_dir=tmp_path / "c")
    tok = AutoTokenizer.from_pretrained(str(encoder), local_files_only=True)
    model = FrozenTextEncoder(str(encoder))
    for i in (0, 2):
        batch = tok([texts[i]], return_tensors="pt")
        want = model(batch["input_ids"], batch["attention_mask"])[0].numpy()
        assert np.allclose(got[i], want, atol=1e-5)
    assert np.isnan(got[1]).all()


def test_cache_key_depends_on_texts_and_path(tmp_path):
    k = cache_key(tmp_path, ["a", "b"], 128)
    assert k != cache_key(tmp_path, ["a", "c"], 128)
    assert k != cache_key(tmp_path, ["ab"], 128) and k != cache_key(tmp_path / "x", ["a", "b"], 128)
    assert k != cache_key(tmp_path, ["a", "b"], 64) and k == cache_key(tmp_path, ["a", "b"], 128)


def test_text_column_without_encoder_is_an_error(tmp_path):
    frame(text=True).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(ValueError, match="text column 'note__text' needs a text encoder"):
        load_data(tmp_path / "d.csv", label="outcome")
    with pytest.raises(ValueError, match="not a local directory"):
        load_data(tmp_path / "d.csv", label="outcome", text_encoder="bert-base-uncased")
    data = load_data(tmp_path / "d.csv", views=["img", "lab"], label="outcome")
    assert list(data.views) == ["img", "lab"]  # text view not selected: no encoder needed


def test_file_errors(tmp_path):
    frame().to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(ValueError, match="no label column"):
        load_data(tmp_path / "d.csv")
    with pytest.raises(ValueError, match="no label column 'nope'"):
        load_data(tmp_path / "d.csv", label="nope")
    with pytest.raises(ValueError, match="unknown view 'xyz'"):
        load_data(tmp_path / "d.csv", label="outcome", views=["img", "xyz"])
    with pytest.raises(ValueError, match="does not exist"):
        load_data(tmp_path / "missing.csv")
    (tmp_path / "d.json").write_text("{}")
    with pytest.raises(ValueError, match="unknown format"):
        load_data(tmp_path / "d.json")
    df = frame()
    df["img__f1"] = "word"
    df.to_csv(tmp_path / "s.csv", index=False)
    with pytest.raises(ValueError, match="column 'img__f1' is not numeric"):
        load_data(tmp_path / "s.csv", label="outcome")
    np.savez(tmp_path / "n.npz", a=np.zeros(3), y=np.zeros(3))
    with pytest.raises(ValueError, match="no view_<name> arrays"):
        load_data(tmp_path / "n.npz")
    np.savez(
        tmp_path / "p.npz",
        view_a=np.zeros((3, 2)),
        view_b=np.zeros((3, 2)),
        y=np.arange(3),
        present=np.ones((3, 3), bool),
    )
    with pytest.raises(ValueError, match=r"present must be \[N, 2\]"):
        load_data(tmp_path / "p.npz")
