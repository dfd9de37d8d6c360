"""Value checks on the device (omnifuse_fast/_device_checks.py), on the Triton interpreter.

The Python value pass does not run for the triton backend (it is kernel-checked, SPEC section 7),
and not at all with ``set_value_checks(False)`` or inside ``torch.compile``: a bad label, comb or
src must still raise the clear error, from the kernel's flag. On CPU tensors (the interpreter)
the flag is read and the error is ``_checks``' ValueError, word for word; on a GPU it is a
``torch._assert_async`` (tested here through a stand-in device, and for real in
``tests/test_device_checks_gpu*.py``). No kernel may touch memory outside its tensors. The interpreter runs
the kernels on CPU tensors; :class:`Bounds` watches every load, store and atomic it makes and
records each address a kernel would touch outside the extent of every tensor argument of the
launch (test inputs sit inside larger buffers, so a near miss lands in padding, not in another
argument). The recorded access is skipped, so a bad address cannot crash the test run.

The CUDA side cannot run here: the same slots and messages are checked in its sources, and
``tests/test_cuda_compile.py`` / ``tests/test_device_checks_gpu.py`` cover the rest.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from _harness import compiled_opaque

import omnifuse_fast as of
from omnifuse_fast import _device_checks, _dispatch
from omnifuse_fast._checks import NonFiniteInputError

pytest.importorskip("triton")

import triton.language as tl  # noqa: E402
from torch._subclasses.fake_tensor import is_fake  # noqa: E402
from triton.runtime.interpreter import InterpreterBuilder, TensorHandle  # noqa: E402

from omnifuse_fast.triton import _common, dwfuse, mix, tla  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
B, M, C, D = 9, 3, 5, 6


@pytest.fixture(scope="module", autouse=True)
def _interpret():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        reason = _dispatch.unavailable_reason("dwfuse_loss", "triton", torch.device("cpu"))
        if reason is not None:
            pytest.skip(f"the triton backend cannot run here: {reason}")
        yield


@pytest.fixture
def checks_off():
    of.set_value_checks(False)
    try:
        yield
    finally:
        of.set_value_checks(True)


def padded(t: torch.Tensor) -> torch.Tensor:
    """``t`` (contiguous) in the middle of a buffer three times its size, NaN/-1 around it."""
    n = t.numel()
    fill = float("nan") if t.is_floating_point() else -1
    buf = torch.full((3 * n,), fill, dtype=t.dtype)
    view = buf[n : 2 * n].view(t.shape)
    view.copy_(t)
    return view.requires_grad_(t.requires_grad)


def _extent(t: torch.Tensor) -> tuple[int, int]:
    if t.numel() == 0:
        return (0, 0)
    last = sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


class Bounds:
    """Records interpreted memory accesses outside every tensor argument of the launch."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.violations: list[str] = []
        self.accesses = 0
        self._extents: list[tuple[int, int]] = []
        self._kernel = "?"
        original = _common.launch
        for module in (dwfuse, tla, mix):
            monkeypatch.setattr(module, "launch", self._wrap(original))
        self.launch = self._wrap(original)
        b = InterpreterBuilder
        load, store = b.create_masked_load, b.create_masked_store
        rmw, cas = b.create_atomic_rmw, b.create_atomic_cas

        def masked_load(builder, ptrs, mask, other, *rest):
            return load(builder, ptrs, self._check(ptrs, mask), other, *rest)

        def masked_store(builder, ptrs, value, mask, *rest):
            return store(builder, ptrs, value, self._check(ptrs, mask), *rest)

        def atomic_rmw(builder, op, ptr, val, mask, *rest):
            return rmw(builder, op, ptr, val, self._check(ptr, mask), *rest)

        def atomic_cas(builder, ptr, cmp, val, *rest):
            self._check(ptr, TensorHandle(np.ones_like(ptr.data, dtype=bool), None))
            return cas(builder, ptr, cmp, val, *rest)

        monkeypatch.setattr(b, "create_masked_load", masked_load)
        monkeypatch.setattr(b, "create_masked_store", masked_store)
        monkeypatch.setattr(b, "create_atomic_rmw", atomic_rmw)
        monkeypatch.setattr(b, "create_atomic_cas", atomic_cas)

    def _wrap(self, launch):
        def wrapped(kernel, grid, *args, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            if any(is_fake(t) for t in tensors):  # torch.compile computing shapes: no launch
                return launch(kernel, grid, *args, **kwargs)
            saved = self._extents, self._kernel
            self._extents = [_extent(t) for t in tensors]
            self._kernel = kernel.fn.__name__
            try:
                return launch(kernel, grid, *args, **kwargs)
            finally:
                self._extents, self._kernel = saved

        return wrapped

    def _check(self, ptrs, mask) -> TensorHandle:
        """The mask with every access outside the launch's tensors removed (and recorded)."""
        addr = np.broadcast_to(ptrs.data, np.shape(mask.data)).astype(np.uint64)
        width = max(ptrs.get_element_ty().primitive_bitwidth // 8, 1)
        inside = np.zeros(addr.shape, dtype=bool)
        for lo, hi in self._extents:
            inside |= (addr >= lo) & (addr + width <= hi)
        live = np.asarray(mask.data, dtype=bool)
        self.accesses += int(live.sum())
        bad = live & ~inside
        if bad.any():
            self.violations.append(f"{self._kernel}: {int(bad.sum())} accesses out of bounds")
        return TensorHandle(live & inside, mask.dtype)


@pytest.fixture
def bounds(monkeypatch):
    checker = Bounds(monkeypatch)
    yield checker
    assert checker.accesses > 0, "the bounds checker saw no memory access: is it wired in?"
    assert not checker.violations, checker.violations


# ------------------------------------------------------------------------- the checker itself


@_common.jit
def _gather_kernel(x_ptr, idx_ptr, out_ptr, N, MASK_INDEX: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    ok = offs < N
    idx = tl.load(idx_ptr + offs, mask=ok, other=0)
    if MASK_INDEX:
        ok = ok & (idx >= 0) & (idx < N)
    tl.store(out_ptr + offs, tl.load(x_ptr + idx, mask=ok, other=0.0), mask=offs < N)


@pytest.mark.parametrize("mask_index", [False, True], ids=["unmasked", "masked"])
def test_the_bounds_checker_catches_an_unmasked_index(monkeypatch, mask_index):
    checker = Bounds(monkeypatch)
    x, out = padded(torch.arange(8.0)), padded(torch.zeros(8))
    idx = padded(torch.tensor([0, 1, 2, 3, 4, 5, 6, 8]))  # 8: one past the end of x
    checker.launch(_gather_kernel, (1,), x, idx, out, 8, MASK_INDEX=mask_index, BLOCK=8)
    assert checker.accesses > 0
    if mask_index:
        assert not checker.violations
    else:
        assert checker.violations == ["_gather_kernel: 1 accesses out of bounds"]
    assert out[:7].tolist() == list(range(7))


# ---------------------------------------------------------------- the same slots in CUDA code


def test_cuda_sources_use_the_same_slots_and_messages():
    common = (ROOT / "csrc" / "cuda" / "common.cuh").read_text()
    binding = (ROOT / "csrc" / "cuda" / "binding.h").read_text()
    slots = {
        "kFlagLabels": _device_checks.LABELS,
        "kFlagComb": _device_checks.COMB,
        "kFlagSrc": _device_checks.SRC,
        "kFlagMultilabel": _device_checks.MULTILABEL,
        "kFlagLogits": _device_checks.LOGITS,
        "kFlagSoftLabels": _device_checks.SOFT_LABELS,
        "kFlagPresent": _device_checks.PRESENT,
        "kFlagWeights": _device_checks.WEIGHTS,
        "kFlagGrads": _device_checks.GRADS,
        "kFlagX": _device_checks.X,
        "kNumFlagSlots": _device_checks.NUM_SLOTS,
    }
    for name, value in slots.items():
        assert re.search(rf"\b{name} = {value},", common), name
    body = binding[binding.index("flag_message(int slot)") :]
    body = body[: body.index("\n}\n")]
    assert set(re.findall(r'return "([^"]+)";', body)) == set(_device_checks.MESSAGES.values())
    assert "(value check on the device)" in binding
    assert "kSimplexTol = 1e-3f + 1e-5f;" in common
    assert _device_checks.SIMPLEX_TOL == 1e-3 + 1e-5
    assert _device_checks.message("x", 0).endswith("(value check on the device)")


def test_flags_on_cpu_raise_the_python_checks_error():
    """CPU tensors (the interpreter): the flag is read and the flagged rule's Python check runs,
    so the error is _checks' ValueError, word for word (the reference's)."""
    flags = _device_checks.new_flags(torch.device("cpu"))
    src = torch.tensor([[0, 1, 2], [2, 1, 0]])
    _device_checks.raise_if_flagged(flags, "op", tuple(_device_checks.MESSAGES), src=src)
    flags[_device_checks.SRC] = 0
    with pytest.raises(ValueError, match=r"^src source indices must be in \[0, 2\], got min -1"):
        _device_checks.raise_if_flagged(
            flags, "op", (_device_checks.SRC,), src=torch.tensor([[0, 1, 2], [2, -1, 0]])
        )
    # a flag the Python check does not confirm (a kernel bug) still raises, never returns
    with pytest.raises(ValueError, match=r"omnifuse_fast\.op: src must be source indices"):
        _device_checks.raise_if_flagged(flags, "op", (_device_checks.SRC,), src=src)
    # a flagged slot the op does not check is not this op's error
    _device_checks.raise_if_flagged(flags, "op", (_device_checks.LABELS,))


def test_every_slot_has_a_python_check():
    """host_check covers every slot: the one map from a slot to the host's error."""
    z = torch.zeros(2, 3)
    bad = {
        _device_checks.LABELS: dict(labels=torch.tensor([0, 3]), num_classes=3),
        _device_checks.COMB: dict(comb=torch.tensor([0, 1]), num_modalities=2),
        _device_checks.SRC: dict(src=torch.tensor([[0, 2]])),
        _device_checks.MULTILABEL: dict(labels=torch.tensor([0.0, 0.5])),
        _device_checks.LOGITS: dict(logits=z.log(), logits_name="modality_logits"),
        _device_checks.SOFT_LABELS: dict(soft_labels=z.log()),
        _device_checks.PRESENT: dict(present=torch.tensor([[True], [False]])),
        _device_checks.WEIGHTS: dict(weights=torch.tensor([0.5, 0.6])),
        _device_checks.GRADS: dict(grads={"g0": [z], "gw": [z.log()]}),
        _device_checks.X: dict(x=z.log()),
    }
    assert set(bad) == set(_device_checks.MESSAGES) == set(range(_device_checks.NUM_SLOTS))
    for slot, args in bad.items():
        with pytest.raises(ValueError):
            _device_checks.host_check(slot, **args)


def test_flags_on_a_gpu_are_device_asserts_without_a_host_read(monkeypatch):
    """Off the CPU, raise_if_flagged queues one ``_assert_async`` per slot and reads nothing
    (the meta device stands in for a GPU here: any host read of it would fail)."""
    calls = []
    monkeypatch.setattr(torch, "_assert_async", lambda t, msg: calls.append((t.device, msg)))
    flags = _device_checks.new_flags(torch.device("meta"))
    slots = (_device_checks.LABELS, _device_checks.LOGITS)
    _device_checks.raise_if_flagged(flags, "dwfuse_loss", slots, labels=None, logits=None)
    assert calls == [
        (torch.device("meta"), _device_checks.message("dwfuse_loss", s)) for s in slots
    ]
    assert calls[0][1] == (
        "omnifuse_fast.dwfuse_loss: labels must be class indices in [0, C) "
        "(value check on the device)"
    )


# ------------------------------------------------------------------ bad values, checks off


def gen(seed):
    return torch.Generator().manual_seed(seed)


def dw(multilabel=False):
    z = torch.randn(B, M, C, generator=gen(0))
    if multilabel:
        return padded(z), padded(torch.randint(0, 2, (B, C), generator=gen(1)).float())
    return padded(z), padded(torch.randint(0, C, (B,), generator=gen(1)))


def tla_in():
    z = torch.randn(B, C, generator=gen(2))
    y = torch.randint(0, C, (B,), generator=gen(3))
    comb = torch.randint(1, 1 << M, (B,), generator=gen(4))
    return padded(z), padded(y), padded(comb)


def mix_in():
    v = torch.randn(B, M, D, generator=gen(5))
    y = torch.randint(0, C, (B,), generator=gen(6))
    src = torch.stack([torch.randperm(B, generator=gen(7 + m)) for m in range(M)])
    return padded(v), padded(y), padded(src)


def with_value(t: torch.Tensor, index, value) -> torch.Tensor:
    bad = t.detach().clone()
    bad[index] = value
    return padded(bad)


BAD_LABELS = [C, -1, 10**6]
BAD_SRC = [B, -1, 10**6]


def test_good_values_pass_and_stay_inside(bounds, checks_off):
    z, y = dw()
    grads = []
    for backend in ("triton", "reference"):
        zz = z.detach().clone().requires_grad_()
        of.dwfuse_loss(zz, y, 0.5, False, backend=backend).backward()
        grads.append(zz.grad)
    torch.testing.assert_close(*grads)
    zml, yml = dw(multilabel=True)
    torch.testing.assert_close(
        of.dwfuse_weights(zml, yml, backend="triton", multilabel=True),
        of.dwfuse_weights(zml, yml, multilabel=True),
    )
    z2, y2, comb = tla_in()
    torch.testing.assert_close(
        of.tla_stats(z2, y2, comb, M, backend="triton"), of.tla_stats(z2, y2, comb, M)
    )
    of.tla_loss(z2.requires_grad_(), y2, comb, int(comb[0]), backend="triton").backward()
    v, y3, src = mix_in()
    w = torch.full((B, M), 1.0 / M, requires_grad=True)
    got = of.modality_mix(v.requires_grad_(), y3, src, C, w, backend="triton")
    want = of.modality_mix(v, y3, src, C, w, backend="reference")
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
    sum(o.sum() for o in got).backward()


@pytest.mark.parametrize("value", BAD_LABELS)
@pytest.mark.parametrize("op", ["dwfuse_loss", "dwfuse_weights"])
def test_dwfuse_bad_labels(bounds, checks_off, op, value):
    z, y = dw()
    with pytest.raises(ValueError, match=rf"^labels class indices must be in \[0, {C - 1}\]"):
        getattr(of, op)(z, with_value(y, 4, value), backend="triton")


@pytest.mark.parametrize("op", ["dwfuse_loss", "dwfuse_weights"])
def test_dwfuse_bad_multilabel_targets(bounds, checks_off, op):
    z, y = dw(multilabel=True)
    with pytest.raises(ValueError, match=r"^labels \(multilabel\) must hold only 0 and 1"):
        getattr(of, op)(z, with_value(y, (2, 3), 0.5), backend="triton", multilabel=True)


@pytest.mark.parametrize("value", BAD_LABELS)
def test_tla_bad_labels(bounds, checks_off, value):
    z, y, comb = tla_in()
    bad = with_value(y, 7, value)
    with pytest.raises(ValueError, match=r"^labels class indices must be in"):
        of.tla_stats(z, bad, comb, M, "l2", backend="triton")
    with pytest.raises(ValueError, match=r"^labels class indices must be in"):
        of.tla_loss(z, bad, comb, int(comb[0]), backend="triton")


@pytest.mark.parametrize("value", [0, -1, 1 << M, 10**6])
def test_tla_bad_comb(bounds, checks_off, value):
    z, y, comb = tla_in()
    bad = with_value(comb, 2, value)
    with pytest.raises(
        ValueError, match=rf"^comb combination ids must be in \[1, {(1 << M) - 1}\]"
    ):
        of.tla_stats(z, y, bad, M, backend="triton")
    if value != 1 << M:  # tla_loss does not know M: any id of up to 8 modalities is fine
        with pytest.raises(ValueError, match=r"^comb combination ids must be in \[1, 255\]"):
            of.tla_loss(z, y, bad, 1, backend="triton")


@pytest.mark.parametrize("weights", [False, True], ids=["uniform", "weights"])
@pytest.mark.parametrize("value", BAD_SRC)
def test_mix_bad_src(bounds, checks_off, value, weights):
    v, y, src = mix_in()
    w = torch.full((B, M), 1.0 / M) if weights else None
    with pytest.raises(ValueError, match=rf"^src source indices must be in \[0, {B - 1}\]"):
        of.modality_mix(v, y, with_value(src, (1, 3), value), C, w, backend="triton")


@pytest.mark.parametrize("value", BAD_LABELS)
def test_mix_bad_labels(bounds, checks_off, value):
    v, y, src = mix_in()
    with pytest.raises(ValueError, match=r"^labels class indices must be in"):
        of.modality_mix(v, with_value(y, 5, value), src, C, backend="triton")


def test_present_without_a_modality(bounds, checks_off):
    present = torch.rand(B, M, generator=gen(12)) < 0.5
    present[:, 0] = True
    torch.testing.assert_close(
        of.combination_ids(padded(present), backend="triton"), of.combination_ids(present)
    )
    present[6] = False
    with pytest.raises(
        ValueError, match=r"^present has a sample with no present modality \(row 6\)"
    ):
        of.combination_ids(padded(present), backend="triton")


@pytest.mark.parametrize("case", ["negative", "sum-above", "sum-below", "nan"])
def test_mix_weights_off_the_simplex(bounds, checks_off, case):
    v, y, src = mix_in()
    w = torch.full((B, M), 1.0 / M)
    w[4] = {
        "negative": torch.tensor([1.5, -0.5, 0.0]),
        "sum-above": torch.tensor([0.5, 0.5, 0.1]),
        "sum-below": torch.tensor([0.3, 0.3, 0.3]),
        "nan": torch.tensor([float("nan"), 0.5, 0.5]),
    }[case]
    with pytest.raises(ValueError, match=r"^weights must be on the simplex"):
        of.modality_mix(v, y, src, C, padded(w), backend="triton")
    w[4] = torch.tensor([0.2, 0.3, 0.5 + 5e-4])  # within the reference check's tolerance
    of.modality_mix(v, y, src, C, padded(w), backend="triton")


NON_FINITE = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("value", NON_FINITE)
def test_non_finite_logits(bounds, checks_off, value):
    for multilabel in (False, True):
        z, y = dw(multilabel)
        for op in ("dwfuse_loss", "dwfuse_weights"):
            with pytest.raises(NonFiniteInputError, match=r"^modality_logits must be finite"):
                getattr(of, op)(
                    with_value(z, (3, 1, 2), value), y, backend="triton", multilabel=multilabel
                )
    z2, y2, comb = tla_in()
    bad = with_value(z2, (5, 4), value)
    with pytest.raises(NonFiniteInputError, match=r"^logits must be finite"):
        of.tla_stats(bad, y2, comb, M, backend="triton")
    with pytest.raises(NonFiniteInputError, match=r"^logits must be finite"):
        of.tla_loss(bad, y2, comb, int(comb[5]), backend="triton")
    q = torch.softmax(z2, 1)
    with pytest.raises(NonFiniteInputError, match=r"^logits must be finite"):
        of.soft_cross_entropy(bad, q, backend="triton")
    with pytest.raises(NonFiniteInputError, match=r"^soft_labels must be finite"):
        of.soft_cross_entropy(z2, with_value(q, (0, 0), value), backend="triton")


def test_tla_loss_checks_only_the_logits_it_reads(bounds, checks_off):
    """The loss reads the lazy combination's rows only: a NaN elsewhere cannot reach it."""
    z2, y2, comb = tla_in()
    comb = with_value(comb, 5, 1)
    comb[comb == 1] = 2
    comb[5] = 1
    bad = with_value(z2, (6, 0), float("nan"))
    got = of.tla_loss(bad, y2, comb, 1, backend="triton")
    torch.testing.assert_close(got, of.tla_loss(z2, y2, comb, 1, backend="reference"))


@pytest.mark.parametrize("n_cls", [3000])
def test_non_finite_logits_in_a_later_tile(bounds, checks_off, n_cls):
    """Rows longer than one tile: the check runs in every tile of the class loop."""
    z = torch.randn(3, 2, n_cls, generator=gen(9))
    y = torch.randint(0, n_cls, (3,), generator=gen(10))
    with pytest.raises(NonFiniteInputError, match=r"^modality_logits must be finite"):
        of.dwfuse_loss(with_value(z, (2, 1, n_cls - 1), float("nan")), padded(y), backend="triton")
    z2 = torch.randn(3, 5000, generator=gen(11))
    q = torch.softmax(z2, 1)
    with pytest.raises(NonFiniteInputError, match=r"^soft_labels must be finite"):
        of.soft_cross_entropy(padded(z2), with_value(q, (1, 4999), float("inf")), backend="triton")
    comb = torch.ones(3, dtype=torch.int64)
    with pytest.raises(NonFiniteInputError, match=r"^logits must be finite"):
        of.tla_stats(with_value(z2, (2, 4998), float("-inf")), padded(y), comb, 2, backend="triton")


# ------------------------------------------- the backward kernels: bad indices stay inside
# (the forward reports them; a backward run on them anyway must still never leave its tensors)


@pytest.mark.parametrize("value", BAD_LABELS)
def test_backward_kernels_never_address_with_bad_labels(bounds, value):
    ops = torch.ops.omnifuse_fast_triton
    z, y = dw()
    bad = with_value(y, 4, value)
    g = torch.ones(())
    for detach in (True, False):
        ops.dwfuse_loss_backward(g, z, bad, 0.5, detach)
    ops.dwfuse_weights_backward(torch.ones(B, M), z, bad, 0.5)
    z2, y2, comb = tla_in()
    ops.tla_loss_backward(g, z2, with_value(y2, 0, value), comb, int(comb[0]))
    v, y3, src = mix_in()
    ops.modality_mix_weights_backward(torch.ones(B, C), with_value(y3, 3, value), src)


@pytest.mark.parametrize("value", BAD_SRC)
def test_backward_kernels_never_address_with_bad_src(bounds, value):
    ops = torch.ops.omnifuse_fast_triton
    v, y, src = mix_in()
    bad = with_value(src, (2, 4), value)
    ops.modality_mix_backward(padded(torch.ones(B, M, D)), bad)
    ops.modality_mix_weights_backward(torch.ones(B, C), y, bad)


# ------------------------------------------------------------------------ under torch.compile


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_bad_values_raise_under_torch_compile(bounds, backend):
    """Value checks on (the default): ``torch.compile`` skips the Python pass, the device
    check still raises."""
    torch._dynamo.reset()
    z, y = dw()
    z2, y2, comb = tla_in()
    v, y3, src = mix_in()

    def step(z, y, z2, y2, comb, v, y3, src):
        loss = of.dwfuse_loss(z, y, backend="triton")
        loss = loss + of.tla_loss(z2, y2, comb, 1, backend="triton")
        v_mix, soft = of.modality_mix(v, y3, src, C, backend="triton")
        return loss + v_mix.sum() + soft.sum()

    fn = compiled_opaque(step, backend)
    args = [z, y, z2, y2, comb, v, y3, src]
    torch.testing.assert_close(fn(*args), step(*args))
    cases = [
        (1, with_value(y, 0, C), r"^labels class indices must be in \[0, 4\], got min \d+, max 5"),
        (4, with_value(comb, 8, 0), r"^comb combination ids must be in \[1, 255\]"),
        (3, with_value(y2, 8, -2), r"^labels class indices must be in \[0, 4\], got min -2"),
        (7, with_value(src, (0, 0), B), r"^src source indices must be in \[0, 8\]"),
    ]
    for i, bad, match in cases:
        with pytest.raises(ValueError, match=match):
            fn(*args[:i], bad, *args[i + 1 :])
