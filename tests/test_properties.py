"""Property tests (hypothesis) of the reference path: invariants that hold for every input."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import omnifuse_fast as of

SETTINGS = settings(max_examples=30, deadline=None)
seeds = st.integers(0, 2**31 - 1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@SETTINGS
@given(
    bsz=st.integers(1, 4),
    nmod=st.integers(2, 8),
    ncls=st.integers(2, 5),
    scale=st.sampled_from([0.0, 0.1, 1.0, 10.0, 1e3, 1e4]),
    beta=st.floats(0.0, 4.0),
    multilabel=st.booleans(),
    seed=seeds,
)
def test_omega_in_unit_interval(bsz, nmod, ncls, scale, beta, multilabel, seed):
    g = _gen(seed)
    z = torch.randn(bsz, nmod, ncls, generator=g) * scale
    if multilabel:
        y = torch.randint(0, 2, (bsz, ncls), generator=g).float()
    else:
        y = torch.randint(0, ncls, (bsz,), generator=g)
    omega = of.dwfuse_weights(z, y, beta=beta, backend="reference", multilabel=multilabel)
    assert torch.isfinite(omega).all()
    assert (omega >= 0).all() and (omega <= 1).all()
    loss = of.dwfuse_loss(z, y, beta=beta, backend="reference", multilabel=multilabel)
    assert torch.isfinite(loss) and loss >= 0


@st.composite
def mix_case(draw):
    bsz, nmod = draw(st.integers(1, 6)), draw(st.integers(2, 8))
    ncls = draw(st.integers(2, 5))
    seed = draw(seeds)
    g = _gen(seed)
    labels = torch.randint(0, ncls, (bsz,), generator=g)
    src = torch.randint(0, bsz, (nmod, bsz), generator=g)
    mode = draw(st.sampled_from(["none", "modality", "sample"]))
    weights = None
    if mode != "none":
        shape = (nmod,) if mode == "modality" else (bsz, nmod)
        w = torch.rand(*shape, generator=g, dtype=torch.float64)
        w[w < 0.3] = 0.0  # exact zeros on the simplex's faces
        w = w + (w.sum(-1, keepdim=True) == 0).double()  # a row of zeros gets all ones
        weights = (w / w.sum(-1, keepdim=True)).float()
    return bsz, nmod, ncls, labels, src, weights


@SETTINGS
@given(case=mix_case())
def test_mixed_soft_labels_on_simplex(case):
    bsz, nmod, ncls, labels, src, weights = case
    v = torch.randn(bsz, nmod, 3)
    vm, q = of.modality_mix(v, labels, src, ncls, weights=weights, backend="reference")
    assert q.shape == (bsz, ncls) and (q >= 0).all()
    torch.testing.assert_close(q.sum(1), torch.ones(bsz), rtol=0, atol=1e-5)
    # the soft label only covers the sources' labels
    for b in range(bsz):
        allowed = set(labels[src[:, b]].tolist())
        assert set(q[b].nonzero().flatten().tolist()) <= allowed
    for m in range(nmod):
        assert torch.equal(vm[:, m], v[src[m], m])


@SETTINGS
@given(
    bsz=st.integers(1, 6),
    nmod=st.integers(2, 8),
    ncls=st.integers(2, 5),
    per_sample=st.booleans(),
    seed=seeds,
)
def test_identity_sources_are_identity(bsz, nmod, ncls, per_sample, seed):
    g = _gen(seed)
    v = torch.randn(bsz, nmod, 2, generator=g)
    labels = torch.randint(0, ncls, (bsz,), generator=g)
    src = torch.arange(bsz).expand(nmod, bsz)
    w = torch.rand(bsz if per_sample else 1, nmod, generator=g) + 0.1
    w = (w / w.sum(-1, keepdim=True)).squeeze(0)
    vm, q = of.modality_mix(v, labels, src, ncls, weights=w, backend="reference")
    assert torch.equal(vm, v)
    assert torch.equal(q, torch.nn.functional.one_hot(labels, ncls).float())


vectors = st.integers(1, 6).flatmap(
    lambda n: st.tuples(
        st.lists(st.floats(-1e3, 1e3, width=32), min_size=n, max_size=n),
        st.lists(st.floats(-1e3, 1e3, width=32), min_size=n, max_size=n),
        st.sampled_from(["independent", "equal", "scaled", "opposite", "zero"]),
        st.floats(0.0, 4.0, width=32),
    )
)


@SETTINGS
@given(case=vectors)
def test_mimo_direction_short_and_lambda_in_unit_interval(case):
    a, b, kind, c = case
    g0 = torch.tensor(a)
    gw = {
        "independent": torch.tensor(b),
        "equal": g0.clone(),
        "scaled": g0 * c,
        "opposite": -g0 * c,
        "zero": torch.zeros_like(g0),
    }[kind]
    (d,), lam = of.mimo_combine([g0], [gw], backend="reference")
    assert 0.0 <= lam.item() <= 1.0
    assert torch.isfinite(d).all()
    n0, nw, nd = (t.double().norm().item() for t in (g0, gw, d))
    # the min-norm point of the segment is no longer than its shorter end
    assert nd <= min(n0, nw) * (1 + 1e-5) + 1e-30
    assert nd <= max(n0, nw) * (1 + 1e-5) + 1e-30
    if kind == "equal":
        assert lam.item() == 0.5


@SETTINGS
@given(
    bsz=st.integers(1, 8),
    nmod=st.integers(2, 8),
    seed=seeds,
)
def test_combination_ids_round_trip(bsz, nmod, seed):
    comb = torch.randint(1, 1 << nmod, (bsz,), generator=_gen(seed))
    bits = torch.arange(nmod)
    present = ((comb.unsqueeze(1) >> bits) & 1).bool()  # ids -> masks
    out = of.combination_ids(present, backend="reference")
    assert out.dtype == torch.int64 and torch.equal(out, comb)  # masks -> the same ids
    assert ((out >= 1) & (out < (1 << nmod))).all()
    assert torch.equal(((out.unsqueeze(1) >> bits) & 1).bool(), present)


@SETTINGS
@given(
    bsz=st.integers(1, 12),
    nmod=st.integers(2, 8),
    ncls=st.integers(2, 5),
    distance=st.sampled_from(["ce", "l1", "l2"]),
    scale=st.sampled_from([0.1, 1.0, 100.0, 1e4]),
    seed=seeds,
)
def test_tla_counts_and_sums(bsz, nmod, ncls, distance, scale, seed):
    g = _gen(seed)
    z = torch.randn(bsz, ncls, generator=g) * scale
    y = torch.randint(0, ncls, (bsz,), generator=g)
    comb = torch.randint(1, 1 << nmod, (bsz,), generator=g)
    sums, counts = of.tla_stats(z, y, comb, nmod, distance=distance, backend="reference")
    assert counts.sum().item() == bsz
    assert torch.equal(counts, torch.bincount(comb, minlength=1 << nmod))
    assert torch.isfinite(sums).all() and (sums >= 0).all()
    assert sums[0] == 0 and counts[0] == 0
    assert (sums[counts == 0] == 0).all()
    if distance != "ce":  # l1 <= 2 and squared l2 <= 2 per sample
        assert (sums <= 2 * counts + 1e-5).all()
