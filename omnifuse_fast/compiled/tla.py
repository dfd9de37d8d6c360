"""TLA (SPEC section 3) on the compiled backends: ``combination_ids``, ``tla_stats``, ``tla_loss``."""

from __future__ import annotations

import torch

from omnifuse_fast.compiled._common import qualname

_ops = torch.ops.omnifuse_fast


@torch.library.register_fake(qualname("combination_ids"))
def _combination_ids_fake(present):
    torch._check(present.dim() == 2, lambda: "present must be [B, M]")
    return present.new_empty((present.shape[0],), dtype=torch.int64)


@torch.library.register_fake(qualname("tla_stats"))
def _tla_stats_fake(logits, labels, comb, num_modalities, distance):
    torch._check(logits.dim() == 2, lambda: "logits must be [B, C]")
    bins = 1 << num_modalities
    return (
        logits.new_empty((bins,), dtype=torch.float32),
        logits.new_empty((bins,), dtype=torch.int64),
    )


@torch.library.register_fake(qualname("tla_loss"))
def _tla_loss_fake(logits, labels, comb, lazy):
    torch._check(logits.dim() == 2, lambda: "logits must be [B, C]")
    return logits.new_empty(())


@torch.library.register_fake(qualname("tla_loss_backward"))
def _tla_loss_backward_fake(grad, logits, labels, comb, lazy):
    return torch.empty_like(logits)


def _tla_loss_setup(ctx, inputs, output):
    logits, labels, comb, lazy = inputs
    ctx.save_for_backward(logits, labels, comb)
    ctx.lazy = lazy


def _tla_loss_backward(ctx, grad):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    logits, labels, comb = ctx.saved_tensors
    return _ops.tla_loss_backward(grad, logits, labels, comb, ctx.lazy), None, None, None


torch.library.register_autograd(
    qualname("tla_loss"), _tla_loss_backward, setup_context=_tla_loss_setup
)


def combination_ids(present: torch.Tensor) -> torch.Tensor:
    """Combination id of each sample (arguments validated by the public op)."""
    return _ops.combination_ids(present)


def tla_stats(logits, labels, comb, num_modalities, distance="ce"):
    """Per-combination distance sums and counts."""
    # a statistic for mining: never part of the autograd graph (like the reference)
    sums, counts = _ops.tla_stats(logits.detach(), labels, comb, num_modalities, distance)
    return sums, counts


def tla_loss(logits, labels, comb, lazy):
    """The lazy combination's mean cross-entropy."""
    return _ops.tla_loss(logits, labels, comb, lazy)
