"""``modality_mix`` and ``soft_cross_entropy``: MM learning of SPEC section 5."""

from __future__ import annotations

import torch

from omnifuse_fast import _checks, _dispatch


def modality_mix(
    v: torch.Tensor,
    labels: torch.Tensor,
    src: torch.Tensor,
    num_classes: int,
    weights: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Modality-mixed samples with proportion labels.

    Args:
        v: embeddings ``[B, M, D]``.
        labels: int64 ``[B]`` in ``[0, num_classes)``.
        src: integer ``[M, B]``; mixed sample b takes modality m from sample ``src[m, b]``.
        num_classes: C.
        weights: modality proportions on the simplex, ``[M]`` or per sample ``[B, M]``;
            uniform when None.

    Returns:
        ``(v_mix [B, M, D], soft_labels [B, C])`` in v's dtype. Gradients flow from v_mix
        into v (a scatter-add: several mixed rows may read one source).
    """
    _checks.floating("v", v, ndim=3, shape=(None, None, None))
    bsz, nmod, _ = v.shape
    _checks.num_modalities(nmod, "v.shape[1] (M)")
    _checks.positive_int("num_classes", num_classes, minimum=2)
    _checks.tensor("labels", labels)
    _checks.tensor("src", src, ndim=2, dtypes=(torch.int64, torch.int32), shape=(nmod, bsz))
    if weights is not None:
        _checks.tensor("weights", weights)
        if weights.dim() not in (1, 2):
            raise ValueError(f"weights must have shape [M] or [B, M], got {tuple(weights.shape)}")
        shape = (nmod,) if weights.dim() == 1 else (bsz, nmod)
        _checks.floating("weights", weights, shape=shape)
    # metadata checks first: no value check reads a tensor that sits on another device
    device = _checks.same_device(v=v, labels=labels, src=src, weights=weights)
    _checks.class_labels("labels", labels, bsz, num_classes, values=False)
    choice = _dispatch.resolve("modality_mix", backend, device)
    if _checks.python_value_checks(choice.backend):  # else: checked in the kernel
        _checks.class_values("labels", labels, num_classes)
        _checks.in_range("src", src, 0, bsz - 1, what="source indices")
    if weights is not None:
        if _checks.python_value_checks(choice.backend, "weights"):  # else: in the kernel
            _checks.simplex_weights("weights", weights)
        weights = weights.float().expand(bsz, nmod).contiguous()
    return choice.impl(v, labels, src.long(), num_classes, weights)


def soft_cross_entropy(
    logits: torch.Tensor, soft_labels: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """``mean_b( -sum_c q_{b,c} log_softmax(z_b)_c )`` for soft labels ``q [B, C]``."""
    _checks.logits2("logits", logits)
    _checks.floating("soft_labels", soft_labels, ndim=2, shape=tuple(logits.shape))
    device = _checks.same_device(logits=logits, soft_labels=soft_labels)
    _checks.same_dtype(logits=logits, soft_labels=soft_labels)
    choice = _dispatch.resolve("soft_cross_entropy", backend, device)
    if _checks.python_value_checks(choice.backend):  # else: checked in the kernel
        _checks.finite("logits", logits)
        _checks.finite("soft_labels", soft_labels)
    return choice.impl(logits, soft_labels)
