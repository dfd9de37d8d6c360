"""``dwfuse_weights`` and ``dwfuse_loss``: DWFuse of SPEC section 2."""

from __future__ import annotations

import torch

from omnifuse_fast import _checks, _dispatch


def _resolve(op: str, logits: torch.Tensor, labels: torch.Tensor, beta: float, backend: str):
    """Metadata checks, the backend choice, then the value checks it still needs."""
    _checks.logits3("modality_logits", logits)
    bsz, _, ncls = logits.shape
    _checks.tensor("labels", labels)
    # the device check reads no data: before any value check reads labels
    device = _checks.same_device(modality_logits=logits, labels=labels)
    multilabel = _checks.labels_any("labels", labels, bsz, ncls, values=False)
    _checks.real("beta", beta, lo=0.0)
    choice = _dispatch.resolve(op, backend, device)
    if _checks.python_value_checks(choice.backend):
        if multilabel:
            _checks.multilabel_values("labels", labels)
        else:
            _checks.in_range("labels", labels, 0, ncls - 1, what="class indices")
        _checks.finite("modality_logits", logits)
    if multilabel:  # 0/1 are exact in every float dtype: let kernels read one dtype
        labels = labels.to(logits.dtype)
    return labels, float(beta), choice.impl


def dwfuse_weights(
    modality_logits: torch.Tensor,
    labels: torch.Tensor,
    beta: float = 0.5,
    backend: str = "auto",
) -> torch.Tensor:
    """Eq. 10: ``omega_{b,m} = prod_{n != m} (1 - p_{b,n})^(beta/(M-1))``, computed in log space.

    Args:
        modality_logits: ``[B, M, C]`` per-modality logits.
        labels: int64 ``[B]`` (multiclass) or float ``[B, C]`` of 0/1 (multilabel).
        beta: down-weighting strength, >= 0.

    Returns:
        ``omega [B, M]`` (``[B, M, C]`` multilabel) in the logits' dtype.
    """
    labels, beta, impl = _resolve("dwfuse_weights", modality_logits, labels, beta, backend)
    return impl(modality_logits, labels, beta)


def dwfuse_loss(
    modality_logits: torch.Tensor,
    labels: torch.Tensor,
    beta: float = 0.5,
    detach_weight: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Eq. 12: ``L_enc = (1/B) sum_b sum_m omega_{b,m} CE(z_{b,m}, y_b)``.

    Multilabel: binary cross-entropy per label, weighted per label, averaged over labels.
    With ``detach_weight=True`` (default) omega is a stop-gradient coefficient.
    """
    if not isinstance(detach_weight, bool):
        raise TypeError(f"detach_weight must be a bool, got {type(detach_weight).__name__}")
    labels, beta, impl = _resolve("dwfuse_loss", modality_logits, labels, beta, backend)
    return impl(modality_logits, labels, beta, detach_weight)
