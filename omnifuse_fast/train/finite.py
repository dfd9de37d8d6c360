"""Stopping a run at its first non-finite loss, with a message that says where and what.

The trainer checks the loss terms of eq. 18 before every update, or every N steps with no host
sync in between (:class:`FiniteMonitor`), and turns an op's refusal of non-finite input
mid-training (:class:`NonFiniteInputError`, or a C++ kernel's ``ValueError`` in the same words:
:func:`omnifuse_fast._checks.refuses_nonfinite`; e.g. inf embeddings after a blow-up) into the
same error, with a diagnosis (:func:`diagnose`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from omnifuse_fast._checks import NonFiniteInputError
from omnifuse_fast.train.distributed import LEAVES

__all__ = [
    "TERM_DOC",
    "FiniteMonitor",
    "NonFiniteInputError",
    "NonFiniteLossError",
    "diagnose",
]

# What each logged term is, for the error message.
TERM_DOC = {
    "forward": "L_forward, forward imputation (eq. 7)",
    "backward": "L_backward, backward imputation (eq. 8; lambda1 in eq. 18)",
    "enc": "L_enc, DWFuse's weighted unimodal CE (eq. 12, in lambda2 * L_DWFuse)",
    "ra": "L_ra, the joint head's CE (eq. 13, in lambda2 * L_DWFuse)",
    "dwfuse": "L_DWFuse (eq. 14; lambda2 in eq. 18)",
    "ce": "CE of the joint head (the lambda2 term of eq. 18 without DWFuse)",
    "tla": "L_TLA (eq. 17; lambda3 in eq. 18)",
    "total": "L, the joint objective (eq. 18)",
    "mix": "MM learning's soft-label CE on mixed samples",
    "objective": "the step's objective",
}


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; the message names the step and the term."""


def _where(epoch: int, step: int, checkpoint: Path | None) -> tuple[str, str]:
    """``("epoch E, step S", "the last checkpoint (...) holds epoch E-1")``."""
    saved = f" ({checkpoint})" if checkpoint is not None else ""
    return f"epoch {epoch + 1}, step {step + 1}", f"the last checkpoint{saved} holds epoch {epoch}"


class FiniteMonitor:
    """Watches each step's loss terms for NaN/inf, with one host sync every ``every`` steps.

    :meth:`add` keeps a step's terms on the device (no sync); every ``every`` steps, and at
    :meth:`flush` (the epoch's end, before its checkpoint), one sync checks them all. With
    ``every = 1`` a bad step stops before its update; with more, the updates up to the check
    have been applied (the message says how many), and the last checkpoint is still whole.
    """

    def __init__(self, every: int = 1) -> None:
        self.every = every
        self._pending: list[tuple[int, int, list[str], torch.Tensor]] = []

    def add(
        self,
        names: list[str],
        values: torch.Tensor,
        epoch: int,
        step: int,
        checkpoint: Path | None,
    ) -> None:
        """Record step ``step`` (0-based) of epoch ``epoch + 1``: its terms' fp64 ``values [T]``,
        named by ``names``; check when ``every`` are due."""
        self._pending.append((epoch, step, names, values))
        if len(self._pending) >= self.every:
            self.flush(checkpoint, updated=False)

    def flush(self, checkpoint: Path | None, updated: bool = True) -> None:
        """Check every recorded step (one sync); raise :class:`NonFiniteLossError` for the
        first bad one, naming its term. ``updated``: the last recorded step has taken its
        optimizer update (False when called before it)."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        ok = [torch.isfinite(values).all() for *_, values in pending]
        finite = ok[0] if len(ok) == 1 else torch.stack(ok)  # (every = 1: nothing to stack)
        if bool(finite.all()):
            return
        first = int((~finite.reshape(-1)).nonzero()[0, 0])
        epoch, step, names, values = pending[first]
        applied = len(pending) - first - (0 if updated else 1)
        named = dict(zip(names, values.tolist()))
        raise _loss_error(named, epoch, step, checkpoint, applied, self.every)


def _loss_error(
    values: dict[str, float],
    epoch: int,
    step: int,
    checkpoint: Path | None,
    applied: int,
    every: int,
) -> NonFiniteLossError:
    bad = [(k, v) for k, v in values.items() if not math.isfinite(v)]
    name, value = next(((k, v) for k, v in bad if k in LEAVES or k == "mix"), bad[0])
    what = TERM_DOC.get(name, "the loss of a unimodal head (MIMO)")
    others = ", ".join(k for k, _ in bad if k != name)
    where, last = _where(epoch, step, checkpoint)
    stopped = (
        "Training stopped before the update"
        if applied == 0
        else f"Training stopped at the next finiteness check (every {every} steps), "
        f"after {applied} update(s) from that step on"
    )
    return NonFiniteLossError(
        f"non-finite loss at {where}: term {name!r} = {value} ({what})"
        + (f"; also non-finite: {others}" if others else "")
        + f". {stopped}; {last}."
    )


def diagnose(
    model: nn.Module, exc: Exception, epoch: int, step: int, checkpoint: Path | None
) -> NonFiniteLossError:
    """The error for an op that refused non-finite input mid-training (the data were checked
    when they were loaded, so the model went wrong): blown-up weights, or an overflow."""
    params = dict(model.named_parameters())
    bad = [n for n, p in params.items() if not bool(torch.isfinite(p).all())]
    if bad:
        what = f"parameters hold NaN/inf after the previous update (first: {bad[0]})"
    else:
        name, p = max(params.items(), key=lambda kv: float(kv[1].detach().abs().max()))
        what = (
            f"the forward pass overflowed (largest |parameter| "
            f"{float(p.detach().abs().max()):.3g}, in {name})"
        )
    where, last = _where(epoch, step, checkpoint)
    return NonFiniteLossError(
        f"non-finite values at {where}: {what}; the op said: {exc}. Training stopped; {last}."
    )
