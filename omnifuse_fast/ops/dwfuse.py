"""``dwfuse_weights`` and ``dwfuse_loss``: DWFuse of SPEC section 2."""

from __future__ import annotations

import torch

from omnifuse_fast import _checks, _dispatch


def multilabel_flag(labels: object, multilabel: bool) -> None:
    """Float ``[B, C]`` labels if and only if ``multilabel=True`` (SPEC section 8)."""
    if not isinstance(multilabel, bool):
        raise TypeError(f"multilabel must be a bool, got {type(multilabel).__name__}")
    if not isinstance(labels, torch.Tensor):
        return  # the label check names the type
    if labels.is_floating_point() and labels.dim() == 2 and not multilabel:
        raise ValueError(
            f"labels is a float tensor of shape {tuple(labels.shape)} but multilabel=False: "
            "for one class per sample pass int64 class indices [B] (e.g. labels.argmax(1) "
            "for one-hot rows); for 0/1 indicators [B, C] (several labels per sample) pass "
            "multilabel=True"
        )
    if multilabel and not labels.is_floating_point():
        raise ValueError(
            f"multilabel=True needs float 0/1 indicators [B, C], got labels of dtype "
            f"{labels.dtype} and shape {tuple(labels.shape)}: pass labels.float() of shape "
            "[B, C], or class indices [B] with multilabel=False"
        )


def _resolve(
    op: str, logits: torch.Tensor, labels: torch.Tensor, beta: float, multilabel: bool, backend: str
):
    """Metadata checks, the backend choice, then the value checks it still needs."""
    _checks.logits3("modality_logits", logits)
    bsz, _, ncls = logits.shape
    _checks.tensor("labels", labels)
    multilabel_flag(labels, multilabel)
    # the device check reads no data: before any value check reads labels
    device = _checks.same_device(modality_logits=logits, labels=labels)
    multilabel = _checks.labels_any("labels", labels, bsz, ncls, values=False)
    _checks.real("beta", beta, lo=0.0)
    choice = _dispatch.resolve(op, backend, device)
    if _checks.python_value_checks(choice.backend):
        _checks.labels_any("labels", labels, bsz, ncls)  # now their values: range or 0/1
        _checks.finite("modality_logits", logits)
    if multilabel:  # 0/1 are exact in every float dtype: let kernels read one dtype
        labels = labels.to(logits.dtype)
    return labels, float(beta), choice.impl


def dwfuse_weights(
    modality_logits: torch.Tensor,
    labels: torch.Tensor,
    beta: float = 0.5,
    backend: str = "auto",
    *,
    multilabel: bool = False,
) -> torch.Tensor:
    """Eq. 10: ``omega_{b,m} = prod_{n != m} (1 - p_{b,n})^(beta/(M-1))``, computed in log space.

    Args:
        modality_logits: ``[B, M, C]`` per-modality logits.
        labels: int64 ``[B]`` class indices, or with ``multilabel=True`` float ``[B, C]`` of 0/1.
        beta: down-weighting strength, >= 0.
        multilabel: labels are 0/1 indicators (float labels without it are refused).

    Returns:
        ``omega [B, M]`` (``[B, M, C]`` multilabel) in the logits' dtype.
    """
    labels, beta, impl = _resolve(
        "dwfuse_weights", modality_logits, labels, beta, multilabel, backend
    )
    return impl(modality_logits, labels, beta)


def dwfuse_loss(
    modality_logits: torch.Tensor,
    labels: torch.Tensor,
    beta: float = 0.5,
    detach_weight: bool = True,
    backend: str = "auto",
    *,
    multilabel: bool = False,
) -> torch.Tensor:
    """Eq. 12: ``L_enc = (1/B) sum_b sum_m omega_{b,m} CE(z_{b,m}, y_b)``.

    ``labels``: int64 ``[B]``, or with ``multilabel=True`` float 0/1 ``[B, C]`` (binary
    cross-entropy per label, weighted per label, averaged over labels; float labels without
    ``multilabel=True`` are refused). With ``detach_weight=True`` (default) omega is a
    stop-gradient coefficient. Returns a scalar in the logits' dtype.
    """
    labels, beta, impl = _resolve("dwfuse_loss", modality_logits, labels, beta, multilabel, backend)
    if not isinstance(detach_weight, bool):
        raise TypeError(f"detach_weight must be a bool, got {type(detach_weight).__name__}")
    return impl(modality_logits, labels, beta, detach_weight)
