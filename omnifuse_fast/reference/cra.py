"""CRA cascade (SPEC section 1): ``s_0 = x``, ``s_k = s_{k-1} + W2_k act(W1_k s_{k-1} + b1_k) + b2_k``.

Computed in fp32 whatever the input dtype (weights upcast), outputs in the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATION_FNS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
}


def cra_forward(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    activation: str = "relu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run K residual autoencoders as a running sum; return ``(s_K, concat(c_1..c_K))``."""
    act = ACTIVATION_FNS[activation]
    s = x.float()
    latents = []
    for k in range(w1.shape[0]):
        c = act(F.linear(s, w1[k].float(), b1[k].float()))  # latent c_k, [B, H]
        s = s + F.linear(c, w2[k].float(), b2[k].float())  # s_k = s_{k-1} + phi_k(s_{k-1})
        latents.append(c)
    return s.to(x.dtype), torch.cat(latents, dim=1).to(x.dtype)
