"""CRA cascade (SPEC section 1) on the compiled backends: ``cra_forward``.

Two op pairs (csrc/ops.cpp):

- ``cra_forward`` / ``cra_backward`` (CPU and CUDA): the forward keeps nothing, the backward
  recomputes the chain from ``x``. Inference runs the forward alone; CUDA also trains with it.
- ``cra_forward_stash`` / ``cra_backward_stash`` (CPU): the forward also returns what the
  backward needs (layer inputs, activations, pre-activations for gelu/silu, all in the
  accumulation dtype), so the backward is four GEMMs per layer, with no recomputation, and
  computes only the gradients autograd asks for (``ctx.needs_input_grad``).
"""

from __future__ import annotations

import torch

from omnifuse_fast.compiled._common import qualname, zeros_if_none

_ops = torch.ops.omnifuse_fast

_NEEDS_PRE = ("gelu", "silu")  # their derivative needs the pre-activation, not just its value


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake(qualname("cra_forward"))
def _cra_forward_fake(x, w1, b1, w2, b2, activation):
    torch._check(x.dim() == 2 and w1.dim() == 3, lambda: "x [B, F], w1 [K, H, F]")
    torch._check(w1.shape[2] == x.shape[1], lambda: "w1 [K, H, F] must match x [B, F]")
    k, h = w1.shape[0], w1.shape[1]
    return x.new_empty(x.shape), x.new_empty((x.shape[0], k * h))


@torch.library.register_fake(qualname("cra_backward"))
def _cra_backward_fake(grad_out, grad_latents, x, w1, b1, w2, b2, activation):
    torch._check(grad_out.shape == x.shape, lambda: "grad_out must match x")
    return tuple(torch.empty_like(t) for t in (x, w1, b1, w2, b2))


@torch.library.register_fake(qualname("cra_forward_stash"))
def _cra_forward_stash_fake(x, w1, b1, w2, b2, activation):
    out, lat = _cra_forward_fake(x, w1, b1, w2, b2, activation)
    (bsz, feat), (k, h) = x.shape, w1.shape[:2]
    acc = _acc_dtype(x.dtype)
    states = x.new_empty((k, bsz, feat), dtype=acc)
    post = x.new_empty((k, bsz, h), dtype=acc)
    pre = x.new_empty((k, bsz, h) if activation in _NEEDS_PRE else (0,), dtype=acc)
    return out, lat, states, post, pre


@torch.library.register_fake(qualname("cra_backward_stash"))
def _cra_backward_stash_fake(grad_out, grad_latents, w1, w2, states, post, pre, activation, mask):
    torch._check(states.dim() == 3 and post.dim() == 3, lambda: "states, post must be [K, B, *]")
    k, h, feat = w1.shape
    shapes = (grad_out.shape, w1.shape, (k, h), w2.shape, (k, feat))
    likes = (grad_out, w1, w1, w2, w2)
    return tuple(t.new_empty(s if m else (0,)) for t, s, m in zip(likes, shapes, mask))


# cra_forward: the backward recomputes the chain from x (nothing but the inputs is saved)
def _setup(ctx, inputs, output):
    x, w1, b1, w2, b2, activation = inputs
    ctx.save_for_backward(x, w1, b1, w2, b2)
    ctx.activation = activation
    ctx.lat_shape = output[1].shape


def _backward(ctx, grad_out, grad_latents):
    need = ctx.needs_input_grad[:5]
    if not any(need):
        return (None,) * 6
    x, w1, b1, w2, b2 = ctx.saved_tensors
    grad_out = zeros_if_none(grad_out, x)
    if grad_latents is None:
        grad_latents = x.new_zeros(ctx.lat_shape)
    grads = _ops.cra_backward(grad_out, grad_latents, x, w1, b1, w2, b2, ctx.activation)
    return (*(g if n else None for g, n in zip(grads, need)), None)


torch.library.register_autograd(qualname("cra_forward"), _backward, setup_context=_setup)


# cra_forward_stash: the backward reads the stash and skips the gradients nobody needs
def _stash_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, activation = inputs
    out, lat, states, post, pre = output
    ctx.save_for_backward(w1, w2, states, post, pre)
    ctx.activation = activation
    ctx.shapes = (out.shape, lat.shape)
    ctx.mark_non_differentiable(states, post, pre)
    ctx.set_materialize_grads(False)  # no zero-filled [K, B, F] gradients for the stash


def _stash_backward(ctx, grad_out, grad_latents, _states, _post, _pre):
    need = list(ctx.needs_input_grad[:5])
    if not any(need):
        return (None,) * 6
    w1, w2, states, post, pre = ctx.saved_tensors
    if grad_out is None:
        grad_out = w1.new_zeros(ctx.shapes[0])
    if grad_latents is None:
        grad_latents = w1.new_zeros(ctx.shapes[1])
    grads = _ops.cra_backward_stash(
        grad_out, grad_latents, w1, w2, states, post, pre, ctx.activation, need
    )
    return (*(g if n else None for g, n in zip(grads, need)), None)


torch.library.register_autograd(
    qualname("cra_forward_stash"), _stash_backward, setup_context=_stash_setup
)


def cra_forward(x, w1, b1, w2, b2, activation="relu"):
    """``(s_K, concat(c_1..c_K))`` (arguments validated by the public op).

    On CPU, when a gradient will be needed, the stashing pair runs (no recomputation in the
    backward); otherwise the forward alone.
    """
    params = (x, w1, b1, w2, b2)
    if x.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in params):
        out, lat, _, _, _ = _ops.cra_forward_stash(x, w1, b1, w2, b2, activation)
        return out, lat
    out, lat = _ops.cra_forward(x, w1, b1, w2, b2, activation)
    return out, lat
