"""MM learning (SPEC section 5) on the compiled backends: ``modality_mix``, ``soft_cross_entropy``."""

from __future__ import annotations

import torch

from omnifuse_fast.compiled._common import qualname

_ops = torch.ops.omnifuse_fast


@torch.library.register_fake(qualname("modality_mix"))
def _modality_mix_fake(v, labels, src, num_classes, weights):
    torch._check(v.dim() == 3 and src.dim() == 2, lambda: "v [B, M, D], src [M, B]")
    torch._check(src.shape[0] == v.shape[1], lambda: "src must be [M, B]")
    bsz = src.shape[1]
    return v.new_empty((bsz, v.shape[1], v.shape[2])), v.new_empty((bsz, num_classes))


@torch.library.register_fake(qualname("modality_mix_backward"))
def _modality_mix_backward_fake(grad_v_mix, src, batch):
    torch._check(grad_v_mix.dim() == 3, lambda: "grad_v_mix must be [B, M, D]")
    return grad_v_mix.new_empty((batch, grad_v_mix.shape[1], grad_v_mix.shape[2]))


@torch.library.register_fake(qualname("soft_cross_entropy"))
def _soft_cross_entropy_fake(logits, soft_labels):
    torch._check(logits.shape == soft_labels.shape, lambda: "soft_labels must match logits")
    return logits.new_empty(())


@torch.library.register_fake(qualname("soft_cross_entropy_backward"))
def _soft_cross_entropy_backward_fake(grad, logits, soft_labels):
    return torch.empty_like(logits), torch.empty_like(soft_labels)


@torch.library.register_fake(qualname("soft_cross_entropy_backward_logits"))
def _soft_cross_entropy_backward_logits_fake(grad, logits, soft_labels):
    return torch.empty_like(logits)


@torch.library.register_fake(qualname("soft_cross_entropy_grad"))
def _soft_cross_entropy_grad_fake(logits, soft_labels):
    torch._check(logits.shape == soft_labels.shape, lambda: "soft_labels must match logits")
    return logits.new_empty(()), torch.empty_like(logits)


# modality_mix: v_mix scatter-adds back into v; soft labels are linear in the weights
def _mix_setup(ctx, inputs, output):
    v, labels, src, num_classes, weights = inputs
    ctx.save_for_backward(labels, src, weights)
    ctx.batch = v.shape[0]
    # the soft labels rarely get a gradient (integer labels, weights without grad): autograd
    # would zero-fill a [B, C] one on every backward
    ctx.set_materialize_grads(False)


def _mix_backward(ctx, grad_v_mix, grad_soft):
    labels, src, weights = ctx.saved_tensors
    grad_v = None
    if ctx.needs_input_grad[0] and grad_v_mix is not None:
        grad_v = _ops.modality_mix_backward(grad_v_mix, src, ctx.batch)
    grad_w = None
    if weights is not None and ctx.needs_input_grad[4] and grad_soft is not None:
        src_labels = labels[src].transpose(0, 1)  # [B, M]
        same = (src_labels == src_labels[:, :1]).all(dim=1, keepdim=True)
        grad_w = torch.where(same, 0.0, grad_soft.float().gather(1, src_labels))
        grad_w = grad_w.sum_to_size(weights.shape).to(weights.dtype)
    return grad_v, None, None, None, grad_w


torch.library.register_autograd(qualname("modality_mix"), _mix_backward, setup_context=_mix_setup)


def _sce_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _sce_backward(ctx, grad):
    if not any(ctx.needs_input_grad):
        return None, None
    logits, soft_labels = ctx.saved_tensors
    if logits.device.type == "cpu" and not ctx.needs_input_grad[1]:
        # usual case, soft labels as targets: skip their gradient's pass (CPU kernel)
        return _ops.soft_cross_entropy_backward_logits(grad, logits, soft_labels), None
    grads = _ops.soft_cross_entropy_backward(grad, logits, soft_labels)
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))


torch.library.register_autograd(
    qualname("soft_cross_entropy"), _sce_backward, setup_context=_sce_setup
)


# soft_cross_entropy_grad (CPU training forward): the gradient for an upstream 1 comes with the
# loss; the backward only scales it
def _sce_grad_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled [B, C] gradient for the second output


def _plain_eager(t: torch.Tensor) -> bool:
    """Whether ``t`` is a real tensor outside any tracing (dynamo, AOT, make_fx): only then may
    the backward branch on its value."""
    return (
        type(t) is torch.Tensor
        and not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
    )


def _sce_grad_backward(ctx, grad, _grad_logits):
    (grad_logits,) = ctx.saved_tensors
    if grad is None or not ctx.needs_input_grad[0]:
        return None, None
    if _plain_eager(grad) and bool(grad == 1):
        # the usual upstream 1 of a loss: hand over the forward's gradient, no pass over it
        # (it shares the saved tensor's version counter: an in-place change before a second,
        # retained backward raises autograd's usual error rather than giving a wrong result)
        return grad_logits, None
    return grad_logits * grad, None


torch.library.register_autograd(
    qualname("soft_cross_entropy_grad"), _sce_grad_backward, setup_context=_sce_grad_setup
)


def modality_mix(v, labels, src, num_classes, weights=None):
    """Mixed representations and soft labels (arguments validated by the public op)."""
    v_mix, soft = _ops.modality_mix(v, labels, src, num_classes, weights)
    return v_mix, soft


def soft_cross_entropy(logits, soft_labels):
    """Mean cross-entropy against soft labels.

    On CPU, when only the logits will need a gradient, the forward writes it as well (one read
    of the rows for forward and backward); otherwise the forward alone.
    """
    if (
        logits.device.type == "cpu"
        and torch.is_grad_enabled()
        and logits.requires_grad
        and not soft_labels.requires_grad
    ):
        loss, _ = _ops.soft_cross_entropy_grad(logits, soft_labels)
        return loss
    return _ops.soft_cross_entropy(logits, soft_labels)
