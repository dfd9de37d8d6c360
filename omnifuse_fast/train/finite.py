"""Stopping a run at its first non-finite loss, with a message that says where and what.

The trainer checks the loss terms of eq. 18 before every update (:func:`check_terms`) and turns
an op's refusal of non-finite input mid-training (:class:`NonFiniteInputError`, e.g. inf
embeddings after a blow-up) into the same error, with a diagnosis (:func:`diagnose`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from omnifuse_fast._checks import NonFiniteInputError
from omnifuse_fast.train.distributed import LEAVES

__all__ = ["TERM_DOC", "NonFiniteInputError", "NonFiniteLossError", "check_terms", "diagnose"]

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


def check_terms(
    terms: dict[str, torch.Tensor], epoch: int, step: int, checkpoint: Path | None
) -> None:
    """Raise :class:`NonFiniteLossError` naming the first bad term (one device sync when fine).

    ``epoch`` is the number of finished epochs, ``step`` the 0-based step within the current
    one; a leaf of eq. 18 (or MM learning's ``mix``) is named before the composites it feeds.
    """
    values = torch.stack([v.detach().double().reshape(()) for v in terms.values()])
    if bool(torch.isfinite(values).all()):
        return
    bad = [(k, v) for k, v in zip(terms, values.tolist()) if not math.isfinite(v)]
    name, value = next(((k, v) for k, v in bad if k in LEAVES or k == "mix"), bad[0])
    what = TERM_DOC.get(name, "the loss of a unimodal head (MIMO)")
    others = ", ".join(k for k, _ in bad if k != name)
    where, last = _where(epoch, step, checkpoint)
    raise NonFiniteLossError(
        f"non-finite loss at {where}: term {name!r} = {value} ({what})"
        + (f"; also non-finite: {others}" if others else "")
        + f". Training stopped before the update; {last}."
    )


def diagnose(
    model: nn.Module, exc: NonFiniteInputError, epoch: int, step: int, checkpoint: Path | None
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
