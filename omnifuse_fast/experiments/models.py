"""Models the trainer does not build, on the same encoders and heads as OmniFuse.

Each takes ``model(views, observed, labels=None, present=None)`` and returns an
:class:`~omnifuse_fast.nn.OmniFuseOutput` (so :class:`~omnifuse_fast.train.Trainer` trains
it unchanged), has ``use_tla = False`` and ``predict_proba(views, observed)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from omnifuse_fast.nn import MLPEncoder, OmniFuse, OmniFuseOutput
from omnifuse_fast.ops import combination_ids


def _head(in_dim: int, hidden: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


class _Base(nn.Module):
    use_tla = False

    def __init__(
        self, view_dims: Sequence[int], num_classes: int, dim: int, encoder_hidden: int
    ) -> None:
        super().__init__()
        self.num_modalities = len(view_dims)
        self.encoders = nn.ModuleList(MLPEncoder(d, dim, encoder_hidden) for d in view_dims)

    def _embed(self, views, observed, present):
        present = observed if present is None else present
        v = torch.stack([enc(x) for enc, x in zip(self.encoders, views)], dim=1)
        u = torch.stack([enc.missing_embedding() for enc in self.encoders])
        p = present.unsqueeze(-1).to(v.dtype)
        return v, p * v + (1.0 - p) * u.unsqueeze(0), present  # missing -> u, as OmniFuse

    @torch.no_grad()
    def predict_proba(self, views: Sequence[torch.Tensor], observed: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``[B, C]`` in eval mode."""
        was = self.training
        self.eval()
        try:
            return self._proba(self.forward(views, observed))
        finally:
            self.train(was)

    def _proba(self, out: OmniFuseOutput) -> torch.Tensor:
        return F.softmax(out.joint_logits.float(), dim=1)


class SumFusion(_Base):
    """Early fusion by summing the embeddings (missing ones are the missing embeddings u)."""

    def __init__(self, view_dims, num_classes, dim=32, encoder_hidden=128, head_hidden=64):
        super().__init__(view_dims, num_classes, dim, encoder_hidden)
        self.fusion_head = _head(dim, head_hidden, num_classes)

    def forward(self, views, observed, labels=None, present=None) -> OmniFuseOutput:
        v, v_full, present = self._embed(views, observed, present)
        o = self.fusion_head(v_full.sum(dim=1))
        losses = {}
        if labels is not None:
            losses = {"ce": F.cross_entropy(o.float(), labels)}
            losses["total"] = losses["ce"]
        z = o.new_zeros(o.shape[0], 0, o.shape[1])  # no unimodal heads
        return OmniFuseOutput(o, z, combination_ids(present), present, v, v_full, losses)


class LateFusion(_Base):
    """One encoder + head per view, each trained on its own CE over the samples that observe
    the view; the prediction is the mean of the present views' probabilities."""

    def __init__(self, view_dims, num_classes, dim=32, encoder_hidden=128, head_hidden=64):
        super().__init__(view_dims, num_classes, dim, encoder_hidden)
        self.heads = nn.ModuleList(_head(dim, head_hidden, num_classes) for _ in view_dims)

    def forward(self, views, observed, labels=None, present=None) -> OmniFuseOutput:
        v, v_full, present = self._embed(views, observed, present)
        z = torch.stack([h(v_full[:, m]) for m, h in enumerate(self.heads)], dim=1)
        p = present.float()
        prob = (F.softmax(z.float(), dim=2) * p.unsqueeze(-1)).sum(1) / p.sum(1, keepdim=True)
        o = prob.clamp_min(1e-12).log()  # log of the averaged probabilities
        losses = {}
        if labels is not None:
            ce = torch.stack(
                [
                    F.cross_entropy(z[:, m].float(), labels, reduction="none")
                    for m in range(z.shape[1])
                ],
                dim=1,
            )  # [B, M]
            per_view = (ce * p).sum(0) / p.sum(0).clamp_min(1.0)
            losses = {"total": per_view.sum()}  # independent views: the sum trains each alone
        return OmniFuseOutput(o, z, combination_ids(present), present, v, v_full, losses)

    @torch.no_grad()
    def predict_view_proba(
        self, views: Sequence[torch.Tensor], observed: torch.Tensor, view: int
    ) -> torch.Tensor:
        """The unimodal model of ``view`` alone on every sample (u where the view is missing)."""
        was = self.training
        self.eval()
        try:
            return F.softmax(self.forward(views, observed).modality_logits[:, view].float(), 1)
        finally:
            self.train(was)


class UniformJoint(nn.Module):
    """An OmniFuse (baseline) model trained on ``L_0 + sum_m L_m`` with equal weights: the
    M+1 objectives MIMO and MGDA balance, summed uniformly. ``L_m`` is the CE of unimodal
    head m over the batch, exactly as the trainer feeds MIMO."""

    use_tla = False

    def __init__(self, inner: OmniFuse) -> None:
        super().__init__()
        self.inner = inner
        self.num_modalities = inner.num_modalities

    def forward(self, views, observed, labels=None, present=None) -> OmniFuseOutput:
        out = self.inner(views, observed, labels, present)
        if labels is not None:
            z = out.modality_logits
            uni = sum(F.cross_entropy(z[:, m].float(), labels) for m in range(z.shape[1]))
            out.losses["unimodal"] = uni
            out.losses["total"] = out.losses["total"] + uni
        return out

    def embed(self, views: Sequence[torch.Tensor]) -> torch.Tensor:
        """The inner model's encoders."""
        return self.inner.embed(views)

    def predict_proba(self, views: Sequence[torch.Tensor], observed: torch.Tensor) -> torch.Tensor:
        """The inner model's ``softmax(o)``."""
        return self.inner.predict_proba(views, observed)
