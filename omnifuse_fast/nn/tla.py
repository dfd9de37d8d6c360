"""``TLAMiner``: epoch-wise lazy-combination mining and the TLA loss (SPEC section 3)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from omnifuse_fast import _checks
from omnifuse_fast.nn import _inputs
from omnifuse_fast.ops import combination_ids, tla_loss, tla_stats

REDUCTIONS = ("mean", "sum")
MODES = ("observed", "subsets")


def expand_subsets(observed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every non-empty subset of each sample's observed modalities, one row per (sample, subset).

    Args:
        observed: bool ``[B, M]`` (no all-false row).

    Returns:
        ``(rows [R], present [R, M], comb [R])``: the sample each row comes from, the subset it
        feeds the model, and the subset's combination id. ``R <= B * (2**M - 1)``; rows are
        ordered by sample, then by combination id.
    """
    _checks.present_mask("observed", observed)
    m = observed.shape[1]
    combos = torch.arange(1, 1 << m, device=observed.device)  # [2^M - 1]
    bits = (combos.unsqueeze(1) >> torch.arange(m, device=observed.device)) & 1  # [C, M]
    obs = combination_ids(observed, backend="reference").unsqueeze(1)  # [B, 1]
    within = (combos.unsqueeze(0) & obs) == combos.unsqueeze(0)  # [B, C]: subset of observed
    rows, idx = within.nonzero(as_tuple=True)
    return rows, bits[idx].bool(), combos[idx]


def contains(comb: torch.Tensor, lazy: int | torch.Tensor) -> torch.Tensor:
    """bool ``[B]``: the samples whose combination holds every modality of ``lazy``."""
    return (comb & lazy) == lazy


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values [B]`` over ``mask [B]``; a real 0 (zero gradient) when nothing is
    selected. A select, so unselected entries may hold anything; no data-dependent shape."""
    picked = torch.where(mask, values, 0.0)
    return picked.sum() / mask.sum().clamp_min(1).to(picked.dtype)


class TLAMiner(nn.Module):
    """Traceable laziness activation: mine the lazy combination each epoch, then activate it.

    During an epoch, :meth:`update` adds each batch's per-combination distance sums ``S`` and
    counts ``N`` (fp64/int64 buffers). :meth:`mine` (at the epoch's end) all-reduces them when
    ``torch.distributed`` is initialized, scores every combination (``S/N`` for ``"mean"``,
    ``S`` for ``"sum"``; ``N = 0`` never wins), takes the argmax (ties: the smallest id),
    resets the sums and stores the winner. :meth:`loss` is eq. 17 for the stored winner.
    Everything (S, N, lazy, epoch) is in ``state_dict``.

    Args:
        num_modalities: M (2..8).
        distance: ``"ce"``, ``"l1"`` or ``"l2"`` (per-sample distance of eq. 15).
        reduction: ``"mean"`` (default) or ``"sum"`` (eq. 15 literally).
        mode: ``"observed"`` (each sample's own combination) or ``"subsets"`` (also score
            every subset of each sample's observed set; see :func:`expand_subsets`).
        backend: backend of the functional ops.
    """

    sums: torch.Tensor
    counts: torch.Tensor
    lazy_id: torch.Tensor
    epoch: torch.Tensor

    def __init__(
        self,
        num_modalities: int,
        distance: str = "ce",
        reduction: str = "mean",
        mode: str = "observed",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.num_modalities = _checks.num_modalities(num_modalities)
        self.distance = _checks.choice("distance", distance, _checks.DISTANCES)
        self.reduction = _checks.choice("reduction", reduction, REDUCTIONS)
        self.mode = _checks.choice("mode", mode, MODES)
        self.backend = backend
        bins = 1 << num_modalities
        # fp64 sums: an epoch of fp32 batch sums adds up without visible rounding.
        self.register_buffer("sums", torch.zeros(bins, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(bins, dtype=torch.int64))
        self.register_buffer("lazy_id", torch.zeros((), dtype=torch.int64))  # 0: none yet
        self.register_buffer("epoch", torch.zeros((), dtype=torch.int64))  # mines so far

    @property
    def lazy(self) -> int | None:
        """The lazy combination id of the last mining, or None before the first.

        Settable (an id in ``1 .. 2**M - 1``, or None to clear it). Reading it syncs with the
        device: the loss reads the ``lazy_id`` buffer instead, so it traces as one graph.
        """
        value = int(self.lazy_id)
        return value if value > 0 else None

    @lazy.setter
    def lazy(self, value: int | None) -> None:
        value = 0 if value is None else _inputs.lazy_id("lazy", value, self.num_modalities)
        self.lazy_id.fill_(value)

    def check_lazy(self) -> None:
        """Value check: ``lazy_id`` names a combination of this miner's M modalities.

        An id >= 2**M (set by hand, or loaded from another model's state) would otherwise
        match no sample and silently make the TLA loss 0.
        """
        if _checks.value_checks_enabled():
            _inputs.lazy_id("lazy_id", int(self.lazy_id), self.num_modalities)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        bins = 1 << self.num_modalities
        if self.sums.numel() == bins:  # a shape mismatch is reported by the caller
            self.check_lazy()

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, comb: torch.Tensor) -> None:
        """Add one batch's statistics: joint ``logits [B, C]``, labels ``[B]``, ``comb [B]``."""
        sums, counts = tla_stats(
            logits.detach(), labels, comb, self.num_modalities, self.distance, backend=self.backend
        )
        self.sums += sums.to(self.sums.device, torch.float64)
        self.counts += counts.to(self.counts.device)

    def scores(self) -> torch.Tensor:
        """fp64 ``[2**M]`` score of each combination; ``-inf`` where ``N = 0`` (and at 0)."""
        score = self.sums.clone()
        if self.reduction == "mean":
            score = score / self.counts.clamp_min(1).to(score.dtype)
        return score.masked_fill(self.counts == 0, float("-inf"))

    @torch.no_grad()
    def mine(self) -> int | None:
        """End the epoch: pick the lazy combination and reset the sums.

        Returns the new lazy id, or None when the epoch saw no sample (the previous lazy id is
        then kept).
        """
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.sums)
            dist.all_reduce(self.counts)
        score = self.scores()
        winner = None
        if bool((self.counts > 0).any()):
            best = score.max()
            winner = int(torch.nonzero(score == best)[0, 0])  # ties: the smallest id
            self.lazy_id.fill_(winner)
        self.sums.zero_()
        self.counts.zero_()
        self.epoch += 1
        return winner

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """Eq. 17: CE over the samples with ``comb == lazy``; a real 0 before the first mining.

        Args:
            logits: joint logits ``[B, C]``.
            labels: int64 ``[B]``.
            comb: combination ids ``[B]`` of what the model was fed: ``combination_ids`` of
                the imputer's ``present`` (after the supervision drop), not of ``observed``.

        Reads the lazy id as a tensor (no host sync, one graph under ``torch.compile``).
        """
        _checks.logits2("logits", logits)
        _checks.comb_ids("comb", comb, logits.shape[0], self.num_modalities)
        self.check_lazy()
        if not torch.compiler.is_compiling() and self.lazy is None:
            # eager, before the first mining: a constant 0 with no graph, as it always was (a
            # NaN gradient from elsewhere must not reach the logits through a zero term)
            return logits.new_zeros(())
        # Eq. 17 through the op with a fixed id: the samples of the lazy combination become
        # "combination 1", the others 2. Before the first mining lazy_id is 0: none matches.
        ids = torch.where(comb == self.lazy_id, 1, 2)
        return tla_loss(logits, labels, ids, 1, backend=self.backend)

    def extra_repr(self) -> str:
        return (
            f"num_modalities={self.num_modalities}, distance={self.distance!r}, "
            f"reduction={self.reduction!r}, mode={self.mode!r}, lazy={self.lazy}"
        )
