"""The C++ CPU kernels (backend="cpu") against the reference: values and every gradient.

Covers batch 1 and partial last blocks, odd widths, M = 2..8, C = 2..1000, fp32/bf16/fp16
(fp64 gradcheck on small cases), extremes (p exactly 0 and 1, empty TLA masks, repeated
mix sources, multilabel), outputs that the kernels allocate poisoned with NaN, thread-count
independence (determinism) and index bounds with the value checks off.
"""

from __future__ import annotations

import pytest
import torch
from _harness import DTYPES, assert_close

import omnifuse_fast as of
from omnifuse_fast import reference as ref
from omnifuse_fast.reference.mix import random_sources

pytestmark = pytest.mark.backend("cpu")

CPU = "cpu"


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype=torch.float32, scale=1.0, seed=0, requires_grad=False):
    t = (torch.randn(*shape, generator=_gen(seed)) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


def _labels(b, c, seed=1):
    return torch.randint(0, c, (b,), generator=_gen(seed))


def _grads(outputs, inputs, seed=7):
    """Gradients of sum(out * r) for fixed random r per output (every input that needs one)."""
    outputs = [o for o in outputs if o.requires_grad]
    total = sum(
        (o.float() * torch.randn(o.shape, generator=_gen(seed + i))).sum()
        for i, o in enumerate(outputs)
    )
    return torch.autograd.grad(total, inputs)


def _both(fn, inputs, **kw):
    """(cpu result, reference result) of fn on clones of the same leaf inputs."""
    results = []
    for backend in (CPU, "reference"):
        leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
        out = fn(*leaves, backend=backend, **kw)
        results.append((out, leaves))
    return results


# ---------------------------------------------------------------------------------------------
# combination_ids
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [2, 3, 5, 8])
@pytest.mark.parametrize("b", [1, 7, 4099])
def test_combination_ids(b, m):
    present = torch.rand(b, m, generator=_gen(b + m)) > 0.5
    present[torch.arange(b), torch.randint(0, m, (b,), generator=_gen(1))] = True
    got = of.combination_ids(present, backend=CPU)
    assert got.dtype == torch.int64
    assert torch.equal(got, ref.combination_ids(present))


# ---------------------------------------------------------------------------------------------
# DWFuse
# ---------------------------------------------------------------------------------------------

DW_SHAPES = [(1, 2, 2), (5, 3, 7), (67, 4, 25), (33, 8, 3), (3, 2, 1000)]


def _dw_inputs(b, m, c, dtype, multilabel=False, scale=3.0, seed=0):
    z = _randn(b, m, c, dtype=dtype, scale=scale, seed=seed, requires_grad=True)
    if multilabel:
        y = (torch.rand(b, c, generator=_gen(seed + 1)) > 0.5).to(dtype)
    else:
        y = _labels(b, c, seed + 1)
    return z, y


def _check_dw_loss(z, y, beta, detach, dtype):
    (lc, (zc,)), (lr, (zr,)) = _both(
        lambda z, backend: of.dwfuse_loss(
            z, y, beta, detach, backend=backend, multilabel=y.dim() == 2
        ),
        [z],
    )
    assert lc.dtype == z.dtype and lc.shape == ()
    assert_close(lc, lr, dtype)
    (gc,) = torch.autograd.grad(lc, zc)
    (gr,) = torch.autograd.grad(lr, zr)
    assert gc.dtype == z.dtype and torch.isfinite(gc.float()).all()
    assert_close(gc, gr, dtype)


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", DW_SHAPES, ids=str)
def test_dwfuse_loss_multiclass(shape, dtype, detach):
    z, y = _dw_inputs(*shape, dtype)
    _check_dw_loss(z, y, 0.5, detach, dtype)


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2, 2), (6, 3, 5), (37, 4, 25), (3, 8, 300)], ids=str)
def test_dwfuse_loss_multilabel(shape, dtype, detach):
    z, y = _dw_inputs(*shape, dtype, multilabel=True)
    _check_dw_loss(z, y, 0.7, detach, dtype)


@pytest.mark.parametrize("multilabel", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2, 3), (33, 5, 9), (4, 8, 200)], ids=str)
def test_dwfuse_weights(shape, dtype, multilabel):
    z, y = _dw_inputs(*shape, dtype, multilabel=multilabel)
    (wc, (zc,)), (wr, (zr,)) = _both(
        lambda z, backend: of.dwfuse_weights(z, y, 0.9, backend=backend, multilabel=multilabel), [z]
    )
    assert wc.shape == wr.shape and wc.dtype == dtype
    assert_close(wc, wr, dtype)
    assert_close(_grads([wc], [zc])[0], _grads([wr], [zr])[0], dtype)


@pytest.mark.parametrize("beta", [0.0, 0.5, 3.0])
def test_dwfuse_beta(beta):
    z, y = _dw_inputs(9, 3, 6, torch.float32)
    _check_dw_loss(z, y, beta, False, torch.float32)


@pytest.mark.parametrize("multilabel", [False, True])
def test_dwfuse_extreme_probabilities(multilabel):
    """p exactly 1 and exactly 0 in fp32 (logits +-1e4): finite, and equal to the reference."""
    b, m, c = 6, 4, 5
    z = torch.zeros(b, m, c)
    if multilabel:
        y = (torch.arange(b * c).view(b, c) % 2).float()
        z[:, 0] = 1e4 * (2 * y - 1)  # modality 0 certain and right
        z[:, 1] = -1e4 * (2 * y - 1)  # modality 1 certain and wrong
    else:
        y = torch.arange(b) % c
        z[torch.arange(b), 0, y] = 1e4  # p = 1
        z[torch.arange(b), 1, y] = -1e4  # p = 0
    z[:, 2:] = torch.randn(b, m - 2, c, generator=_gen(3))
    z.requires_grad_(True)
    for detach in (True, False):
        _check_dw_loss(z, y, 0.5, detach, torch.float32)
    (wc, (zc,)), (wr, (zr,)) = _both(
        lambda z, backend: of.dwfuse_weights(z, y, 0.5, backend=backend, multilabel=multilabel), [z]
    )
    assert torch.isfinite(wc).all()
    assert_close(wc, wr)
    assert_close(_grads([wc], [zc])[0], _grads([wr], [zr])[0])


@pytest.mark.parametrize("multilabel", [False, True])
def test_dwfuse_gradcheck_fp64(multilabel):
    z, y = _dw_inputs(3, 3, 4, torch.float64, multilabel=multilabel, scale=2.0)
    torch.autograd.gradcheck(
        lambda z: of.dwfuse_loss(z, y, 0.7, False, backend=CPU, multilabel=multilabel), (z,)
    )
    torch.autograd.gradcheck(
        lambda z: of.dwfuse_weights(z, y, 0.7, backend=CPU, multilabel=multilabel), (z,)
    )


@pytest.mark.parametrize("multilabel", [False, True])
def test_dwfuse_fp64_matches_reference(multilabel):
    """fp64 end to end (the reference accumulates fp64 in fp64): the derivation, exactly."""
    z, y = _dw_inputs(7, 4, 6, torch.float64, multilabel=multilabel, scale=4.0)
    for detach in (True, False):
        _check_dw_loss(z, y, 0.8, detach, torch.float64)


# ---------------------------------------------------------------------------------------------
# TLA
# ---------------------------------------------------------------------------------------------


def _comb(b, m, seed=2):
    present = torch.rand(b, m, generator=_gen(seed)) > 0.5
    present[:, 0] |= ~present.any(dim=1)
    return ref.combination_ids(present)


@pytest.mark.parametrize("distance", ["ce", "l1", "l2"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,m,c", [(1, 2, 2), (300, 3, 25), (2049, 8, 7), (5, 4, 1000)], ids=str)
def test_tla_stats(b, m, c, dtype, distance):
    z = _randn(b, c, dtype=dtype, scale=4.0)
    y, comb = _labels(b, c), _comb(b, m)
    sums, counts = of.tla_stats(z, y, comb, m, distance, backend=CPU)
    rsums, rcounts = ref.tla_stats(z, y, comb, m, distance)
    assert sums.dtype == torch.float32 and counts.dtype == torch.int64
    assert sums.shape == counts.shape == (1 << m,)
    assert sums[0] == 0 and counts[0] == 0
    assert torch.equal(counts, rcounts)
    assert_close(sums, rsums, dtype)


def test_tla_stats_extremes_and_int32_comb():
    b, c = 8, 5
    y = torch.arange(b) % c
    z = torch.zeros(b, c)
    z[torch.arange(b), y] = torch.tensor([1e4, -1e4] * (b // 2))
    comb = torch.tensor([1, 2, 3, 3, 1, 2, 3, 1], dtype=torch.int32)
    for distance in ("ce", "l1", "l2"):
        got = of.tla_stats(z, y, comb, 2, distance, backend=CPU)
        want = ref.tla_stats(z, y, comb, 2, distance)
        assert torch.isfinite(got[0]).all()
        assert torch.equal(got[1], want[1])
        assert_close(got[0], want[0])


def test_tla_stats_detached():
    z = _randn(6, 4, requires_grad=True)
    sums, _ = of.tla_stats(z, _labels(6, 4), _comb(6, 2), 2, backend=CPU)
    assert not sums.requires_grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,c", [(1, 2), (257, 25), (40, 1000)], ids=str)
def test_tla_loss(b, c, dtype):
    z = _randn(b, c, dtype=dtype, scale=3.0, requires_grad=True)
    y, comb = _labels(b, c), _comb(b, 3)
    lazy = int(comb[0])
    (lc, (zc,)), (lr, (zr,)) = _both(
        lambda z, backend: of.tla_loss(z, y, comb, lazy, backend=backend), [z]
    )
    assert lc.dtype == dtype and lc.shape == ()
    assert_close(lc, lr, dtype)
    assert_close(torch.autograd.grad(lc, zc)[0], torch.autograd.grad(lr, zr)[0], dtype)


def test_tla_loss_empty_mask_is_a_real_zero():
    z = _randn(9, 4, requires_grad=True)
    comb = torch.full((9,), 3)
    loss = of.tla_loss(z, _labels(9, 4), comb, 5, backend=CPU)
    (g,) = torch.autograd.grad(loss, z)
    assert loss.item() == 0.0 and torch.equal(g, torch.zeros_like(z))


def test_tla_loss_gradcheck_fp64():
    z = _randn(11, 5, dtype=torch.float64, requires_grad=True)
    y, comb = _labels(11, 5), _comb(11, 2)
    torch.autograd.gradcheck(lambda z: of.tla_loss(z, y, comb, int(comb[3]), backend=CPU), (z,))


# ---------------------------------------------------------------------------------------------
# MM learning
# ---------------------------------------------------------------------------------------------


def _src(b, m, kind, seed=4):
    if kind == "perm":
        return random_sources(b, m, _gen(seed))
    return torch.randint(0, b, (m, b), generator=_gen(seed))  # repeated sources, unread rows


@pytest.mark.parametrize("weights", ["none", "vector", "per_sample"])
@pytest.mark.parametrize("kind", ["perm", "repeat"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,m,d,c", [(1, 2, 1, 2), (37, 3, 5, 4), (130, 8, 17, 25)], ids=str)
def test_modality_mix(b, m, d, c, dtype, kind, weights):
    v = _randn(b, m, d, dtype=dtype, requires_grad=True)
    y, src = _labels(b, c), _src(b, m, kind)
    if weights == "none":
        w = None
    else:
        shape = (m,) if weights == "vector" else (b, m)
        w = torch.softmax(torch.randn(shape, generator=_gen(5)), dim=-1).requires_grad_(True)
    inputs = [v] if w is None else [v, w]

    def fn(v, w=None, backend="auto"):
        return of.modality_mix(v, y, src, c, w, backend=backend)

    (outc, leaves_c), (outr, leaves_r) = _both(fn, inputs)
    assert outc[0].dtype == outc[1].dtype == dtype
    assert torch.equal(outc[0], outr[0])  # a gather: exact
    assert_close(outc[1], outr[1], dtype)
    for gc, gr in zip(_grads(outc, leaves_c), _grads(outr, leaves_r), strict=True):
        assert_close(gc, gr, dtype)


def test_modality_mix_hard_labels_exact():
    """Sources that share a label keep an exact one-hot, also with uneven weights."""
    b, m, c = 6, 3, 4
    y = torch.tensor([1, 1, 2, 2, 3, 0])
    src = torch.tensor([[0, 2, 4, 5, 0, 1], [1, 3, 4, 4, 0, 1], [0, 2, 4, 1, 1, 0]])
    w = torch.tensor([0.2, 0.3, 0.5])
    _, soft = of.modality_mix(_randn(b, m, 2), y, src, c, w, backend=CPU)
    _, want = ref.modality_mix(_randn(b, m, 2), y, src, c, w)
    assert torch.equal(soft[:3], want[:3])
    assert torch.equal(soft[:3], torch.nn.functional.one_hot(y[src[0, :3]], c).float())
    assert_close(soft, want)


def test_modality_mix_gradcheck_fp64():
    # v only: the public op hands the weights to every backend in fp32, too coarse for finite
    # differences (their gradient is compared with the reference in test_modality_mix)
    v = _randn(7, 3, 4, dtype=torch.float64, requires_grad=True)
    y, src = _labels(7, 3), _src(7, 3, "repeat")
    torch.autograd.gradcheck(lambda v: of.modality_mix(v, y, src, 3, backend=CPU)[0], (v,))


@pytest.mark.parametrize("soft_grad", [True, False], ids=["both", "logits-only"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,c", [(1, 2), (300, 25), (9, 1000)], ids=str)
def test_soft_cross_entropy(b, c, dtype, soft_grad):
    # logits-only: the CPU forward writes d logits as well (soft_cross_entropy_grad)
    z = _randn(b, c, dtype=dtype, scale=3.0, requires_grad=True)
    q = torch.softmax(torch.randn(b, c, generator=_gen(6)), -1).to(dtype)
    q.requires_grad_(soft_grad)
    (lc, leaves_c), (lr, leaves_r) = _both(of.soft_cross_entropy, [z, q])
    assert lc.dtype == dtype and lc.shape == ()
    assert_close(lc, lr, dtype)
    leaves_c, leaves_r = ([t for t in ls if t.requires_grad] for ls in (leaves_c, leaves_r))
    for gc, gr in zip(_grads([lc], leaves_c), _grads([lr], leaves_r), strict=True):
        assert_close(gc, gr, dtype)


def test_soft_cross_entropy_extremes_and_gradcheck():
    z = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 3.0]], requires_grad=True)
    q = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.25, 0.25]], requires_grad=True)
    (lc, leaves_c), (lr, leaves_r) = _both(of.soft_cross_entropy, [z, q])
    assert_close(lc, lr)
    for gc, gr in zip(_grads([lc], leaves_c), _grads([lr], leaves_r), strict=True):
        assert_close(gc, gr)
    z64 = _randn(5, 4, dtype=torch.float64, requires_grad=True)
    q64 = torch.softmax(_randn(5, 4, dtype=torch.float64, seed=3), -1).requires_grad_(True)
    torch.autograd.gradcheck(lambda z, q: of.soft_cross_entropy(z, q, backend=CPU), (z64, q64))
    torch.autograd.gradcheck(lambda z: of.soft_cross_entropy(z, q64.detach(), backend=CPU), (z64,))


def test_soft_cross_entropy_logits_only_upstream_and_retained():
    """The forward's gradient (upstream 1) is handed over by the backward; any other upstream
    gradient scales it, and a retained graph gives the same gradient twice."""
    z = _randn(37, 25, scale=3.0, requires_grad=True)
    q = torch.softmax(_randn(37, 25, seed=4), -1)
    zr = z.detach().clone().requires_grad_(True)
    want = torch.autograd.grad(of.soft_cross_entropy(zr, q, backend="reference"), zr)[0]
    loss = of.soft_cross_entropy(z, q, backend=CPU)
    first = torch.autograd.grad(loss, z, retain_graph=True)[0]
    again = torch.autograd.grad(loss, z, retain_graph=True)[0]
    scaled = torch.autograd.grad(loss * -2.5, z)[0]
    assert_close(first, want)
    assert torch.equal(again, first)
    assert_close(scaled, -2.5 * want)
    with torch.no_grad():  # no gradient wanted: the forward alone, same loss
        assert_close(of.soft_cross_entropy(z, q, backend=CPU), loss.detach())


# ---------------------------------------------------------------------------------------------
# MIMO
# ---------------------------------------------------------------------------------------------


def _grad_list(shapes, dtypes, seed):
    return [_randn(*s, dtype=d, seed=seed + i) for i, (s, d) in enumerate(zip(shapes, dtypes))]


MIMO_SHAPES = [(3, 5), (7,), (1,), (40000,), (2, 3, 4)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_mimo_combine(dtype):
    dtypes = [dtype, torch.float32, dtype, dtype, torch.float32]
    g0, gw = _grad_list(MIMO_SHAPES, dtypes, 0), _grad_list(MIMO_SHAPES, dtypes, 50)
    d, lam = of.mimo_combine(g0, gw, backend=CPU)
    rd, rlam = ref.mimo_combine(g0, gw)
    assert lam.dtype == torch.float32 and lam.shape == ()
    assert_close(lam, rlam)
    for a, b, t in zip(d, rd, g0, strict=True):
        assert a.dtype == t.dtype and a.shape == t.shape
        assert_close(a, b, a.dtype)


@pytest.mark.parametrize("case", ["equal", "zero_gw", "opposite"])
def test_mimo_combine_edge_cases(case):
    g0 = _grad_list([(4, 3), (5,)], [torch.float32] * 2, 0)
    gw = {
        "equal": [t.clone() for t in g0],
        "zero_gw": [torch.zeros_like(t) for t in g0],
        "opposite": [-t for t in g0],
    }[case]
    d, lam = of.mimo_combine(g0, gw, backend=CPU)
    rd, rlam = ref.mimo_combine(g0, gw)
    assert_close(lam, rlam)
    assert_close(d, rd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mimo_combine_gradients(dtype):
    shapes = [(3, 2), (4,), (1,)]
    g0, gw = _grad_list(shapes, [dtype] * 3, 0), _grad_list(shapes, [dtype] * 3, 9)

    def fn(*ts, backend):
        d, lam = of.mimo_combine(list(ts[:3]), list(ts[3:]), backend=backend)
        return (*d, lam)

    for t in (*g0, *gw):
        t.requires_grad_(True)
    (outc, leaves_c), (outr, leaves_r) = _both(fn, [*g0, *gw])
    # lam is fp32 by contract in both paths: compare at fp32 tolerance
    for gc, gr in zip(_grads(outc, leaves_c), _grads(outr, leaves_r), strict=True):
        assert_close(gc, gr, torch.float32)


def test_mimo_ops_gradcheck_fp64():
    """The Gram and direction ops' autograd formulas, exactly (lam is an fp64 tensor here)."""
    g0 = [t.requires_grad_(True) for t in _grad_list([(3, 2), (4,)], [torch.float64] * 2, 0)]
    gw = [t.requires_grad_(True) for t in _grad_list([(3, 2), (4,)], [torch.float64] * 2, 9)]
    lam = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    ops = torch.ops.omnifuse_fast
    torch.autograd.gradcheck(lambda *t: ops.mimo_gram(list(t[:2]), list(t[2:])), (*g0, *gw))
    torch.autograd.gradcheck(
        lambda *t: tuple(ops.mimo_direction(list(t[:2]), list(t[2:4]), t[4])), (*g0, *gw, lam)
    )


def test_mimo_direction_rounds_like_the_reference():
    """Opposed gradients whose weighted terms cancel: the same roundings, the same direction."""
    g0, gw = [torch.tensor(-1437.7383), torch.ones(3)], [torch.tensor(926.5177), torch.ones(3)]
    d, lam = of.mimo_combine(g0, gw, backend=CPU)
    rd, rlam = ref.mimo_combine(g0, gw)
    assert torch.equal(lam, rlam)
    assert all(torch.equal(a, b) for a, b in zip(d, rd, strict=True))


@pytest.mark.parametrize("t", [1, 2, 3, 5])
def test_mgda_min_norm(t):
    grads = [_grad_list([(6, 3), (5,), (2, 2)], [torch.float32] * 3, 10 * i) for i in range(t)]
    w, d = of.mgda_min_norm(grads, backend=CPU)
    rw, rd = ref.mgda_min_norm(grads)
    assert w.dtype == torch.float32 and w.shape == (t,)
    assert_close(w, rw)
    assert_close(d, rd)


# ---------------------------------------------------------------------------------------------
# CRA
# ---------------------------------------------------------------------------------------------


def _cra_inputs(b, f, k, h, dtype, seed=0):
    x = _randn(b, f, dtype=dtype, seed=seed, requires_grad=True)
    w1 = _randn(k, h, f, dtype=dtype, scale=f**-0.5, seed=seed + 1, requires_grad=True)
    b1 = _randn(k, h, dtype=dtype, scale=0.1, seed=seed + 2, requires_grad=True)
    w2 = _randn(k, f, h, dtype=dtype, scale=h**-0.5, seed=seed + 3, requires_grad=True)
    b2 = _randn(k, f, dtype=dtype, scale=0.1, seed=seed + 4, requires_grad=True)
    return [x, w1, b1, w2, b2]


CRA_TOL = {  # K chained GEMMs: bf16/fp16 outputs round once, inputs are the same
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,f,k,h", [(1, 3, 1, 2), (19, 12, 3, 5), (64, 33, 5, 16)], ids=str)
def test_cra_forward(b, f, k, h, dtype, activation):
    inputs = _cra_inputs(b, f, k, h, dtype)
    (outc, leaves_c), (outr, leaves_r) = _both(of.cra_forward, inputs, activation=activation)
    assert outc[0].dtype == outc[1].dtype == dtype
    assert outc[1].shape == (b, k * h)
    for a, e in zip(outc, outr, strict=True):
        torch.testing.assert_close(a.float(), e.float(), **CRA_TOL[dtype])
    for gc, gr in zip(_grads(outc, leaves_c), _grads(outr, leaves_r), strict=True):
        assert gc.dtype == dtype
        torch.testing.assert_close(gc.float(), gr.float(), **CRA_TOL[dtype])


@pytest.mark.parametrize("which", ["out", "latents"])
def test_cra_one_output_used(which):
    inputs = _cra_inputs(5, 6, 2, 3, torch.float32)
    (outc, leaves_c), (outr, leaves_r) = _both(of.cra_forward, inputs, activation="silu")
    i = 0 if which == "out" else 1
    for gc, gr in zip(_grads([outc[i]], leaves_c), _grads([outr[i]], leaves_r), strict=True):
        assert_close(gc, gr)


@pytest.mark.parametrize("activation", ["relu", "silu"])
@pytest.mark.parametrize(
    "need", [(0,), (1,), (2,), (3,), (4,), (0, 3), (1, 2), (2, 4), (3, 4)], ids=str
)
def test_cra_needs_input_grad_subsets(need, activation):
    """Only some of (x, w1, b1, w2, b2) require grad: those gradients match the reference."""
    inputs = _cra_inputs(19, 12, 3, 5, torch.float32)
    for i, t in enumerate(inputs):
        t.requires_grad_(i in need)
    (outc, leaves_c), (outr, leaves_r) = _both(of.cra_forward, inputs, activation=activation)
    got = _grads(outc, [leaves_c[i] for i in need])
    want = _grads(outr, [leaves_r[i] for i in need])
    assert len(got) == len(want) == len(need)
    for gc, gr in zip(got, want):
        torch.testing.assert_close(gc, gr, **CRA_TOL[torch.float32])


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
def test_cra_backward_stash_computes_only_the_masked_gradients(activation):
    x, w1, b1, w2, b2 = (t.detach() for t in _cra_inputs(9, 6, 2, 4, torch.float32))
    ops = torch.ops.omnifuse_fast
    out, lat, states, post, pre = ops.cra_forward_stash(x, w1, b1, w2, b2, activation)
    assert states.shape == (2, 9, 6) and post.shape == (2, 9, 4)
    assert pre.shape == ((2, 9, 4) if activation == "gelu" else (0,))
    go, gl = torch.randn(out.shape), torch.randn(lat.shape)
    full = ops.cra_backward_stash(go, gl, w1, w2, states, post, pre, activation, [True] * 5)
    for i in range(5):
        mask = [j == i for j in range(5)]
        part = ops.cra_backward_stash(go, gl, w1, w2, states, post, pre, activation, mask)
        for j, (p, f) in enumerate(zip(part, full)):
            if j == i:
                torch.testing.assert_close(p, f)
            else:
                assert p.numel() == 0, (i, j)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize(
    "mask", [[True] * 5, [False, True, True, True, True], [False, False, False, True, True]]
)
def test_cra_backward_overlapped_on_two_threads_equals_the_sequential_walk(activation, mask):
    """At small sizes the backward overlaps the chain and the weight gradients on two threads
    (csrc/cpu/cra.cpp, backward_overlapped); one thread walks the same GEMMs in sequence. The
    bits must agree, for every subset of gradients (the last: decoder only, no chain at 0)."""
    x, w1, b1, w2, b2 = (t.detach() for t in _cra_inputs(64, 48, 3, 32, torch.float32))
    ops = torch.ops.omnifuse_fast
    out, lat, states, post, pre = ops.cra_forward_stash(x, w1, b1, w2, b2, activation)
    go, gl = torch.randn(out.shape), torch.randn(lat.shape)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.cra_backward_stash(go, gl, w1, w2, states, post, pre, activation, mask)
        torch.set_num_threads(max(2, threads))
        two = ops.cra_backward_stash(go, gl, w1, w2, states, post, pre, activation, mask)
    finally:
        torch.set_num_threads(threads)
    for a, b, wanted in zip(one, two, mask, strict=True):
        assert torch.equal(a, b)
        assert (a.numel() > 0) == wanted
    with torch.enable_grad():  # and both are the reference's gradients
        leaves = [t.clone().requires_grad_(True) for t in (x, w1, b1, w2, b2)]
        ro, rl = ref.cra_forward(*leaves, activation=activation)
        want = torch.autograd.grad((ro * go).sum() + (rl * gl).sum(), leaves)
    for g, r, wanted in zip(two, want, mask):
        if wanted:
            torch.testing.assert_close(g, r, **CRA_TOL[torch.float32])


def test_cra_trains_on_the_stash_and_infers_without_it():
    inputs = _cra_inputs(33, 10, 3, 4, torch.float32)
    out, lat = of.cra_forward(*inputs, activation="gelu", backend=CPU)
    assert "cra_forward_stash" in out.grad_fn.name()  # the backward reads the stash
    with torch.no_grad():
        out_ng, lat_ng = of.cra_forward(*inputs, activation="gelu", backend=CPU)
    assert torch.equal(out_ng, out.detach()) and torch.equal(lat_ng, lat.detach())


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh"])
def test_cra_gradcheck_fp64(activation):
    inputs = _cra_inputs(4, 5, 2, 3, torch.float64, seed=3)
    torch.autograd.gradcheck(
        lambda *t: of.cra_forward(*t, activation=activation, backend=CPU), tuple(inputs)
    )


# ---------------------------------------------------------------------------------------------
# Large logits with moderate probabilities: against the float64 truth
# ---------------------------------------------------------------------------------------------


def _vs_float64(fn, z, *rest):
    """fn on fp32 z (cpu) against fn on float64 z (reference): values and gradients."""
    zc = z.detach().clone().requires_grad_(True)
    zr = z.detach().double().requires_grad_(True)
    outc, outr = fn(zc, *rest, backend=CPU), fn(zr, *rest, backend="reference")
    outc, outr = (outc, outr) if isinstance(outc, tuple) else ((outc,), (outr,))
    for a, e in zip(outc, outr, strict=True):
        assert_close(a, e)
    if zc.requires_grad and outc[0].requires_grad:
        assert_close(_grads(outc, [zc])[0], _grads(outr, [zr])[0])


@pytest.mark.parametrize("offset", [1e3, 3e4])
def test_large_offset_logits_keep_fp32_accuracy(offset):
    """z = offset + O(1): every log-space statistic is formed from differences, not from z
    minus a large logsumexp (which would lose ulp(offset), ~2e-3 at 3e4)."""
    b, m, c = 16, 3, 6
    z3 = offset + _randn(b, m, c, scale=2.0)
    y = _labels(b, c)
    for detach in (True, False):
        _vs_float64(lambda z, backend, d=detach: of.dwfuse_loss(z, y, 0.5, d, backend=backend), z3)
    _vs_float64(lambda z, backend: of.dwfuse_weights(z, y, 0.5, backend=backend), z3)
    z2, comb = z3[:, 0].contiguous(), _comb(b, 2)
    for distance in ("ce", "l1", "l2"):
        _vs_float64(
            lambda z, backend, d=distance: of.tla_stats(z, y, comb, 2, d, backend=backend), z2
        )
    _vs_float64(lambda z, backend: of.tla_loss(z, y, comb, int(comb[0]), backend=backend), z2)
    q = torch.softmax(_randn(b, c, seed=5), -1)
    _vs_float64(lambda z, backend: of.soft_cross_entropy(z, q.to(z.dtype), backend=backend), z2)


# ---------------------------------------------------------------------------------------------
# Every element written, thread-count independence, bounds with value checks off
# ---------------------------------------------------------------------------------------------


def _run_all(b):
    """Every op's outputs and gradients on one set of inputs (b not a multiple of any block)."""
    out = {}
    z, y = _dw_inputs(b, 3, 7, torch.float32)
    yl = (torch.rand(b, 7, generator=_gen(2)) > 0.5).float()
    for name, labels in (("mc", y), ("ml", yl)):
        for det in (True, False):
            zz = z.detach().clone().requires_grad_(True)
            loss = of.dwfuse_loss(zz, labels, 0.5, det, backend=CPU, multilabel=name == "ml")
            out[f"dw_{name}_{det}"] = (loss, torch.autograd.grad(loss, zz)[0])
        zz = z.detach().clone().requires_grad_(True)
        w = of.dwfuse_weights(zz, labels, 0.5, backend=CPU, multilabel=name == "ml")
        out[f"dww_{name}"] = (w, _grads([w], [zz])[0])
    z2 = _randn(b, 9, scale=3.0, requires_grad=True)
    y2, comb = _labels(b, 9), _comb(b, 4)
    for distance in ("ce", "l1", "l2"):
        out[f"tla_{distance}"] = of.tla_stats(z2, y2, comb, 4, distance, backend=CPU)
    loss = of.tla_loss(z2, y2, comb, int(comb[0]), backend=CPU)
    out["tla_loss"] = (loss, torch.autograd.grad(loss, z2)[0])
    v = _randn(b, 4, 6, requires_grad=True)
    mix = of.modality_mix(v, y2, _src(b, 4, "repeat"), 9, backend=CPU)
    out["mix"] = (*mix, _grads([mix[0]], [v])[0])
    q = torch.softmax(_randn(b, 9), -1).requires_grad_(True)
    loss = of.soft_cross_entropy(z2, q, backend=CPU)
    out["sce"] = (loss, *torch.autograd.grad(loss, (z2, q)))
    g0 = _grad_list(MIMO_SHAPES, [torch.float32] * 5, 0)
    gw = _grad_list(MIMO_SHAPES, [torch.float32] * 5, 70)
    d, lam = of.mimo_combine(g0, gw, backend=CPU)
    out["mimo"] = (*d, lam)
    cra = _cra_inputs(b, 10, 2, 4, torch.float32)
    res = of.cra_forward(*cra, activation="gelu", backend=CPU)
    out["cra"] = (*res, *_grads(res, cra))
    present = torch.rand(b, 5, generator=_gen(8)) > 0.3
    present[:, 2] |= ~present.any(dim=1)
    out["comb"] = (of.combination_ids(present, backend=CPU),)
    return out


def _assert_identical(a, b):
    assert a.keys() == b.keys()
    for key in a:
        for x, y in zip(a[key], b[key], strict=True):
            assert torch.equal(x, y), key


@pytest.mark.parametrize("b", [1, 33, 1029])
def test_poisoned_outputs_are_fully_written(b):
    """With deterministic mode's NaN fill, every at::empty a kernel allocates starts as NaN."""
    clean = _run_all(b)
    fill = torch.utils.deterministic.fill_uninitialized_memory
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = True
        assert torch.isnan(torch.empty(4)).all()  # the poison is on
        poisoned = _run_all(b)
    finally:
        torch.use_deterministic_algorithms(was)
        torch.utils.deterministic.fill_uninitialized_memory = fill
    _assert_identical(clean, poisoned)


def test_results_do_not_depend_on_thread_count():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run_all(5000)
        torch.set_num_threads(max(2, threads))
        many = _run_all(5000)
    finally:
        torch.set_num_threads(threads)
    _assert_identical(one, many)


def test_non_contiguous_inputs():
    z = _randn(5, 3, 4).transpose(0, 2).requires_grad_(True)  # [4, 3, 5], strided
    y = _labels(4, 5)
    (lc, (zc,)), (lr, (zr,)) = _both(
        lambda z, backend: of.dwfuse_loss(z, y, 0.5, False, backend=backend), [z]
    )
    assert_close(lc, lr)
    assert_close(torch.autograd.grad(lc, zc)[0], torch.autograd.grad(lr, zr)[0])
    z2 = _randn(9, 6)[:, ::2]
    assert_close(
        of.tla_stats(z2, _labels(9, 3), _comb(9, 2), 2, backend=CPU)[0],
        ref.tla_stats(z2, _labels(9, 3), _comb(9, 2), 2)[0],
    )
    v = _randn(4, 3, 8)[..., ::2]
    src = _src(4, 3, "repeat")
    assert torch.equal(
        of.modality_mix(v, _labels(4, 3), src, 3, backend=CPU)[0],
        ref.modality_mix(v, _labels(4, 3), src, 3)[0],
    )


def test_out_of_range_indices_raise_with_value_checks_off():
    # the kernels' own range checks: the Python checks' ValueError, naming the argument
    of.set_value_checks(False)
    z = _randn(4, 3)
    bad = torch.tensor([0, 1, 3, 2])  # 3 >= C
    with pytest.raises(ValueError, match=r"labels class indices must be in \[0, 2\]"):
        of.tla_loss(z, bad, torch.ones(4, dtype=torch.long), 1, backend=CPU)
    with pytest.raises(ValueError, match=r"labels class indices .* max 3"):
        of.dwfuse_loss(_randn(4, 2, 3), bad, backend=CPU)
    with pytest.raises(ValueError, match=r"comb combination ids must be in \[1, 3\]"):
        of.tla_stats(z, _labels(4, 3), torch.tensor([1, 2, 4, 1]), 2, backend=CPU)
    with pytest.raises(ValueError, match=r"src source indices must be in \[0, 3\]"):
        of.modality_mix(
            _randn(4, 2, 3), _labels(4, 3), torch.tensor([[0, 1, 2, 4]] * 2), 3, backend=CPU
        )
