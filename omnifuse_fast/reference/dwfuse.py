"""DWFuse (SPEC section 2): weights from the other modalities' complements, in log space.

Multiclass: ``log(1 - p) = logsumexp_{c != y} z_c - logsumexp_c z_c`` (exact for p in [0, 1]),
with ``z`` shifted by its row max first so that large logits lose no precision.
Multilabel: per label, ``1 - p`` is the probability of the wrong value, so
``log(1 - p) = logsigmoid(z)`` if the label is 0 and ``logsigmoid(-z)`` if it is 1.
``omega_{b,m} = exp(beta / (M - 1) * sum_{n != m} log(1 - p_{b,n}))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omnifuse_fast.reference._common import upcast


def _log_complement_and_ce(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log(1 - p)`` and the per-element CE (fp32, or fp64 for fp64 logits).

    Shapes: [B, M] multiclass, [B, M, C] multilabel.
    """
    z = upcast(logits)
    if labels.dim() == 2:  # multilabel, labels [B, C] in {0, 1}
        y = labels.to(z.dtype).unsqueeze(1)  # [B, 1, C]
        log_comp = F.logsigmoid(
            z * (1.0 - 2.0 * y)
        )  # wrong value: sigma(z) if y=0, sigma(-z) if y=1
        ce = F.binary_cross_entropy_with_logits(z, y.expand_as(z), reduction="none")
        return log_comp, ce
    index = labels.view(-1, 1, 1).expand(-1, z.shape[1], 1)  # [B, M, 1]
    # Shift by the row max first: both logsumexps are then O(log C), so their difference keeps
    # full precision (two absolute logsumexps at |z| ~ 1e4 lose ulp(1e4) ~ 1e-3 in fp32).
    z = z - z.amax(dim=-1, keepdim=True).detach()
    lse_all = torch.logsumexp(z, dim=-1)  # [B, M]
    z_true = z.gather(-1, index).squeeze(-1)  # [B, M]
    others = z.scatter(-1, index, float("-inf"))  # mask out the true class
    log_comp = torch.logsumexp(others, dim=-1) - lse_all
    return log_comp, lse_all - z_true


def _weights_from_log_complement(log_comp: torch.Tensor, beta: float) -> torch.Tensor:
    """``exp(beta/(M-1) * sum_{n != m} log_comp_n)``; modality dim is 1."""
    m = log_comp.shape[1]
    # Sum the others explicitly (not total minus own): exact when magnitudes differ a lot.
    expanded = log_comp.unsqueeze(1).expand(-1, m, *log_comp.shape[1:])  # [B, m, n, ...]
    eye = torch.eye(m, dtype=torch.bool, device=log_comp.device)
    eye = eye.view(1, m, m, *([1] * (log_comp.dim() - 2)))
    others = torch.where(eye, torch.zeros((), device=log_comp.device), expanded).sum(dim=2)
    return torch.exp(beta / (m - 1) * others)


def dwfuse_weights(logits: torch.Tensor, labels: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """omega ``[B, M]`` (``[B, M, C]`` multilabel), in the logits' dtype."""
    log_comp, _ = _log_complement_and_ce(logits, labels)
    return _weights_from_log_complement(log_comp, beta).to(logits.dtype)


def dwfuse_loss(
    logits: torch.Tensor, labels: torch.Tensor, beta: float = 0.5, detach_weight: bool = True
) -> torch.Tensor:
    """``L_enc = (1/B) sum_b sum_m omega_{b,m} CE(z_{b,m}, y_b)`` (multilabel: mean over labels)."""
    log_comp, ce = _log_complement_and_ce(logits, labels)
    omega = _weights_from_log_complement(log_comp, beta)
    if detach_weight:
        omega = omega.detach()
    weighted = omega * ce
    if labels.dim() == 2:
        weighted = weighted.mean(dim=-1)  # average over labels
    return (weighted.sum(dim=1).mean()).to(logits.dtype)
