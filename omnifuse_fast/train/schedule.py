"""MM learning's bilevel schedule: pick the strongly predicted samples after stage 1."""

from __future__ import annotations

import torch


def select_strong(
    p_true: torch.Tensor,
    tau: float | None = 0.9,
    top_fraction: float = 0.5,
    minimum: int = 2,
) -> torch.Tensor:
    """Indices (sorted, int64) of the samples with a strong prediction of their true class.

    With ``tau`` set: the samples with ``p_true >= tau``; if fewer than ``minimum`` qualify,
    the top ``top_fraction`` instead (so stage 2 always has a pool to mix). With ``tau=None``:
    the top ``top_fraction`` (at least ``minimum``, at most all). Ties in the ranking go to
    the lower index (stable sort).

    Args:
        p_true: probability of each training sample's true class ``[N]``.
        tau: threshold in (0, 1], or None.
        top_fraction: fraction in (0, 1].
        minimum: smallest pool size (capped at N).
    """
    if p_true.dim() != 1 or p_true.numel() == 0:
        raise ValueError(f"p_true must be a non-empty 1-D tensor, got shape {tuple(p_true.shape)}")
    if tau is not None and not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1] or None, got {tau}")
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    n = p_true.numel()
    minimum = min(max(1, minimum), n)
    if tau is not None:
        chosen = torch.nonzero(p_true >= tau).flatten()
        if chosen.numel() >= minimum:
            return chosen
    k = min(n, max(minimum, round(top_fraction * n)))
    order = torch.sort(p_true, descending=True, stable=True).indices
    return torch.sort(order[:k]).values
