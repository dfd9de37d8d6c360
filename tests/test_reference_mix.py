"""Reference MM-learning ops (SPEC section 5): modality_mix and soft_cross_entropy."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tol

import omnifuse_fast as of
from omnifuse_fast.reference.mix import random_sources


def make(bsz, nmod, dim, ncls, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(bsz, nmod, dim, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, ncls, (bsz,), generator=g)
    src = torch.stack([torch.randint(0, bsz, (bsz,), generator=g) for _ in range(nmod)])
    return v, y, src


def simplex(*shape, seed=0):
    w = torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w = w + 0.05
    return (w / w.sum(-1, keepdim=True)).float()


def loop_mix(v, y, src, ncls, weights=None):
    """v_mix[b, m] = v[src[m, b], m]; q[b] = sum_m w_{b,m} onehot(y[src[m, b]]); shared -> hard."""
    bsz, nmod, _ = v.shape
    vm = torch.empty_like(v)
    q = torch.zeros(bsz, ncls, dtype=torch.float64)
    for b in range(bsz):
        labs = []
        for m in range(nmod):
            s = int(src[m, b])
            vm[b, m] = v[s, m]
            if weights is None:
                w = 1.0 / nmod
            elif weights.dim() == 1:
                w = float(weights[m])
            else:
                w = float(weights[b, m])
            q[b, int(y[s])] += w
            labs.append(int(y[s]))
        if len(set(labs)) == 1:
            q[b] = 0.0
            q[b, labs[0]] = 1.0
    return vm, q


def test_hand_computed():
    v = torch.arange(12, dtype=torch.float32).view(3, 2, 2)
    y = torch.tensor([0, 1, 2])
    src = torch.tensor([[0, 1, 2], [1, 2, 0]])
    vm, q = of.modality_mix(v, y, src, 3, backend="reference")
    want_v = torch.tensor([[[0, 1], [6, 7]], [[4, 5], [10, 11]], [[8, 9], [2, 3]]]).float()
    assert torch.equal(vm, want_v)
    want_q = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.5, 0.0, 0.5]])
    assert torch.equal(q, want_q)
    w = torch.tensor([0.25, 0.75])
    _, q = of.modality_mix(v, y, src, 3, weights=w, backend="reference")
    assert torch.equal(q, torch.tensor([[0.25, 0.75, 0.0], [0.0, 0.25, 0.75], [0.75, 0.0, 0.25]]))


@pytest.mark.parametrize("mode", ["uniform", "per-modality", "per-sample"])
@pytest.mark.parametrize("nmod", [2, 3, 8])
def test_matches_loop(mode, nmod):
    bsz, ncls = 6, 3
    v, y, src = make(bsz, nmod, 4, ncls, seed=nmod)
    weights = {"uniform": None, "per-modality": simplex(nmod), "per-sample": simplex(bsz, nmod)}
    w = weights[mode]
    vm, q = of.modality_mix(v, y, src, ncls, weights=w, backend="reference")
    want_v, want_q = loop_mix(v, y, src, ncls, w)
    assert vm.shape == v.shape and vm.dtype == v.dtype and q.shape == (bsz, ncls)
    assert torch.equal(vm, want_v)
    torch.testing.assert_close(q.double(), want_q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("weights", [None, "per-modality", "per-sample"])
def test_shared_label_keeps_exact_hard_label(weights):
    bsz, nmod, ncls = 5, 3, 4
    v, _, src = make(bsz, nmod, 2, ncls, seed=3)
    y = torch.full((bsz,), 2)  # every source shares label 2
    w = {None: None, "per-modality": simplex(nmod, seed=1), "per-sample": simplex(bsz, nmod)}
    _, q = of.modality_mix(v, y, src, ncls, weights=w[weights], backend="reference")
    assert torch.equal(q, torch.nn.functional.one_hot(y, ncls).float())  # exact, not 0.9999


def test_hard_label_rows_only():
    """Rows whose sources share a label are one-hot, the others keep their proportions."""
    v = torch.zeros(3, 3, 1)
    y = torch.tensor([1, 1, 0])
    src = torch.tensor([[0, 0, 2], [1, 1, 2], [0, 2, 2]])
    w = torch.tensor([0.2, 0.3, 0.5])
    _, q = of.modality_mix(v, y, src, 2, weights=w, backend="reference")
    torch.testing.assert_close(q, torch.tensor([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]))
    assert torch.equal(q[2], torch.tensor([1.0, 0.0]))


def test_identity_sources():
    v, y, _ = make(5, 4, 3, 6, seed=4)
    src = torch.arange(5).expand(4, 5)
    vm, q = of.modality_mix(v, y, src, 6, backend="reference")
    assert torch.equal(vm, v)
    assert torch.equal(q, torch.nn.functional.one_hot(y, 6).float())


def test_backward_is_scatter_add_with_repeats():
    bsz, nmod, dim = 4, 3, 2
    v, y, _ = make(bsz, nmod, dim, 3, seed=5, dtype=torch.float64)
    src = torch.tensor([[0, 0, 0, 0], [3, 1, 3, 3], [2, 1, 0, 3]])  # repeated sources
    v.requires_grad_()
    vm, _ = of.modality_mix(v, y, src, 3, backend="reference")
    up = torch.randn(bsz, nmod, dim, generator=torch.Generator().manual_seed(0), dtype=v.dtype)
    vm.backward(up)
    want = torch.zeros(bsz, nmod, dim, dtype=torch.float64)
    for m in range(nmod):
        for b in range(bsz):
            want[src[m, b], m] += up[b, m]
    torch.testing.assert_close(v.grad, want, rtol=0, atol=1e-15)
    assert torch.equal(v.grad[1:, 0], torch.zeros(3, dim))  # never read: zero gradient


def test_gradcheck_repeated_sources():
    v, y, _ = make(4, 3, 2, 3, seed=6, dtype=torch.float64)
    src = torch.tensor([[1, 1, 1, 0], [0, 2, 2, 3], [3, 3, 0, 0]])
    v.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: of.modality_mix(t, y, src, 3, backend="reference")[0], (v,)
    )


def test_default_sources_helper():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = random_sources(7, 4, g1), random_sources(7, 4, g2)
    assert torch.equal(a, b) and a.shape == (4, 7)
    assert torch.equal(a[0], torch.arange(7))
    for row in a:
        assert torch.equal(row.sort().values, torch.arange(7))  # permutations


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(dtype):
    v, y, src = make(5, 3, 4, 3, seed=7, dtype=dtype)
    vm, q = of.modality_mix(v, y, src, 3, weights=simplex(3), backend="reference")
    assert vm.dtype == q.dtype == dtype
    want_v, want_q = loop_mix(v, y, src, 3, simplex(3))
    assert torch.equal(vm, want_v)
    torch.testing.assert_close(q.double(), want_q, **tol(dtype))


# soft cross-entropy


def loop_soft_ce(z, q):
    total = 0.0
    for row, qrow in zip(z.double().tolist(), q.double().tolist()):
        top = max(row)
        lse = top + math.log(sum(math.exp(v - top) for v in row))
        total += -sum(qc * (v - lse) for v, qc in zip(row, qrow))
    return total / len(z)


def test_soft_ce_hand():
    z = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=torch.float64)
    loss = of.soft_cross_entropy(z, q, backend="reference")
    assert abs(loss.item() - (math.log(2.0) - math.log(0.75)) / 2) < 1e-12


def test_soft_ce_matches_loop_and_hard_ce():
    g = torch.Generator().manual_seed(8)
    z = torch.randn(7, 5, generator=g) * 3
    q = torch.softmax(torch.randn(7, 5, generator=g), dim=1)
    loss = of.soft_cross_entropy(z, q, backend="reference")
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - loop_soft_ce(z, q)) < 1e-5
    y = torch.randint(0, 5, (7,), generator=g)
    hard = of.soft_cross_entropy(z, torch.nn.functional.one_hot(y, 5).float(), backend="reference")
    torch.testing.assert_close(hard, torch.nn.functional.cross_entropy(z, y))


def test_soft_ce_gradcheck():
    g = torch.Generator().manual_seed(9)
    z = (torch.randn(4, 3, generator=g, dtype=torch.float64) * 2).requires_grad_()
    q = torch.softmax(torch.randn(4, 3, generator=g, dtype=torch.float64), 1).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: of.soft_cross_entropy(a, b, backend="reference"), (z, q)
    )


def test_soft_ce_gradient_closed_form():
    g = torch.Generator().manual_seed(10)
    z = torch.randn(4, 3, generator=g, dtype=torch.float64).requires_grad_()
    q = torch.softmax(torch.randn(4, 3, generator=g, dtype=torch.float64), 1).requires_grad_()
    of.soft_cross_entropy(z, q, backend="reference").backward()
    # d/dz = (sum_c q_c * softmax - q) / B ; d/dq = -log_softmax / B
    p = torch.softmax(z.detach(), 1)
    torch.testing.assert_close(z.grad, (q.detach().sum(1, keepdim=True) * p - q.detach()) / 4)
    torch.testing.assert_close(q.grad, -torch.log_softmax(z.detach(), 1) / 4)


def test_soft_ce_extremes_and_empty():
    z = torch.tensor([[1e4, -1e4], [-1e4, 1e4]], requires_grad=True)
    q = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    loss = of.soft_cross_entropy(z, q, backend="reference")
    torch.testing.assert_close(loss.detach(), torch.tensor(0.5 * 2e4 / 2))
    loss.backward()
    assert torch.isfinite(z.grad).all()
    empty = torch.zeros(0, 3, requires_grad=True)
    loss = of.soft_cross_entropy(empty, torch.zeros(0, 3), backend="reference")
    assert loss.item() == 0.0  # a loss over an empty set is a real 0, never NaN
    loss.backward()
    assert empty.grad is not None and empty.grad.shape == (0, 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_soft_ce_low_precision(dtype):
    g = torch.Generator().manual_seed(11)
    z = (torch.randn(6, 4, generator=g) * 2).to(dtype)
    q = torch.softmax(torch.randn(6, 4, generator=g), 1).to(dtype)
    loss = of.soft_cross_entropy(z, q, backend="reference")
    assert loss.dtype == dtype
    ref = of.soft_cross_entropy(z.float(), q.float(), backend="reference")
    torch.testing.assert_close(loss.float(), ref, **tol(dtype))


def test_non_contiguous_inputs():
    v, y, src = make(5, 3, 4, 3, seed=12)
    vv = v.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    sv = src.t().contiguous().t()
    w = simplex(5, 3)
    wv = w.t().contiguous().t()
    assert not (vv.is_contiguous() or sv.is_contiguous() or wv.is_contiguous())
    got = of.modality_mix(vv, y, sv, 3, weights=wv, backend="reference")
    want = of.modality_mix(v, y, src, 3, weights=w, backend="reference")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    z = torch.randn(4, 6).t()
    q = torch.softmax(torch.randn(4, 6), 1).t()
    torch.testing.assert_close(
        of.soft_cross_entropy(z, q, backend="reference"),
        of.soft_cross_entropy(z.contiguous(), q.contiguous(), backend="reference"),
    )
