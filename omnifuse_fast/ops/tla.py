"""``combination_ids``, ``tla_stats`` and ``tla_loss``: TLA of SPEC section 3."""

from __future__ import annotations

import torch

from omnifuse_fast import _checks, _dispatch


def combination_ids(present: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``comb[b] = sum_m present[b, m] << m``: int64 ``[B]`` in ``1 .. 2**M - 1``."""
    _checks.present_mask("present", present, values=False)
    choice = _dispatch.resolve("combination_ids", backend, present.device)
    if _checks.python_value_checks(choice.backend):  # else: checked in the kernel
        _checks.present_rows("present", present)
    return choice.impl(present)


def _logits_labels_comb(logits, labels, comb, num_modalities):
    """Metadata checks (they read no data); returns the device."""
    _checks.logits2("logits", logits)
    bsz, ncls = logits.shape
    _checks.tensor("labels", labels)
    _checks.tensor("comb", comb)
    # the device check reads no data: before any value check reads labels or comb
    device = _checks.same_device(logits=logits, labels=labels, comb=comb)
    _checks.class_labels("labels", labels, bsz, ncls, values=False)
    _checks.comb_ids("comb", comb, bsz, num_modalities, values=False)
    return device


def _check_values(backend, logits, labels, comb, num_modalities):
    """The value checks, unless the chosen backend's kernels make them."""
    if _checks.python_value_checks(backend):
        _checks.class_values("labels", labels, logits.shape[1])
        _checks.comb_values("comb", comb, num_modalities)
        _checks.finite("logits", logits)


def tla_stats(
    logits: torch.Tensor,
    labels: torch.Tensor,
    comb: torch.Tensor,
    num_modalities: int,
    distance: str = "ce",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 15's per-combination reduction of one batch.

    Args:
        logits: joint logits ``[B, C]``.
        labels: int64 ``[B]``.
        comb: combination id of each sample ``[B]``, in ``1 .. 2**M - 1``.
        num_modalities: M (2..8).
        distance: ``"ce"``, ``"l1"`` or ``"l2"``.

    Returns:
        ``(sums float32 [2**M], counts int64 [2**M])``; index 0 is unused and always 0.
        Not differentiable (a statistic for mining).
    """
    _checks.num_modalities(num_modalities)
    device = _logits_labels_comb(logits, labels, comb, num_modalities)
    _checks.choice("distance", distance, _checks.DISTANCES)
    choice = _dispatch.resolve("tla_stats", backend, device)
    _check_values(choice.backend, logits, labels, comb, num_modalities)
    return choice.impl(logits, labels, comb.long(), num_modalities, distance)


def tla_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    comb: torch.Tensor,
    lazy: int,
    backend: str = "auto",
) -> torch.Tensor:
    """Eq. 17: mean CE over the samples with ``comb == lazy``; a real 0 when there are none."""
    if isinstance(lazy, torch.Tensor) and lazy.numel() == 1 and not lazy.is_floating_point():
        lazy = int(lazy)
    _checks.positive_int("lazy", lazy, minimum=1)
    if lazy > (1 << _checks.MAX_MODALITIES) - 1:
        raise ValueError(f"lazy must be a combination id in 1..255, got {lazy}")
    device = _logits_labels_comb(logits, labels, comb, None)
    choice = _dispatch.resolve("tla_loss", backend, device)
    _check_values(choice.backend, logits, labels, comb, None)
    return choice.impl(logits, labels, comb.long(), lazy)
