"""The Triton half of the device value checks (``omnifuse_fast/_device_checks.py``)."""

from __future__ import annotations

import triton.language as tl

from omnifuse_fast import _device_checks as _dc
from omnifuse_fast.triton._common import jit


@jit
def flag_if(flags_ptr, SLOT: tl.constexpr, bad):
    """Store 0 in ``flags[SLOT]`` when any element of ``bad`` is true (one masked store)."""
    any_bad = tl.max(bad.to(tl.int32))  # over every axis
    tl.store(flags_ptr + SLOT, 0, mask=any_bad > 0)


@jit
def flag_nonfinite(flags_ptr, SLOT: tl.constexpr, x, ok):
    """Store 0 in ``flags[SLOT]`` when an element of ``x`` where ``ok`` is NaN or +-inf."""
    flag_if(flags_ptr, SLOT, ok & ~(tl.abs(x) < float("inf")))


# The slots as constexprs: a Triton kernel may read a global only when it is a constexpr.
LABELS = tl.constexpr(_dc.LABELS)
COMB = tl.constexpr(_dc.COMB)
SRC = tl.constexpr(_dc.SRC)
MULTILABEL = tl.constexpr(_dc.MULTILABEL)
LOGITS = tl.constexpr(_dc.LOGITS)
SOFT_LABELS = tl.constexpr(_dc.SOFT_LABELS)
PRESENT = tl.constexpr(_dc.PRESENT)
WEIGHTS = tl.constexpr(_dc.WEIGHTS)
X = tl.constexpr(_dc.X)
SIMPLEX_TOL = tl.constexpr(_dc.SIMPLEX_TOL)
