"""Fuzzing every public op on every backend against the reference (hypothesis).

Each op gets random shapes (including one-sample batches, M from 2 to 8, odd widths), dtypes
(fp32, bf16, fp16) and value scales from 0 to 1e4; every fast backend that can run here
("cpu", and "triton" in the interpreter when ``TRITON_INTERPRET`` works) must give the
reference's outputs and gradients within the dtype's tolerance (tests/_harness.py). Logits
holding +-inf are rejected with ValueError on every backend; logits of +-1e4 give finite
results. A dispatcher hammered from many threads returns what it returns from one.

Case counts: ``FUZZ_CASES`` records how many inputs each (op, backend) ran;
``test_zz_fuzz_case_counts`` prints them (``-s``) and checks none fell short.
"""

from __future__ import annotations

import collections
import contextlib
import subprocess
import sys
import threading

import _harness
import pytest
import torch
from _harness import DTYPES, OPS, flat, require_backend, tol
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import omnifuse_fast as of

EXAMPLES = {"cpu": 80, "triton": 8}  # the Triton interpreter is slow
FUZZ_CASES: collections.Counter = collections.Counter()
SCALES = (0.0, 1e-3, 1.0, 30.0, 1e4)
seeds = st.integers(0, 2**31 - 1)


@contextlib.contextmanager
def backend_ready(backend: str):
    """Run with ``backend`` usable on CPU tensors (Triton: in the interpreter), or skip (fail
    where OMNIFUSE_EXPECT_BACKENDS names it: tests/_harness.py)."""
    require_backend(backend)
    interp = _harness.triton_interpreter() if backend == "triton" else contextlib.nullcontext()
    with interp:
        yield


def fuzz(**strategies):
    """One hypothesis test per fast backend (each with its example budget) over ``strategies``."""

    def decorate(fn):
        tests = {}
        for backend in ("cpu", "triton"):
            configured = settings(
                max_examples=EXAMPLES[backend],
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                derandomize=True,  # reproducible in CI; the seed space is still searched widely
            )(given(**strategies)(fn))
            tests[backend] = configured

        @pytest.mark.parametrize("backend", ["cpu", "triton"])
        def test(backend):
            with backend_ready(backend):
                tests[backend](backend=backend)

        test.__name__ = fn.__name__
        return test

    return decorate


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, seed, scale=1.0, dtype=torch.float32):
    return (torch.randn(shape, generator=_gen(seed), dtype=torch.float64) * scale).to(dtype)


def check(op, args, diff, dtype, backend, magnitude=1.0, **kw):
    """``op`` on ``backend`` equals the reference: outputs (all finite) and gradients.

    ``magnitude``: the inputs' largest |value| where an output is a cancelling sum of them
    (MIMO's direction): its absolute error then scales with the inputs, not with the output.
    """
    FUZZ_CASES[(op, backend)] += 1
    _harness.check(op, args, backend, diff, dtype, magnitude=magnitude, finite=True, **kw)


dtypes = st.sampled_from(DTYPES)
scales = st.sampled_from(SCALES)


# ------------------------------------------------------------------------------ the ops
@fuzz(bsz=st.integers(1, 17), nmod=st.integers(2, 8), seed=seeds, data=st.data())
def test_fuzz_combination_ids(backend, bsz, nmod, seed, data):
    present = torch.rand(bsz, nmod, generator=_gen(seed)) < data.draw(st.floats(0.05, 1.0))
    present[~present.any(1), data.draw(st.integers(0, nmod - 1))] = True
    check("combination_ids", [present], (), torch.float32, backend)


@fuzz(
    bsz=st.integers(1, 9),
    feat=st.integers(1, 12),
    k=st.integers(1, 3),
    hidden=st.integers(1, 6),
    activation=st.sampled_from(["relu", "gelu", "silu", "tanh"]),
    dtype=dtypes,
    scale=st.sampled_from((0.0, 1e-3, 1.0, 10.0)),
    seed=seeds,
)
def test_fuzz_cra_forward(backend, bsz, feat, k, hidden, activation, dtype, scale, seed):
    x = _randn((bsz, feat), seed, scale, dtype)
    w1 = _randn((k, hidden, feat), seed + 1, feat**-0.5, dtype)
    b1 = _randn((k, hidden), seed + 2, 0.1, dtype)
    w2 = _randn((k, feat, hidden), seed + 3, hidden**-0.5, dtype)
    b2 = _randn((k, feat), seed + 4, 0.1, dtype)
    check("cra_forward", [x, w1, b1, w2, b2, activation], (0, 1, 2, 3, 4), dtype, backend)


def _labels(bsz, ncls, multilabel, seed, dtype):
    g = _gen(seed + 7)
    if multilabel:
        return torch.randint(0, 2, (bsz, ncls), generator=g).to(dtype)
    return torch.randint(0, ncls, (bsz,), generator=g)


@fuzz(
    bsz=st.integers(1, 9),
    nmod=st.integers(2, 8),
    ncls=st.integers(2, 11),
    multilabel=st.booleans(),
    beta=st.sampled_from((0.0, 0.5, 2.0)),
    detach=st.booleans(),
    dtype=dtypes,
    scale=scales,
    seed=seeds,
)
def test_fuzz_dwfuse(backend, bsz, nmod, ncls, multilabel, beta, detach, dtype, scale, seed):
    z = _randn((bsz, nmod, ncls), seed, scale, dtype)
    y = _labels(bsz, ncls, multilabel, seed, dtype)
    check("dwfuse_weights", [z, y, beta], (0,), dtype, backend, multilabel=multilabel)
    check("dwfuse_loss", [z, y, beta, detach], (0,), dtype, backend, multilabel=multilabel)


@fuzz(
    bsz=st.integers(1, 17),
    nmod=st.integers(2, 8),
    ncls=st.integers(2, 11),
    distance=st.sampled_from(["ce", "l1", "l2"]),
    dtype=dtypes,
    scale=scales,
    seed=seeds,
    data=st.data(),
)
def test_fuzz_tla(backend, bsz, nmod, ncls, distance, dtype, scale, seed, data):
    logits = _randn((bsz, ncls), seed, scale, dtype)
    labels = _labels(bsz, ncls, False, seed, dtype)
    comb = torch.randint(1, 1 << nmod, (bsz,), generator=_gen(seed + 3))
    check("tla_stats", [logits, labels, comb, nmod, distance], (), dtype, backend)
    # lazy: one of the batch's combinations, or one absent (the empty mask: a real 0)
    lazy = data.draw(st.sampled_from([int(comb[0]), (1 << nmod) - 1, 1]))
    check("tla_loss", [logits, labels, comb, lazy], (0,), dtype, backend)


@fuzz(
    bsz=st.integers(1, 9),
    nmod=st.integers(2, 8),
    dim=st.integers(1, 7),
    ncls=st.integers(2, 6),
    weights=st.sampled_from(["none", "modality", "sample"]),
    dtype=dtypes,
    scale=scales,
    seed=seeds,
)
def test_fuzz_modality_mix(backend, bsz, nmod, dim, ncls, weights, dtype, scale, seed):
    v = _randn((bsz, nmod, dim), seed, scale, dtype)
    g = _gen(seed + 1)
    labels = torch.randint(0, ncls, (bsz,), generator=g)
    src = torch.randint(0, bsz, (nmod, bsz), generator=g)  # repeats: scatter-add backward
    w = None
    if weights != "none":
        shape = (nmod,) if weights == "modality" else (bsz, nmod)
        w = torch.rand(shape, generator=g) + 0.01
        w = w / w.sum(-1, keepdim=True)
    check("modality_mix", [v, labels, src, ncls, w], (0,), dtype, backend)


@fuzz(
    bsz=st.integers(1, 17),
    ncls=st.integers(2, 11),
    dtype=dtypes,
    scale=scales,
    hard=st.booleans(),
    seed=seeds,
)
def test_fuzz_soft_cross_entropy(backend, bsz, ncls, dtype, scale, hard, seed):
    logits = _randn((bsz, ncls), seed, scale, dtype)
    q = torch.rand(bsz, ncls, generator=_gen(seed + 1))
    if hard:
        q = torch.nn.functional.one_hot(q.argmax(1), ncls).float()
    q = (q / q.sum(1, keepdim=True)).to(dtype)
    check("soft_cross_entropy", [logits, q], (0, 1), dtype, backend)


@st.composite
def grad_lists(draw, count):
    shapes = draw(st.lists(st.lists(st.integers(1, 9), max_size=3), min_size=1, max_size=4))
    dtype = draw(st.sampled_from((torch.float32, torch.float32, torch.bfloat16)))
    seed, scale = draw(seeds), draw(st.sampled_from((1e-3, 1.0, 1e3)))
    lists = [
        [_randn(tuple(s), seed + 10 * t + i, scale, dtype) for i, s in enumerate(shapes)]
        for t in range(count)
    ]
    if draw(st.booleans()):  # identical objectives: the degenerate 0/0 case
        lists[1] = [t.clone() for t in lists[0]]
    return lists, dtype


@fuzz(case=grad_lists(2))
def test_fuzz_mimo_combine(backend, case):
    (g0, gw), dtype = case
    check("mimo_combine", [g0, gw], (), dtype, backend, magnitude=_max_abs(g0 + gw))


@fuzz(count=st.integers(1, 4), data=st.data())
def test_fuzz_mgda_min_norm(backend, count, data):
    # The min-norm point (the direction) is unique; the weights are not when the gradients
    # are linearly dependent, so the weights are checked for what they must be (on the
    # simplex, combining to the direction), and the direction against the reference.
    grads, dtype = data.draw(grad_lists(max(count, 2)))
    used = grads[:count]
    FUZZ_CASES[("mgda_min_norm", backend)] += 1
    want_w, want_d = of.mgda_min_norm(used, backend="reference")
    got_w, got_d = of.mgda_min_norm(used, backend=backend)
    assert got_w.shape == want_w.shape and torch.isfinite(got_w).all()
    assert (got_w >= 0).all() and abs(float(got_w.sum()) - 1.0) < 1e-5
    magnitude = max(1.0, _max_abs(sum(used, [])))
    t = tol(dtype)
    for i, (a, e) in enumerate(zip(got_d, want_d, strict=True)):
        combo = sum(float(w) * g[i].double() for w, g in zip(got_w, used))
        for other, what in ((e, "reference direction"), (combo, "its weights' combination")):
            torch.testing.assert_close(
                a.double(),
                other.double(),
                rtol=t["rtol"],
                atol=t["atol"] * magnitude,
                msg=f"mgda_min_norm direction {i} ({backend}, {dtype}) vs {what}",
            )


def _max_abs(tensors):
    return max(float(t.float().abs().max()) for t in tensors)


# ------------------------------------------------------------------------ extreme logits
def _logit_calls(z3: torch.Tensor):
    """Every op that takes logits, called on ``z3 [B, M, C]`` (and its first modality)."""
    bsz, nmod, ncls = z3.shape
    y = torch.arange(bsz) % ncls
    comb = torch.ones(bsz, dtype=torch.long)
    z2 = z3[:, 0].contiguous()
    q = torch.full((bsz, ncls), 1.0 / ncls, dtype=z3.dtype)
    return {
        "dwfuse_weights": lambda b: of.dwfuse_weights(z3, y, backend=b),
        "dwfuse_loss": lambda b: of.dwfuse_loss(z3, y, backend=b),
        "tla_stats": lambda b: of.tla_stats(z2, y, comb, nmod, backend=b),
        "tla_loss": lambda b: of.tla_loss(z2, y, comb, 1, backend=b),
        "soft_cross_entropy": lambda b: of.soft_cross_entropy(z2, q, backend=b),
        "cra_forward": lambda b: of.cra_forward(
            z2,
            *(
                torch.zeros(s, dtype=z3.dtype)
                for s in ((1, 2, ncls), (1, 2), (1, ncls, 2), (1, ncls))
            ),
            backend=b,
        ),
    }


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_logits_are_rejected(backend, bad):
    with backend_ready(backend) if backend != "reference" else contextlib.nullcontext():
        for seed in range(5):
            z = _randn((3, 2, 4), seed)
            z[seed % 3, 0, seed % 4] = bad  # modality 0: the 2-D ops take z[:, 0]
            for op, call in _logit_calls(z).items():
                FUZZ_CASES[(op + " non-finite", backend)] += 1
                with pytest.raises(ValueError, match="logits|x") as err:
                    call(backend)
                assert "finite" in str(err.value), (op, str(err.value))


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_logits_of_1e4_give_finite_results(backend, dtype):
    with backend_ready(backend) if backend != "reference" else contextlib.nullcontext():
        for seed in range(4):
            z = torch.sign(_randn((3, 3, 5), seed)) * 1e4  # every logit at +-1e4
            z = z.to(dtype).requires_grad_()
            for op, call in _logit_calls(z).items():
                FUZZ_CASES[(op + " 1e4", backend)] += 1
                outs = [o for o in flat(call(backend)) if o.is_floating_point()]
                assert all(torch.isfinite(o).all() for o in outs), (op, dtype)
                diffable = [o for o in outs if o.requires_grad]
                if diffable:
                    (g,) = torch.autograd.grad(sum(o.float().sum() for o in diffable), z)
                    assert torch.isfinite(g).all(), (op, dtype)


# ----------------------------------------------------------------------------- threads
def _thread_jobs():
    g = _gen(0)
    z = torch.randn(8, 3, 5, generator=g)
    y = torch.randint(0, 5, (8,), generator=g)
    comb = torch.randint(1, 8, (8,), generator=g)
    v = torch.randn(8, 3, 4, generator=g)
    src = torch.randint(0, 8, (3, 8), generator=g)
    x = torch.randn(8, 6, generator=g)
    w = [torch.randn(s, generator=g) * 0.3 for s in ((2, 4, 6), (2, 4), (2, 6, 4), (2, 6))]
    return {
        "dwfuse_loss": lambda b: of.dwfuse_loss(z, y, backend=b),
        "tla_stats": lambda b: of.tla_stats(z[:, 0], y, comb, 3, backend=b),
        "modality_mix": lambda b: of.modality_mix(v, y, src, 5, backend=b),
        "cra_forward": lambda b: of.cra_forward(x, *w, backend=b),
        "mimo_combine": lambda b: of.mimo_combine([x, z], [x * 2, -z], backend=b),
    }


def test_dispatcher_is_thread_safe():
    """16 threads, each calling every op 25 times on a different backend rotation."""
    backends = [
        b for b in ("reference", "cpu", "auto") if b == "auto" or b in of.available_backends()
    ]
    jobs = _thread_jobs()
    want = {(op, b): flat(call(b)) for op, call in jobs.items() for b in backends}
    errors: list[BaseException] = []
    start = threading.Barrier(16)

    def worker(i: int) -> None:
        try:
            start.wait()
            for r in range(25):
                b = backends[(i + r) % len(backends)]
                for op, call in jobs.items():
                    got = flat(call(b))
                    for a, e in zip(got, want[(op, b)], strict=True):
                        assert torch.equal(a, e), (op, b)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


def test_first_use_from_many_threads_at_once():
    """The lazy backend loading races in a fresh process: 16 threads make the first calls."""
    code = (
        "import threading, torch, omnifuse_fast as of\n"
        "z = torch.randn(4, 3, 5); y = torch.randint(0, 5, (4,))\n"
        "out, errs = [], []\n"
        "bar = threading.Barrier(16)\n"
        "def run(i):\n"
        "    try:\n"
        "        bar.wait()\n"
        "        b = ('auto', 'reference', 'cpu')[i % 3]\n"
        "        if b == 'cpu' and 'cpu' not in of.available_backends(): b = 'auto'\n"
        "        out.append(float(of.dwfuse_loss(z, y, backend=b)))\n"
        "    except BaseException as e:\n"
        "        errs.append(repr(e))\n"
        "ts = [threading.Thread(target=run, args=(i,)) for i in range(16)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "assert not errs, errs\n"
        "assert len(out) == 16 and max(out) - min(out) < 1e-5, out\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def test_zz_fuzz_case_counts():
    """Every op was fuzzed (when the fuzz tests ran in this session): print the counts."""
    ran = {op for op, backend in FUZZ_CASES if backend == "cpu"}
    if not set(OPS) <= ran:
        pytest.skip("the fuzz tests of this module did not all run in this session")
    lines = [f"{op:>32} {backend:>9}: {n}" for (op, backend), n in sorted(FUZZ_CASES.items())]
    print("\nfuzz cases per (op, backend):\n" + "\n".join(lines))
    for op in OPS:
        assert FUZZ_CASES[(op, "cpu")] >= EXAMPLES["cpu"] // 2, op
