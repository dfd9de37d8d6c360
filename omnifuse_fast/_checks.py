"""Input validation shared by every op.

Shape, dtype and device checks always run, before any backend is chosen: they read metadata
only. Value checks (label and index ranges, finite logits, empty ``present`` rows) read the
data, so (SPEC section 7) they belong where the data is read anyway: the backends of
:data:`KERNEL_CHECKED` check them inside their kernels, and this module's second pass over the
data runs only for the reference (:func:`python_value_checks`; :data:`PYTHON_PASS_RULES` names
the few rules a compiled backend does not check in its kernels yet). That pass can be switched
off with :func:`set_value_checks`, and is skipped while ``torch.compile`` traces (a
data-dependent branch would break the graph); the in-kernel checks always run (they cost a few
percent, and the index checks keep a bad label from touching memory out of bounds).

The C++ CPU kernels raise this module's ValueErrors themselves. The GPU kernels set a device
flag per rule (``omnifuse_fast/_device_checks.py``): on a GPU it becomes a device-side assert
(no host sync), and on CPU tensors (the Triton interpreter) the flag is read and the Python
check of the flagged rule is run with ``force=True``, so the error is this module's, word for
word.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
ACTIVATIONS = ("relu", "gelu", "silu", "tanh")
DISTANCES = ("ce", "l1", "l2")
MIN_MODALITIES, MAX_MODALITIES = 2, 8

_value_checks = True

# Backends whose kernels check the values they read (ranges, finiteness): the C++ CPU kernels
# raise these same errors; the Triton and CUDA kernels set device flags (_device_checks.py).
# Only "reference" reads the data a second time.
KERNEL_CHECKED: frozenset[str] = frozenset({"cpu", "triton", "cuda"})

# Rules a kernel-checked backend does not check in its kernels yet. "x" is CRA's input
# finiteness: the Triton CRA kernel flags it; the C++ CPU kernel does not, so the Python pass
# still checks it for "cpu"; the CUDA kernel does not either, so for "cuda" the op queues a
# device-side check instead (one more read of x, no host sync; CRA's cost is its GEMMs).
PYTHON_PASS_RULES: dict[str, frozenset[str]] = {"cpu": frozenset({"x"})}
DEVICE_PASS_RULES: dict[str, frozenset[str]] = {"cuda": frozenset({"x"})}


def python_value_checks(backend: str, rule: str | None = None) -> bool:
    """Whether the ops run this module's value pass for the chosen ``backend``.

    ``rule`` (``"x"``, ``"weights"``): a rule that some kernels may not check
    (:data:`PYTHON_PASS_RULES`); ``None`` for the rules every kernel checks."""
    if backend not in KERNEL_CHECKED:
        return True
    return rule is not None and rule in PYTHON_PASS_RULES.get(backend, frozenset())


def device_value_checks(backend: str, rule: str) -> bool:
    """Whether ``rule`` is checked for ``backend`` by a device-side pass of the op
    (:data:`DEVICE_PASS_RULES`: its kernels do not flag it, and a host read would sync)."""
    return rule in DEVICE_PASS_RULES.get(backend, frozenset())


class NonFiniteInputError(ValueError):
    """An input holds NaN or inf; the message names the argument.

    A ``ValueError``, so callers that catch bad input keep working; the trainer catches this
    type to explain a mid-training blow-up (see ``omnifuse_fast.train.finite``).
    """


# The words of every non-finite refusal: these checks' messages and the C++ kernels'
# (csrc/cpu/common.h, check_finite_flags), word for word.
NONFINITE_WORDS = "must be finite; it holds NaN or inf"


def refuses_nonfinite(exc: BaseException) -> bool:
    """Whether ``exc`` is an op refusing NaN/inf input: :class:`NonFiniteInputError`, or the
    plain ``ValueError`` the C++ kernels raise (a ``RuntimeError`` once a compiled graph's C++
    wrapper has passed it on) with the same words."""
    if isinstance(exc, NonFiniteInputError):
        return True
    return isinstance(exc, (ValueError, RuntimeError)) and NONFINITE_WORDS in str(exc)


def set_value_checks(enabled: bool) -> None:
    """Turn the Python value checks (label/index ranges, finiteness) on or off for every op.

    This switches off the second pass over the data that the reference path makes (and the
    few rules of :data:`PYTHON_PASS_RULES`). The kernels of the cpu, triton and cuda backends
    check the values as they read them, at a few percent of their time, and keep doing so: a
    bad label never reads or writes out of bounds. The C++ CPU kernels (and the Triton
    interpreter) raise the same ValueError; on a GPU the error is a device-side assert that
    surfaces at the next synchronizing point.
    """
    global _value_checks
    _value_checks = bool(enabled)


def value_checks_enabled() -> bool:
    """Whether value checks run now (on, and not inside a ``torch.compile`` trace)."""
    return _value_checks and not torch.compiler.is_compiling()


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def tensor(
    name: str,
    t: object,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    shape: Sequence[int | None] | None = None,
) -> torch.Tensor:
    """Check that ``t`` is a tensor of the given rank, dtype family and shape (None: any)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        want = f"[{', '.join('?' if s is None else str(s) for s in shape)}]" if shape else ""
        raise ValueError(f"{name} must have {ndim} dimensions {want}, got {_describe(t)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {_describe(t)}")
    if shape is not None:
        for i, (got, want) in enumerate(zip(t.shape, shape)):
            if want is not None and got != want:
                expected = ", ".join("?" if s is None else str(s) for s in shape)
                raise ValueError(
                    f"{name} must have shape [{expected}] (dim {i} = {want}), got {_describe(t)}"
                )
    return t


def floating(name: str, t: object, **kw) -> torch.Tensor:
    """A floating tensor (fp32, bf16, fp16 or fp64)."""
    return tensor(name, t, dtypes=FLOAT_DTYPES, **kw)


def same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given tensors on one device; returns it."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    device = items[0][1].device
    for name, t in items[1:]:
        if t.device != device:
            first = items[0][0]
            raise ValueError(
                f"{name} is on {t.device} but {first} is on {device}: every tensor must be on "
                f"one device; move them (e.g. {name}.to({first}.device))"
            )
    return device


def same_dtype(**tensors: torch.Tensor) -> torch.dtype:
    """All given floating tensors share one dtype; returns it."""
    items = list(tensors.items())
    dtype = items[0][1].dtype
    for name, t in items[1:]:
        if t.dtype != dtype:
            first = items[0][0]
            raise TypeError(
                f"{name} has dtype {t.dtype} but {first} has {dtype}: they must share one dtype; "
                f"cast one (e.g. {name}.to({first}.dtype)), or run under torch.autocast"
            )
    return dtype


def num_modalities(m: int, name: str = "num_modalities") -> int:
    """2 <= M <= 8."""
    if isinstance(m, bool) or not isinstance(m, int):
        raise TypeError(f"{name} must be an int, got {type(m).__name__}")
    if not MIN_MODALITIES <= m <= MAX_MODALITIES:
        raise ValueError(f"{name} must be in {MIN_MODALITIES}..{MAX_MODALITIES}, got {m}")
    return m


def positive_int(name: str, v: object, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def real(name: str, v: object, lo: float | None = None, hi: float | None = None) -> float:
    """A finite Python number in [lo, hi]."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(v).__name__}")
    v = float(v)
    if v != v or v in (float("inf"), float("-inf")):
        raise NonFiniteInputError(f"{name} must be finite, got {v}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        if hi is None:
            raise ValueError(f"{name} must be >= {lo}, got {v}")
        if lo is None:
            raise ValueError(f"{name} must be <= {hi}, got {v}")
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {v}")
    return v


def choice(name: str, v: object, options: Sequence[str]) -> str:
    if v not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {v!r}")
    return v  # type: ignore[return-value]


def _on(force: bool) -> bool:
    # force: the check of a rule a kernel flagged (the error path of the device checks)
    return force or value_checks_enabled()


def finite(name: str, t: torch.Tensor, *, force: bool = False) -> None:
    """Value check: no NaN or inf in ``t``."""
    if _on(force) and t.numel() and not bool(torch.isfinite(t).all()):
        raise NonFiniteInputError(f"{name} {NONFINITE_WORDS} ({_describe(t)})")


def finite_list(name: str, tensors: Sequence[torch.Tensor], *, force: bool = False) -> None:
    """Value check: no NaN or inf in any tensor of the list (one host sync for all)."""
    if _on(force) and tensors:
        ok = torch.stack([torch.isfinite(t).all() for t in tensors])
        if not bool(ok.all()):
            i = int((~ok).nonzero()[0, 0])
            raise NonFiniteInputError(f"{name}[{i}] {NONFINITE_WORDS}")


def cra_width(x: torch.Tensor, w1: torch.Tensor) -> None:
    """``x [B, F]`` and ``w1 [K, H, F]`` agree on the width F = M*D (nn.Linear convention)."""
    if x.shape[1] != w1.shape[2]:
        raise ValueError(
            f"x and w1 disagree on the width F: x is [B, F] with F = M*D = {x.shape[1]} "
            f"({_describe(x)}), but w1's last dim is {w1.shape[2]} ({_describe(w1)}); "
            "F must equal w1's last dim"
        )


def in_range(
    name: str,
    t: torch.Tensor,
    lo: int,
    hi: int,
    what: str = "values",
    hint: str = "",
    *,
    force: bool = False,
) -> None:
    """Value check: integer tensor with every element in [lo, hi] (``hint``: why, or the fix)."""
    if _on(force) and t.numel():
        tmin, tmax = int(t.min()), int(t.max())
        if tmin < lo or tmax > hi:
            raise ValueError(
                f"{name} {what} must be in [{lo}, {hi}], got min {tmin}, max {tmax}"
                + (f": {hint}" if hint else "")
            )


def class_values(name: str, t: torch.Tensor, num_classes: int, *, force: bool = False) -> None:
    """Value check: class indices in ``[0, C)`` (the C++ kernels raise the same message)."""
    hint = f"the logits have C = {num_classes} classes (their last dim)"
    in_range(name, t, 0, num_classes - 1, what="class indices", hint=hint, force=force)


def comb_values(
    name: str, t: torch.Tensor, num_modalities_: int | None, *, force: bool = False
) -> None:
    """Value check: combination ids in ``[1, 2**M)`` (M = 8 when not known)."""
    m = num_modalities_ if num_modalities_ is not None else MAX_MODALITIES
    hint = f"ids of {m} modalities come from combination_ids(present) (0 means none present)"
    in_range(name, t, 1, comb_top(num_modalities_), what="combination ids", hint=hint, force=force)


def source_values(name: str, t: torch.Tensor, batch: int, *, force: bool = False) -> None:
    """Value check: ``src`` rows of the batch, in ``[0, B)``."""
    in_range(name, t, 0, batch - 1, what="source indices", force=force)


# |sum_m w[b, m] - 1| above this is off the simplex: allclose's atol + rtol * 1
SIMPLEX_TOL = 1e-3 + 1e-5


def simplex_weights(name: str, w: torch.Tensor, *, force: bool = False) -> None:
    """Value check: mixing proportions ``[M]`` or ``[B, M]``, >= 0 and summing to 1 over M."""
    if _on(force) and w.numel():
        w = w.float()
        if bool((w < 0).any()) or not bool(
            torch.allclose(w.sum(-1), torch.ones((), device=w.device), atol=1e-3)
        ):
            raise ValueError(f"{name} must be on the simplex: >= 0 and summing to 1 over M")


def logits3(name: str, t: object) -> torch.Tensor:
    """Per-modality logits ``[B, M, C]`` with 2 <= M <= 8 and C >= 2."""
    t = floating(name, t, ndim=3, shape=(None, None, None))
    num_modalities(t.shape[1], f"{name}.shape[1] (M)")
    if t.shape[2] < 2:
        raise ValueError(f"{name} needs C >= 2 classes in dim 2, got {_describe(t)}")
    if t.shape[0] < 1:
        raise ValueError(f"{name} needs a batch of at least 1, got {_describe(t)}")
    return t


def logits2(name: str, t: object) -> torch.Tensor:
    """Logits ``[B, C]`` with C >= 2."""
    t = floating(name, t, ndim=2, shape=(None, None))
    if t.shape[1] < 2:
        raise ValueError(f"{name} needs C >= 2 classes in dim 1, got {_describe(t)}")
    return t


def class_labels(
    name: str, labels: object, batch: int, num_classes: int, values: bool = True
) -> torch.Tensor:
    """Multiclass labels: int64 ``[B]`` in ``[0, C)`` (the range only with ``values``)."""
    t = tensor(name, labels, ndim=1, shape=(batch,))
    if t.dtype != torch.int64:
        raise TypeError(
            f"{name} must be int64 class indices of shape [{batch}], got {t.dtype}: "
            f"convert with {name}.long()"
        )
    if values:
        class_values(name, t, num_classes)
    return t


def multilabel_values(name: str, t: torch.Tensor, *, force: bool = False) -> None:
    """Value check: a multilabel target holds only 0 and 1."""
    if _on(force) and t.numel() and not bool(((t == 0) | (t == 1)).all()):
        raise ValueError(
            f"{name} (multilabel) must hold only 0 and 1: threshold soft targets, e.g. "
            f"({name} > 0.5).float()"
        )


def labels_any(
    name: str, labels: object, batch: int, num_classes: int, values: bool = True
) -> bool:
    """Multiclass int64 ``[B]`` or multilabel floating ``[B, C]`` in {0, 1}; True if multilabel.

    The values (range, 0/1) are checked only with ``values``."""
    if isinstance(labels, torch.Tensor) and labels.dim() == 2:
        t = floating(name, labels, shape=(batch, num_classes))
        if values:
            multilabel_values(name, t)
        return True
    class_labels(name, labels, batch, num_classes, values)
    return False


def present_rows(name: str, t: torch.Tensor, *, force: bool = False) -> None:
    """Value check: no all-false row in a ``[B, M]`` mask."""
    if _on(force) and t.shape[0] and not bool(t.any(dim=1).all()):
        row = int((~t.any(dim=1)).nonzero()[0, 0])
        raise ValueError(
            f"{name} has a sample with no present modality (row {row}): every sample needs at "
            "least one; drop samples with nothing observed"
        )


def present_mask(name: str, present: object, values: bool = True) -> torch.Tensor:
    """Bool ``[B, M]`` with 2 <= M <= 8 and (with ``values``) no all-false row."""
    t = tensor(name, present, ndim=2, dtypes=(torch.bool,), shape=(None, None))
    num_modalities(t.shape[1], f"{name}.shape[1] (M)")
    if values:
        present_rows(name, t)
    return t


def comb_top(num_modalities_: int | None) -> int:
    """The largest combination id of M modalities (M = 8 when not known)."""
    return (1 << (num_modalities_ if num_modalities_ is not None else MAX_MODALITIES)) - 1


def comb_ids(
    name: str, comb: object, batch: int, num_modalities_: int | None, values: bool = True
) -> torch.Tensor:
    """Combination ids: integer ``[B]`` in ``1 .. 2**M - 1`` (the range only with ``values``)."""
    t = tensor(name, comb, ndim=1, dtypes=(torch.int64, torch.int32), shape=(batch,))
    if values:
        comb_values(name, t, num_modalities_)
    return t


def grad_lists(name0: str, g0: object, name1: str, g1: object) -> None:
    """Two lists of tensors, pairwise the same shape, dtype and device."""
    for name, g in ((name0, g0), (name1, g1)):
        if not isinstance(g, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in g):
            raise TypeError(f"{name} must be a list of tensors")
        if len(g) == 0:
            raise ValueError(f"{name} must hold at least one tensor")
    if len(g0) != len(g1):  # type: ignore[arg-type]
        raise ValueError(
            f"{name0} and {name1} must have the same length, got {len(g0)} and {len(g1)}"
        )  # type: ignore[arg-type]
    device = g0[0].device  # type: ignore[index]
    for i, (a, b) in enumerate(zip(g0, g1)):  # type: ignore[call-overload]
        floating(f"{name0}[{i}]", a)
        floating(f"{name1}[{i}]", b)
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(
                f"{name0}[{i}] ({_describe(a)}) and {name1}[{i}] ({_describe(b)}) must match"
            )
        if a.device != device or b.device != device:
            raise ValueError(f"{name0}[{i}]/{name1}[{i}] must be on {device}, like {name0}[0]")
