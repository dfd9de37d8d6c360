"""``MIMOBalancer``: fusion loss vs. worst modality, min-norm direction (SPEC section 6)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from omnifuse_fast import _checks
from omnifuse_fast.ops import mgda_min_norm, mimo_combine

MODES = ("mimo", "mgda")


class MIMOStep(NamedTuple):
    """What one :meth:`MIMOBalancer.backward` did.

    Attributes:
        worst: w, the modality with the largest loss.
        weights: fp32 objective weights: ``[lam, 1 - lam]`` for (L_0, L_w) in ``"mimo"`` mode,
            ``[T]`` for (L_0, L_1 .. L_M) in ``"mgda"`` mode.
        seconds: time of the subroutine (the combination of the gradients).
    """

    worst: int
    weights: torch.Tensor
    seconds: float


def _grads(loss: torch.Tensor, params: Sequence[nn.Parameter]) -> list[torch.Tensor | None]:
    return list(torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True))


class MIMOBalancer(nn.Module):
    """Sets ``.grad`` of a model's parameters to the MIMO direction (call instead of backward).

    With ``L_0`` the fusion loss and ``w = argmax_m L_m``: ``g_0`` and ``g_w`` are taken with
    respect to every parameter (shared, fusion head, the heads of w) that ``L_0`` or ``L_w``
    touches (zeros where one of them does not), combined by :func:`omnifuse_fast.mimo_combine`
    and written to ``.grad``; the unimodal heads of the other modalities get their own losses'
    gradients unchanged. Parameters neither touches keep ``.grad = None``.
    ``mode="mgda"`` is the baseline: M+1 objectives (L_0, L_1 .. L_M) over every parameter,
    combined by :func:`omnifuse_fast.mgda_min_norm` (Frank-Wolfe).
    ``subroutine_seconds`` adds up the time of the combination step.

    Args:
        shared_params: parameters every objective may touch (encoders, imputer, ...).
        head_params_per_modality: M lists, the parameters of each unimodal head g_m.
        fusion_params: parameters of the fusion head (touched by L_0 only).
        mode: ``"mimo"`` (default) or ``"mgda"``.
        backend: backend of the functional ops.
    """

    def __init__(
        self,
        shared_params: Sequence[nn.Parameter],
        head_params_per_modality: Sequence[Sequence[nn.Parameter]],
        fusion_params: Sequence[nn.Parameter] = (),
        mode: str = "mimo",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        # Plain lists on purpose: the balancer must not register (and so re-own) the parameters.
        self._shared = [p for p in shared_params if p.requires_grad]
        self._heads = [[p for p in h if p.requires_grad] for h in head_params_per_modality]
        self._fusion = [p for p in fusion_params if p.requires_grad]
        if len(self._heads) < 2:
            raise ValueError(
                f"head_params_per_modality needs one list per modality (M >= 2), "
                f"got {len(self._heads)}"
            )
        ids = [id(p) for p in self._shared + self._fusion + [p for h in self._heads for p in h]]
        if len(ids) != len(set(ids)):
            raise ValueError("shared, fusion and head parameters must be disjoint")
        self.mode = _checks.choice("mode", mode, MODES)
        self.backend = backend
        self.subroutine_seconds = 0.0
        self.steps = 0

    @property
    def num_modalities(self) -> int:
        """M, the number of unimodal heads."""
        return len(self._heads)

    def backward(
        self, fusion_loss: torch.Tensor, modality_losses: Sequence[torch.Tensor] | torch.Tensor
    ) -> MIMOStep:
        """Compute the gradients and write ``.grad``; returns what was chosen."""
        losses = list(modality_losses)
        if len(losses) != self.num_modalities:
            raise ValueError(
                f"modality_losses must hold {self.num_modalities} losses, got {len(losses)}"
            )
        worst = int(torch.argmax(self._loss_values(losses)))
        if self.mode == "mgda":
            step = self._mgda(fusion_loss, losses, worst)
        else:
            step = self._mimo(fusion_loss, losses, worst)
        self.subroutine_seconds += step.seconds
        self.steps += 1
        return step

    # The two hooks a distributed balancer overrides (train/distributed.py): everything else,
    # the choice of w and the combination, is the same on one process and on many.
    def _loss_values(self, losses: list[torch.Tensor]) -> torch.Tensor:
        """The per-modality loss values that pick the worst modality."""
        return torch.stack([loss.detach().float() for loss in losses])

    def _grads(
        self, loss: torch.Tensor, params: Sequence[nn.Parameter]
    ) -> list[torch.Tensor | None]:
        """``d loss / d params`` (None where the loss does not touch a parameter)."""
        return _grads(loss, params)

    def _mimo(self, l0: torch.Tensor, losses: list[torch.Tensor], worst: int) -> MIMOStep:
        params = self._shared + self._fusion + self._heads[worst]
        g0, gw = self._grads(l0, params), self._grads(losses[worst], params)
        touched = [i for i, (a, b) in enumerate(zip(g0, gw)) if a is not None or b is not None]
        if not touched:
            raise ValueError("neither the fusion loss nor the worst loss touches any parameter")
        g0t = [g0[i] if g0[i] is not None else torch.zeros_like(params[i]) for i in touched]
        gwt = [gw[i] if gw[i] is not None else torch.zeros_like(params[i]) for i in touched]
        start = time.perf_counter()
        direction, lam = mimo_combine(g0t, gwt, backend=self.backend)
        seconds = time.perf_counter() - start
        for i, d in zip(touched, direction):
            params[i].grad = d.detach()
        self._own_head_grads(losses, skip=worst)
        return MIMOStep(worst, torch.stack([lam, 1.0 - lam]).float(), seconds)

    def _mgda(self, l0: torch.Tensor, losses: list[torch.Tensor], worst: int) -> MIMOStep:
        params = self._shared + self._fusion + [p for h in self._heads for p in h]
        per_obj = [self._grads(loss, params) for loss in [l0, *losses]]
        touched = [i for i in range(len(params)) if any(g[i] is not None for g in per_obj)]
        if not touched:
            raise ValueError("no objective touches any parameter")
        grads = [
            [g[i] if g[i] is not None else torch.zeros_like(params[i]) for i in touched]
            for g in per_obj
        ]
        start = time.perf_counter()
        weights, direction = mgda_min_norm(grads, backend=self.backend)
        seconds = time.perf_counter() - start
        for i, d in zip(touched, direction):
            params[i].grad = d.detach()
        return MIMOStep(worst, weights, seconds)

    def _own_head_grads(self, losses: list[torch.Tensor], skip: int) -> None:
        """Each other head's parameters get the gradient of its own loss."""
        for m, (loss, head) in enumerate(zip(losses, self._heads)):
            if m == skip or not head:
                continue
            for p, g in zip(head, self._grads(loss, head)):
                p.grad = None if g is None else g.detach()

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, num_modalities={self.num_modalities}"
