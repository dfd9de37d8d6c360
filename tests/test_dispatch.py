"""The dispatcher: "auto" choice, reasons for unavailable backends, errors, thread safety."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from _harness import EXPECT_ENV, OPS

import omnifuse_fast as of
from omnifuse_fast import _dispatch, ops, reference

CPU = torch.device("cpu")
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture
def isolated(monkeypatch):
    """Every backend loaded once, then the registry's tables swapped for copies we may edit."""
    for b in _dispatch.BACKENDS:
        _dispatch.unavailable_reason("dwfuse_loss", b, CPU)
    monkeypatch.setattr(_dispatch, "_impls", dict(_dispatch._impls))
    monkeypatch.setattr(_dispatch, "_availability", dict(_dispatch._availability))
    monkeypatch.setattr(_dispatch, "_load_errors", dict(_dispatch._load_errors))
    monkeypatch.setattr(_dispatch, "_guards", dict(_dispatch._guards))
    monkeypatch.setattr(_dispatch, "_usage", {})
    monkeypatch.setattr(_dispatch, "_fallbacks", {})
    monkeypatch.setattr(_dispatch, "_warned", set())
    return monkeypatch


def _off(reason):
    return lambda device: reason


def test_ops_table_is_every_public_op():
    """_dispatch.OPS, the one list of op names, is exactly the public functions with backend=."""
    public = {
        name
        for name, fn in vars(ops).items()
        if inspect.isfunction(fn) and "backend" in inspect.signature(fn).parameters
    }
    assert public == set(_dispatch.OPS)
    assert set(_dispatch.OPS.values()) == set(_dispatch.FAMILIES)


def test_reference_registered_for_every_op():
    for op in OPS:
        assert _dispatch.resolve(op, "reference", CPU).impl is getattr(reference, op)


def test_auto_falls_back_to_reference_when_nothing_else(isolated):
    for b in ("cpu", "triton", "cuda"):
        _dispatch.set_availability(b, _off(f"{b} switched off for the test"))
    for device in ("cpu", "cuda", "meta"):
        for op in OPS:
            assert _dispatch.resolve(op, "auto", torch.device(device)).impl is getattr(
                reference, op
            )
    assert of.available_backends("cpu") == ["reference"]


def test_auto_prefers_an_available_fast_backend(isolated):
    def fake(*args):
        return "fake"

    _dispatch.set_availability("cpu", lambda device: None)
    _dispatch.register("dwfuse_loss", "cpu", fake)
    assert _dispatch.resolve("dwfuse_loss", "auto", CPU).impl is fake
    # an op the fast backend does not implement still falls back to the reference
    isolated.delitem(_dispatch._impls, ("tla_loss", "cpu"), raising=False)
    assert _dispatch.resolve("tla_loss", "auto", CPU).impl is reference.tla_loss

    # CUDA tensors: cuda before triton, both before reference
    def fake_cuda(*args):
        return "cuda"

    def fake_triton(*args):
        return "triton"

    _dispatch.set_availability("cuda", lambda device: None)
    _dispatch.set_availability("triton", lambda device: None)
    _dispatch.register("dwfuse_loss", "cuda", fake_cuda)
    _dispatch.register("dwfuse_loss", "triton", fake_triton)
    cuda = torch.device("cuda")
    assert _dispatch.resolve("dwfuse_loss", "auto", cuda).impl is fake_cuda
    isolated.delitem(_dispatch._impls, ("dwfuse_loss", "cuda"))
    assert _dispatch.resolve("dwfuse_loss", "auto", cuda).impl is fake_triton
    isolated.delitem(_dispatch._impls, ("dwfuse_loss", "triton"))
    assert _dispatch.resolve("dwfuse_loss", "auto", cuda).impl is reference.dwfuse_loss


def test_public_op_with_auto_runs_reference_when_nothing_else(isolated):
    for b in ("cpu", "triton", "cuda"):
        _dispatch.set_availability(b, _off("off"))
    z = torch.randn(3, 2, 4)
    y = torch.tensor([0, 3, 1])
    assert torch.equal(of.dwfuse_loss(z, y), reference.dwfuse_loss(z, y))


def test_explicit_unavailable_backend_names_it_and_why(isolated):
    _dispatch.set_availability("cpu", _off("the test switched it off"))
    with pytest.raises(RuntimeError, match=r"'cpu' is not available .*the test switched it off"):
        of.dwfuse_weights(torch.randn(2, 2, 3), torch.tensor([0, 1]), backend="cpu")


def test_real_unavailable_backends_raise_with_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    z, y = torch.randn(2, 3), torch.tensor([0, 2])
    for b in ("cuda", "triton"):  # no CUDA tensors here, so neither can run
        reason = _dispatch.unavailable_reason("tla_loss", b, CPU)
        assert reason, f"{b} should not run on CPU tensors"
        with pytest.raises(RuntimeError) as info:
            of.tla_loss(z, y, torch.tensor([1, 1]), 1, backend=b)
        assert f"'{b}'" in str(info.value) and reason in str(info.value)


def test_cpu_backend_reason_when_missing():
    reason = _dispatch.unavailable_reason("soft_cross_entropy", "cpu", CPU)
    if reason is None:
        pytest.skip("the C++ CPU kernels are built here")
    assert "extension" in reason or "implementation" in reason
    with pytest.raises(RuntimeError, match="'cpu'"):
        of.soft_cross_entropy(torch.randn(2, 3), torch.rand(2, 3), backend="cpu")


def test_failed_loader_is_reported_not_fatal(isolated):
    isolated.setitem(_dispatch._LOADERS, "triton", ("omnifuse_fast._no_such_module_for_test",))
    isolated.setattr(_dispatch, "_loaded", _dispatch._loaded - {"triton"})
    if hasattr(_dispatch, "_ready"):
        isolated.setattr(_dispatch, "_ready", _dispatch._ready - {"triton"})
    _dispatch._load_errors.pop("triton", None)
    reason = _dispatch.unavailable_reason("dwfuse_loss", "triton", torch.device("cuda"))
    assert "failed to load" in reason and "ModuleNotFoundError" in reason
    with pytest.raises(RuntimeError, match="'triton'.*failed to load"):
        _dispatch.resolve("dwfuse_loss", "triton", torch.device("cuda"))
    # auto still works: it skips the broken backend
    for b in ("cuda", "cpu"):
        _dispatch.set_availability(b, _off("off"))
    assert (
        _dispatch.resolve("dwfuse_loss", "auto", torch.device("cuda")).impl is reference.dwfuse_loss
    )


def test_backend_without_the_op_is_explained(isolated):
    _dispatch.set_availability("cpu", lambda device: None)
    isolated.delitem(_dispatch._impls, ("mgda_min_norm", "cpu"), raising=False)
    with pytest.raises(RuntimeError, match="no implementation of 'mgda_min_norm'"):
        _dispatch.resolve("mgda_min_norm", "cpu", CPU)


@pytest.mark.parametrize("name", ["gpu", "Reference", "", "auto ", None, 3])
def test_unknown_backend_is_value_error(name):
    with pytest.raises(ValueError, match="backend"):
        _dispatch.resolve("dwfuse_loss", name, CPU)
    with pytest.raises(ValueError, match="backend"):
        of.soft_cross_entropy(torch.randn(2, 3), torch.rand(2, 3), backend=name)


def test_register_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        _dispatch.register("dwfuse_loss", "opencl", lambda *a: None)


def test_available_backends_lists_reference_first_class():
    names = of.available_backends("cpu")
    assert "reference" in names and set(names) <= set(_dispatch.BACKENDS)
    assert of.BACKENDS == ("reference", "cpu", "triton", "cuda")


def _workload(seed: int):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(8, 3, 5, generator=g)
    y = torch.randint(0, 5, (8,), generator=g)
    comb = torch.randint(1, 8, (8,), generator=g)
    src = torch.randint(0, 8, (3, 8), generator=g)
    return z, y, comb, src


def _run(z, y, comb, src, backend):
    return [
        of.dwfuse_loss(z, y, backend=backend),
        of.dwfuse_weights(z, y, backend=backend),
        of.tla_stats(z[:, 0], y, comb, 3, backend=backend)[0],
        of.tla_loss(z[:, 1], y, comb, 3, backend=backend),
        of.modality_mix(z, y, src, 5, backend=backend)[1],
        of.soft_cross_entropy(z[:, 2], torch.softmax(z[:, 0], 1), backend=backend),
        of.mimo_combine([z[0]], [z[1]], backend=backend)[0][0],
    ]


def test_threads_calling_ops_concurrently():
    cases = [_workload(s) for s in range(4)]
    want = [_run(*c, "reference") for c in cases]
    errors, barrier = [], threading.Barrier(8)

    def worker(tid):
        try:
            barrier.wait()
            for it in range(15):
                i = (tid + it) % len(cases)
                got = _run(*cases[i], "auto" if it % 2 else "reference")
                for a, b in zip(got, want[i]):
                    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        except Exception as exc:  # collected: pytest only sees the main thread's failures
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


def test_threads_racing_the_first_lazy_load():
    """A fresh interpreter where 8 threads hit every op's first dispatch at the same moment."""
    code = textwrap.dedent(
        """
        import threading, torch, omnifuse_fast as of
        from omnifuse_fast import _dispatch
        # import preloads the backends (so a first call under torch.compile needs no load);
        # forget that, so the 8 threads race through the lazy loader's lock again
        assert "reference" in _dispatch._loaded and "cpu" in _dispatch._loaded
        _dispatch._loaded.clear(); _dispatch._ready.clear()
        barrier, errors, results = threading.Barrier(8), [], {}
        z = torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(0))
        y = torch.tensor([0, 1, 2, 3, 0, 1])
        def work(t):
            try:
                barrier.wait()
                backend = "auto" if t % 2 else "reference"
                results[t] = (
                    of.dwfuse_loss(z, y, backend=backend).item(),
                    of.tla_loss(z[:, 0], y, torch.tensor([1, 3, 3, 2, 1, 3]), 3,
                                backend=backend).item(),
                    of.combination_ids(z[:, :, 0] > 0, backend=backend).tolist()
                    if bool((z[:, :, 0] > 0).any(1).all()) else None,
                )
            except Exception as exc:
                errors.append(repr(exc))
        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert not errors, errors
        assert len(results) == 8
        # threads on one backend agree exactly; "auto" (maybe a fast path) agrees closely
        for t in range(2, 8):
            assert results[t] == results[t % 2], (t, results)
        (a0, a1, a2), (r0, r1, r2) = results[1], results[0]
        assert abs(a0 - r0) < 1e-5 * abs(r0) and abs(a1 - r1) < 1e-5 * abs(r1) and a2 == r2
        print("ok", sorted(_dispatch._loaded))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("ok") and "reference" in proc.stdout


@pytest.mark.backend("cpu")
def test_auto_trains_on_the_cpu_cra_cascade():
    """Measured (benchmarks/NOTES.md): the C++ CRA fwd+bwd now beats autograd on CPU."""
    for needs_grad in (False, True):
        choice = _dispatch.resolve("cra_forward", "auto", CPU, needs_grad=needs_grad)
        assert choice.backend == "cpu"
        assert choice.impl is _dispatch._impls[("cra_forward", "cpu")]


def test_auto_passes_over_a_backend_measured_slower_for_training(isolated):
    """The skip list: "auto" passes over an entry only when gradients are needed."""
    isolated.setattr(_dispatch, "_AUTO_SKIP_WITH_GRAD", {("dwfuse_loss", "cpu", "cpu")})
    _dispatch.set_availability("cpu", lambda device: None)
    _dispatch.register("dwfuse_loss", "cpu", lambda *a: "fast")
    assert _dispatch.resolve("dwfuse_loss", "auto", CPU).backend == "cpu"
    assert _dispatch.resolve("dwfuse_loss", "auto", CPU, needs_grad=True).backend == "reference"
    # an explicit backend is always honoured
    assert _dispatch.resolve("dwfuse_loss", "cpu", CPU, needs_grad=True).backend == "cpu"


# ----------------------------------------------------------------- usage and fallback record


def test_usage_records_the_backend_that_ran_per_family(isolated):
    z, y = torch.randn(4, 2, 3), torch.tensor([0, 1, 2, 0])
    of.dwfuse_loss(z, y, backend="reference")
    of.soft_cross_entropy(z[:, 0], torch.softmax(z[:, 1], 1), backend="reference")
    assert _dispatch.backend_usage() == {"dwfuse": "reference", "mix": "reference"}
    _dispatch.reset_backend_usage()
    assert _dispatch.backend_usage() == {}


def test_ops_run_unrecorded_leave_the_usage_record_as_it_was(isolated):
    z, y = torch.randn(4, 2, 3), torch.tensor([0, 1, 2, 0])
    of.dwfuse_loss(z, y, backend="reference")
    with _dispatch.unrecorded():  # e.g. the trainer's probe of which parameters train
        of.soft_cross_entropy(z[:, 0], torch.softmax(z[:, 1], 1), backend="reference")
        of.dwfuse_loss(z, y, backend="reference")
        assert _dispatch.backend_usage() == {"dwfuse": "reference", "mix": "reference"}
    assert _dispatch.backend_usage() == {"dwfuse": "reference"}


def test_a_fallback_moves_the_call_to_the_backend_that_ran(isolated):
    _dispatch.set_availability("cpu", lambda device: None)
    _dispatch.register("dwfuse_loss", "cpu", lambda *a: "cpu ran")
    _dispatch.resolve("dwfuse_loss", "cpu", CPU)
    assert _dispatch.backend_usage() == {"dwfuse": "cpu"}
    with pytest.warns(UserWarning, match="cpu dwfuse_loss falls back to the reference: why"):
        _dispatch.fallback("dwfuse_loss", "cpu", "reference", "why")
    assert _dispatch.backend_usage() == {"dwfuse": "reference"}  # cpu did not run this call
    assert _dispatch.fallback_reasons() == {("dwfuse_loss", "cpu"): "why"}
    _dispatch.resolve("dwfuse_loss", "cpu", CPU)  # a second call that stays on cpu
    assert _dispatch.backend_usage() == {"dwfuse": "cpu+reference"}
    _dispatch.clear_fallbacks()
    assert _dispatch.fallback_reasons() == {}


def test_a_guard_sends_inputs_a_backend_cannot_take_to_the_reference(isolated):
    _dispatch.set_availability("cpu", lambda device: None)
    _dispatch.register("soft_cross_entropy", "cpu", lambda z, q: "fast")
    _dispatch.register_guard(
        "soft_cross_entropy",
        "cpu",
        lambda z, q: "fp64 inputs" if z.dtype == torch.float64 else None,
    )
    z = torch.randn(3, 4)
    q = torch.softmax(z, 1)
    assert of.soft_cross_entropy(z, q, backend="cpu") == "fast"
    assert _dispatch.backend_usage() == {"mix": "cpu"} and not _dispatch.fallback_reasons()
    _dispatch.reset_backend_usage()
    with pytest.warns(UserWarning, match="falls back to the reference: fp64 inputs"):
        got = of.soft_cross_entropy(z.double(), q.double(), backend="cpu")
    assert torch.equal(got, reference.soft_cross_entropy(z.double(), q.double()))
    assert _dispatch.backend_usage() == {"mix": "reference"}
    assert _dispatch.fallback_reasons() == {("soft_cross_entropy", "cpu"): "fp64 inputs"}


def test_cuda_cra_guard_names_each_limit():
    """The CUDA CRA guard (no GPU needed for these): what the fused kernel cannot take."""
    from omnifuse_fast.compiled._cuda_cra import fused_reason, smem_bytes

    def args(f, h, dtype=torch.float32, offset=0):
        x = torch.zeros(2 * f + offset, dtype=dtype)[offset:].view(2, f)
        return x, torch.zeros(1, h, f, dtype=dtype), None, torch.zeros(1, f, h, dtype=dtype), None

    assert "fp32, bf16 and fp16" in fused_reason(*args(32, 16, torch.float64))
    assert "multiples of 16" in fused_reason(*args(72, 16))
    assert "multiples of 16" in fused_reason(*args(32, 24))
    assert "F <= 1024" in fused_reason(*args(1040, 16))
    assert "H <= 256" in fused_reason(*args(32, 272))
    assert "aligned" in fused_reason(*args(32, 16, offset=1))
    # the shared-memory plan of cra.cuh: fp32 SIMT tile and fp16 tensor-core tile at the limits
    assert smem_bytes(1024, 256, 4) == 4 * 16 * 1028 + 4 * 16 * 260
    assert smem_bytes(1024, 256, 2) == 65792 + 33024 + 16640 + 8448


# ------------------------------------------------------------------------ expected backends


def _pytest(tmp_path, env: dict, *args: str, poison: str = ""):
    """pytest in a fresh process on a one-test file gated by the cpu backend; ``poison``: a
    module made unimportable there (a broken build)."""
    test = tmp_path / "test_gated.py"
    test.write_text("import pytest\n\n@pytest.mark.backend('cpu')\ndef test_cpu():\n    pass\n")
    tests = ROOT / "tests"
    (tmp_path / "conftest.py").write_text(  # the suite's own hooks, run in this folder
        f"import sys\nsys.path.insert(0, {str(tests)!r})\n"
        + (f"sys.modules[{poison!r}] = None\n" if poison else "")
        + f"exec(open({str(tests / 'conftest.py')!r}).read())\n"
    )
    full_env = {k: v for k, v in __import__("os").environ.items() if k != EXPECT_ENV}
    full_env.update(env)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test), *args]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env=full_env, cwd=tmp_path
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_expected_backend_that_fails_to_load_fails_the_suite(tmp_path):
    # omnifuse_fast.triton made unimportable: the triton backend fails to load
    rc, out = _pytest(tmp_path, {EXPECT_ENV: "cpu,triton"}, poison="omnifuse_fast.triton")
    assert rc == 1, out[-3000:]
    assert "expects backends that cannot run here" in out and "triton: it failed to load" in out
    assert "ModuleNotFoundError" in out, out[-3000:]


def test_missing_backend_skips_unless_expected(tmp_path):
    # the compiled extension made unimportable: the cpu backend is missing
    rc, out = _pytest(tmp_path, {}, "-rs", poison="omnifuse_fast._C")
    assert rc == 0 and "1 skipped" in out and "extension is not built" in out, out[-3000:]
    rc, out = _pytest(tmp_path, {EXPECT_ENV: "cpu"}, poison="omnifuse_fast._C")
    assert rc == 1 and "cpu: the compiled extension is not built" in out, out[-3000:]


def test_misspelt_expected_backend_is_an_error(tmp_path):
    rc, out = _pytest(tmp_path, {EXPECT_ENV: "cpu,trition"})
    assert rc != 0 and "trition" in out, out[-3000:]
