"""Reference MIMO ops (SPEC section 6): the two-objective closed form and the MGDA baseline."""

from __future__ import annotations

import itertools

import pytest
import torch

import omnifuse_fast as of

SHAPES = [(3, 4), (5,), (2, 2, 2)]


def grads(seed, shapes=SHAPES, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype) for s in shapes]


def flat(ts):
    return torch.cat([t.double().reshape(-1) for t in ts])


def closed_form(g0, gw):
    """lam = clip((g_w - g_0) . g_w / |g_w - g_0|^2, 0, 1), 1/2 when g_w = g_0."""
    a, b = flat(g0), flat(gw)
    den = float((b - a) @ (b - a))
    lam = 0.5 if den == 0 else min(max(float((b - a) @ b) / den, 0.0), 1.0)
    return lam, lam * a + (1 - lam) * b


def test_hand_orthogonal():
    d, lam = of.mimo_combine([torch.tensor([1.0, 0.0])], [torch.tensor([0.0, 1.0])], "reference")
    assert lam.item() == 0.5 and lam.dtype == torch.float32 and lam.dim() == 0
    assert torch.equal(d[0], torch.tensor([0.5, 0.5]))


def test_hand_clipping():
    # (gw - g0) . gw / |gw - g0|^2 = 2 -> clipped to 1: d = g0 (the shorter one)
    d, lam = of.mimo_combine([torch.tensor([1.0, 0.0])], [torch.tensor([2.0, 0.0])], "reference")
    assert lam.item() == 1.0 and torch.equal(d[0], torch.tensor([1.0, 0.0]))
    # -1 -> clipped to 0: d = gw
    d, lam = of.mimo_combine([torch.tensor([2.0, 0.0])], [torch.tensor([1.0, 0.0])], "reference")
    assert lam.item() == 0.0 and torch.equal(d[0], torch.tensor([1.0, 0.0]))


def test_hand_interior():
    # g0 = (2, 0), gw = (0, 1): lam = (gw - g0).gw / |gw - g0|^2 = 1/5, d = (0.4, 0.8)
    d, lam = of.mimo_combine([torch.tensor([2.0, 0.0])], [torch.tensor([0.0, 1.0])], "reference")
    torch.testing.assert_close(lam, torch.tensor(0.2))
    torch.testing.assert_close(d[0], torch.tensor([0.4, 0.8]))


def test_equal_gradients_give_half():
    g = grads(1)
    d, lam = of.mimo_combine(g, [t.clone() for t in g], backend="reference")
    assert lam.item() == 0.5
    for a, b in zip(d, g):
        assert torch.equal(a, b)
    zeros = [torch.zeros(3)]
    d, lam = of.mimo_combine(zeros, [torch.zeros(3)], backend="reference")
    assert lam.item() == 0.5 and torch.equal(d[0], torch.zeros(3))


@pytest.mark.parametrize("seed", range(6))
def test_matches_closed_form(seed):
    g0 = grads(seed)
    gw = grads(seed + 100, scale=[0.3, 1.0, 3.0][seed % 3])
    if seed % 2:  # a parameter L_w does not touch contributes zeros
        gw[1] = torch.zeros_like(gw[1])
    d, lam = of.mimo_combine(g0, gw, backend="reference")
    want_lam, want_d = closed_form(g0, gw)
    assert abs(lam.item() - want_lam) < 1e-6
    assert [t.shape for t in d] == [t.shape for t in g0]
    torch.testing.assert_close(flat(d), want_d, rtol=1e-5, atol=1e-6)
    # min-norm point: no longer than either gradient, and optimal on the segment
    dd = flat(d)
    assert dd.norm() <= min(flat(g0).norm(), flat(gw).norm()) * (1 + 1e-6)
    for g in (g0, gw):
        assert flat(g) @ dd >= dd @ dd - 1e-5 * (dd @ dd + 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(dtype):
    g0, gw = grads(2, dtype=dtype), grads(3, dtype=dtype)
    d, lam = of.mimo_combine(g0, gw, backend="reference")
    assert lam.dtype == torch.float32 and all(t.dtype == dtype for t in d)
    want_lam, _ = closed_form(g0, gw)
    assert abs(lam.item() - want_lam) < 1e-6
    # d is the convex combination with the returned (fp32) lam, computed at >= fp32
    want_d = lam.item() * flat(g0) + (1 - lam.item()) * flat(gw)
    atol = 1e-12 if dtype == torch.float64 else 1e-2
    torch.testing.assert_close(flat(d), want_d, rtol=atol, atol=atol)


# MGDA baseline


def exact_min_norm_sq(gs) -> float:
    """|d*|^2 of the min-norm hull point, by enumerating active sets (KKT linear systems)."""
    pts = torch.stack([flat(g) for g in gs])
    gram = pts @ pts.T
    t = len(gs)
    best = float("inf")
    for k in range(1, t + 1):
        for active in itertools.combinations(range(t), k):
            idx = list(active)
            kkt = torch.zeros(k + 1, k + 1, dtype=torch.float64)
            kkt[:k, :k] = gram[idx][:, idx]
            kkt[:k, k] = kkt[k, :k] = 1.0
            rhs = torch.zeros(k + 1, dtype=torch.float64)
            rhs[k] = 1.0
            sol = torch.linalg.lstsq(kkt, rhs).solution[:k]
            if (sol >= -1e-12).all() and abs(float(sol.sum()) - 1) < 1e-9:
                best = min(best, float((sol @ pts[idx]).square().sum()))
    return best


# Frank-Wolfe (the baseline the paper measured, 250 iterations) is approximate: its duality gap,
# |d|^2 - min_t g_t . d, shrinks like 1/iterations; 1e-3 of max |g_t|^2 bounds what it reaches.
FW_TOL = 1e-3


def check_mgda(gs, weights, direction, tol=FW_TOL):
    t = len(gs)
    assert weights.shape == (t,) and weights.dtype == torch.float32
    assert (weights >= -1e-7).all() and abs(weights.sum().item() - 1.0) < 1e-5
    want = sum(w.item() * flat(g) for w, g in zip(weights, gs))
    d = flat(direction)
    torch.testing.assert_close(d, want, rtol=1e-5, atol=1e-5)
    scale = max(flat(g) @ flat(g) for g in gs)
    for g in gs:
        assert d.norm() <= flat(g).norm() * (1 + 1e-6) + 1e-6
        assert flat(g) @ d >= d @ d - tol * scale  # optimality: every g_t at least |d|^2 along d


@pytest.mark.parametrize("seed", range(4))
def test_mgda_two_objectives_is_closed_form(seed):
    g0, g1 = grads(seed), grads(seed + 50, scale=2.0 if seed % 2 else 0.5)
    weights, direction = of.mgda_min_norm([g0, g1], backend="reference")
    lam, want_d = closed_form(g0, g1)
    assert abs(weights[0].item() - lam) < 1e-4
    torch.testing.assert_close(flat(direction), want_d, rtol=1e-4, atol=1e-5)
    check_mgda([g0, g1], weights, direction)


@pytest.mark.parametrize("t", [1, 3, 5])
@pytest.mark.parametrize("seed", range(3))
def test_mgda_many_objectives(t, seed):
    gs = [grads(seed * 10 + i, scale=1.0 + i) for i in range(t)]
    weights, direction = of.mgda_min_norm(gs, backend="reference")
    check_mgda(gs, weights, direction)
    got, best = float(flat(direction).square().sum()), exact_min_norm_sq(gs)
    assert best * (1 - 1e-6) <= got <= best * (1 + 1e-2)  # never below the optimum; near it
    if t == 1:
        assert weights.tolist() == [1.0]
        assert torch.equal(flat(direction), flat(gs[0]))


def test_mgda_against_simplex_grid():
    """T = 3 in the plane: no point of a fine simplex grid is shorter than the answer."""
    gs = [[torch.tensor([2.0, 0.5])], [torch.tensor([-1.0, 1.5])], [torch.tensor([0.5, -2.0])]]
    weights, direction = of.mgda_min_norm(gs, backend="reference")
    pts = torch.stack([flat(g) for g in gs])
    n = 200
    best = min(
        float(((torch.tensor([i, j, n - i - j], dtype=torch.float64) / n) @ pts).norm())
        for i, j in itertools.product(range(n + 1), repeat=2)
        if i + j <= n
    )
    assert flat(direction).norm() <= best + 1e-3
    check_mgda(gs, weights, direction)


def test_mgda_origin_inside_hull():
    gs = [[torch.tensor([1.0, 0.0])], [torch.tensor([-1.0, 0.0])], [torch.tensor([0.0, 1.0])]]
    weights, direction = of.mgda_min_norm(gs, backend="reference")
    assert flat(direction).norm() < 1e-3
    check_mgda(gs, weights, direction)


def test_non_contiguous_inputs():
    g0 = [torch.randn(4, 3).t(), torch.randn(6)[::2]]
    gw = [torch.randn(4, 3).t(), torch.randn(6)[1::2]]
    assert not g0[0].is_contiguous() and not gw[1].is_contiguous()
    d, lam = of.mimo_combine(g0, gw, backend="reference")
    d2, lam2 = of.mimo_combine(
        [t.contiguous() for t in g0], [t.contiguous() for t in gw], backend="reference"
    )
    assert lam.item() == lam2.item()
    for a, b in zip(d, d2):
        assert a.shape == b.shape and torch.equal(a, b)
    w, dm = of.mgda_min_norm([g0, gw], backend="reference")
    w2, dm2 = of.mgda_min_norm(
        [[t.contiguous() for t in g0], [t.contiguous() for t in gw]], backend="reference"
    )
    assert torch.equal(w, w2) and all(torch.equal(a, b) for a, b in zip(dm, dm2))
