"""Reference TLA ops (SPEC section 3) against hand-computed cases and python loops."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tol

import omnifuse_fast as of


def make(bsz, ncls, nmod, seed=0, scale=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(bsz, ncls, generator=g, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, ncls, (bsz,), generator=g)
    comb = torch.randint(1, 1 << nmod, (bsz,), generator=g)
    return z, y, comb


def loop_distance(row: list[float], label: int, distance: str) -> float:
    top = max(row)
    den = sum(math.exp(v - top) for v in row)
    prob = [math.exp(v - top) / den for v in row]
    if distance == "ce":
        return -math.log(prob[label])
    diff = [p - (1.0 if c == label else 0.0) for c, p in enumerate(prob)]
    if distance == "l1":
        return sum(abs(d) for d in diff)
    return sum(d * d for d in diff)


def loop_stats(z, y, comb, nmod, distance):
    sums = [0.0] * (1 << nmod)
    counts = [0] * (1 << nmod)
    for row, label, c in zip(z.double().tolist(), y.tolist(), comb.tolist()):
        sums[c] += loop_distance(row, label, distance)
        counts[c] += 1
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(counts)


def loop_tla_loss(z, y, comb, lazy):
    picked = [
        loop_distance(row, label, "ce")
        for row, label, c in zip(z.double().tolist(), y.tolist(), comb.tolist())
        if c == lazy
    ]
    return sum(picked) / len(picked) if picked else 0.0


def test_combination_ids_hand():
    present = torch.tensor([[True, False, True], [False, True, False], [True, True, True]])
    assert torch.equal(of.combination_ids(present, backend="reference"), torch.tensor([5, 2, 7]))
    full = torch.ones(2, 8, dtype=torch.bool)
    out = of.combination_ids(full, backend="reference")
    assert out.dtype == torch.int64 and torch.equal(out, torch.tensor([255, 255]))
    last = torch.zeros(1, 8, dtype=torch.bool)
    last[0, 7] = True
    assert of.combination_ids(last, backend="reference").item() == 128


def test_stats_hand_uniform_logits():
    # softmax of zeros over C=4 is 1/4: ce = log 4, l1 = 3/4 + 3 * 1/4, l2 = (3/4)^2 + 3/16
    z = torch.zeros(3, 4)
    y = torch.tensor([0, 2, 3])
    comb = torch.tensor([1, 3, 3])
    for distance, d in (("ce", math.log(4.0)), ("l1", 1.5), ("l2", 0.75)):
        sums, counts = of.tla_stats(z, y, comb, 2, distance=distance, backend="reference")
        assert sums.dtype == torch.float32 and counts.dtype == torch.int64
        assert sums.shape == counts.shape == (4,)
        torch.testing.assert_close(sums, torch.tensor([0.0, d, 0.0, 2 * d]))
        assert torch.equal(counts, torch.tensor([0, 1, 0, 2]))


@pytest.mark.parametrize("distance", ["ce", "l1", "l2"])
@pytest.mark.parametrize("nmod", [2, 3, 8])
def test_stats_match_loop(distance, nmod):
    z, y, comb = make(40, 5, nmod, seed=nmod)
    sums, counts = of.tla_stats(z, y, comb, nmod, distance=distance, backend="reference")
    want_sums, want_counts = loop_stats(z, y, comb, nmod, distance)
    assert sums.shape == (1 << nmod,) and sums[0] == 0 and counts[0] == 0
    torch.testing.assert_close(sums.double(), want_sums, rtol=1e-5, atol=1e-5)
    assert torch.equal(counts, want_counts)


def test_stats_default_distance_is_ce_and_int32_comb():
    z, y, comb = make(10, 3, 3, seed=1)
    a = of.tla_stats(z, y, comb, 3, backend="reference")
    b = of.tla_stats(z, y, comb.int(), 3, distance="ce", backend="reference")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_stats_are_not_differentiable():
    z, y, comb = make(6, 3, 2, seed=2)
    z.requires_grad_()
    sums, counts = of.tla_stats(z, y, comb, 2, backend="reference")
    assert not sums.requires_grad and not counts.requires_grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_stats_other_dtypes(dtype):
    z, y, comb = make(12, 4, 3, seed=3, dtype=dtype)
    sums, counts = of.tla_stats(z, y, comb, 3, distance="l2", backend="reference")
    assert sums.dtype == torch.float32  # the contract's dtype, whatever the logits
    want, want_counts = loop_stats(z, y, comb, 3, "l2")
    torch.testing.assert_close(sums.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(counts, want_counts)


def test_loss_hand():
    # sample 0: ce of [log 3, 0] at class 0 = -log(3/4); sample 2: zeros over 2 -> log 2
    z = torch.tensor([[math.log(3.0), 0.0], [5.0, -5.0], [0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 1, 1])
    comb = torch.tensor([3, 1, 3])
    loss = of.tla_loss(z, y, comb, 3, backend="reference")
    want = (-math.log(0.75) + math.log(2.0)) / 2
    assert loss.dim() == 0 and abs(loss.item() - want) < 1e-12


@pytest.mark.parametrize("lazy", [1, 2, 5, 7])
def test_loss_matches_masked_ce(lazy):
    z, y, comb = make(30, 6, 3, seed=lazy)
    loss = of.tla_loss(z, y, comb, lazy, backend="reference")
    want = loop_tla_loss(z, y, comb, lazy)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - want) < 1e-5 * max(1.0, want)


def test_loss_lazy_as_tensor():
    z, y, comb = make(10, 3, 2, seed=4)
    a = of.tla_loss(z, y, comb, 3, backend="reference")
    b = of.tla_loss(z, y, comb, torch.tensor(3), backend="reference")
    assert torch.equal(a, b)


def test_loss_empty_mask_is_real_zero():
    z, y, _ = make(5, 4, 2, seed=5)
    comb = torch.ones(5, dtype=torch.int64)
    z.requires_grad_()
    loss = of.tla_loss(z, y, comb, 2, backend="reference")
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert z.grad is not None and torch.equal(z.grad, torch.zeros_like(z))


def test_loss_gradient_only_on_masked_rows():
    z, y, comb = make(8, 4, 2, seed=6, dtype=torch.float64)
    z.requires_grad_()
    of.tla_loss(z, y, comb, 3, backend="reference").backward()
    mask = comb == 3
    assert mask.any() and (~mask).any()
    assert torch.equal(z.grad[~mask], torch.zeros_like(z.grad[~mask]))
    # d/dz of mean CE over n rows: (softmax - onehot) / n
    n = int(mask.sum())
    want = (torch.softmax(z.detach(), 1) - torch.nn.functional.one_hot(y, 4)) / n
    torch.testing.assert_close(z.grad[mask], want[mask], rtol=1e-12, atol=1e-14)


def test_loss_gradcheck():
    z, y, comb = make(7, 3, 2, seed=7, dtype=torch.float64)
    z.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: of.tla_loss(t, y, comb, 3, backend="reference"), z)
    empty = torch.ones_like(comb)
    assert torch.autograd.gradcheck(lambda t: of.tla_loss(t, y, empty, 2, backend="reference"), z)


def test_extreme_logits():
    z = torch.tensor([[1e4, -1e4], [-1e4, 1e4], [1e4, -1e4]], requires_grad=True)
    y = torch.tensor([0, 0, 1])
    comb = torch.tensor([1, 1, 2])
    loss = of.tla_loss(z, y, comb, 1, backend="reference")
    torch.testing.assert_close(loss.detach(), torch.tensor(1e4))  # (0 + 2e4) / 2
    loss.backward()
    assert torch.isfinite(z.grad).all()
    for distance in ("ce", "l1", "l2"):
        sums, _ = of.tla_stats(z, y, comb, 2, distance=distance, backend="reference")
        assert torch.isfinite(sums).all() and (sums >= 0).all()
    sums, _ = of.tla_stats(z, y, comb, 2, distance="l1", backend="reference")
    assert torch.equal(sums, torch.tensor([0.0, 2.0, 2.0, 0.0]))


def test_batch_one():
    z, y, comb = make(1, 2, 2, seed=8)
    sums, counts = of.tla_stats(z, y, comb, 2, backend="reference")
    assert counts.sum() == 1 and counts[comb[0]] == 1
    loss = of.tla_loss(z, y, comb, int(comb[0]), backend="reference")
    torch.testing.assert_close(loss, sums[comb[0]])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_low_precision(dtype):
    z, y, comb = make(16, 5, 2, seed=9, dtype=dtype)
    loss = of.tla_loss(z, y, comb, 3, backend="reference")
    assert loss.dtype == dtype
    ref = of.tla_loss(z.float(), y, comb, 3, backend="reference")
    torch.testing.assert_close(loss.float(), ref, **tol(dtype))


def test_non_contiguous_inputs():
    z, y, comb = make(10, 4, 3, seed=10)
    zv = z.t().contiguous().t()
    yv, cv = torch.stack([y, y], 1)[:, 1], torch.stack([comb, comb], 1)[:, 0]
    assert not (zv.is_contiguous() or yv.is_contiguous() or cv.is_contiguous())
    for distance in ("ce", "l1", "l2"):
        got = of.tla_stats(zv, yv, cv, 3, distance=distance, backend="reference")
        want = of.tla_stats(z, y, comb, 3, distance=distance, backend="reference")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    lazy = int(comb[0])
    assert torch.equal(
        of.tla_loss(zv, yv, cv, lazy, backend="reference"),
        of.tla_loss(z, y, comb, lazy, backend="reference"),
    )
