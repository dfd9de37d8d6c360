"""Models the trainer does not build, on the same encoders and heads as OmniFuse.

Each takes ``model(views, observed, labels=None, present=None)`` and returns an
:class:`~omnifuse_fast.nn.OmniFuseOutput` (so :class:`~omnifuse_fast.train.Trainer` trains
it unchanged), has ``use_tla = False`` and ``predict_proba(views, observed)``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from omnifuse_fast.nn import MLPEncoder, OmniFuse, OmniFuseOutput
from omnifuse_fast.nn.imputer import supervision_drop
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

    def embed(self, views: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-view encoders: ``v [B, M, D]``."""
        return torch.stack([enc(x) for enc, x in zip(self.encoders, views)], dim=1)

    def _embed(self, views, observed, present):
        present = observed if present is None else present
        v = torch.stack([enc(x) for enc, x in zip(self.encoders, views)], dim=1)
        u = torch.stack([enc.missing_embedding() for enc in self.encoders])
        p = present.unsqueeze(-1).to(v.dtype)
        return v, p * v + (1.0 - p) * u.unsqueeze(0), present  # missing -> u, as OmniFuse

    @torch.no_grad()
    def predict_proba(
        self, views: Sequence[torch.Tensor], observed: torch.Tensor, reading: str = "joint"
    ) -> torch.Tensor:
        """Class probabilities ``[B, C]`` in eval mode (one reading: ``reading`` is ignored)."""
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


class _Delegate(nn.Module):
    """A wrapper that forwards every attribute it lacks to ``inner`` (an OmniFuse)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "inner":
                raise
            return getattr(self.inner, name)

    def predict_proba(self, views, observed, reading: str = "joint") -> torch.Tensor:
        """The inner model's prediction (``reading`` as :meth:`OmniFuse.predict_proba`)."""
        if reading == "joint":
            return self.inner.predict_proba(views, observed)
        return self.inner.predict_proba(views, observed, reading=reading)


class DropAugment(_Delegate):
    """The imputer's supervision drop for a model without imputation.

    OmniFuse draws ``present = observed & ~drop`` in training only when IMP-forward or
    IMP-backward is on; "No-imp" would then also lose the modality-drop augmentation, and the
    Imp vs No-imp comparison would change two things at once. This wrapper feeds the inner
    model the same drop (:func:`~omnifuse_fast.nn.imputer.supervision_drop`, same rate, the
    global RNG) so that only the imputation differs.
    """

    def __init__(self, inner: nn.Module, drop_rate: float) -> None:
        super().__init__(inner)
        self.drop_rate = float(drop_rate)

    def forward(self, views, observed, labels=None, present=None) -> OmniFuseOutput:
        if self.training and present is None:
            present = supervision_drop(observed, self.drop_rate)
        return self.inner(views, observed, labels, present)


class LabelScarce(_Delegate):
    """Labels for some training rows only (``label < 0``: unlabeled); the imputation losses on
    every row.

    The inner model's full objective (eq. 18) runs on the labeled rows of a batch; on the
    unlabeled rows only the imputer runs, and its L_forward / L_backward replace the labeled
    rows' ones by the row-weighted mean over the whole batch. Without imputation the unlabeled
    rows contribute nothing. The output (and the TLA miner's statistics) covers the labeled
    rows.
    """

    def forward(self, views, observed, labels=None, present=None) -> OmniFuseOutput:
        inner = self.inner
        if labels is None or not self.training:
            return inner(views, observed, labels, present)
        lab = labels >= 0
        li, ui = torch.nonzero(lab).flatten(), torch.nonzero(~lab).flatten()

        def rows(idx):
            return [x[idx] for x in views], observed[idx], None if present is None else present[idx]

        imputes = inner.use_imp_forward or inner.use_imp_backward
        if li.numel() == 0 and not imputes:
            raise ValueError("LabelScarce: a batch without labeled rows and nothing to impute")
        self._rows = li
        fwd = bwd = None
        if ui.numel() and imputes:
            v_u, obs_u, pres_u = rows(ui)
            imp = inner.imputer(inner.embed(v_u), obs_u, inner.missing_embeddings(), present=pres_u)
            fwd, bwd = imp.loss_forward, imp.loss_backward
        if li.numel() == 0:  # only unlabeled rows: the imputation losses alone
            v_u, obs_u, pres_u = rows(ui)
            out = inner(v_u, obs_u, None, pres_u)
            self._rows = ui[:0]
            total = fwd * float(inner.use_imp_forward) + inner.lambdas[0] * bwd * float(
                inner.use_imp_backward
            )
            return out._replace(losses={"total": total})
        v_l, obs_l, pres_l = rows(li)
        out = inner(v_l, obs_l, labels[li], pres_l)
        if fwd is None:
            return out
        n_l, n_u = li.numel(), ui.numel()
        losses = dict(out.losses)
        total = losses["total"]
        for key, new, weight in (("forward", fwd, 1.0), ("backward", bwd, inner.lambdas[0])):
            if key in losses:
                mixed = (n_l * losses[key] + n_u * new) / (n_l + n_u)
                total = total - weight * losses[key] + weight * mixed
                losses[key] = mixed
        losses["total"] = total
        return out._replace(losses=losses)

    @torch.no_grad()
    def tla_observe(self, out, observed, labels) -> None:
        """The miner sees the labeled rows (those the output covers)."""
        rows = self._rows
        if rows.numel():
            self.inner.tla_observe(out, observed[rows], labels[rows])


class BranchTracker:
    """Per-view early stopping of a :class:`LateFusion` model's branches.

    Its branches (encoder + head of one view) share no parameter and are trained by a sum of
    independent losses, so each is a unimodal model; called after every epoch, the tracker
    keeps each branch's weights at its own lowest validation NLL (on every validation row).
    """

    def __init__(self, model: LateFusion, val) -> None:
        self.model, self.val = model, val
        self.best = [math.inf] * model.num_modalities
        self.states: list[dict | None] = [None] * model.num_modalities

    def __call__(self, trainer) -> bool:
        improved = False
        labels = self.val.labels.view(-1, 1)
        for m in range(self.model.num_modalities):
            p = self.model.predict_view_proba(self.val.views, self.val.observed, m)
            value = float(-p.gather(1, labels).clamp_min(1e-12).log().mean())
            if value < self.best[m]:
                self.best[m], improved = value, True
                self.states[m] = {
                    "encoder": copy.deepcopy(self.model.encoders[m].state_dict()),
                    "head": copy.deepcopy(self.model.heads[m].state_dict()),
                }
        return improved

    def selected(self) -> LateFusion:
        """A copy of the model with every branch at its own selected weights."""
        model = copy.deepcopy(self.model)
        for m, state in enumerate(self.states):
            if state is not None:
                model.encoders[m].load_state_dict(state["encoder"])
                model.heads[m].load_state_dict(state["head"])
        return model

    @torch.no_grad()
    def proba(self, split, m: int) -> torch.Tensor:
        """View ``m``'s unimodal prediction on ``split``, with the branch's selected weights."""
        return self.selected().predict_view_proba(split.views, split.observed, m)
