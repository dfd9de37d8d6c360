"""``mimo_combine`` and the ``mgda_min_norm`` baseline: MIMO of SPEC section 6."""

from __future__ import annotations

import torch

from omnifuse_fast import _checks, _dispatch


def mimo_combine(
    g0: list[torch.Tensor], gw: list[torch.Tensor], backend: str = "auto"
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Min-norm point of {g0, gw}'s convex hull (two-objective MGDA, closed form).

    Args:
        g0: gradients of the fusion loss, one tensor per parameter.
        gw: gradients of the worst modality's loss, same shapes (zeros where untouched).

    Returns:
        ``(direction, lam)``: ``lam g0 + (1 - lam) gw`` per tensor, and ``lam`` (0-dim fp32).
    """
    _checks.grad_lists("g0", g0, "gw", gw)
    choice = _dispatch.resolve("mimo_combine", backend, g0[0].device)
    if _checks.python_value_checks(choice.backend):  # else: checked by the Gram (in the op)
        _checks.finite_list("g0", g0)
        _checks.finite_list("gw", gw)
    return choice.impl(list(g0), list(gw))


def mgda_min_norm(
    grads: list[list[torch.Tensor]], backend: str = "auto"
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """T-objective MGDA (Frank-Wolfe on the Gram matrix): the baseline MIMO is measured against.

    Returns ``(weights [T] fp32, direction)`` with ``direction = sum_t weights_t grads[t]``.
    """
    if not isinstance(grads, (list, tuple)) or len(grads) < 1:
        raise TypeError("grads must be a non-empty list of gradient lists")
    for t, g in enumerate(grads):
        _checks.grad_lists("grads[0]", grads[0], f"grads[{t}]", g)
    choice = _dispatch.resolve("mgda_min_norm", backend, grads[0][0].device)
    if _checks.python_value_checks(choice.backend):  # else: checked by the Gram (in the op)
        for t, g in enumerate(grads):
            _checks.finite_list(f"grads[{t}]", g)
    return choice.impl([list(g) for g in grads])
