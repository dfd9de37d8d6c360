"""``ModalityMixer``: modality-mixed samples with proportion labels (SPEC section 5)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from omnifuse_fast import _checks
from omnifuse_fast.ops import modality_mix
from omnifuse_fast.reference.mix import random_sources


class ModalityMixer(nn.Module):
    """Mix modalities across the samples of a batch: ``v_mix[b, m] = v[src[m, b], m]``.

    Sources are drawn by :func:`omnifuse_fast.reference.mix.random_sources` (modality 0 keeps
    the identity, every other modality an independent permutation) from this module's own
    ``torch.Generator``, whose state is part of ``state_dict`` so that a resumed run draws the
    same sources.

    Args:
        num_modalities: M (2..8).
        num_classes: C (>= 2).
        weights: modality proportions ``[M]`` on the simplex; uniform when None.
        seed: seed of the generator.
        backend: backend of the functional op.
    """

    weights: torch.Tensor | None

    def __init__(
        self,
        num_modalities: int,
        num_classes: int,
        weights: torch.Tensor | None = None,
        seed: int = 0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.num_modalities = _checks.num_modalities(num_modalities)
        self.num_classes = _checks.positive_int("num_classes", num_classes, minimum=2)
        if weights is not None:
            weights = _checks.floating("weights", weights, shape=(num_modalities,))
            if weights.dim() != 1 or bool((weights < 0).any()):
                raise ValueError("weights must be a non-negative [M] tensor")
            if abs(float(weights.sum()) - 1.0) > 1e-3:
                raise ValueError("weights must sum to 1 over the modalities")
            weights = weights.float().clone()
        self.register_buffer("weights", weights)
        self.seed = _checks.positive_int("seed", seed, minimum=0)
        self.backend = backend
        self.generator = torch.Generator().manual_seed(seed)

    def sources(self, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Draw ``src [M, batch]`` (int64) from the module's generator."""
        return random_sources(batch, self.num_modalities, self.generator, device)

    def forward(
        self, v: torch.Tensor, labels: torch.Tensor, src: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``v [B, M, D]``, labels ``[B]`` -> ``(v_mix [B, M, D], soft_labels [B, C])``.

        ``src`` is drawn from the generator when not given.
        """
        if src is None:
            src = self.sources(v.shape[0], v.device)
        return modality_mix(v, labels, src, self.num_classes, self.weights, backend=self.backend)

    def get_extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
