"""The Triton backend on a CUDA GPU: real sizes, fp32/bf16/fp16, torch.compile, determinism.

Run with ``pytest -m gpu`` on a machine with a GPU (skipped elsewhere). The interpreter tests
(``tests/test_triton.py``) cover the same code at small sizes without a GPU.
"""

from __future__ import annotations

import functools

import _harness
import pytest
import torch
from _harness import DTYPES, assert_close, falls_back
from _op_samples import on, triton_args, triton_samples

import omnifuse_fast as of

DEV = "cuda"
pytestmark = [pytest.mark.gpu, pytest.mark.backend("triton", device=DEV)]


# the harness's helpers on this device and backend (tests/_harness.py)
gen = functools.partial(_harness.gen, device=DEV)
randn = functools.partial(_harness.randn, device=DEV)
randint = functools.partial(_harness.randint, device=DEV)
check = functools.partial(_harness.check, backend="triton")


# ------------------------------------------------------------------------------- opcheck

_SAMPLES = triton_samples()


@pytest.mark.parametrize(
    "name,args", _SAMPLES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(_SAMPLES)]
)
def test_opcheck(name, args):
    """torch.library.opcheck on the Triton ops with compiled kernels (the interpreter:
    tests/test_opcheck.py)."""
    op = getattr(torch.ops.omnifuse_fast_triton, name).default
    torch.library.opcheck(op, on(DEV, triton_args(name, args)))


# ------------------------------------------------------------------------------- DWFuse


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ncls", [10, 1000, 5000])  # 5000: streamed class dim
def test_dwfuse_multiclass(ncls, dtype):
    z = randn(4096 if ncls < 5000 else 512, 4, ncls, seed=1, scale=3.0, dtype=dtype)
    y = randint(0, ncls, (z.shape[0],), seed=2)
    check("dwfuse_weights", [z, y, 0.5], diff=(0,), dtype=dtype)
    for detach in (True, False):
        check("dwfuse_loss", [z, y, 0.5, detach], diff=(0,), dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ncls", [25, 700])
def test_dwfuse_multilabel(ncls, dtype):
    z = randn(2048, 8, ncls, seed=3, scale=3.0, dtype=dtype)
    y = randint(0, 2, (2048, ncls), seed=4).to(dtype)
    check("dwfuse_weights", [z, y, 0.5], diff=(0,), dtype=dtype, multilabel=True)
    check("dwfuse_loss", [z, y, 0.5, False], diff=(0,), dtype=dtype, multilabel=True)


# ---------------------------------------------------------------------------------- TLA


def test_combination_ids():
    present = torch.rand(65536, 8, generator=gen(5), device=DEV) > 0.5
    present[:, 0] = True
    got = of.combination_ids(present, backend="triton")
    assert torch.equal(got, of.combination_ids(present, backend="reference"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("distance", ["ce", "l1", "l2"])
def test_tla_stats_and_loss(distance, dtype):
    z = randn(65536, 10, seed=6, scale=3.0, dtype=dtype)
    y = randint(0, 10, (65536,), seed=7)
    comb = randint(1, 256, (65536,), seed=8)
    check("tla_stats", [z, y, comb, 8, distance], dtype=dtype)
    first = of.tla_stats(z, y, comb, 8, distance, backend="triton")
    again = of.tla_stats(z, y, comb, 8, distance, backend="triton")
    assert torch.equal(first[0], again[0])  # two-stage reduction: bitwise reproducible
    check("tla_loss", [z, y, comb, 77], diff=(0,), dtype=dtype)


def test_tla_many_classes():
    z = randn(256, 9000, seed=9, scale=3.0)
    y = randint(0, 9000, (256,), seed=10)
    comb = randint(1, 4, (256,), seed=11)
    check("tla_stats", [z, y, comb, 2, "l2"])
    check("tla_loss", [z, y, comb, 2], diff=(0,))


# --------------------------------------------------------------------------------- mix


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weighted", [False, True])
def test_modality_mix(weighted, dtype):
    bsz, nmod = 4096, 4
    v = randn(bsz, nmod, 256, seed=12, dtype=dtype)
    y = randint(0, 10, (bsz,), seed=13)
    src = randint(0, bsz // 4, (nmod, bsz), seed=14)  # many repeated sources
    w = torch.softmax(randn(bsz, nmod, seed=15), 1) if weighted else None
    # scaled: the reference accumulates repeated sources in the input dtype, the kernels in fp32
    diff = (0, 4) if weighted else (0,)
    check("modality_mix", [v, y, src, 10, w], diff=diff, dtype=dtype, scaled=True)


def test_modality_mix_backward_is_bitwise_reproducible():
    v = randn(8192, 4, 128, seed=16)
    y = randint(0, 5, (8192,), seed=17)
    src = randint(0, 64, (4, 8192), seed=18)  # ~128 readers per source
    grads = []
    for _ in range(3):
        vv = v.clone().requires_grad_()
        v_mix, _ = of.modality_mix(vv, y, src, 5, backend="triton")
        (g,) = torch.autograd.grad((v_mix * randn(*v_mix.shape, seed=19)).sum(), vv)
        grads.append(g)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ncls", [10, 1000, 5000])
def test_soft_cross_entropy(ncls, dtype):
    z = randn(2048, ncls, seed=20, scale=3.0, dtype=dtype)
    q = torch.softmax(randn(2048, ncls, seed=21), 1).to(dtype)
    check("soft_cross_entropy", [z, q], diff=(0, 1), dtype=dtype)


# --------------------------------------------------------------------------------- MIMO

SHAPES = [(64, 3, 7, 7), (64,), (128, 64, 3, 3), (1000, 512), (1000,), (3, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mimo_combine(dtype):
    g0 = [randn(*s, seed=30 + i, dtype=dtype) for i, s in enumerate(SHAPES)]
    gw = [randn(*s, seed=50 + i, dtype=dtype) for i, s in enumerate(SHAPES)]
    check("mimo_combine", [g0, gw], diff=(0, 1), dtype=dtype, scaled=True)


def test_mgda_min_norm():
    grads = [[randn(*s, seed=70 + 10 * t + i) for i, s in enumerate(SHAPES)] for t in range(5)]
    check("mgda_min_norm", [grads])


# ---------------------------------------------------------------------------------- CRA


def cra_inputs(bsz, feat, hidden, k, dtype):
    return [
        randn(bsz, feat, seed=80, dtype=dtype),
        randn(k, hidden, feat, seed=81, scale=feat**-0.5, dtype=dtype),
        randn(k, hidden, seed=82, scale=0.1, dtype=dtype),
        randn(k, feat, hidden, seed=83, scale=hidden**-0.5, dtype=dtype),
        randn(k, feat, seed=84, scale=0.1, dtype=dtype),
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "feat, hidden, activation",
    [
        (100, 32, "relu"),
        (256, 64, "gelu"),
        (512, 256, "silu"),
        (1024, 256, "relu"),
        (1000, 64, "tanh"),
    ],
)
def test_cra_forward(feat, hidden, activation, dtype):
    args = cra_inputs(1024, feat, hidden, 5, dtype)
    check(
        "cra_forward", args, diff=(0, 1, 2, 3, 4), dtype=dtype, scaled=True, activation=activation
    )


def test_cra_forward_beyond_the_fused_width_falls_back():
    args = cra_inputs(64, 1500, 32, 2, torch.float32)
    with falls_back("cra_forward", "triton", "1500"):
        out, _ = of.cra_forward(*args, backend="triton")
    assert_close(out, of.cra_forward(*args, backend="reference")[0])


# ------------------------------------------------------------------------ torch.compile


def test_compile_fullgraph_inductor():
    torch._dynamo.reset()
    args = cra_inputs(256, 128, 32, 3, torch.float32)
    y = randint(0, 8, (256,), seed=90)
    src = randint(0, 256, (4, 256), seed=91)

    def step(x, w1, b1, w2, b2):
        out, lat = of.cra_forward(x, w1, b1, w2, b2, backend="triton")
        z = out.view(256, 4, 32)[:, :, :8]
        loss = of.dwfuse_loss(z, y, 0.5, False, backend="triton")
        v_mix, soft = of.modality_mix(out.view(256, 4, 32), y, src, 8, backend="triton")
        loss = loss + of.soft_cross_entropy(v_mix[:, 0, :8], soft, backend="triton")
        return loss + lat.square().mean()

    eager = [a.clone().requires_grad_() for a in args]
    want = step(*eager)
    want_g = torch.autograd.grad(want, eager)
    comp = [a.clone().requires_grad_() for a in args]
    got = torch.compile(step, fullgraph=True)(*comp)
    got_g = torch.autograd.grad(got, comp)
    assert_close(got, want)
    for a, e in zip(got_g, want_g, strict=True):
        assert_close(a, e)
