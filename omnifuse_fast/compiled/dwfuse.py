"""DWFuse (SPEC section 2) on the compiled backends: ``dwfuse_weights`` and ``dwfuse_loss``."""

from __future__ import annotations

import torch

from omnifuse_fast.compiled._common import qualname

_ops = torch.ops.omnifuse_fast


@torch.library.register_fake(qualname("dwfuse_weights"))
def _dwfuse_weights_fake(logits, labels, beta):
    torch._check(logits.dim() == 3, lambda: "logits must be [B, M, C]")
    if labels.dim() == 2:  # multilabel: one weight per label
        return logits.new_empty(logits.shape)
    return logits.new_empty(logits.shape[:2])


@torch.library.register_fake(qualname("dwfuse_weights_backward"))
def _dwfuse_weights_backward_fake(grad_weights, logits, labels, beta):
    return torch.empty_like(logits)


@torch.library.register_fake(qualname("dwfuse_loss"))
def _dwfuse_loss_fake(logits, labels, beta, detach_weight):
    torch._check(logits.dim() == 3, lambda: "logits must be [B, M, C]")
    return logits.new_empty(())


@torch.library.register_fake(qualname("dwfuse_loss_backward"))
def _dwfuse_loss_backward_fake(grad, logits, labels, beta, detach_weight):
    return torch.empty_like(logits)


def _setup(ctx, inputs, output):
    logits, labels, beta = inputs[:3]
    ctx.save_for_backward(logits, labels)
    ctx.beta = beta
    ctx.detach_weight = inputs[3] if len(inputs) > 3 else None


def _weights_backward(ctx, grad):
    if not ctx.needs_input_grad[0]:
        return None, None, None
    logits, labels = ctx.saved_tensors
    return _ops.dwfuse_weights_backward(grad, logits, labels, ctx.beta), None, None


def _loss_backward(ctx, grad):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    logits, labels = ctx.saved_tensors
    g = _ops.dwfuse_loss_backward(grad, logits, labels, ctx.beta, ctx.detach_weight)
    return g, None, None, None


torch.library.register_autograd(qualname("dwfuse_weights"), _weights_backward, setup_context=_setup)
torch.library.register_autograd(qualname("dwfuse_loss"), _loss_backward, setup_context=_setup)


def dwfuse_weights(modality_logits, labels, beta=0.5):
    """Per-modality fusion weights (arguments validated by the public op)."""
    return _ops.dwfuse_weights(modality_logits, labels, beta)


def dwfuse_loss(modality_logits, labels, beta=0.5, detach_weight=True):
    """The DWFuse training loss."""
    return _ops.dwfuse_loss(modality_logits, labels, beta, detach_weight)
