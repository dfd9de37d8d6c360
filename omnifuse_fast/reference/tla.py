"""TLA (SPEC section 3): per-combination distance sums and counts, and the masked CE."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omnifuse_fast.reference._common import acc_dtype, upcast


def combination_ids(present: torch.Tensor) -> torch.Tensor:
    """``comb[b] = sum_m present[b, m] << m`` as int64 ``[B]``."""
    bits = torch.arange(present.shape[1], device=present.device)
    return (present.long() << bits).sum(dim=1)


def sample_distance(
    logits: torch.Tensor, labels: torch.Tensor, distance: str = "ce"
) -> torch.Tensor:
    """``d_b = D(softmax(logits_b), y_b)`` in fp32 (fp64 for fp64 logits), ``[B]``."""
    z = upcast(logits)
    if distance == "ce":
        return F.cross_entropy(z, labels, reduction="none")
    prob = torch.softmax(z, dim=1)
    diff = prob - F.one_hot(labels, z.shape[1]).to(z.dtype)
    if distance == "l1":
        return diff.abs().sum(dim=1)
    return diff.square().sum(dim=1)  # "l2": squared Euclidean


def tla_stats(
    logits: torch.Tensor,
    labels: torch.Tensor,
    comb: torch.Tensor,
    num_modalities: int,
    distance: str = "ce",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``S_c = sum_{comb_b = c} d_b`` (fp32) and ``N_c`` (int64), both ``[2**M]``; bin 0 unused."""
    bins = 1 << num_modalities
    d = sample_distance(logits.detach(), labels, distance)
    sums = torch.zeros(bins, dtype=torch.float32, device=logits.device).index_add_(
        0, comb.long(), d.float()
    )
    # index_add_, not bincount: a static shape, so the miner's update traces into one graph
    counts = torch.zeros(bins, dtype=torch.int64, device=logits.device).index_add_(
        0, comb.long(), torch.ones_like(comb, dtype=torch.int64)
    )
    return sums, counts


def tla_loss(
    logits: torch.Tensor, labels: torch.Tensor, comb: torch.Tensor, lazy: int
) -> torch.Tensor:
    """Eq. 17: CE over the samples of combination ``lazy``; a real 0 when there are none."""
    mask = (comb == lazy).to(acc_dtype(logits.dtype))
    ce = F.cross_entropy(upcast(logits), labels, reduction="none")
    # sum/count rather than boolean indexing: no data-dependent shape, and 0 (not NaN) when empty
    return ((ce * mask).sum() / mask.sum().clamp_min(1.0)).to(logits.dtype)
