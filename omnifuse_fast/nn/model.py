"""``OmniFuse``: encoders -> imputer -> heads -> the joint objective of eq. 18 (SPEC section 4)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from omnifuse_fast import _checks
from omnifuse_fast._dispatch import BACKENDS
from omnifuse_fast.nn import _inputs
from omnifuse_fast.nn.dwfuse import DWFuseLoss, joint_cross_entropy
from omnifuse_fast.nn.encoders import MLPEncoder
from omnifuse_fast.nn.imputer import MISSING_EMBEDDINGS, OmniFuseImputer
from omnifuse_fast.nn.tla import TLAMiner, contains, expand_subsets, masked_mean
from omnifuse_fast.ops import combination_ids, tla_loss


class OmniFuseOutput(NamedTuple):
    """What :meth:`OmniFuse.forward` returns.

    Attributes:
        joint_logits: ``o [B, C]`` (the prediction: ``softmax(o)``).
        modality_logits: ``z [B, M, C]`` from the unimodal heads on ``v_full``.
        comb: combination id of what the model was fed ``[B]``.
        present: bool ``[B, M]``, what the model was fed (``observed`` minus the drop).
        embeddings: the encoders' outputs ``v [B, M, D]``.
        v_full: the completed embeddings ``[B, M, D]``.
        losses: the terms of eq. 18 and ``"total"`` (empty when no labels were given).
    """

    joint_logits: torch.Tensor
    modality_logits: torch.Tensor
    comb: torch.Tensor
    present: torch.Tensor
    embeddings: torch.Tensor
    v_full: torch.Tensor
    losses: dict[str, torch.Tensor]


def _head(in_dim: int, hidden: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


class OmniFuse(nn.Module):
    """The OmniFuse model and its joint objective.

    ``L = L_forward + l1 * L_backward + l2 * L_DWFuse + l3 * L_TLA`` (eq. 18); each term has a
    switch, giving the ablation rows of Table 4. Without DWFuse the joint head sits on the
    concatenated embeddings ``v_full`` (the concat baseline) and ``l2 * CE(o, y)`` takes the
    place of ``l2 * L_DWFuse``. Without IMP-forward the missing blocks keep their missing
    embeddings (no imputation, no drop, no L_forward); the forward cascade still runs when
    DWFuse needs its latents (eq. 11). Without DWFuse and both IMP terms no cascade runs.

    Args:
        view_dims: input width of each view (M = len, 2..8).
        num_classes: C (>= 2).
        dim: D, the embedding width of every modality.
        hidden: H, the latent width of each residual autoencoder.
        num_blocks: K, residual autoencoders per cascade.
        encoder_hidden: hidden width of the MLP encoders.
        head_hidden: hidden width of the classification heads.
        activation: the cascades' activation.
        drop_rate: supervision drop rate of the imputer in training.
        alpha, beta: DWFuse's weight of L_ra and down-weighting strength.
        lambdas: ``(l1, l2, l3)`` of eq. 18.
        use_dwfuse, use_tla, use_imp_forward, use_imp_backward: the ablation switches.
        tla_mode: ``"observed"`` or ``"subsets"`` (see :class:`TLAMiner`).
        tla_distance, tla_reduction: the miner's distance and reduction.
        missing_embedding: ``"zero_input"`` (the encoders on zeros, eq. 2) or ``"learned"``.
        detach_target, detach_weight: stop-gradients of the imputation target and of omega.
        encoders: custom encoders (one per view, output ``[B, dim]``); with
            ``"zero_input"`` each needs a ``missing_embedding()`` method. MLPs when None.
        backend: backend of every functional op.
        multilabel: labels are float ``[B, C]`` indicators: BCE joint loss, ``sigmoid(o)``
            predictions, and TLA's distance is each sample's joint BCE (mean over labels).
            Without it, labels must be int64 class indices ``[B]`` (float labels are refused:
            a one-hot float target must not silently change the loss).
    """

    def __init__(
        self,
        view_dims: Sequence[int],
        num_classes: int,
        dim: int = 64,
        hidden: int = 128,
        num_blocks: int = 5,
        encoder_hidden: int = 128,
        head_hidden: int = 64,
        activation: str = "relu",
        drop_rate: float = 0.3,
        alpha: float = 0.1,
        beta: float = 0.5,
        lambdas: Sequence[float] = (1.0, 10.0, 0.5),
        use_dwfuse: bool = True,
        use_tla: bool = True,
        use_imp_forward: bool = True,
        use_imp_backward: bool = True,
        tla_mode: str = "observed",
        tla_distance: str = "ce",
        tla_reduction: str = "mean",
        missing_embedding: str = "zero_input",
        detach_target: bool = True,
        detach_weight: bool = True,
        encoders: Sequence[nn.Module] | None = None,
        backend: str = "auto",
        multilabel: bool = False,
    ) -> None:
        super().__init__()
        self.multilabel = bool(multilabel)
        view_dims = [int(d) for d in view_dims]
        m = _checks.num_modalities(len(view_dims), "len(view_dims) (M)")
        for i, d in enumerate(view_dims):
            _checks.positive_int(f"view_dims[{i}]", d)
        self.num_classes = _checks.positive_int("num_classes", num_classes, minimum=2)
        self.dim = _checks.positive_int("dim", dim)
        _checks.positive_int("head_hidden", head_hidden)
        if len(tuple(lambdas)) != 3:
            raise ValueError(f"lambdas must be (l1, l2, l3), got {lambdas!r}")
        self.lambdas = tuple(
            _checks.real(f"lambdas[{i}]", v, lo=0.0) for i, v in enumerate(lambdas)
        )
        _checks.choice("missing_embedding", missing_embedding, MISSING_EMBEDDINGS)
        self.view_dims, self.num_modalities = view_dims, m
        self.use_dwfuse, self.use_tla = bool(use_dwfuse), bool(use_tla)
        self.use_imp_forward, self.use_imp_backward = bool(use_imp_forward), bool(use_imp_backward)
        self.missing_embedding = missing_embedding

        if encoders is None:
            encoders = [MLPEncoder(d, dim, encoder_hidden) for d in view_dims]
        elif len(encoders) != m:
            raise ValueError(f"encoders must hold one module per view ({m}), got {len(encoders)}")
        self.encoders = nn.ModuleList(encoders)
        if missing_embedding == "zero_input":
            for i, enc in enumerate(self.encoders):
                if not callable(getattr(enc, "missing_embedding", None)):
                    raise ValueError(
                        f'encoders[{i}] has no missing_embedding(); use missing_embedding="learned"'
                    )
        needs_cra = self.use_dwfuse or self.use_imp_forward or self.use_imp_backward
        self.imputer: OmniFuseImputer | None = None
        if needs_cra:
            self.imputer = OmniFuseImputer(
                m,
                dim,
                hidden,
                num_blocks,
                activation,
                drop_rate,
                detach_target=detach_target,
                missing_embedding=missing_embedding,
                use_forward=self.use_imp_forward,
                use_backward=self.use_imp_backward,
            )
        elif missing_embedding == "learned":
            self.missing = nn.Parameter(torch.zeros(m, dim))
        self.heads = nn.ModuleList(_head(dim, head_hidden, num_classes) for _ in range(m))
        if self.use_dwfuse:
            assert self.imputer is not None
            self.fusion_head = _head(self.imputer.latent_dim, head_hidden, num_classes)
        else:
            self.fusion_head = _head(m * dim, head_hidden, num_classes)
        self.dwfuse = DWFuseLoss(alpha, beta, detach_weight, multilabel=self.multilabel)
        self.miner = TLAMiner(m, tla_distance, tla_reduction, tla_mode)
        self.backend = backend

    # ----------------------------------------------------------------- plumbing
    @property
    def backend(self) -> str:
        """Backend of every functional op the model calls."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value != "auto" and value not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {value!r}")
        self._backend = value
        if self.imputer is not None:
            self.imputer.backend = value
        self.dwfuse.backend = value
        self.miner.backend = value

    def parameter_groups(
        self,
    ) -> tuple[list[nn.Parameter], list[list[nn.Parameter]], list[nn.Parameter]]:
        """``(shared, heads per modality, fusion head)`` parameters, for :class:`MIMOBalancer`."""
        heads = [list(h.parameters()) for h in self.heads]
        fusion = list(self.fusion_head.parameters())
        taken = {id(p) for p in fusion} | {id(p) for h in heads for p in h}
        shared = [p for p in self.parameters() if id(p) not in taken]
        return shared, heads, fusion

    # ----------------------------------------------------------------- forward
    def embed(
        self, views: Sequence[torch.Tensor], observed: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-modality encoders (eq. 1): ``v [B, M, D]``.

        With ``observed``, the rows of each view that ``observed`` marks missing are zeroed by a
        select before its encoder, so that whatever they hold (NaN, inf, garbage) changes no
        value and no gradient (not even the encoders' weight gradients, where ``0 * NaN``
        would be NaN); the observed rows must be finite.
        """
        if len(views) != self.num_modalities:
            raise ValueError(f"views must hold {self.num_modalities} tensors, got {len(views)}")
        for i, (x, d) in enumerate(zip(views, self.view_dims)):
            _checks.floating(f"views[{i}]", x, ndim=2, shape=(views[0].shape[0], d))
        for i, (x, enc) in enumerate(zip(views, self.encoders)):
            if isinstance(enc, MLPEncoder):  # a custom encoder may take any input dtype
                _inputs.module_dtype(f"views[{i}]", x, enc.net[0].weight, f"encoders[{i}]")
        if observed is not None:
            _checks.tensor(
                "observed",
                observed,
                ndim=2,
                dtypes=(torch.bool,),
                shape=(views[0].shape[0], self.num_modalities),
            )
            for i, x in enumerate(views):
                _inputs.finite_rows(f"views[{i}]", x, observed[:, i], i)
            views = [torch.where(observed[:, i : i + 1], x, 0.0) for i, x in enumerate(views)]
        return torch.stack([enc(x) for enc, x in zip(self.encoders, views)], dim=1)

    def missing_embeddings(self) -> torch.Tensor | None:
        """``u [M, D]``: the encoders on an all-zero input (eq. 2), or the learned vectors."""
        if self.missing_embedding == "zero_input":
            return torch.stack([enc.missing_embedding() for enc in self.encoders])
        return None if self.imputer is not None else self.missing

    def _complete(self, v, observed, u, present=None, losses=True):
        """``(v_full, latents | None, present, L_forward, L_backward)``."""
        if self.imputer is not None:
            imp = self.imputer(v, observed, u, present=present, losses=losses)
            return imp.v_full, imp.latents, imp.present, imp.loss_forward, imp.loss_backward
        _checks.present_mask("observed", observed)
        present = observed if present is None else present
        assert u is not None
        # a select, not P*v + (1-P)*u: a missing block's content must not leak (NaN * 0 = NaN)
        v_full = torch.where(present.unsqueeze(-1), v, u.unsqueeze(0).to(v.dtype))
        zero = v.new_zeros(())
        return v_full, None, present, zero, zero

    def _joint(self, v_full: torch.Tensor, latents: torch.Tensor | None) -> torch.Tensor:
        if self.use_dwfuse:
            return self.fusion_head(latents)  # g_ra on the forward CRA's latents (eq. 11)
        return self.fusion_head(v_full.flatten(1))

    def joint_logits_from_embeddings(self, v_full: torch.Tensor) -> torch.Tensor:
        """Joint logits of complete embeddings ``[B, M, D]`` (every modality present).

        Used by MM learning, which mixes embeddings across samples.
        """
        latents = None
        if self.use_dwfuse:
            assert self.imputer is not None
            latents = self.imputer.forward_cra(v_full.flatten(1))[1]
        return self._joint(v_full, latents)

    def draw_present(
        self, observed: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The mask :meth:`forward` would feed: the imputer's supervision drop in training.

        Draw it outside a compiled region and pass it as ``present``: the step then traces as
        one graph, and ``forward(..., present=None)`` would have drawn the very same mask from
        the same RNG state (so eager, compiled and resumed runs agree).
        """
        if self.imputer is None:
            return observed
        return self.imputer.draw_present(observed, generator)

    def forward(
        self,
        views: Sequence[torch.Tensor],
        observed: torch.Tensor,
        labels: torch.Tensor | None = None,
        present: torch.Tensor | None = None,
    ) -> OmniFuseOutput:
        """Run the model; with ``labels``, also the terms of eq. 18.

        Args:
            views: one float tensor ``[B, D_m]`` per view. Rows that ``observed`` marks missing
                may hold anything (zeros, NaN, inf): they change no value and no gradient.
            observed: bool ``[B, M]``, which views are real (no all-false row).
            labels: int64 ``[B]`` (float ``[B, C]`` 0/1 with ``multilabel=True``); when
                given, ``losses`` holds every enabled term.
            present: feed exactly this mask (within ``observed``) instead of drawing the
                imputer's supervision drop (see :meth:`draw_present`).
        """
        v = self.embed(views, observed)
        u = self.missing_embeddings()
        v_full, latents, present, l_fwd, l_bwd = self._complete(v, observed, u, present)
        z = torch.stack([h(v_full[:, i]) for i, h in enumerate(self.heads)], dim=1)
        o = self._joint(v_full, latents)
        comb = combination_ids(present, backend=self.backend)
        losses: dict[str, torch.Tensor] = {}
        if labels is not None:
            losses = self._objective(v, observed, u, z, o, comb, labels, l_fwd, l_bwd)
        return OmniFuseOutput(o, z, comb, present, v, v_full, losses)

    def _objective(self, v, observed, u, z, o, comb, labels, l_fwd, l_bwd):
        self.dwfuse.check_labels(labels, o)
        l1, l2, l3 = self.lambdas
        losses: dict[str, torch.Tensor] = {}
        total = o.new_zeros(())
        if self.use_imp_forward:
            losses["forward"] = l_fwd
            total = total + l_fwd
        if self.use_imp_backward:
            losses["backward"] = l_bwd
            total = total + l1 * l_bwd
        if self.use_dwfuse:
            terms = self.dwfuse(z, o, labels)
            losses.update(enc=terms.enc, ra=terms.ra, dwfuse=terms.loss)
            total = total + l2 * terms.loss
        else:
            ce = joint_cross_entropy(o, labels)
            losses["ce"] = ce
            total = total + l2 * ce
        if self.use_tla:
            tla = self._tla_term(v, observed, u, o, comb, labels)
            losses["tla"] = tla
            total = total + l3 * tla
        losses["total"] = total
        return losses

    # ----------------------------------------------------------------- TLA
    def _tla_term(self, v, observed, u, o, comb, labels) -> torch.Tensor:
        # Branch-free on the lazy id (a buffer, never read on the host): one graph under
        # torch.compile. Before the first mining the id is 0, no sample matches: a real 0.
        self.miner.check_lazy()
        if not torch.compiler.is_compiling() and self.miner.lazy is None:
            return o.new_zeros(())  # eager, before the first mining: a constant 0, no graph
        lazy = self.miner.lazy_id
        if self.miner.mode == "observed":
            if labels.dim() == 2:
                return _multilabel_tla_loss(o, labels, comb == lazy)
            return self.miner.loss(o, labels, comb)
        # subsets: samples whose observed set contains lazy, predicted from lazy alone. Every
        # row runs (no data-dependent shape); rows that do not contain lazy are fed their own
        # observed set and masked out of the mean.
        hit = contains(combination_ids(observed, backend=self.backend), lazy) & (lazy > 0)
        bits = ((lazy >> torch.arange(self.num_modalities, device=v.device)) & 1).bool()
        present = torch.where(hit.unsqueeze(1), bits.unsqueeze(0), observed)
        v_full, latents, _, _, _ = self._complete(v, observed, u, present, losses=False)
        logits = self._joint(v_full, latents)
        if labels.dim() == 2:
            return _multilabel_tla_loss(logits, labels, hit)
        ids = torch.where(hit, 1, 2)  # eq. 17 over the hit rows: "combination 1" stands for them
        return tla_loss(logits, labels, ids, 1, backend=self.backend)

    @torch.no_grad()
    def tla_observe(
        self, out: OmniFuseOutput, observed: torch.Tensor, labels: torch.Tensor
    ) -> None:
        """Add a training batch to the miner's epoch statistics.

        ``"observed"``: the batch's joint logits under the combination it was fed.
        ``"subsets"``: one extra no-grad pass scoring every non-empty subset of each sample's
        observed modalities (the rest marked missing).
        """
        update = _multilabel_tla_update if labels.dim() == 2 else TLAMiner.update
        if self.miner.mode == "observed":
            update(self.miner, out.joint_logits, labels, out.comb)
            return
        rows, present, comb = expand_subsets(observed)
        u = self.missing_embeddings()
        v = out.embeddings.detach()[rows]
        v_full, latents, _, _, _ = self._complete(v, observed[rows], u, present, losses=False)
        update(self.miner, self._joint(v_full, latents), labels[rows], comb)

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def predict_proba(
        self, views: Sequence[torch.Tensor], observed: torch.Tensor, reading: str = "joint"
    ) -> torch.Tensor:
        """``softmax(o)`` ``[B, C]`` (``sigmoid(o)`` multilabel) in eval mode.

        Only the forward imputation runs. ``reading="imputed"`` is an optional reading in
        which the imputed embeddings reach the prediction: the mean of ``softmax(o)`` and the
        M unimodal heads' ``softmax(z_m)``, where ``z_m`` reads ``v_full`` (the imputed ``v'``
        for a missing modality, ``u`` without IMP-forward). The paper predicts with ``o``
        alone ("joint", the default), which with DWFuse reads the cascade's latents only.
        """
        _checks.choice("reading", reading, ("joint", "imputed"))
        was = self.training
        self.eval()
        try:
            out = self.forward(views, observed)
            act = torch.sigmoid if self.multilabel else (lambda t: F.softmax(t, dim=-1))
            proba = act(out.joint_logits.float())
            if reading == "imputed":  # (p_o + sum_m p_m) / (M + 1)
                proba = (proba + act(out.modality_logits.float()).sum(1)) / (
                    1 + self.num_modalities
                )
            return proba
        finally:
            self.train(was)


# ----------------------------------------------------------------- multilabel TLA
# The TLA ops take class labels; for multilabel labels the distance of eq. 15 is the sample's
# joint BCE (mean over labels, the per-sample share of L_ra) for "ce", and the l1 / l2 distance
# of sigmoid(o) to the indicator vector otherwise. Mining (argmax, ties, all-reduce) is the
# miner's own: only the per-combination sums are accumulated here.


def _multilabel_distance(logits: torch.Tensor, labels: torch.Tensor, distance: str) -> torch.Tensor:
    logits, labels = logits.float(), labels.float()
    if distance == "ce":
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        return bce.mean(dim=1)
    diff = torch.sigmoid(logits) - labels
    return diff.abs().sum(dim=1) if distance == "l1" else diff.square().sum(dim=1)


@torch.no_grad()
def _multilabel_tla_update(
    miner: TLAMiner, logits: torch.Tensor, labels: torch.Tensor, comb: torch.Tensor
) -> None:
    d = _multilabel_distance(logits.detach(), labels, miner.distance)
    comb = comb.to(miner.sums.device, torch.int64)
    miner.sums.index_add_(0, comb, d.to(miner.sums.device, torch.float64))
    miner.counts.index_add_(0, comb, torch.ones_like(comb))


def _multilabel_tla_loss(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Eq. 17 with BCE: the joint BCE over the samples of ``mask [B]``; a real 0 when none."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
    return masked_mean(bce.mean(dim=1), mask).to(logits.dtype)
