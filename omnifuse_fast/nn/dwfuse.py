"""``DWFuseLoss``: ``L_DWFuse = L_enc + alpha * CE(o, y)`` (SPEC section 2, eqs. 9-14)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from omnifuse_fast import _checks
from omnifuse_fast.ops import dwfuse_loss


class DWFuseTerms(NamedTuple):
    """``loss = enc + alpha * ra``, with both terms for logging."""

    loss: torch.Tensor
    enc: torch.Tensor
    ra: torch.Tensor


def joint_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``L_ra`` (eq. 13): CE of the joint logits; BCE averaged over labels when multilabel."""
    if labels.dim() == 2:
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float()).to(logits.dtype)
    return F.cross_entropy(logits.float(), labels).to(logits.dtype)


class DWFuseLoss(nn.Module):
    """Dynamic weighted fusion loss.

    ``L_enc`` is :func:`omnifuse_fast.dwfuse_loss` on the per-modality logits (each modality's
    CE down-weighted by how well the others already predict the sample); ``L_ra`` is the CE of
    the joint logits ``o``.

    Args:
        alpha: weight of ``L_ra`` (>= 0).
        beta: down-weighting strength of eq. 10 (>= 0).
        detach_weight: treat omega as a stop-gradient coefficient (default True).
        backend: backend of the functional op.
    """

    def __init__(
        self,
        alpha: float = 0.1,
        beta: float = 0.5,
        detach_weight: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.alpha = _checks.real("alpha", alpha, lo=0.0)
        self.beta = _checks.real("beta", beta, lo=0.0)
        if not isinstance(detach_weight, bool):
            raise TypeError(f"detach_weight must be a bool, got {type(detach_weight).__name__}")
        self.detach_weight = detach_weight
        self.backend = backend

    def forward(
        self, modality_logits: torch.Tensor, joint_logits: torch.Tensor, labels: torch.Tensor
    ) -> DWFuseTerms:
        """``modality_logits [B, M, C]``, ``joint_logits [B, C]``, labels ``[B]`` or ``[B, C]``."""
        _checks.logits2("joint_logits", joint_logits)
        if joint_logits.shape[0] != modality_logits.shape[0]:
            raise ValueError(
                f"joint_logits has batch {joint_logits.shape[0]} but modality_logits has "
                f"{modality_logits.shape[0]}"
            )
        enc = dwfuse_loss(
            modality_logits, labels, self.beta, self.detach_weight, backend=self.backend
        )
        ra = joint_cross_entropy(joint_logits, labels)
        return DWFuseTerms(enc + self.alpha * ra, enc, ra)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, detach_weight={self.detach_weight}"
