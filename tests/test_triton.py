"""The Triton backend against the reference: values and gradients of every op.

Runs the kernels in the Triton interpreter on CPU tensors (no GPU needed): ``TRITON_INTERPRET``
is set for this module only (other modules expect "triton" to be unavailable on CPU), and the
backend picks the interpreter at launch time, so the order the suite imports things in does not
matter. Sizes are small and odd on purpose; ``tests/test_triton_gpu.py`` has the real sizes.
"""

from __future__ import annotations

import _harness
import pytest
import torch
import torch.nn.functional as F
from _harness import LOW, OPS, assert_close, compiled_opaque, falls_back, gen, randn, run

import omnifuse_fast as of
from omnifuse_fast import _dispatch
from omnifuse_fast.reference.mix import random_sources

pytestmark = pytest.mark.backend("triton")


@pytest.fixture(scope="module", autouse=True)
def _interpret():
    with _harness.triton_interpreter():
        yield


def check(op: str, args: list, **kw) -> None:
    """``op`` on the triton backend equals the reference: outputs and gradients
    (tests/_harness.py; ``fp64_reference=True`` for extreme inputs)."""
    _harness.check(op, args, "triton", **kw)


def test_every_op_resolves_to_the_triton_kernels():
    for op in OPS:
        impl = _dispatch.resolve(op, "triton", torch.device("cpu")).impl
        assert impl.__module__.startswith("omnifuse_fast.triton."), (op, impl.__module__)


# ---------------------------------------------------------------------------------- DWFuse


def dw_inputs(bsz, nmod, ncls, multilabel=False, seed=0, scale=3.0, dtype=torch.float32):
    z = randn(bsz, nmod, ncls, seed=seed, scale=scale, dtype=dtype)
    g = gen(seed + 1)
    y = torch.randint(0, 2, (bsz, ncls), generator=g).to(dtype) if multilabel else None
    if y is None:
        y = torch.randint(0, ncls, (bsz,), generator=g)
    return z, y


@pytest.mark.parametrize("multilabel", [False, True], ids=["multiclass", "multilabel"])
@pytest.mark.parametrize("nmod", [2, 3, 5, 8])
def test_dwfuse_matches_reference(nmod, multilabel):
    z, y = dw_inputs(5, nmod, 7, multilabel, seed=nmod)
    check("dwfuse_weights", [z, y, 0.7], diff=(0,), multilabel=multilabel)
    for detach in (True, False):
        check("dwfuse_loss", [z, y, 0.7, detach], diff=(0,), multilabel=multilabel)


@pytest.mark.parametrize("multilabel", [False, True], ids=["multiclass", "multilabel"])
def test_dwfuse_two_classes_and_beta_zero(multilabel):
    z, y = dw_inputs(6, 3, 2, multilabel, seed=3)
    check("dwfuse_weights", [z, y, 0.5], diff=(0,), multilabel=multilabel)
    check("dwfuse_loss", [z, y, 0.0, False], diff=(0,), multilabel=multilabel)


@pytest.mark.parametrize("multilabel", [False, True], ids=["multiclass", "multilabel"])
def test_dwfuse_many_classes_streams_the_class_dim(multilabel):
    # M = 8 pads to 8 rows: more than 512 classes no longer fit one tile
    z, y = dw_inputs(2, 8, 600, multilabel, seed=4)
    check("dwfuse_weights", [z, y, 0.5], diff=(0,), multilabel=multilabel)
    check("dwfuse_loss", [z, y, 0.5, False], diff=(0,), multilabel=multilabel)


@pytest.mark.parametrize("multilabel", [False, True], ids=["multiclass", "multilabel"])
def test_dwfuse_extreme_logits(multilabel):
    z, y = dw_inputs(4, 3, 5, multilabel, seed=5, scale=1.0)
    z = torch.where(z > 0, 1e4, -1e4)
    if not multilabel:  # true class far above, far below, and tied with the others
        z[0, :, y[0]] = 1e4
        z[1, :, y[1]] = -1e4
        z[2] = 1e4
    check("dwfuse_weights", [z, y, 0.5], diff=(0,), fp64_reference=True, multilabel=multilabel)
    for detach in (True, False):
        check(
            "dwfuse_loss",
            [z, y, 0.5, detach],
            diff=(0,),
            fp64_reference=True,
            multilabel=multilabel,
        )
    loss = of.dwfuse_loss(
        z.requires_grad_(), y, 0.5, False, backend="triton", multilabel=multilabel
    )
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("multilabel", [False, True], ids=["multiclass", "multilabel"])
def test_dwfuse_low_precision(dtype, multilabel):
    z, y = dw_inputs(5, 3, 6, multilabel, seed=6, dtype=dtype)
    check("dwfuse_weights", [z, y, 0.5], diff=(0,), dtype=dtype, multilabel=multilabel)
    check("dwfuse_loss", [z, y, 0.5, False], diff=(0,), dtype=dtype, multilabel=multilabel)


# ------------------------------------------------------------------------------------- TLA


@pytest.mark.parametrize("nmod", [2, 3, 5, 8])
def test_combination_ids(nmod):
    present = torch.rand(37, nmod, generator=gen(nmod)) > 0.5
    present[torch.arange(37), torch.randint(0, nmod, (37,), generator=gen(1))] = True
    got = of.combination_ids(present, backend="triton")
    assert got.dtype == torch.int64
    assert torch.equal(got, of.combination_ids(present, backend="reference"))


@pytest.mark.parametrize("distance", ["ce", "l1", "l2"])
@pytest.mark.parametrize("nmod", [2, 5, 8])
def test_tla_stats(nmod, distance):
    bsz, ncls = 77, 5
    z = randn(bsz, ncls, seed=nmod, scale=3.0)
    y = torch.randint(0, ncls, (bsz,), generator=gen(2))
    # a few combinations only: most bins stay empty
    comb = torch.tensor([1, 3, (1 << nmod) - 1])[torch.randint(0, 3, (bsz,), generator=gen(3))]
    sums, counts = of.tla_stats(z, y, comb, nmod, distance, backend="triton")
    want_s, want_c = of.tla_stats(z, y, comb, nmod, distance, backend="reference")
    assert sums.dtype == torch.float32 and counts.dtype == torch.int64
    assert sums.shape == counts.shape == (1 << nmod,)
    assert torch.equal(counts, want_c) and sums[0] == 0
    assert_close(sums, want_s)


@pytest.mark.parametrize("distance", ["ce", "l1", "l2"])
def test_tla_stats_many_classes_and_extremes(distance):
    z = randn(3, 5000, seed=7)  # > one 4096-class tile: the streamed path
    z[0, 3] = 1e4
    z[1] = -1e4
    y = torch.tensor([3, 1, 4999])
    comb = torch.tensor([1, 2, 1])
    check("tla_stats", [z, y, comb, 2, distance], fp64_reference=True)


@pytest.mark.parametrize("lazy", [1, 3, 6], ids=["some", "all-but-one", "empty"])
def test_tla_loss(lazy):
    z = randn(33, 7, seed=8, scale=3.0)
    y = torch.randint(0, 7, (33,), generator=gen(9))
    comb = torch.full((33,), 3)
    comb[::4] = 1
    check("tla_loss", [z, y, comb, lazy], diff=(0,))


def test_tla_loss_empty_mask_is_a_real_zero():
    z = randn(9, 4, seed=10).requires_grad_()
    y = torch.zeros(9, dtype=torch.int64)
    loss = of.tla_loss(z, y, torch.ones(9, dtype=torch.int64), 2, backend="triton")
    (grad,) = torch.autograd.grad(loss, z)
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


def test_tla_loss_many_classes_and_extremes():
    z = randn(4, 4100, seed=11)
    z[0, 5] = 1e4
    z[1, 5] = -1e4
    y = torch.tensor([5, 5, 0, 4099])
    check("tla_loss", [z, y, torch.tensor([2, 2, 1, 2]), 2], diff=(0,), fp64_reference=True)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_tla_low_precision(dtype):
    z = randn(21, 6, seed=12, scale=3.0, dtype=dtype)
    y = torch.randint(0, 6, (21,), generator=gen(13))
    comb = torch.randint(1, 8, (21,), generator=gen(14))
    check("tla_stats", [z, y, comb, 3, "l1"], dtype=dtype)
    check("tla_loss", [z, y, comb, int(comb[0])], diff=(0,), dtype=dtype)


# --------------------------------------------------------------------------------- MM mix


def mix_inputs(bsz, nmod, dim, ncls, seed=0, dtype=torch.float32):
    v = randn(bsz, nmod, dim, seed=seed, dtype=dtype)
    y = torch.randint(0, ncls, (bsz,), generator=gen(seed + 1))
    return v, y, random_sources(bsz, nmod, gen(seed + 2))


@pytest.mark.parametrize("weights", [None, "shared", "per-sample"])
@pytest.mark.parametrize("nmod", [2, 3, 8])
def test_modality_mix(nmod, weights):
    v, y, src = mix_inputs(11, nmod, 5, 4, seed=nmod)
    src[:, :4] = src[:, 4:8]  # repeated sources: the backward really sums
    if weights == "shared":
        w = torch.softmax(randn(nmod, seed=15), 0)
    elif weights == "per-sample":
        w = torch.softmax(randn(11, nmod, seed=15), 1)
    else:
        w = None
    diff = (0,) if w is None else (0, 4)
    check("modality_mix", [v, y, src, 4, w], diff=diff)


def test_modality_mix_one_source_everywhere_and_wide_rows():
    v, y, _ = mix_inputs(6, 8, 300, 3, seed=16)  # D = 300 > the 256-wide D tile
    src = torch.zeros(8, 6, dtype=torch.int64)  # every mixed row reads sample 0
    check("modality_mix", [v, y, src, 3], diff=(0,))


def test_modality_mix_shared_label_is_exactly_hard():
    v, _, src = mix_inputs(9, 3, 4, 5, seed=17)
    y = torch.full((9,), 2)
    y[0] = 4
    src[:, 1] = torch.tensor([3, 5, 7])  # sources all labelled 2
    w = torch.tensor([0.2, 0.3, 0.5])
    _, soft = of.modality_mix(v, y, src, 5, w, backend="triton")
    assert torch.equal(soft[1], F.one_hot(torch.tensor(2), 5).float())


def test_modality_mix_backward_is_deterministic():
    v, y, _ = mix_inputs(40, 3, 6, 3, seed=18)
    src = torch.randint(0, 5, (3, 40), generator=gen(19))  # heavy repetition
    grads = []
    for _ in range(2):
        vv = v.clone().requires_grad_()
        v_mix, _ = of.modality_mix(vv, y, src, 3, backend="triton")
        (g,) = torch.autograd.grad((v_mix * randn(*v_mix.shape, seed=20)).sum(), vv)
        grads.append(g)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_modality_mix_low_precision(dtype):
    v, y, src = mix_inputs(10, 4, 7, 3, seed=21, dtype=dtype)
    src[1, :5] = 0
    check("modality_mix", [v, y, src, 3], diff=(0,), dtype=dtype)


@pytest.mark.parametrize("ncls", [2, 9, 3000])  # 3000: more than one 2048-class tile
def test_soft_cross_entropy(ncls):
    z = randn(7, ncls, seed=ncls, scale=3.0)
    q = torch.softmax(randn(7, ncls, seed=22), 1)
    q[0] = 0.0
    q[0, 1] = 1.0  # a hard row
    check("soft_cross_entropy", [z, q], diff=(0, 1))


def test_soft_cross_entropy_extremes_and_empty_batch():
    z = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]])
    q = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    check("soft_cross_entropy", [z, q], diff=(0, 1), fp64_reference=True)
    check("soft_cross_entropy", [torch.zeros(0, 4), torch.zeros(0, 4)], diff=(0, 1))


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_soft_cross_entropy_low_precision(dtype):
    z = randn(6, 5, seed=23, scale=3.0, dtype=dtype)
    q = torch.softmax(randn(6, 5, seed=24), 1).to(dtype)
    check("soft_cross_entropy", [z, q], diff=(0, 1), dtype=dtype)


# ------------------------------------------------------------------------------------ MIMO

SHAPES = [(3, 5), (7,), (2, 3, 4), (0,), (1,)]


def grad_list(seed, shapes=SHAPES, dtype=torch.float32):
    return [randn(*s, seed=seed + i, dtype=dtype) for i, s in enumerate(shapes)]


@pytest.mark.parametrize("case", ["generic", "equal", "clipped-0", "clipped-1", "opposed"])
def test_mimo_combine(case):
    g0, gw = grad_list(30), grad_list(40)
    if case == "equal":  # |gw - g0| = 0: lam = 1/2
        gw = [t.clone() for t in g0]
    elif case == "clipped-0":  # gw is the short one: lam clips to 0
        gw = [0.1 * t for t in g0]
    elif case == "clipped-1":
        g0 = [0.1 * t for t in gw]
    elif case == "opposed":
        gw = [-2.0 * t for t in g0]
    check("mimo_combine", [g0, gw], diff=(0, 1))


def test_mimo_combine_mixed_dtypes_non_contiguous_and_many_chunks():
    # 20000 elements: two 16384-element chunks; fp16/bf16 tensors: one launch per dtype
    shapes = [(20000,), (6, 5)]
    g0 = grad_list(50, shapes) + [randn(9, seed=52, dtype=torch.float16)]
    gw = grad_list(60, shapes) + [randn(9, seed=62, dtype=torch.float16)]
    g0.append(randn(4, 6, seed=53, dtype=torch.bfloat16).t())  # not contiguous
    gw.append(randn(4, 6, seed=63, dtype=torch.bfloat16).t())
    want, want_g = run("mimo_combine", [g0, gw], (0, 1), "reference")
    got, got_g = run("mimo_combine", [g0, gw], (0, 1), "triton")
    for a, e in zip(got + got_g, want + want_g, strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert_close(a, e, e.dtype if e.dtype in LOW else torch.float32)


@pytest.mark.parametrize("num_objectives", [1, 2, 3, 5])
def test_mgda_min_norm(num_objectives):
    grads = [grad_list(70 + 10 * t) for t in range(num_objectives)]
    check("mgda_min_norm", [grads])


def test_mgda_min_norm_conflicting_pair():
    g = grad_list(80)
    check("mgda_min_norm", [[g, [-t for t in g], grad_list(90)]])


# ------------------------------------------------------------------------------------- CRA


def cra_inputs(bsz, feat, hidden, k, seed=0, dtype=torch.float32):
    return [
        randn(bsz, feat, seed=seed, dtype=dtype),
        randn(k, hidden, feat, seed=seed + 1, scale=feat**-0.5, dtype=dtype),
        randn(k, hidden, seed=seed + 2, scale=0.1, dtype=dtype),
        randn(k, feat, hidden, seed=seed + 3, scale=hidden**-0.5, dtype=dtype),
        randn(k, feat, seed=seed + 4, scale=0.1, dtype=dtype),
    ]


@pytest.mark.parametrize(
    "bsz, feat, hidden, k, activation",
    [
        (40, 48, 24, 3, "relu"),  # several row tiles, H over two slices, split weight grads
        (5, 20, 16, 1, "gelu"),  # one RA, fewer rows than a tile
        (33, 64, 40, 2, "silu"),
        (17, 13, 7, 2, "tanh"),  # F and H below the 16-wide dot minimum
    ],
)
def test_cra_forward(bsz, feat, hidden, k, activation):
    args = cra_inputs(bsz, feat, hidden, k, seed=bsz)
    check("cra_forward", args, diff=(0, 1, 2, 3, 4), activation=activation)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_cra_forward_low_precision(dtype):
    args = cra_inputs(20, 30, 20, 2, seed=3, dtype=dtype)
    check("cra_forward", args, diff=(0, 1, 2, 3, 4), dtype=dtype, activation="gelu")


def test_cra_forward_inference_and_partial_grads():
    args = cra_inputs(9, 24, 16, 2, seed=4)
    with torch.no_grad():
        check("cra_forward", args)
    check("cra_forward", args, diff=(1, 4))  # weights only: no stash needed for x


def test_cra_forward_too_wide_falls_back_with_a_reason():
    args = cra_inputs(2, 1100, 4, 1, seed=5)
    with falls_back("cra_forward", "triton", "1100"):
        out, lat = of.cra_forward(*args, backend="triton")
    want = of.cra_forward(*args, backend="reference")
    assert_close(out, want[0])
    assert_close(lat, want[1])


@pytest.mark.parametrize("op", ["dwfuse_loss", "tla_loss", "soft_cross_entropy", "cra_forward"])
def test_fp64_falls_back_to_the_reference_and_is_recorded(op):
    """fp64 inputs run the reference (the kernels accumulate in fp32): reported through the
    dispatcher, so the usage record names the reference, not triton."""
    z = randn(6, 3, 4, seed=30, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    args = {
        "dwfuse_loss": [z, y, 0.5, False],
        "tla_loss": [z[:, 0], y, torch.tensor([1, 3, 3, 2, 1, 3]), 3],
        "soft_cross_entropy": [z[:, 0], torch.softmax(z[:, 1], 1)],
        "cra_forward": cra_inputs(6, 8, 4, 2, seed=31, dtype=torch.float64),
    }[op]
    with falls_back(op, "triton", "fp64"):
        check(op, args, diff=(0,), dtype=torch.float64)


# ------------------------------------------------------------------- non-contiguous inputs


def test_strided_inputs():
    # every tensor a strided view: the kernels index flat memory, so the ops must compact first
    z = randn(9, 12, seed=40)[::2, ::2]  # [5, 6]
    y = torch.randint(0, 6, (10,), generator=gen(41))[::2]
    comb = torch.randint(1, 4, (10,), generator=gen(42))[::2]
    check("tla_stats", [z, y, comb, 2, "l2"])
    check("tla_loss", [z, y, comb, int(comb[0])], diff=(0,))
    check("soft_cross_entropy", [z.t(), torch.softmax(randn(5, 6, seed=43), 1).t()], diff=(0, 1))
    y3 = torch.randint(0, 3, (8,), generator=gen(49))[::2]
    check("dwfuse_loss", [randn(3, 5, 4, seed=44).transpose(0, 2), y3, 0.5, False], diff=(0,))
    v = randn(3, 7, 5, seed=45).transpose(0, 1)  # [7, 3, 5]
    src = random_sources(14, 3, gen(46))[:, ::2] // 2
    check("modality_mix", [v, y[:4].repeat(2)[:7], src, 6], diff=(0,))
    args = cra_inputs(20, 18, 16, 2, seed=47)
    args[0] = randn(18, 20, seed=48).t()
    check("cra_forward", args, diff=(0, 1, 2, 3, 4))


# -------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_dwfuse_loss(backend):
    torch._dynamo.reset()
    z, y = dw_inputs(6, 3, 5, seed=25)

    def step(z, y):
        return of.dwfuse_loss(z, y, 0.5, False, backend="triton") * 2.0

    eager_z = z.clone().requires_grad_()
    want = step(eager_z, y)
    (want_g,) = torch.autograd.grad(want, eager_z)
    comp_z = z.clone().requires_grad_()
    got = compiled_opaque(step, backend)(comp_z, y)
    (got_g,) = torch.autograd.grad(got, comp_z)
    assert_close(got, want)
    assert_close(got_g, want_g)


def test_compile_cra_tla_and_mimo():
    torch._dynamo.reset()
    args = cra_inputs(18, 20, 16, 2, seed=26)
    y = torch.randint(0, 4, (18,), generator=gen(27))
    comb = torch.randint(1, 4, (18,), generator=gen(28))
    lazy = int(comb[0])

    def step(x, w1, b1, w2, b2):
        out, lat = of.cra_forward(x, w1, b1, w2, b2, backend="triton")
        loss = of.tla_loss(out[:, :4], y, comb, lazy, backend="triton")
        (d,), lam = of.mimo_combine([lat], [lat.flip(0)], backend="triton")
        return loss + d.square().mean() * lam

    eager = [a.clone().requires_grad_() for a in args]
    want = step(*eager)
    want_g = torch.autograd.grad(want, eager)
    comp = [a.clone().requires_grad_() for a in args]
    got = compiled_opaque(step, "aot_eager")(*comp)
    got_g = torch.autograd.grad(got, comp)
    assert_close(got, want)
    for a, e in zip(got_g, want_g, strict=True):
        assert_close(a, e)


# ------------------------------------------------- the kernels compile for a real GPU (sm_90)

_TY = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
       torch.int64: "i64", torch.int32: "i32", torch.uint8: "u8"}  # fmt: skip
SM90_SMEM = 232448  # bytes of shared memory one H100 block may use


def _run_in_fresh_process(test_name: str) -> None:
    """Runs ``test_name`` of this file alone in a new pytest process and fails with its output
    unless it passed there (a skip there is a failure here: nothing would have been checked)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTEST_ADDOPTS")}
    env["OMNIFUSE_SM90_CHILD"] = "1"
    root = Path(__file__).resolve().parents[1]
    test_id = f"{Path(__file__).resolve()}::{test_name}"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_id]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "1 passed" in out, (
        f"{test_name} in a fresh process:\n{out[-6000:]}"
    )


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_every_kernel_compiles_for_sm90(monkeypatch):
    """The interpreter does not run Triton's compiler: compile every kernel the ops launch, in the
    configurations a GPU gets, for sm_90 (no GPU needed: PTX and cubin only).

    Runs itself in a fresh interpreter: the interpreter tests of this process patch Triton's
    frontend, and with some Triton releases (3.8) the real compiler then fails, so the outcome
    would depend on test order."""
    import os

    if os.environ.get("OMNIFUSE_SM90_CHILD") != "1":
        _run_in_fresh_process("test_every_kernel_compiles_for_sm90")
        return
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from omnifuse_fast.triton import cra, dwfuse, mimo, mix, tla

    compiled = {}

    def compile_only(kernel, grid, *args, **kwargs):
        bound = dict(zip(kernel.arg_names, args))
        bound.update({k: v for k, v in kwargs.items() if k in kernel.arg_names})
        sig, const = {}, {}
        for i, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
            v = bound[name]
            if param.is_constexpr:
                sig[name], const[(i,)] = "constexpr", v
            elif isinstance(v, torch.Tensor):
                sig[name] = "*" + _TY[v.dtype]
            else:
                sig[name] = "fp32" if isinstance(v, float) else "i32"
        key = (kernel.fn.__name__, str(sorted(sig.items())), str(sorted(const.items())))
        if key in compiled:
            return
        opts = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        src = ASTSource(kernel, sig, constexprs=const)
        binary = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
        assert binary.metadata.shared <= SM90_SMEM, (key, binary.metadata.shared)
        compiled[key] = binary

    import triton

    for module in (cra, dwfuse, mimo, mix, tla):
        monkeypatch.setattr(module, "launch", compile_only)
    monkeypatch.setattr(cra, "interpreting", lambda t: False)  # the GPU configurations
    monkeypatch.setattr(cra, "fp32_dot_precision", lambda t: "tf32x3")

    class Props:
        multi_processor_count = 132

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())

    def backward(*outs):
        sum(o.float().sum() for o in outs if o.requires_grad).backward()

    for dtype, feat in ((torch.float32, 128), (torch.bfloat16, 1024)):
        args = [a.requires_grad_() for a in cra_inputs(64, feat, 64, 2, dtype=dtype)]
        backward(*of.cra_forward(*args, activation="gelu", backend="triton"))
    for multilabel, ncls in ((False, 10), (False, 5000), (True, 25)):
        z, y = dw_inputs(64, 4, ncls, multilabel)
        z.requires_grad_()
        backward(of.dwfuse_loss(z, y, 0.5, False, backend="triton", multilabel=multilabel))
        backward(of.dwfuse_weights(z, y, 0.5, backend="triton", multilabel=multilabel))
    z = randn(256, 10).requires_grad_()
    y, comb = torch.zeros(256, dtype=torch.int64), torch.ones(256, dtype=torch.int64)
    of.tla_stats(z, y, comb, 8, "l1", backend="triton")
    backward(of.tla_loss(z, y, comb, 1, backend="triton"))
    of.combination_ids(torch.ones(8, 3, dtype=torch.bool), backend="triton")
    v, y, src = mix_inputs(64, 4, 256, 10)
    w = torch.full((64, 4), 0.25).requires_grad_()
    backward(*of.modality_mix(v.requires_grad_(), y, src, 10, w, backend="triton"))
    q = torch.softmax(randn(256, 10), 1).requires_grad_()
    backward(of.soft_cross_entropy(z, q, backend="triton"))
    g0 = [t.requires_grad_() for t in grad_list(1)]
    d, lam = of.mimo_combine(g0, grad_list(2), backend="triton")
    backward(*d, lam)
    of.mgda_min_norm([grad_list(3), grad_list(4), grad_list(5)], backend="triton")
    assert {k[0] for k in compiled} == {  # every kernel of the backend
        "_cra_forward_kernel", "_cra_backward_kernel", "_cra_weight_grad_kernel",
        "_dwfuse_mc_kernel", "_dwfuse_ml_kernel",
        "_combination_ids_kernel", "_tla_kernel", "_bin_reduce_kernel",
        "_mix_kernel", "_link_kernel", "_gather_back_kernel",
        "_weights_back_kernel", "_soft_ce_kernel",
        "_multi_dot_kernel", "_multi_lincomb_kernel",
    }  # fmt: skip
