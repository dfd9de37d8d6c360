"""MIMO (SPEC section 6) on the compiled backends: ``mimo_combine`` and ``mgda_min_norm``.

The 2x2 Gram and the direction are each one fused pass; their gradients are polynomial in the
inputs and written with torch ops. The Gram also checks the gradients' finiteness (a NaN or inf
anywhere makes it non-finite): ``_device_checks.check_gram``, no second pass over them.
"""

from __future__ import annotations

import torch

from omnifuse_fast import _device_checks
from omnifuse_fast.compiled._common import qualname, zeros_if_none
from omnifuse_fast.reference.mimo import frank_wolfe_min_norm, min_norm_lambda

_ops = torch.ops.omnifuse_fast


@torch.library.register_fake(qualname("mimo_gram"))
def _mimo_gram_fake(g0, gw):
    torch._check(len(g0) == len(gw), lambda: "g0 and gw must have the same length")
    return g0[0].new_empty((3,), dtype=torch.float64)


@torch.library.register_fake(qualname("mimo_direction"))
def _mimo_direction_fake(g0, gw, lam):
    torch._check(len(g0) == len(gw), lambda: "g0 and gw must have the same length")
    return [torch.empty_like(t) for t in g0]


def _gram_setup(ctx, inputs, output):
    g0, gw = inputs
    ctx.save_for_backward(*g0, *gw)
    ctx.n = len(g0)


def _gram_backward(ctx, grad):
    saved = ctx.saved_tensors
    g0, gw = saved[: ctx.n], saved[ctx.n :]
    d0 = [(2.0 * grad[0] * a.double() + grad[1] * b.double()).to(a.dtype) for a, b in zip(g0, gw)]
    dw = [(grad[1] * a.double() + 2.0 * grad[2] * b.double()).to(b.dtype) for a, b in zip(g0, gw)]
    return d0, dw


torch.library.register_autograd(qualname("mimo_gram"), _gram_backward, setup_context=_gram_setup)


def _direction_setup(ctx, inputs, output):
    g0, gw, lam = inputs
    ctx.save_for_backward(lam, *g0, *gw)
    ctx.n = len(g0)


def _direction_backward(ctx, grads):
    lam, *rest = ctx.saved_tensors
    g0, gw = rest[: ctx.n], rest[ctx.n :]
    grads = [zeros_if_none(g, a) for g, a in zip(grads, g0)]
    d0 = [(lam * g.float()).to(g.dtype) for g in grads]
    dw = [((1.0 - lam) * g.float()).to(g.dtype) for g in grads]
    dlam = sum(torch.sum(g.float() * (a.float() - b.float())) for g, a, b in zip(grads, g0, gw))
    return d0, dw, dlam.reshape(lam.shape).to(lam.dtype)


torch.library.register_autograd(
    qualname("mimo_direction"), _direction_backward, setup_context=_direction_setup
)


def mimo_combine(g0, gw):
    """Gram in one fused pass, lambda with the reference's torch ops, direction in one pass."""
    gram = _ops.mimo_gram(g0, gw)
    gram = _device_checks.check_gram("mimo_combine", gram, [g0, gw])
    lam = min_norm_lambda(gram[0], gram[1], gram[2])
    return list(_ops.mimo_direction(g0, gw, lam)), lam


def mgda_min_norm(grads):
    """The T-objective baseline: Gram from fused pair passes, then the reference Frank-Wolfe."""
    t = len(grads)
    rows = [[None] * t for _ in range(t)]
    if t == 1:
        rows[0][0] = _ops.mimo_gram(grads[0], grads[0])[0]
    for i in range(t):
        for j in range(i + 1, t):
            g = _ops.mimo_gram(grads[i], grads[j])
            rows[i][i], rows[j][j] = g[0], g[2]
            rows[i][j] = rows[j][i] = g[1]
    gram = torch.stack([torch.stack(r) for r in rows])
    gram = _device_checks.check_gram("mgda_min_norm", gram, grads)
    weights = frank_wolfe_min_norm(gram)
    direction = []
    for parts in zip(*grads):
        acc = sum(w * p.double() for w, p in zip(weights, parts))
        direction.append(acc.to(parts[0].dtype))
    return weights.float(), direction
