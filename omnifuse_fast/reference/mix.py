"""MM learning (SPEC section 5): modality-mixed samples with proportion labels, soft CE."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omnifuse_fast.reference._common import acc_dtype, upcast


def modality_mix(
    v: torch.Tensor,
    labels: torch.Tensor,
    src: torch.Tensor,
    num_classes: int,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``v_mix[b, m] = v[src[m, b], m]``; ``q[b] = sum_m w_m onehot(y[src[m, b]])``."""
    b, m, _ = v.shape
    acc = acc_dtype(v.dtype)
    src = src.long()
    modality = torch.arange(m, device=v.device).unsqueeze(1).expand(m, b)  # [M, B]
    v_mix = v[src, modality].transpose(0, 1)  # [B, M, D]; autograd scatter-adds back into v
    if weights is None:
        w = torch.full((b, m), 1.0 / m, dtype=acc, device=v.device)
    else:
        w = weights.to(acc).expand(b, m)
    src_labels = labels[src].transpose(0, 1)  # [B, M]
    soft = torch.zeros(b, num_classes, dtype=acc, device=v.device)
    soft.scatter_add_(1, src_labels, w)
    # A sample whose sources share one label keeps an exact hard label.
    same = (src_labels == src_labels[:, :1]).all(dim=1, keepdim=True)
    hard = F.one_hot(src_labels[:, 0], num_classes).to(acc)
    soft = torch.where(same, hard, soft)
    return v_mix, soft.to(v.dtype)


def soft_cross_entropy(logits: torch.Tensor, soft_labels: torch.Tensor) -> torch.Tensor:
    """``mean_b( -sum_c q_{b,c} log_softmax(z_b)_c )``, fp32 inside; 0 for an empty batch."""
    z = upcast(logits)
    per_sample = -(soft_labels.to(z.dtype) * torch.log_softmax(z, dim=1)).sum(dim=1)
    # sum / max(B, 1): an empty batch is a real 0, not the NaN of an empty mean
    return (per_sample.sum() / max(logits.shape[0], 1)).to(logits.dtype)


def random_sources(
    batch: int, num_modalities: int, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """Default ``src [M, B]``: identity for modality 0, an independent permutation for the rest."""
    rows = [torch.arange(batch)]
    rows += [torch.randperm(batch, generator=generator) for _ in range(num_modalities - 1)]
    return torch.stack(rows).to(device)
