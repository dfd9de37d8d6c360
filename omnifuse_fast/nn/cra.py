"""``CascadeResidualAutoencoder``: K residual autoencoders as one module (SPEC section 1)."""

from __future__ import annotations

import math

import torch
from torch import nn

from omnifuse_fast import _checks
from omnifuse_fast.ops import cra_forward


class CascadeResidualAutoencoder(nn.Module):
    """``s_0 = x``, ``s_k = s_{k-1} + W2_k act(W1_k s_{k-1} + b1_k) + b2_k``; returns ``s_K``.

    The weights are stacked (``w1 [K, H, F]``, ``b1 [K, H]``, ``w2 [K, F, H]``, ``b2 [K, F]``)
    so the whole cascade is one call of :func:`omnifuse_fast.cra_forward`.

    Args:
        features: F, the width of the input and output (``M * D``).
        hidden: H, the latent width of each autoencoder.
        num_blocks: K, the number of residual autoencoders.
        activation: ``"relu"``, ``"gelu"``, ``"silu"`` or ``"tanh"``.
        decoder_init_scale: the decoders start at this fraction of nn.Linear's init, so the
            cascade starts near the identity (each block adds a small correction).
        backend: backend of the functional op (``"auto"`` by default).
    """

    def __init__(
        self,
        features: int,
        hidden: int,
        num_blocks: int = 5,
        activation: str = "relu",
        decoder_init_scale: float = 0.1,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        _checks.positive_int("features", features)
        _checks.positive_int("hidden", hidden)
        _checks.positive_int("num_blocks", num_blocks)
        _checks.choice("activation", activation, _checks.ACTIVATIONS)
        _checks.real("decoder_init_scale", decoder_init_scale, lo=0.0)
        self.features, self.hidden, self.num_blocks = features, hidden, num_blocks
        self.activation = activation
        self.decoder_init_scale = float(decoder_init_scale)
        self.backend = backend
        self.w1 = nn.Parameter(torch.empty(num_blocks, hidden, features))
        self.b1 = nn.Parameter(torch.empty(num_blocks, hidden))
        self.w2 = nn.Parameter(torch.empty(num_blocks, features, hidden))
        self.b2 = nn.Parameter(torch.empty(num_blocks, features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's uniform init for the encoders; decoders scaled down, zero biases."""
        enc, dec = 1.0 / math.sqrt(self.features), 1.0 / math.sqrt(self.hidden)
        with torch.no_grad():
            self.w1.uniform_(-enc, enc)
            self.b1.uniform_(-enc, enc)
            self.w2.uniform_(-dec, dec).mul_(self.decoder_init_scale)
            self.b2.zero_()

    @property
    def latent_dim(self) -> int:
        """Width of the concatenated latents, ``K * H``."""
        return self.num_blocks * self.hidden

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, F]`` -> ``(out [B, F], latents [B, K*H])``."""
        return cra_forward(
            x, self.w1, self.b1, self.w2, self.b2, self.activation, backend=self.backend
        )

    def extra_repr(self) -> str:
        return (
            f"features={self.features}, hidden={self.hidden}, num_blocks={self.num_blocks}, "
            f"activation={self.activation!r}, backend={self.backend!r}"
        )
