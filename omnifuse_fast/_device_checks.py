"""Value checks on the device, shared by the Triton and CUDA kernels: no host sync per call.

The GPU kernels read labels, ``comb`` and ``src`` anyway, so they check them there, and the
logits (and soft labels) they read for finiteness. A kernel
never dereferences an out-of-range index (the access is masked or skipped) and reports it in
a small int32 flag tensor: one slot per checked argument, 1 = fine, and a kernel that meets a
bad value stores 0 in its slot (every writer stores the same 0, so races are harmless). The
wrapper then hands each slot to ``torch._assert_async`` with a message naming the argument.

Why ``_assert_async`` on a flag the kernel writes, rather than a Python range check:

- no host synchronization: on CUDA the assert is one more kernel in the stream, so a bad value
  surfaces at the next synchronizing point (``.item()``, ``.cpu()``, printing a loss,
  ``torch.cuda.synchronize()``) as ``RuntimeError: CUDA error: device-side assert triggered``,
  with this module's message printed by the device to stderr. Like any device-side assert (and
  like ``F.cross_entropy`` on a bad label), it leaves the CUDA context unusable: a bad label on
  a GPU is a bug to fix, not an error to recover from. On CPU tensors (the Triton interpreter)
  ``_assert_async`` raises at once.
- no second pass over the data: the kernel that reads the indices sets the flag.
- the custom-op schemas stay as they are (the CPU kernels share them): the CUDA bindings
  allocate and assert the flags in C++ (``csrc/cuda/binding.h``, same slots and messages),
  the Triton ops in Python (this module). Both trace under ``torch.compile``: the CUDA ops are
  opaque, and a decomposed Triton op's asserts become Inductor's ``tl.device_assert``.
"""

from __future__ import annotations

import torch

# Slots of the flag tensor. The CUDA side mirrors them (csrc/cuda/common.cuh, kFlag*).
LABELS = 0
COMB = 1
SRC = 2
MULTILABEL = 3
LOGITS = 4
SOFT_LABELS = 5
PRESENT = 6
WEIGHTS = 7
NUM_SLOTS = 8

# |sum_m w[b, m] - 1| above this is off the simplex (the reference check's allclose atol+rtol).
SIMPLEX_TOL = 1e-3 + 1e-5

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
}


def message(op: str, slot: int) -> str:
    """The assert message of ``slot`` for ``op`` (shorter than _assert_async's 255 bytes)."""
    return f"omnifuse_fast.{op}: {MESSAGES[slot]} (value check on the device)"


def new_flags(device: torch.device) -> torch.Tensor:
    """A fresh flag tensor: int32 ``[NUM_SLOTS]``, all 1 (nothing bad seen yet)."""
    return torch.ones(NUM_SLOTS, dtype=torch.int32, device=device)


def raise_if_flagged(flags: torch.Tensor, op: str, *slots: int) -> None:
    """Assert, without a host sync, that no kernel flagged any of ``slots``."""
    for slot in slots:
        torch._assert_async(flags[slot], message(op, slot))
