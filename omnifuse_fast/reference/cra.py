"""CRA cascade (SPEC section 1): ``s_0 = x``, ``s_k = s_{k-1} + W2_k act(W1_k s_{k-1} + b1_k) + b2_k``.

Computed in fp32 (fp64 for fp64 input) whatever the input dtype (weights upcast), outputs in
the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omnifuse_fast.reference._common import upcast

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
    s = upcast(x)
    w1, b1, w2, b2 = (t.to(s.dtype) for t in (w1, b1, w2, b2))
    latents = []
    for k in range(w1.shape[0]):
        c = act(F.linear(s, w1[k], b1[k]))  # latent c_k, [B, H]
        s = s + F.linear(c, w2[k], b2[k])  # s_k = s_{k-1} + phi_k(s_{k-1})
        latents.append(c)
    return s.to(x.dtype), torch.cat(latents, dim=1).to(x.dtype)
