"""The built-in UCI multiple-features data, its splits and its low-quality corruption."""

from __future__ import annotations

import math
import time
from importlib import resources

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnifuse_fast.data import (
    VIEW_DIMS,
    VIEW_NAMES,
    add_noise,
    load_mfeat,
    missing_mask,
    prepare_mfeat,
    standardize,
    stratified_split,
)
from omnifuse_fast.data.split import fit_scaler, scale, split_rows


@pytest.fixture(scope="module")
def mfeat():
    return load_mfeat()


@pytest.fixture(scope="module")
def prepared():
    return prepare_mfeat(missing_rate=0.5, seed=3)


# --- the stored data ---------------------------------------------------------------------------


def test_load_shapes_dtypes_and_balance(mfeat):
    assert mfeat.view_names == ["fou", "fac", "kar", "pix", "zer", "mor"] == list(VIEW_NAMES)
    assert mfeat.view_dims == [76, 216, 64, 240, 47, 6] == list(VIEW_DIMS)
    assert mfeat.num_classes == 10 and mfeat.num_samples == 2000
    for v in mfeat.views:
        assert v.dtype == np.float32 and v.shape[0] == 2000 and np.isfinite(v).all()
    assert mfeat.labels.dtype == np.int64 and mfeat.labels.shape == (2000,)
    assert np.bincount(mfeat.labels).tolist() == [200] * 10
    # The UCI order: 200 rows of digit 0, then 200 of digit 1, ...
    assert np.array_equal(mfeat.labels, np.repeat(np.arange(10), 200))


def test_load_is_fast_and_fresh():
    load_mfeat()  # warm the file system cache
    t0 = time.perf_counter()
    a = load_mfeat()
    assert time.perf_counter() - t0 < 1.0
    a.views[0][:] = 0.0
    assert load_mfeat().views[0].any(), "load_mfeat must return fresh arrays"


def test_license_file_ships_with_the_data():
    text = (resources.files("omnifuse_fast.data") / "MFEAT_LICENSE.txt").read_text()
    assert "10.24432/C5HC70" in text and "CC BY 4.0" in text and "Duin" in text


def test_features_carry_the_labels(mfeat):
    """Nearest class mean on complete standardized pix features: rows and labels line up."""
    train, _, test = stratified_split(mfeat.labels, seed=0)
    x = standardize([mfeat.views[3]], train)[0]
    y = mfeat.labels
    means = np.stack([x[train][y[train] == c].mean(0) for c in range(10)])
    pred = ((x[test, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == y[test]).mean() > 0.85


def test_select_views_by_name_and_index(mfeat):
    sub = mfeat.select_views(["mor", 0])
    assert sub.view_names == ["mor", "fou"]
    assert sub.views[0] is mfeat.views[5] and sub.views[1] is mfeat.views[0]


# --- split and standardization -----------------------------------------------------------------


def test_stratified_split_disjoint_complete_and_balanced(mfeat):
    tr, va, te = stratified_split(mfeat.labels, (0.6, 0.2, 0.2), seed=1)
    assert (len(tr), len(va), len(te)) == (1200, 400, 400)
    assert all(i.dtype == np.int64 for i in (tr, va, te))
    allidx = np.concatenate([tr, va, te])
    assert np.array_equal(np.sort(allidx), np.arange(2000))  # disjoint and complete
    for idx, per_class in ((tr, 120), (va, 40), (te, 40)):
        assert np.bincount(mfeat.labels[idx], minlength=10).tolist() == [per_class] * 10
    again = stratified_split(mfeat.labels, (0.6, 0.2, 0.2), seed=1)
    assert all(np.array_equal(a, b) for a, b in zip((tr, va, te), again))
    other = stratified_split(mfeat.labels, (0.6, 0.2, 0.2), seed=2)
    assert not np.array_equal(tr, other[0])


def test_stratified_split_other_fractions(mfeat):
    tr, va, te = stratified_split(mfeat.labels, (0.8, 0.1, 0.1), seed=0)
    assert (len(tr), len(va), len(te)) == (1600, 200, 200)
    assert np.bincount(mfeat.labels[va], minlength=10).tolist() == [20] * 10


def test_split_rows_serves_the_builtin_data_and_the_classifier(mfeat):
    """One split implementation: the built-in data's and users' (any labels, no held-out
    rows, classes too small to stratify, multilabel matrices)."""
    same = zip(split_rows(mfeat.labels, 0.2, 0.2, 1), stratified_split(mfeat.labels, seed=1))
    assert all(np.array_equal(a, b) for a, b in same)
    tr, va, te = split_rows(np.arange(10) % 2, 0.0, 0.0)
    assert tr.tolist() == list(range(10)) and va.size == te.size == 0
    y = np.array(["a"] * 9 + ["b"])  # "b" has one row: split without stratification
    tr, va, te = split_rows(y, 0.05, 0.2, seed=0)
    assert (tr.size, va.size, te.size) == (7, 1, 2)
    tr, va, te = split_rows(np.eye(4)[np.arange(20) % 4], 0.25, 0.25)  # multilabel [N, C]
    assert (tr.size, va.size, te.size) == (10, 5, 5)
    assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(20))
    with pytest.raises(ValueError, match="no training rows"):
        split_rows(np.arange(4) % 2, 0.5, 0.5)


def test_fit_scaler_keeps_the_statistics_of_observed_training_rows(mfeat):
    """What the classifier stores and re-applies at predict time (``scale``)."""
    tr, _, _ = stratified_split(mfeat.labels, seed=0)
    observed = np.random.default_rng(0).random((mfeat.num_samples, 6)) > 0.3
    means, stds = fit_scaler(mfeat.views, tr, observed)
    z = scale(mfeat.views, means, stds)
    for m, v in enumerate(mfeat.views):
        rows = tr[observed[tr, m]]
        assert np.allclose(means[m], v[rows].mean(axis=0)) and means[m].dtype == np.float64
        assert z[m].dtype == np.float32 and np.abs(z[m][rows].mean(axis=0)).max() < 1e-4


def test_standardize_uses_training_statistics(mfeat):
    tr, _, te = stratified_split(mfeat.labels, seed=0)
    before = [v.copy() for v in mfeat.views]
    z = standardize(mfeat.views, tr)
    assert all(np.array_equal(a, b) for a, b in zip(before, mfeat.views)), "input modified"
    for v, raw in zip(z, mfeat.views):
        assert v.dtype == np.float32 and np.isfinite(v).all()
        const = raw[tr].std(0) == 0
        np.testing.assert_allclose(v[tr].mean(0), 0.0, atol=1e-4)
        np.testing.assert_allclose(v[tr].std(0)[~const], 1.0, atol=1e-3)
        np.testing.assert_allclose(v[tr][:, const], 0.0, atol=1e-6)  # constant: centered only
    # Test rows are scaled with the training statistics, not their own.
    raw = mfeat.views[0].astype(np.float64)
    mu, sd = raw[tr].mean(0), raw[tr].std(0)
    np.testing.assert_allclose(z[0][te], (raw[te] - mu) / sd, rtol=1e-4, atol=1e-4)


def test_standardize_constant_feature_is_safe():
    x = np.ones((10, 3), dtype=np.float32) * 7.0
    x[:, 1] = np.arange(10)
    z = standardize([x], np.arange(6))[0]
    assert np.isfinite(z).all()
    np.testing.assert_allclose(z[:, 0], 0.0)
    np.testing.assert_allclose(z[:, 2], 0.0)


def test_standardize_with_observed_ignores_missing_rows():
    x = np.array([[1.0], [3.0], [1000.0], [5.0]], dtype=np.float32)
    observed = np.array([[True], [True], [False], [True]])
    z = standardize([x], np.arange(3), observed=observed)[0]
    np.testing.assert_allclose(z[:2, 0], [-1.0, 1.0], atol=1e-6)  # stats of rows 0 and 1 only


# --- corruption --------------------------------------------------------------------------------


def _expected_missing(rate: float, m: int) -> tuple[float, float]:
    """Mean and variance of one row's missing count after the keep-one-view fix."""
    pmf = [math.comb(m, k) * rate**k * (1 - rate) ** (m - k) for k in range(m + 1)]
    counts = [min(k, m - 1) for k in range(m + 1)]
    mean = sum(p * c for p, c in zip(pmf, counts))
    var = sum(p * c * c for p, c in zip(pmf, counts)) - mean**2
    return mean, var


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    rate=st.floats(0.0, 0.9),
    seed=st.integers(0, 2**31 - 1),
    m=st.integers(1, 8),
    n=st.integers(1, 3000),
)
def test_missing_mask_rate_and_no_empty_row(rate, seed, m, n):
    mask = missing_mask(n, m, rate, np.random.default_rng(seed))
    assert mask.dtype == np.bool_ and mask.shape == (n, m)
    assert not mask.all(axis=1).any(), "a sample lost every view"
    mean, var = _expected_missing(rate, m)
    # The realized rate is rate - rate**m / m in expectation; allow 6 standard deviations.
    assert abs(mask.sum() / n - mean) <= 6 * math.sqrt(var / n) + 1e-9
    if rate == 0.0:
        assert not mask.any()


def test_missing_mask_large_sample_hits_target():
    mask = missing_mask(200_000, 6, 0.5, np.random.default_rng(0))
    assert abs(mask.mean() - (0.5 - 0.5**6 / 6)) < 3e-3
    mask = missing_mask(200_000, 6, 0.9, np.random.default_rng(0))
    assert abs(mask.mean() - (0.9 - 0.9**6 / 6)) < 3e-3
    assert (mask.sum(1) <= 5).all()


def test_missing_mask_deterministic_for_a_seed():
    a = missing_mask(500, 4, 0.3, np.random.default_rng(7))
    b = missing_mask(500, 4, 0.3, np.random.default_rng(7))
    c = missing_mask(500, 4, 0.3, np.random.default_rng(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(a, missing_mask(500, 4, 0.3, 7))  # an int seed works the same


def test_add_noise_only_on_chosen_views():
    rng = np.random.default_rng(0)
    views = [rng.normal(size=(4000, d)).astype(np.float32) for d in (5, 7, 3)]
    before = [v.copy() for v in views]
    out = add_noise(views, [2, 0], 0.5, np.random.default_rng(1))
    assert all(np.array_equal(a, b) for a, b in zip(before, views)), "input modified"
    assert all(o is not v for o, v in zip(out, views))
    assert np.array_equal(out[1], views[1])
    for i in (0, 2):
        assert out[i].dtype == np.float32
        diff = out[i] - views[i]
        assert abs(diff.std() - 0.5) < 0.02 and abs(diff.mean()) < 0.02
    same = add_noise(views, [0, 2], 0.5, np.random.default_rng(1))
    assert all(np.array_equal(a, b) for a, b in zip(out, same))  # order-independent, seeded


# --- prepare_mfeat -----------------------------------------------------------------------------


def test_prepare_shapes_dtypes_and_missing_fill(prepared):
    assert set(prepared) == {"train", "val", "test"}
    sizes = {"train": 1200, "val": 400, "test": 400}
    seen = []
    for name, s in prepared.items():
        assert len(s) == sizes[name] and s.num_views == 6
        assert s.view_names == list(VIEW_NAMES) and s.view_dims == list(VIEW_DIMS)
        assert s.num_classes == 10
        assert s.labels.dtype == torch.int64 and s.observed.dtype == torch.bool
        assert s.observed.shape == (len(s), 6) and s.observed.any(1).all()
        assert torch.bincount(s.labels, minlength=10).tolist() == [sizes[name] // 10] * 10
        for m, v in enumerate(s.views):
            assert v.dtype == torch.float32 and v.shape == (len(s), VIEW_DIMS[m])
            assert torch.isfinite(v).all()
            assert (v[~s.observed[:, m]] == 0).all()
        seen.append(s.indices)
    assert torch.cat(seen).sort().values.equal(torch.arange(2000))
    rate = 1 - torch.cat([s.observed for s in prepared.values()]).float().mean().item()
    assert abs(rate - (0.5 - 0.5**6 / 6)) < 0.02


def test_prepare_standardizes_with_observed_train_rows(prepared):
    tr = prepared["train"]
    for m, v in enumerate(tr.views):
        rows = v[tr.observed[:, m]].double()
        assert rows.mean(0).abs().max() < 1e-4
        sd = rows.std(0, unbiased=False)
        assert ((sd - 1).abs() < 1e-3).sum() >= 0.9 * v.shape[1]  # constant features stay 0


def test_prepare_deterministic_for_a_seed(prepared):
    again = prepare_mfeat(missing_rate=0.5, seed=3)
    other = prepare_mfeat(missing_rate=0.5, seed=4)
    for name in ("train", "val", "test"):
        a, b = prepared[name], again[name]
        assert a.indices.equal(b.indices) and a.observed.equal(b.observed)
        assert all(x.equal(y) for x, y in zip(a.views, b.views))
    assert not prepared["train"].indices.equal(other["train"].indices)


def test_prepare_noise_only_on_chosen_views_and_splits():
    clean = prepare_mfeat(missing_rate=0.3, seed=5)
    noisy = prepare_mfeat(missing_rate=0.3, seed=5, noise_views=["kar", 4], noise_std=1.0)
    test_only = prepare_mfeat(
        missing_rate=0.3, seed=5, noise_views=["kar"], noise_std=1.0, noise_splits=("test",)
    )
    for name in ("train", "val", "test"):
        c, n = clean[name], noisy[name]
        assert c.observed.equal(n.observed), "noise must not change the missing mask"
        for m in range(6):
            if m in (2, 4):
                obs = c.observed[:, m]
                d = (n.views[m] - c.views[m])[obs]
                assert abs(d.std().item() - 1.0) < 0.05  # std in standardized units
                assert (n.views[m][~obs] == 0).all()  # missing stays zero
            else:
                assert n.views[m].equal(c.views[m])
    assert test_only["train"].views[2].equal(clean["train"].views[2])
    assert test_only["val"].views[2].equal(clean["val"].views[2])
    assert test_only["test"].views[2].equal(noisy["test"].views[2])


def test_prepare_view_subset_and_complete_data():
    out = prepare_mfeat(missing_rate=0.0, views=["pix", 0, "mor"], seed=0)
    s = out["val"]
    assert s.view_names == ["pix", "fou", "mor"] and s.view_dims == [240, 76, 6]
    assert s.observed.all()
    sub = s.subset(torch.tensor([3, 1]))
    assert len(sub) == 2 and sub.labels.equal(s.labels[[3, 1]])
    assert sub.views[0].equal(s.views[0][[3, 1]]) and sub.indices.equal(s.indices[[3, 1]])


def test_prepare_high_missing_rate_keeps_one_view():
    out = prepare_mfeat(missing_rate=0.9, seed=0)
    obs = torch.cat([s.observed for s in out.values()])
    assert obs.any(1).all()
    assert abs(1 - obs.float().mean().item() - (0.9 - 0.9**6 / 6)) < 0.02


# --- bad inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [1.0, -0.1, float("nan"), 1.5, "0.5", True])
def test_bad_missing_rate(rate):
    with pytest.raises(ValueError, match="missing_rate"):
        prepare_mfeat(missing_rate=rate)
    with pytest.raises(ValueError, match="rate"):
        missing_mask(10, 3, rate, 0)


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(views=["fou", "digits"]), "views: unknown view name 'digits'"),
        (dict(views=[6]), "views: view index 6 out of range"),
        (dict(views=["fou", 0]), "views: view 'fou' selected twice"),
        (dict(views=[]), "views: select at least one"),
        (dict(views=["fou", "kar"], noise_views=["pix"], noise_std=1.0), "noise_views"),
        (dict(noise_views=[0], noise_std=-1.0), "std"),
        (dict(noise_splits=("training",)), "noise_splits"),
        (dict(fractions=(0.5, 0.2, 0.2)), "fractions"),
        (dict(fractions=(0.8, 0.2, 0.0)), "fractions"),
        (dict(fractions=(0.8, 0.2)), "fractions"),
        (dict(seed=-1), "seed"),
    ],
)
def test_prepare_bad_inputs(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        prepare_mfeat(**kwargs)


def test_function_bad_inputs():
    labels = np.repeat(np.arange(10), 20)
    with pytest.raises(ValueError, match="fractions"):
        stratified_split(labels, (0.6, 0.6, -0.2))
    with pytest.raises(ValueError, match="labels"):
        stratified_split(labels.reshape(20, 10))
    with pytest.raises(ValueError, match="n must"):
        missing_mask(0, 3, 0.5, 0)
    with pytest.raises(ValueError, match="num_views"):
        missing_mask(10, 0, 0.5, 0)
    views = [np.zeros((5, 2), np.float32)]
    with pytest.raises(ValueError, match="view_indices"):
        add_noise(views, [1], 1.0, 0)
    with pytest.raises(ValueError, match="view_indices"):
        add_noise(views, [0, 0], 1.0, 0)
    with pytest.raises(ValueError, match="std"):
        add_noise(views, [0], float("inf"), 0)
    with pytest.raises(ValueError, match="train_idx"):
        standardize(views, np.array([7]))
    with pytest.raises(ValueError, match="observed"):
        standardize(views, np.arange(3), observed=np.ones((5, 2), bool))


# --- per-sample corruption (swap, heavy-noise, noise) ------------------------------------------


def _toy(n=300, m=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, n)
    views = [rng.normal(size=(n, d)).astype(np.float32) + labels[:, None] for d in (3, 5, 2, 4)[:m]]
    observed = ~missing_mask(n, m, 0.3, rng)
    for v, o in zip(views, observed.T):
        v[~o] = 0.0
    return views, labels, observed


@pytest.mark.parametrize("kind", ["swap", "heavy-noise"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_corruption_changes_k_observed_views_per_sample(kind, k):
    from omnifuse_fast.data import Corruption, corrupt

    views, labels, observed = _toy()
    before = [v.copy() for v in views]
    out, changed, _ = corrupt(views, labels, observed, Corruption(kind, k=k), 5)
    assert all(np.array_equal(a, b) for a, b in zip(before, views)), "input modified"
    assert not (changed & ~observed).any(), "a missing view was corrupted"
    np.testing.assert_array_equal(changed.sum(1), np.minimum(k, observed.sum(1)))
    assert changed.sum(0).min() > 0  # the chosen views vary from sample to sample
    for j in range(len(views)):
        diff = np.abs(out[j] - views[j]).max(axis=1) > 0
        np.testing.assert_array_equal(diff, changed[:, j])  # exactly the marked entries changed


def test_swap_takes_the_view_of_another_class():
    from omnifuse_fast.data import Corruption, corrupt

    views, labels, observed = _toy()
    out, changed, donors = corrupt(views, labels, observed, Corruption("swap", k=2), 1)
    rows, cols = np.nonzero(changed)
    assert rows.size and (donors[changed] >= 0).all() and (donors[~changed] == -1).all()
    assert (labels[donors[rows, cols]] != labels[rows]).all()
    assert observed[donors[rows, cols], cols].all()  # the donor observes the view
    for i, j in zip(rows, cols):
        np.testing.assert_array_equal(out[j][i], views[j][donors[i, j]])


def test_corruption_is_deterministic_for_a_seed():
    from omnifuse_fast.data import Corruption, corrupt

    views, labels, observed = _toy()
    for kind in ("swap", "heavy-noise", "noise"):
        c = Corruption(kind, k=2)
        a, ca, _ = corrupt(views, labels, observed, c, 3)
        b, cb, _ = corrupt(views, labels, observed, c, np.random.default_rng(3))
        d, _, _ = corrupt(views, labels, observed, c, 4)
        assert np.array_equal(ca, cb) and all(np.array_equal(x, y) for x, y in zip(a, b))
        assert not all(np.array_equal(x, y) for x, y in zip(a, d))


def test_noise_kind_is_uniform_on_the_named_views():
    from omnifuse_fast.data import Corruption, corrupt

    views, labels, observed = _toy(n=4000)
    c = Corruption("noise", std=0.5, views=("1",))
    out, changed, _ = corrupt(views, labels, observed, c, 0, view_names=["0", "1", "2", "3"])
    np.testing.assert_array_equal(changed[:, 1], observed[:, 1])
    assert not changed[:, [0, 2, 3]].any()
    d = (out[1] - views[1])[observed[:, 1]]
    assert abs(d.std() - 0.5) < 0.02
    heavy = corrupt(views, labels, observed, Corruption("heavy-noise"), 0)
    assert abs((heavy[0][0] - views[0])[heavy[1][:, 0]].std() - 5.0) < 0.2  # default std 5
    with pytest.raises(ValueError, match="unknown view"):
        corrupt(views, labels, observed, Corruption("noise", views=("x",)), 0, ["0", "1", "2", "3"])


def test_corrupt_splits_same_process_per_split_and_seeded():
    from omnifuse_fast.data import Corruption, corrupt_splits

    splits = prepare_mfeat(missing_rate=0.3, seed=0)
    c = Corruption("swap", k=2)
    a, info = corrupt_splits(splits, c, 7)
    b, _ = corrupt_splits(splits, c, 7)
    for name in ("train", "val", "test"):
        ch = info[name]["corrupted"]
        obs = splits[name].observed.numpy()
        np.testing.assert_array_equal(ch.sum(1), np.minimum(2, obs.sum(1)))
        donors = info[name]["donors"][ch]
        assert donors.max() < len(splits[name])  # donors from the same split
        for x, y in zip(a[name].views, b[name].views):
            assert torch.equal(x, y)
    assert all(
        torch.equal(x, y)
        for x, y in zip(splits["test"].views, prepare_mfeat(0.3, seed=0)["test"].views)
    )


def test_corruption_rejects_bad_options():
    from omnifuse_fast.data import Corruption

    with pytest.raises(ValueError, match="corruption must be one of"):
        Corruption("blur")
    with pytest.raises(ValueError, match="corrupt_views"):
        Corruption("swap", k=0)
    with pytest.raises(ValueError, match="corrupt_std"):
        Corruption("heavy-noise", std=-1.0)
