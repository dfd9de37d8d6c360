"""``DWFuseLoss``: ``L_DWFuse = L_enc + alpha * CE(o, y)`` (SPEC section 2, eqs. 9-14)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from omnifuse_fast import _checks
from omnifuse_fast.ops import dwfuse_loss
from omnifuse_fast.ops.dwfuse import multilabel_flag


class DWFuseTerms(NamedTuple):
    """What :class:`DWFuseLoss` returns: ``loss = enc + alpha * ra``.

    Attributes:
        loss: ``L_DWFuse`` (eq. 14), the scalar to optimize: ``terms.loss.backward()``.
        enc: ``L_enc`` (eq. 12), the down-weighted per-modality CE (for logging).
        ra: ``L_ra`` (eq. 13), the CE of the joint logits (for logging).

    A NamedTuple, so ``loss, enc, ra = terms`` also works; :meth:`backward` is a shortcut for
    ``terms.loss.backward()``.
    """

    loss: torch.Tensor
    enc: torch.Tensor
    ra: torch.Tensor

    def backward(self, *args, **kwargs) -> None:
        """``self.loss.backward(...)``: DWFuseTerms can stand where a loss tensor stood."""
        self.loss.backward(*args, **kwargs)


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

    Dtypes: ``modality_logits`` and ``joint_logits`` must share one dtype (under autocast, both
    heads give the autocast dtype); every term comes back in that dtype and is accumulated in
    at least fp32. Mixed dtypes are refused rather than silently promoted.

    Args:
        alpha: weight of ``L_ra`` (>= 0).
        beta: down-weighting strength of eq. 10 (>= 0).
        detach_weight: treat omega as a stop-gradient coefficient (default True).
        backend: backend of the functional op.
        multilabel: labels are float 0/1 indicators ``[B, C]`` (BCE per label). Without it
            labels must be int64 class indices ``[B]``; float labels are refused.
    """

    def __init__(
        self,
        alpha: float = 0.1,
        beta: float = 0.5,
        detach_weight: bool = True,
        backend: str = "auto",
        *,
        multilabel: bool = False,
    ) -> None:
        super().__init__()
        self.alpha = _checks.real("alpha", alpha, lo=0.0)
        self.beta = _checks.real("beta", beta, lo=0.0)
        if not isinstance(detach_weight, bool):
            raise TypeError(f"detach_weight must be a bool, got {type(detach_weight).__name__}")
        if not isinstance(multilabel, bool):
            raise TypeError(f"multilabel must be a bool, got {type(multilabel).__name__}")
        self.detach_weight = detach_weight
        self.multilabel = multilabel
        self.backend = backend

    def check_labels(self, labels: torch.Tensor, joint_logits: torch.Tensor) -> None:
        """Labels of the kind ``multilabel`` says: int64 ``[B]``, or float ``[B, C]``."""
        multilabel_flag(labels, self.multilabel)
        if self.multilabel and (labels.dim() != 2 or labels.shape != joint_logits.shape):
            raise ValueError(
                f"multilabel labels must be 0/1 indicators of the joint logits' shape "
                f"{tuple(joint_logits.shape)}, got {tuple(labels.shape)}"
            )

    def forward(
        self, modality_logits: torch.Tensor, joint_logits: torch.Tensor, labels: torch.Tensor
    ) -> DWFuseTerms:
        """The DWFuse terms of one batch.

        Args:
            modality_logits: ``z [B, M, C]``, the unimodal heads' logits (on ``v_full``).
            joint_logits: ``o [B, C]``, the fusion head's logits (on the imputer's latents).
            labels: int64 ``[B]``, or float 0/1 ``[B, C]`` with ``multilabel=True``.

        Returns:
            :class:`DWFuseTerms` ``(loss, enc, ra)`` in the logits' dtype.
        """
        _checks.logits2("joint_logits", joint_logits)
        if joint_logits.shape[0] != modality_logits.shape[0]:
            raise ValueError(
                f"joint_logits has batch {joint_logits.shape[0]} but modality_logits has "
                f"{modality_logits.shape[0]}"
            )
        if isinstance(modality_logits, torch.Tensor) and (
            modality_logits.dtype != joint_logits.dtype
        ):
            raise TypeError(
                f"joint_logits is {str(joint_logits.dtype).replace('torch.', '')} but "
                f"modality_logits is {str(modality_logits.dtype).replace('torch.', '')}: "
                "DWFuseLoss returns its terms in the logits' dtype, so both must share one. "
                "Cast one of them (e.g. joint_logits.to(modality_logits.dtype)) or run both "
                "heads under the same autocast"
            )
        if isinstance(labels, torch.Tensor):
            self.check_labels(labels, joint_logits)
        enc = dwfuse_loss(
            modality_logits,
            labels,
            self.beta,
            self.detach_weight,
            backend=self.backend,
            multilabel=self.multilabel,
        )
        ra = joint_cross_entropy(joint_logits, labels)
        return DWFuseTerms(enc + self.alpha * ra, enc, ra)

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta={self.beta}, detach_weight={self.detach_weight}, "
            f"multilabel={self.multilabel}"
        )
