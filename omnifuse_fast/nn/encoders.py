"""Modality-specific encoders ``v^m = e^m(x^m)`` (eq. 1)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from omnifuse_fast import _checks


class MLPEncoder(nn.Module):
    """Two-layer MLP for a vector view: ``Linear(in, hidden) -> ReLU -> Linear(hidden, dim)``.

    Args:
        in_dim: features of the view.
        dim: D, the embedding width.
        hidden: width of the hidden layer.
    """

    def __init__(self, in_dim: int, dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.in_dim = _checks.positive_int("in_dim", in_dim)
        self.dim = _checks.positive_int("dim", dim)
        _checks.positive_int("hidden", hidden)
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, in_dim]`` -> ``[B, dim]``."""
        return self.net(x)

    def missing_embedding(self) -> torch.Tensor:
        """The encoder applied to an all-zero input (eq. 2): ``[dim]``, differentiable."""
        zero = self.net[0].weight.new_zeros(1, self.in_dim)
        return self.forward(zero)[0]


class FrozenTextEncoder(nn.Module):
    """A frozen transformers text model: the mean of the last hidden state over real tokens.

    The paper keeps BERT fixed (fine-tuning was worse); so this module never trains its
    backbone: parameters have ``requires_grad=False``, it stays in eval mode, and it runs
    under ``torch.no_grad``.

    Args:
        model_or_path: a ``transformers`` model (e.g. ``BertModel``) or a local path / hub id
            for ``AutoModel.from_pretrained`` (``local_files_only`` by default: no download).
        local_files_only: passed to ``from_pretrained`` when a path is given.
    """

    def __init__(self, model_or_path: Any, local_files_only: bool = True) -> None:
        super().__init__()
        if isinstance(model_or_path, nn.Module):
            model = model_or_path
        elif isinstance(model_or_path, str):
            try:
                from transformers import AutoModel
            except ImportError as exc:  # optional dependency
                raise ImportError(
                    "FrozenTextEncoder needs transformers: pip install 'omnifuse-fast[text]'"
                ) from exc
            model = AutoModel.from_pretrained(model_or_path, local_files_only=local_files_only)
        else:
            raise TypeError(
                "model_or_path must be a transformers model or a path, got "
                f"{type(model_or_path).__name__}"
            )
        self.model = model
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()

    @property
    def dim(self) -> int:
        """Width of the embedding (the model's hidden size)."""
        return int(self.model.config.hidden_size)

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        """The backbone stays in eval mode (no dropout) whatever ``mode`` is."""
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``input_ids [B, T]`` (and ``attention_mask [B, T]``, 1 for real tokens) -> ``[B, dim]``."""
        _checks.tensor("input_ids", input_ids, ndim=2, dtypes=(torch.int64, torch.int32))
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        _checks.tensor("attention_mask", attention_mask, ndim=2, shape=tuple(input_ids.shape))
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
