"""The CUDA C++ backend (csrc/cuda) on a GPU: real sizes, fp32/bf16/fp16, values and gradients
against the reference, determinism, the fused-CRA fallback, and a compute-sanitizer run.

Run with ``pytest -m gpu`` on a machine with a GPU and the extension built with its CUDA
kernels (skipped elsewhere); ``tests/test_cuda_compile.py`` compile-checks the same code anywhere.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
import textwrap
import warnings

import _harness
import pytest
import torch
from _harness import DTYPES, assert_close, falls_back, no_fallback
from _op_samples import compiled_samples, on

import omnifuse_fast as of
from omnifuse_fast import _dispatch

DEV = "cuda"
pytestmark = [pytest.mark.gpu, pytest.mark.backend("cuda", device=DEV)]


# the harness's helpers on this device and backend (tests/_harness.py)
gen = functools.partial(_harness.gen, device=DEV)
randn = functools.partial(_harness.randn, device=DEV)
randint = functools.partial(_harness.randint, device=DEV)
check = functools.partial(_harness.check, backend="cuda")


def composite_warnings(caught) -> list:
    """The C++ op's own fallback to its ATen composite (warned on every call)."""
    return [w for w in caught if "ATen composite" in str(w.message)]


# ------------------------------------------------------------------------------------- CRA


def cra_inputs(b, f, h, k, dtype, seed=0):
    x = randn(b, f, seed=seed, dtype=dtype)
    w1 = randn(k, h, f, seed=seed + 1, scale=f**-0.5, dtype=dtype)
    b1 = randn(k, h, seed=seed + 2, scale=0.1, dtype=dtype)
    w2 = randn(k, f, h, seed=seed + 3, scale=0.5 * h**-0.5, dtype=dtype)
    b2 = randn(k, f, seed=seed + 4, scale=0.1, dtype=dtype)
    return [x, w1, b1, w2, b2]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh"])
@pytest.mark.parametrize("shape", [(1000, 256, 64, 5), (333, 1024, 256, 3), (64, 32, 16, 2)])
def test_cra_fused(shape, activation, dtype):
    b, f, h, k = shape  # 1000 and 333 rows: a partial last row tile
    args = cra_inputs(b, f, h, k, dtype) + [activation]
    # the fused kernels must take these shapes: no fallback reported, nor the C++ composite run
    with no_fallback("cra_forward", "cuda"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check("cra_forward", args, diff=(0, 1, 2, 3, 4), dtype=dtype, scaled=True)
    assert not composite_warnings(caught)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_cra_fallback_shapes(dtype):
    # F = 72 is not a multiple of 16 (and fp64 never takes the fused kernel): the dispatcher
    # sends them to the reference and records why, before the C++ op could fall back itself
    args = cra_inputs(100, 72, 24, 2, dtype) + ["gelu"]
    why = "fp32, bf16 and fp16 only" if dtype == torch.float64 else "multiples of 16"
    with falls_back("cra_forward", "cuda", why) as caught:
        check("cra_forward", args, diff=(0, 1, 2, 3, 4), dtype=dtype, scaled=True)
    assert not composite_warnings(caught)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "f,h",
    [(32, 16), (72, 24), (1024, 256), (1040, 16), (64, 272), (512, 128)],
)
def test_cra_guard_agrees_with_the_kernel(f, h, dtype):
    """The Python guard (omnifuse_fast/compiled/_cuda_cra.py) and the kernel's own check agree: the
    C++ op runs its composite exactly where the guard sends the public op to the reference."""
    from omnifuse_fast.compiled._cuda_cra import fused_reason

    args = cra_inputs(40, f, h, 2, dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.ops.omnifuse_fast.cra_forward(*args, "relu")
    reason = fused_reason(*args)
    assert (reason is None) == (not composite_warnings(caught)), (reason, caught)


_SAMPLES = compiled_samples()


@pytest.mark.parametrize(
    "name,args", _SAMPLES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(_SAMPLES)]
)
def test_opcheck_cuda(name, args):
    """torch.library.opcheck on the CUDA registrations (the CPU ones: tests/test_opcheck.py)."""
    _dispatch.load_error("cuda")  # the fake impls and autograd formulas
    torch.library.opcheck(getattr(torch.ops.omnifuse_fast, name).default, on(DEV, args))


# ---------------------------------------------------------------------------------- DWFuse


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4096, 4, 10), (4096, 3, 1000), (512, 8, 5000), (999, 2, 7)])
def test_dwfuse_multiclass(shape, dtype):
    b, m, c = shape  # C = 10, 7: several samples per warp; 1000, 5000: vector loads
    z = randn(b, m, c, seed=1, scale=3.0, dtype=dtype)
    y = randint(0, c, (b,), seed=2)
    check("dwfuse_weights", [z, y, 0.5], diff=(0,), dtype=dtype)
    for detach in (True, False):
        check("dwfuse_loss", [z, y, 0.5, detach], diff=(0,), dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ncls", [25, 64])  # odd C: scalar loads; 64: vector loads
def test_dwfuse_multilabel(ncls, dtype):
    z = randn(2048, 8, ncls, seed=3, scale=3.0, dtype=dtype)
    y = randint(0, 2, (2048, ncls), seed=4).to(dtype)
    check("dwfuse_weights", [z, y, 0.7], diff=(0,), dtype=dtype, multilabel=True)
    for detach in (True, False):
        check("dwfuse_loss", [z, y, 0.7, detach], diff=(0,), dtype=dtype, multilabel=True)


def test_dwfuse_extreme_probabilities():
    # p_y ~ 1 and ~ 0: log(1 - p) must stay exact (finite, matching the reference in fp32)
    z = torch.zeros(64, 3, 5, device=DEV)
    y = torch.zeros(64, dtype=torch.long, device=DEV)
    z[:, :, 0] = torch.linspace(-60, 60, 64, device=DEV).unsqueeze(1)
    check("dwfuse_weights", [z, y, 0.5], diff=(0,))
    check("dwfuse_loss", [z, y, 0.5, False], diff=(0,))


# ------------------------------------------------------------------------------------- TLA


def test_combination_ids():
    present = torch.rand(65537, 8, generator=gen(5), device=DEV) > 0.5
    present[:, 0] = True
    got = of.combination_ids(present, backend="cuda")
    assert torch.equal(got, of.combination_ids(present, backend="reference"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("distance", ["ce", "l1", "l2"])
@pytest.mark.parametrize("m,c", [(2, 10), (3, 1000), (8, 7)])
def test_tla_stats(m, c, distance, dtype):
    b = 20000
    z = randn(b, c, seed=6, scale=3.0, dtype=dtype)
    y = randint(0, c, (b,), seed=7)
    comb = randint(1, 1 << m, (b,), seed=8)
    sums, counts = of.tla_stats(z, y, comb, m, distance, backend="cuda")
    ref_s, ref_c = of.tla_stats(z, y, comb, m, distance, backend="reference")
    assert sums.dtype == torch.float32 and counts.dtype == torch.int64
    assert torch.equal(counts, ref_c)
    assert sums[0] == 0 and counts[0] == 0
    # fp32 sums of ~b / 2^m per-sample distances in a different order
    torch.testing.assert_close(sums, ref_s, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", [10, 1000])
def test_tla_loss(c, dtype):
    b = 8192
    z = randn(b, c, seed=9, scale=3.0, dtype=dtype)
    y = randint(0, c, (b,), seed=10)
    comb = randint(1, 16, (b,), seed=11)
    for lazy in (5, 200):  # 200: no sample, a real 0 with a zero gradient
        check("tla_loss", [z, y, comb, lazy], diff=(0,), dtype=dtype)
    loss = of.tla_loss(z.requires_grad_(), y, comb, 200, backend="cuda")
    (grad,) = torch.autograd.grad(loss, z)
    assert loss.item() == 0.0 and not grad.any()


# ------------------------------------------------------------------------------------- mix


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 30])  # 30: scalar copies
@pytest.mark.parametrize("collide", [False, True])
def test_modality_mix(collide, d, dtype):
    b, m, c = 2048, 4, 10
    v = randn(b, m, d, seed=12, dtype=dtype)
    y = randint(0, c, (b,), seed=13)
    if collide:  # many mixed rows read one source: the backward sums several readers
        src = randint(0, 64, (m, b), seed=14)
    else:
        src = torch.stack([torch.randperm(b, generator=gen(15 + i), device=DEV) for i in range(m)])
    weights = torch.softmax(randn(b, m, seed=20), dim=1)
    check("modality_mix", [v, y, src, c], diff=(0,), dtype=dtype)
    check("modality_mix", [v, y, src, c, weights], diff=(0,), dtype=dtype)


def test_modality_mix_backward_is_deterministic():
    b, m, d = 4096, 8, 128
    v = randn(b, m, d, seed=16).requires_grad_()
    y = randint(0, 5, (b,), seed=17)
    src = randint(0, 32, (m, b), seed=18)
    grads = []
    for _ in range(3):
        v_mix, _ = of.modality_mix(v, y, src, 5, backend="cuda")
        grads.append(torch.autograd.grad((v_mix * v_mix).sum(), v)[0])
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


def test_modality_mix_hard_label_when_sources_agree():
    b, m = 256, 3
    v = randn(b, m, 16, seed=19)
    y = torch.full((b,), 4, dtype=torch.long, device=DEV)
    src = randint(0, b, (m, b), seed=20)
    _, soft = of.modality_mix(v, y, src, 7, backend="cuda")
    assert torch.equal(soft, torch.nn.functional.one_hot(y, 7).float())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", [10, 1000, 37])
def test_soft_cross_entropy(c, dtype):
    z = randn(4096, c, seed=21, scale=3.0, dtype=dtype)
    q = torch.softmax(randn(4096, c, seed=22, scale=2.0), dim=1).to(dtype)
    check("soft_cross_entropy", [z, q], diff=(0, 1), dtype=dtype)


# ------------------------------------------------------------------------------------ MIMO


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mimo_combine(dtype):
    # > 36 tensors and > 320 chunks: several tables per launch; one empty, one odd-sized
    shapes = [(3,), (0,), (1000, 1001), (64,)] + [(257, 33)] * 40 + [(5_000_000,)]
    g0 = [randn(*s, seed=30 + i, dtype=dtype) for i, s in enumerate(shapes)]
    gw = [
        randn(*s, seed=90 + i, scale=0.5, dtype=dtype) + 0.1 * g.float()
        for i, (s, g) in enumerate(zip(shapes, g0))
    ]
    gw = [g.to(dtype) for g in gw]
    d_ref, lam_ref = of.mimo_combine(g0, gw, backend="reference")
    d, lam = of.mimo_combine(g0, gw, backend="cuda")
    torch.testing.assert_close(lam, lam_ref, rtol=1e-6, atol=1e-7)
    for a, e in zip(d, d_ref, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype
        assert_close(a, e, dtype)
    gram = torch.ops.omnifuse_fast.mimo_gram(g0, gw)
    ref = [
        sum(torch.sum(a.double() * b.double()) for a, b in zip(x, y))
        for x, y in ((g0, g0), (g0, gw), (gw, gw))
    ]
    torch.testing.assert_close(gram.cpu(), torch.stack(ref).cpu(), rtol=1e-12, atol=1e-9)


def test_mimo_mixed_dtypes_and_determinism():
    g0 = [randn(70_000, seed=40), randn(300, seed=41, dtype=torch.bfloat16)]
    gw = [randn(70_000, seed=42), randn(300, seed=43, dtype=torch.bfloat16)]
    first = torch.ops.omnifuse_fast.mimo_gram(g0, gw)
    for _ in range(3):
        assert torch.equal(torch.ops.omnifuse_fast.mimo_gram(g0, gw), first)
    d_ref, lam_ref = of.mimo_combine(g0, gw, backend="reference")
    d, lam = of.mimo_combine(g0, gw, backend="cuda")
    torch.testing.assert_close(lam, lam_ref, rtol=1e-6, atol=1e-7)
    for a, e in zip(d, d_ref, strict=True):
        assert_close(a, e, a.dtype)


# -------------------------------------------------------------------------- compute-sanitizer

SANITIZER_SCRIPT = """
import torch
import omnifuse_fast as of

dev = "cuda"
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    x = torch.randn(37, 64, device=dev, dtype=dtype, requires_grad=True)
    w1 = (0.1 * torch.randn(2, 32, 64, device=dev)).to(dtype).requires_grad_()
    b1 = torch.zeros(2, 32, device=dev, dtype=dtype, requires_grad=True)
    w2 = (0.1 * torch.randn(2, 64, 32, device=dev)).to(dtype).requires_grad_()
    b2 = torch.zeros(2, 64, device=dev, dtype=dtype, requires_grad=True)
    out, lat = of.cra_forward(x, w1, b1, w2, b2, "gelu", backend="cuda")
    (out.float().sum() + lat.float().sum()).backward()

    z = torch.randn(33, 3, 10, device=dev, dtype=dtype, requires_grad=True)
    y = torch.randint(0, 10, (33,), device=dev)
    yl = torch.randint(0, 2, (33, 10), device=dev).to(dtype)
    for lab in (y, yl):
        ml = lab.dim() == 2
        of.dwfuse_weights(z, lab, backend="cuda", multilabel=ml).float().sum().backward()
        of.dwfuse_loss(z, lab, detach_weight=False, backend="cuda", multilabel=ml).backward()

    logits = torch.randn(33, 10, device=dev, dtype=dtype, requires_grad=True)
    present = torch.rand(33, 3, device=dev) > 0.3
    present[:, 0] = True
    comb = of.combination_ids(present, backend="cuda")
    of.tla_stats(logits, y, comb, 3, "l2", backend="cuda")
    of.tla_loss(logits, y, comb, int(comb[0]), backend="cuda").backward()

    v = torch.randn(33, 3, 24, device=dev, dtype=dtype, requires_grad=True)
    src = torch.randint(0, 33, (3, 33), device=dev)
    v_mix, soft = of.modality_mix(v, y, src, 10, backend="cuda")
    v_mix.float().sum().backward()
    q = soft.detach().requires_grad_()
    of.soft_cross_entropy(logits.detach().requires_grad_(), q, backend="cuda").backward()

    g0 = [torch.randn(70_001, device=dev, dtype=dtype), torch.randn(5, device=dev, dtype=dtype)]
    gw = [torch.randn(70_001, device=dev, dtype=dtype), torch.randn(5, device=dev, dtype=dtype)]
    of.mimo_combine(g0, gw, backend="cuda")
torch.cuda.synchronize()
print("sanitizer script done")
"""


@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="no compute-sanitizer")
def test_compute_sanitizer_memcheck(tmp_path):
    script = tmp_path / "exercise_cuda_ops.py"
    script.write_text(textwrap.dedent(SANITIZER_SCRIPT))
    cmd = [
        "compute-sanitizer",
        "--tool",
        "memcheck",
        "--error-exitcode",
        "3",
        sys.executable,
        str(script),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-8000:]
    assert "sanitizer script done" in output
    assert "ERROR SUMMARY: 0 errors" in output, output[-8000:]
