"""Data-parallel training under ``torchrun``: process group, sharding, global-batch losses.

The contract: N ranks training with global batch size ``B`` take the same steps as one process
training with batch size ``B`` (up to fp32 reduction order). Each epoch's seeded permutation is
drawn identically on every rank; every global batch ``order[i : i + B]`` is cut into ``N``
contiguous shards (``tensor_split``), one per rank. Every random draw the single-process
trainer makes (supervision drop, MM learning's pool picks and mixing sources) is drawn for the
whole global batch on every rank from identically seeded generators, and each rank keeps its
slice, so the ranks' RNG streams never diverge and rank 0's checkpoint resumes any rank.

Losses. Every term of eq. 18 is a mean over a data-dependent set (the batch, the observed
blocks, the samples of the lazy combination, ...). One all-reduce per step of each term's
per-rank ``(sum, count)`` gives the exact global term values (logged, checked for
non-finite values identically on every rank) and the global counts; rank ``r`` then
back-propagates ``N * sum_t c_t * term_{r,t} * n_{r,t} / n_t`` so that DDP's gradient average
is exactly the gradient of the global-batch objective.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from omnifuse_fast.nn import MIMOBalancer

# Leaf terms of eq. 18 (the composites "dwfuse" and "total" are sums of these).
LEAVES = ("forward", "backward", "enc", "ra", "ce", "tla")


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job (``world_size == 1``: plain single-process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this module initialized the process group (and destroys it)

    @property
    def enabled(self) -> bool:
        """True when gradients and statistics must be synchronized."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, checkpoints and writes outputs."""
        return self.rank == 0

    def shard(self, idx: torch.Tensor) -> tuple[torch.Tensor, slice]:
        """This rank's contiguous slice of a global batch ``idx`` (and the slice itself).

        Shards differ in size by at most one sample; a rank may get an empty shard when the
        global batch is smaller than the world (the caller then feeds a zero-weight stand-in).
        """
        if not self.enabled:
            return idx, slice(0, len(idx))
        n, w = len(idx), self.world_size
        start = self.rank * (n // w) + min(self.rank, n % w)
        stop = start + n // w + (1 if self.rank < n % w else 0)
        return idx[start:stop], slice(start, stop)


def env_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the environment ``torchrun`` sets (or 0, 1, 0)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def setup(device: str | torch.device = "cpu") -> tuple[DistContext, torch.device]:
    """Join the job ``torchrun`` started (nothing to do for one process).

    Uses an already initialized process group if there is one; otherwise, when
    ``WORLD_SIZE > 1``, initializes one from the environment (``env://``): NCCL for CUDA
    devices, gloo for CPU. A CUDA device becomes ``cuda:LOCAL_RANK``.

    Returns:
        ``(context, device)``: this rank's place and the device it trains on.
    """
    device = torch.device(device)
    owns = False
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    else:
        rank, world, local = env_world()
        if world > 1:
            if not dist.is_available():
                raise RuntimeError("WORLD_SIZE > 1 but this torch has no torch.distributed")
            if device.type == "cuda":
                torch.cuda.set_device(local)
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world)
            owns = True
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    return DistContext(rank, world, local, owns), device


def teardown(ctx: DistContext) -> None:
    """Wait for every rank, then destroy the process group if :func:`setup` created it."""
    if ctx.enabled and dist.is_initialized():
        dist.barrier()
        if ctx.owns_group:
            dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity without a process group); returns ``t``."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def objective_coefficients(model: nn.Module) -> dict[str, float]:
    """Coefficient of each leaf term in the model's ``total`` (eq. 18, with eq. 14 expanded).

    ``total = forward + l1 * backward + l2 * (enc + alpha * ra) + l3 * tla`` (``ce`` takes the
    place of the DWFuse terms without DWFuse). tests/test_ddp.py checks this against the model.
    """
    l1, l2, l3 = model.lambdas
    return {
        "forward": 1.0,
        "backward": l1,
        "enc": l2,
        "ra": l2 * model.dwfuse.alpha,
        "ce": l2,
        "tla": l3,
    }


def leaf_counts(model: nn.Module, out, observed: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-rank count of what each leaf term of ``out.losses`` averages over (int64 scalars).

    ``forward``: observed blocks (eq. 7); ``backward``: blocks fed (eq. 8); ``enc``, ``ra``,
    ``ce``: samples; ``tla``: the samples of the lazy combination (``observed`` mode) or whose
    observed set contains it (``subsets``). A constant factor (D, C) cancels in the ratio.
    """
    from omnifuse_fast.nn.tla import contains
    from omnifuse_fast.ops import combination_ids

    n = torch.tensor(observed.shape[0], device=observed.device)
    counts: dict[str, torch.Tensor] = {}
    for name in out.losses:
        if name in ("enc", "ra", "ce"):
            counts[name] = n
        elif name == "forward":
            counts[name] = observed.sum()
        elif name == "backward":
            counts[name] = out.present.sum()
        elif name == "tla":
            lazy = model.miner.lazy
            if lazy is None:
                counts[name] = torch.zeros_like(n)
            elif model.miner.mode == "observed":
                counts[name] = (out.comb == lazy).sum()
            else:
                counts[name] = contains(combination_ids(observed, backend="reference"), lazy).sum()
    return counts


def global_terms(
    terms: dict[str, torch.Tensor], counts: dict[str, torch.Tensor], real: bool
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One all-reduce of every leaf's ``(sum, count)``: global values and this rank's weights.

    Args:
        terms: this rank's leaf terms (means over its shard; graph attached), in an order
            that is the same on every rank.
        counts: what each averages over on this rank.
        real: False for a zero-weight stand-in shard (contributes nothing).

    Returns:
        ``(values, weights)``: the global value of each leaf (detached, fp64; what one process
        on the global batch computes) and ``world * n_r / n`` per leaf (0 where ``n = 0``).
    """
    names = list(terms)  # the same order on every rank: the packed vector lines up
    device = terms[names[0]].device
    local_n = torch.stack([counts[k].to(device, torch.float64) for k in names])
    local_s = torch.stack([terms[k].detach().to(torch.float64) for k in names]) * local_n
    if not real:  # a stand-in shard: nothing to add (not even a NaN)
        local_n, local_s = torch.zeros_like(local_n), torch.zeros_like(local_s)
    packed = all_reduce_sum(torch.cat([local_s, local_n]))
    total_s, total_n = packed[: len(names)], packed[len(names) :]
    safe_n = total_n.clamp_min(1.0)
    # n = 0: the sum is 0 (nothing to average), unless a term was NaN/inf, which stays visible
    values = torch.where(total_n > 0, total_s / safe_n, total_s)
    world = dist.get_world_size() if dist.is_initialized() else 1
    weights = world * local_n / safe_n
    return dict(zip(names, values)), dict(zip(names, weights))


def rank_share(
    model: nn.Module,
    out,
    observed: torch.Tensor,
    terms: dict[str, torch.Tensor],
    real: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """This rank's share of a global batch's objective, and the global values of its terms.

    Args:
        model: the model (its eq. 18 coefficients and TLA miner).
        out: the model's output on this rank's shard (``out.losses``: eq. 18's terms).
        observed: the shard's observed mask.
        terms: ``out.losses`` plus per-sample extras (MM learning's ``mix``, MIMO's
            ``modality m``), each a mean over the shard, graph attached.
        real: False for a zero-weight stand-in shard.

    Returns:
        ``(values, shares)``: ``values`` holds every term's global value (detached, fp64: what
        one process logs for the global batch; ``dwfuse`` and ``total`` re-summed from the
        leaves); ``shares`` the terms this rank back-propagates, ``total`` as
        ``sum_t c_t w_t term_t`` and each extra as ``w * term`` with ``w = world * n_r / n``,
        so that DDP's mean over the ranks is the gradient of the global-batch objective.
    """
    leaves = {k: v for k, v in terms.items() if k in LEAVES}
    extras = {k: v for k, v in terms.items() if k not in out.losses}
    counts = leaf_counts(model, out, observed)
    n = torch.tensor(observed.shape[0], device=observed.device)
    counts.update(dict.fromkeys(extras, n))
    values, weights = global_terms({**leaves, **extras}, counts, real)
    coef = objective_coefficients(model)
    shares = {k: weights[k] * v for k, v in extras.items()}
    shares["total"] = sum(coef[k] * weights[k] * v for k, v in leaves.items())
    values["total"] = sum(coef[k] * values[k] for k in leaves)
    if "dwfuse" in out.losses:
        values["dwfuse"] = values["enc"] + model.dwfuse.alpha * values["ra"]
    return values, shares


class DistributedMIMOBalancer(MIMOBalancer):
    """:class:`MIMOBalancer` whose gradients and loss values are global over the ranks.

    MIMO's direction is a nonlinear function of ``g_0`` and ``g_w``, so averaging each rank's
    own direction (what DDP would do after a plain backward) is not the global direction. Here
    ``torch.autograd.grad`` runs outside DDP's hooks, and every gradient list (``g_0``, ``g_w``,
    the other heads' own gradients, or MGDA's M+1 lists) and the per-modality loss values that
    pick ``w`` are summed over ranks before the combination, so every rank computes the same
    direction from the global gradients. The losses passed in must be pre-scaled so that their
    sum over ranks is the global loss (``n_r / n`` times the shard mean).
    """

    def _loss_values(self, losses: list[torch.Tensor]) -> torch.Tensor:
        """The loss values summed over ranks (each rank's loss is pre-scaled)."""
        return all_reduce_sum(torch.stack([loss.detach().double() for loss in losses]))

    def _grads(
        self, loss: torch.Tensor, params: Sequence[nn.Parameter]
    ) -> list[torch.Tensor | None]:
        """``d loss / d params`` summed over ranks; None where no rank's loss touches it."""
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        used = torch.tensor([g is not None for g in grads], dtype=torch.int32, device=loss.device)
        used = all_reduce_sum(used)  # untouched here may be touched on another rank
        full = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
        if full:
            flat = all_reduce_sum(torch.cat([g.reshape(-1).float() for g in full]))
            parts = flat.split([g.numel() for g in full])
            full = [f.view_as(p).to(p.dtype) for f, p in zip(parts, params)]
        return [g if int(u) > 0 else None for g, u in zip(full, used.tolist())]
