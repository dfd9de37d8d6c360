"""Value checks on the device, shared by the Triton and CUDA kernels: no host sync per call.

The GPU kernels read labels, ``comb`` and ``src`` anyway, so they check them there, and the
logits (and soft labels) they read for finiteness. A kernel
never dereferences an out-of-range index (the access is masked or skipped) and reports it in
a small int32 flag tensor: one slot per checked rule, 1 = fine, and a kernel that meets a
bad value stores 0 in its slot (every writer stores the same 0, so races are harmless).
:func:`raise_if_flagged` then turns the flags into the error:

- on a GPU, each slot goes to ``torch._assert_async`` with a message naming the argument
  (:data:`MESSAGES`): no host synchronization. The assert is one more kernel in the stream, so
  a bad value surfaces at the next synchronizing point (``.item()``, ``.cpu()``, printing a
  loss, ``torch.cuda.synchronize()``) as ``RuntimeError: CUDA error: device-side assert
  triggered``, with this module's message printed by the device to stderr. Like any
  device-side assert (and like ``F.cross_entropy`` on a bad label), it leaves the CUDA context
  unusable: a bad label on a GPU is a bug to fix, not an error to recover from.
- on CPU tensors (the Triton interpreter) reading the flag costs no sync, so it is read at once
  and the Python check of the flagged rule runs (:func:`host_check`, ``force=True``): the user
  gets ``omnifuse_fast._checks``' ValueError, word for word, as from the reference and the C++
  CPU kernels. While ``torch.compile`` traces a Python composite (MIMO), the flag can't be
  read: ``_assert_async`` again (a RuntimeError at run time on CPU, with the same message).
- the custom-op schemas stay as they are (the CPU kernels share them): the CUDA bindings
  allocate and assert the flags in C++ (``csrc/cuda/binding.h``, same slots and messages),
  the Triton ops in Python (this module). Both trace under ``torch.compile``: the CUDA ops are
  opaque, and a decomposed Triton op's asserts become Inductor's ``tl.device_assert``.

:data:`MESSAGES` (the device's words) and :func:`host_check` (the Python check of each slot,
whose ValueError is the host's words) are the one map from a slot to its error.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch._subclasses.fake_tensor import is_fake

from omnifuse_fast import _checks

# Slots of the flag tensor. The CUDA side mirrors them (csrc/cuda/common.cuh, kFlag*).
LABELS = 0
COMB = 1
SRC = 2
MULTILABEL = 3
LOGITS = 4
SOFT_LABELS = 5
PRESENT = 6
WEIGHTS = 7
GRADS = 8  # MIMO: a non-finite gradient (flagged by the Gram, which every element reaches)
X = 9  # CRA: a non-finite input x
NUM_SLOTS = 10

# |sum_m w[b, m] - 1| above this is off the simplex (the reference check's allclose atol+rtol).
SIMPLEX_TOL = _checks.SIMPLEX_TOL

# What each slot checks. csrc/cuda/binding.h holds the same strings (a test compares them).
MESSAGES: dict[int, str] = {
    LABELS: "labels must be class indices in [0, C)",
    COMB: "comb must be combination ids in [1, 2**M)",
    SRC: "src must be source indices in [0, B)",
    MULTILABEL: "labels (multilabel) must hold only 0 and 1",
    LOGITS: "logits must be finite (no NaN or inf)",
    SOFT_LABELS: "soft_labels must be finite (no NaN or inf)",
    PRESENT: "present has a sample with no present modality",
    WEIGHTS: "weights must be on the simplex: >= 0 and summing to 1 over M",
    GRADS: "gradients must be finite (no NaN or inf)",
    X: "x must be finite (no NaN or inf)",
}


def message(op: str, slot: int) -> str:
    """The assert message of ``slot`` for ``op`` (shorter than _assert_async's 255 bytes)."""
    return f"omnifuse_fast.{op}: {MESSAGES[slot]} (value check on the device)"


def new_flags(device: torch.device) -> torch.Tensor:
    """A fresh flag tensor: int32 ``[NUM_SLOTS]``, all 1 (nothing bad seen yet)."""
    return torch.ones(NUM_SLOTS, dtype=torch.int32, device=device)


def flags_of(slot: int, ok: torch.Tensor) -> torch.Tensor:
    """A flag tensor with ``slot`` set from the 0-dim ``ok`` (computed on the device), the rest 1:
    for checks made by a Python composite rather than inside a kernel (MIMO's Gram)."""
    flags = new_flags(ok.device)
    flags[slot] = ok
    return flags


def check_gram(op: str, gram: torch.Tensor, lists: list[list[torch.Tensor]]) -> torch.Tensor:
    """MIMO: the Gram of the gradient lists, checked. It is finite iff every gradient is (each
    element's square reaches a diagonal entry, accumulated in fp32 or wider), so the Gram the
    op computes anyway checks every element with no second pass over them.

    ``lists``: ``[g0, gw]`` for ``mimo_combine``, ``grads`` for ``mgda_min_norm`` (their names
    in the error are the public arguments'). Returns the Gram to use from here on: the check is
    an opaque custom op in the data path (a ``torch.compile`` graph keeps it, and on CPU it
    raises the same ValueError there)."""
    tensors = [t for g in lists for t in g]
    return _checked_gram(gram, op, [len(g) for g in lists], tensors)


def _grad_names(op: str, count: int) -> list[str]:
    return ["g0", "gw"] if op == "mimo_combine" else [f"grads[{t}]" for t in range(count)]


@torch.library.custom_op("omnifuse_fast_checks::checked_gram", mutates_args=())
def _checked_gram(
    gram: torch.Tensor, op: str, counts: list[int], tensors: list[torch.Tensor]
) -> torch.Tensor:
    grads, start = {}, 0
    for name, n in zip(_grad_names(op, len(counts)), counts):
        grads[name], start = tensors[start : start + n], start + n
    ok = torch.isfinite(gram).all()
    raise_if_flagged(flags_of(GRADS, ok), op, (GRADS,), grads=grads)
    return gram.clone()


@_checked_gram.register_fake
def _checked_gram_fake(gram, op, counts, tensors):
    return torch.empty_like(gram)


def _checked_gram_setup(ctx, inputs, output):
    ctx.num_tensors = len(inputs[3])


def _checked_gram_backward(ctx, grad):
    # the Gram's gradient passes through; the gradients it was computed from get it elsewhere
    return grad, None, None, [None] * ctx.num_tensors


_checked_gram.register_autograd(_checked_gram_backward, setup_context=_checked_gram_setup)


def check_finite(op: str, slot: int, t: torch.Tensor, **args) -> None:
    """``slot``'s finiteness check of ``t`` as a device-side pass (one read of ``t``, no host
    sync): for a rule whose kernel does not flag it (_checks.DEVICE_PASS_RULES)."""
    raise_if_flagged(flags_of(slot, torch.isfinite(t).all()), op, (slot,), **args)


def host_check(slot: int, **args) -> None:
    """Run the Python check of ``slot`` on the op's arguments (it raises when they are bad).

    ``args`` names what the slot's check reads: ``labels`` and ``num_classes`` (LABELS),
    ``labels`` (MULTILABEL), ``comb`` and ``num_modalities`` (COMB; None: any M up to 8),
    ``src`` (SRC, ``[M, B]``), ``logits`` and ``logits_name`` (LOGITS), ``soft_labels``,
    ``present``, ``weights``, ``grads`` (GRADS: ``{name: list of tensors}``) and ``x``."""
    if slot == LABELS:
        _checks.class_values("labels", args["labels"], args["num_classes"], force=True)
    elif slot == MULTILABEL:
        _checks.multilabel_values("labels", args["labels"], force=True)
    elif slot == COMB:
        _checks.comb_values("comb", args["comb"], args.get("num_modalities"), force=True)
    elif slot == SRC:
        _checks.source_values("src", args["src"], args["src"].shape[1], force=True)
    elif slot == LOGITS:
        _checks.finite(args.get("logits_name", "logits"), args["logits"], force=True)
    elif slot == SOFT_LABELS:
        _checks.finite("soft_labels", args["soft_labels"], force=True)
    elif slot == PRESENT:
        _checks.present_rows("present", args["present"], force=True)
    elif slot == WEIGHTS:
        _checks.simplex_weights("weights", args["weights"], force=True)
    elif slot == GRADS:
        for name, tensors in args["grads"].items():
            _checks.finite_list(name, tensors, force=True)
    elif slot == X:
        _checks.finite("x", args["x"], force=True)
    else:
        raise ValueError(f"unknown value-check slot {slot}")


def host_checks(slots: Sequence[int], **args) -> None:
    """The Python pass of ``slots`` as the reference runs it (off with set_value_checks(False)).

    For a kernel-checked backend that hands a call to the reference (fp64 in Triton): the
    ops skipped their Python pass for it, so it runs here."""
    if _checks.value_checks_enabled():
        for slot in slots:
            host_check(slot, **args)


def raise_if_flagged(flags: torch.Tensor, op: str, slots: Sequence[int], **args) -> None:
    """Raise if a kernel flagged any of ``slots``; on a GPU without a host sync.

    GPU (or a ``torch.compile`` trace): one ``torch._assert_async`` per slot. CPU tensors: read
    the flags and raise the flagged rule's ValueError (:func:`host_check` on ``args``)."""
    if flags.device.type != "cpu" or torch.compiler.is_compiling():
        for slot in slots:
            torch._assert_async(flags[slot], message(op, slot))
        return
    if is_fake(flags):  # torch.compile computing shapes: no kernel ran, nothing to read
        return
    values = flags.tolist()
    for slot in slots:
        if not values[slot]:
            host_check(slot, **args)
            # the kernel and the Python check disagree (a bug): still never a silent result
            raise ValueError(message(op, slot))
