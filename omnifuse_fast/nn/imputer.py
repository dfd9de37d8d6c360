"""``OmniFuseImputer``: forward and backward CRA with their losses (SPEC section 1, eqs. 2-8)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from omnifuse_fast import _checks
from omnifuse_fast.nn.cra import CascadeResidualAutoencoder

MISSING_EMBEDDINGS = ("learned", "zero_input")


class ImputerOutput(NamedTuple):
    """What :class:`OmniFuseImputer` returns.

    Attributes:
        v_full: ``P*v + (1-P)*v'`` ``[B, M, D]`` (``P*v + (1-P)*u`` when imputation is off).
        v_forward: ``v'`` ``[B, M, D]``, the forward CRA's output.
        v_backward: ``v''`` ``[B, M, D]``, or None when the backward pass did not run.
        latents: the forward CRA's latents ``[B, K*H]`` (the joint embedding of eq. 11).
        present: bool ``[B, M]``, ``observed & ~drop``: what the model was fed.
        loss_forward: eq. 7 (0 when not computed or nothing supervised).
        loss_backward: eq. 8 (0 when not computed or nothing supervised).
    """

    v_full: torch.Tensor
    v_forward: torch.Tensor
    v_backward: torch.Tensor | None
    latents: torch.Tensor
    present: torch.Tensor
    loss_forward: torch.Tensor
    loss_backward: torch.Tensor


def supervision_drop(
    observed: torch.Tensor, rate: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``present = observed & ~drop``: drop each observed entry with probability ``rate``.

    A sample never loses its last present modality: where every observed entry was dropped,
    the one with the largest draw comes back. Draws use ``generator`` (or the global RNG).
    """
    if rate <= 0.0:
        return observed.clone()
    draw = torch.rand(observed.shape, generator=generator, device=observed.device)
    present = observed & (draw >= rate)
    empty = ~present.any(dim=1)
    if bool(empty.any()):
        keep = torch.where(observed, draw, torch.full_like(draw, -1.0)).argmax(dim=1)
        restore = torch.zeros_like(present).scatter_(1, keep.unsqueeze(1), True)
        present = present | (restore & empty.unsqueeze(1))
    return present


def masked_block_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the blocks ``mask [B, M]`` selects (mean over block count x D).

    A real 0 (zero gradient, never NaN) when no block is selected. Accumulates in fp32.
    """
    sq = (pred.float() - target.float()).square() * mask.unsqueeze(-1).float()
    count = mask.sum().float() * pred.shape[-1]
    return (sq.sum() / count.clamp_min(1.0)).to(pred.dtype)


class OmniFuseImputer(nn.Module):
    """Missing-modality imputation by a forward CRA and a dual backward CRA.

    ``v_in = P*v + (1-P)*u``; ``v' = CRA_f(v_in)``; ``v_hat = (1-P)*v' + P*u``;
    ``v'' = CRA_b(v_hat)``; ``v_full = P*v + (1-P)*v'``. In training, observed modalities are
    dropped at ``drop_rate`` so that imputation has ground truth (``present = observed & ~drop``).

    Args:
        num_modalities: M (2..8).
        dim: D, the embedding width of every modality.
        hidden: H, the latent width of each residual autoencoder.
        num_blocks: K, residual autoencoders per cascade.
        activation: the cascades' activation.
        drop_rate: probability of dropping an observed modality in training, in [0, 1).
        detach_target: stop-gradient on the target ``v`` of both losses (default True).
        missing_embedding: ``"learned"`` (a parameter ``u [M, D]``, zeros at init) or
            ``"zero_input"`` (the caller passes ``u``: the encoders applied to zeros, eq. 2).
        use_forward: fill missing blocks with ``v'``, compute L_forward, drop in training.
            When False the forward CRA still runs (its latents are the joint embedding) but
            ``v_full`` keeps ``u`` for missing blocks and L_forward is 0.
        use_backward: run the backward CRA in training and compute L_backward.
        backend: backend of the functional ops.
    """

    def __init__(
        self,
        num_modalities: int,
        dim: int,
        hidden: int,
        num_blocks: int = 5,
        activation: str = "relu",
        drop_rate: float = 0.3,
        detach_target: bool = True,
        missing_embedding: str = "learned",
        use_forward: bool = True,
        use_backward: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        _checks.num_modalities(num_modalities)
        _checks.positive_int("dim", dim)
        _checks.real("drop_rate", drop_rate, lo=0.0)
        if drop_rate >= 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        _checks.choice("missing_embedding", missing_embedding, MISSING_EMBEDDINGS)
        self.num_modalities, self.dim = num_modalities, dim
        self.drop_rate = float(drop_rate)
        self.detach_target = bool(detach_target)
        self.missing_embedding = missing_embedding
        self.use_forward, self.use_backward = bool(use_forward), bool(use_backward)
        feat = num_modalities * dim
        self.forward_cra = CascadeResidualAutoencoder(feat, hidden, num_blocks, activation)
        self.backward_cra = CascadeResidualAutoencoder(feat, hidden, num_blocks, activation)
        if missing_embedding == "learned":
            self.missing = nn.Parameter(torch.zeros(num_modalities, dim))
        else:
            self.register_parameter("missing", None)
        self.backend = backend

    @property
    def backend(self) -> str:
        """Backend of the functional ops (set on both cascades)."""
        return self.forward_cra.backend

    @backend.setter
    def backend(self, value: str) -> None:
        self.forward_cra.backend = value
        self.backward_cra.backend = value

    @property
    def latent_dim(self) -> int:
        """Width of the joint embedding (the forward CRA's latents), ``K * H``."""
        return self.forward_cra.latent_dim

    def _missing(self, u: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
        if self.missing is not None:
            if u is not None:
                raise ValueError("u must be None: this imputer learns its missing embeddings")
            return self.missing.to(v.dtype)
        if u is None:
            raise ValueError('missing_embedding="zero_input" needs u [M, D] from the caller')
        _checks.floating("u", u, ndim=2, shape=(self.num_modalities, self.dim))
        return u

    def forward(
        self,
        v: torch.Tensor,
        observed: torch.Tensor,
        u: torch.Tensor | None = None,
        present: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        losses: bool = True,
    ) -> ImputerOutput:
        """Impute the missing blocks of ``v [B, M, D]``.

        Args:
            v: modality embeddings ``[B, M, D]`` (missing blocks may hold anything).
            observed: bool ``[B, M]``, the data's own mask (no all-false row).
            u: missing embeddings ``[M, D]`` when ``missing_embedding="zero_input"``.
            present: what to feed the model instead of drawing a drop (must be within
                ``observed``); None draws the supervision drop in training.
            generator: RNG of the drop (global RNG when None).
            losses: compute L_forward and L_backward (in training); False skips them and the
                backward cascade (e.g. for an extra no-grad pass).
        """
        m, d = self.num_modalities, self.dim
        _checks.floating("v", v, ndim=3, shape=(None, m, d))
        _checks.tensor("observed", observed, ndim=2, dtypes=(torch.bool,), shape=(v.shape[0], m))
        _checks.present_mask("observed", observed)
        u = self._missing(u, v)
        supervise = self.training and (self.use_forward or self.use_backward)
        if present is None:
            rate = self.drop_rate if supervise else 0.0
            present = supervision_drop(observed, rate, generator)
        else:
            _checks.tensor("present", present, dtypes=(torch.bool,), shape=tuple(observed.shape))
            _checks.present_mask("present", present)
            if _checks.value_checks_enabled() and bool((present & ~observed).any()):
                raise ValueError("present must be within observed (a subset of its True entries)")
        p = present.unsqueeze(-1).to(v.dtype)
        u_b = u.unsqueeze(0).expand_as(v)
        v_in = p * v + (1.0 - p) * u_b
        out, latents = self.forward_cra(v_in.reshape(v.shape[0], m * d))
        v_fwd = out.view_as(v)
        fill = v_fwd if self.use_forward else u_b
        v_full = p * v + (1.0 - p) * fill
        target = v.detach() if self.detach_target else v
        zero = v.new_zeros(())
        loss_fwd = zero
        if losses and self.training and self.use_forward:
            loss_fwd = masked_block_mse(v_fwd, target, observed)
        v_bwd, loss_bwd = None, zero
        if losses and self.training and self.use_backward:
            v_hat = (1.0 - p) * v_fwd + p * u_b
            v_bwd = self.backward_cra(v_hat.reshape(v.shape[0], m * d))[0].view_as(v)
            loss_bwd = masked_block_mse(v_bwd, target, present)
        return ImputerOutput(v_full, v_fwd, v_bwd, latents, present, loss_fwd, loss_bwd)
