"""``OmniFuseImputer``: forward and backward CRA with their losses (SPEC section 1, eqs. 2-8)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from omnifuse_fast import _checks
from omnifuse_fast.nn import _inputs
from omnifuse_fast.nn.cra import CascadeResidualAutoencoder

MISSING_EMBEDDINGS = ("learned", "zero_input")


class ImputerOutput(NamedTuple):
    """What :class:`OmniFuseImputer` returns.

    Attributes:
        v_full: ``[B, M, D]``, the completed embeddings: ``v`` where ``present``, the
            forward CRA's imputation ``v'`` elsewhere (``u`` when imputation is off). Feed this
            to your unimodal heads.
        v_forward: ``v'`` ``[B, M, D]``, the forward CRA's output (every block, imputed or not).
        v_backward: ``v''`` ``[B, M, D]``, the backward CRA's output, or None when it did not
            run (eval, ``losses=False`` or ``use_backward=False``).
        latents: the forward CRA's latents ``[B, K*H]``, the joint embedding of eq. 11: feed
            this to your fusion head.
        present: bool ``[B, M]``, ``observed & ~drop``: what the model was fed. Its
            combination ids (``combination_ids(present)``) are TLA's ``comb``.
        loss_forward: eq. 7, ``L_forward`` (0 when not computed or nothing supervised).
        loss_backward: eq. 8, ``L_backward`` (0 when not computed or nothing supervised).

    Missing blocks are replaced by a select (``torch.where``), never by ``P*v + (1-P)*u``: what
    a missing block of ``v`` holds (NaN, inf, garbage) changes no value and no gradient.
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
    return drop_with(observed, draw, rate)


def drop_with(observed: torch.Tensor, draw: torch.Tensor, rate: float) -> torch.Tensor:
    """:func:`supervision_drop` given its uniform ``draw`` (shaped like ``observed``): the
    deterministic part, which a compiled step can trace while the draw stays eager (the same
    random stream as the eager step, so resume stays bit-exact)."""
    present = observed & (draw >= rate)
    empty = ~present.any(dim=1)
    # Branch-free (no host sync, one graph under torch.compile): rows that kept something are
    # unchanged since ``restore & empty`` is all false there; the result equals the branchy one.
    keep = torch.where(observed, draw, torch.full_like(draw, -1.0)).argmax(dim=1)
    restore = torch.zeros_like(present).scatter_(1, keep.unsqueeze(1), True)
    return present | (restore & empty.unsqueeze(1))


def masked_block_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the blocks ``mask [B, M]`` selects (mean over block count x D).

    A real 0 (zero gradient, never NaN) when no block is selected. Accumulates in fp32.
    Unselected blocks are dropped by a select, so NaN or inf there changes nothing.
    """
    sel = mask.unsqueeze(-1)
    diff = torch.where(sel, pred.float() - target.float(), 0.0)
    sq = diff.square()
    count = mask.sum().float() * pred.shape[-1]
    return (sq.sum() / count.clamp_min(1.0)).to(pred.dtype)


class OmniFuseImputer(nn.Module):
    """Missing-modality imputation by a forward CRA and a dual backward CRA.

    ``v_in = P*v + (1-P)*u``; ``v' = CRA_f(v_in)``; ``v_hat = (1-P)*v' + P*u``;
    ``v'' = CRA_b(v_hat)``; ``v_full = P*v + (1-P)*v'`` (each computed as a select on ``P``,
    so missing blocks of ``v`` may hold anything). In training, observed modalities are
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

    def draw_present(
        self, observed: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """What :meth:`forward` would feed the model: the supervision drop in training.

        Call this outside a compiled region and pass the result as ``present`` so the random
        draw stays out of the graph (``forward(v, observed, present=None)`` draws the very
        same mask from the same RNG state).
        """
        supervise = self.training and (self.use_forward or self.use_backward)
        return supervision_drop(observed, self.drop_rate if supervise else 0.0, generator)

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
            v: modality embeddings ``[B, M, D]``, in the dtype of the module's parameters
                (under autocast: any float dtype). Missing blocks may hold anything (zeros,
                NaN, inf): they change no value and no gradient. Observed blocks must be finite.
            observed: bool ``[B, M]``, the data's own mask (no all-false row).
            u: missing embeddings ``[M, D]`` when ``missing_embedding="zero_input"``.
            present: what to feed the model instead of drawing a drop (must be within
                ``observed``; see :meth:`draw_present`); None draws the supervision drop in
                training.
            generator: RNG of the drop (global RNG when None).
            losses: compute L_forward and L_backward (in training); False skips them and the
                backward cascade (e.g. for an extra no-grad pass).

        Returns:
            :class:`ImputerOutput`.
        """
        m, d = self.num_modalities, self.dim
        _checks.floating("v", v, ndim=3, shape=(None, m, d))
        _checks.tensor("observed", observed, ndim=2, dtypes=(torch.bool,), shape=(v.shape[0], m))
        _checks.present_mask("observed", observed)
        _inputs.module_dtype("v", v, self.forward_cra.w1, type(self).__name__)
        _inputs.finite_where("v", v, observed)
        u = self._missing(u, v)
        if present is None:
            present = self.draw_present(observed, generator)
        else:
            _checks.tensor("present", present, dtypes=(torch.bool,), shape=tuple(observed.shape))
            _checks.present_mask("present", present)
            if _checks.value_checks_enabled() and bool((present & ~observed).any()):
                raise ValueError("present must be within observed (a subset of its True entries)")
        # Selects, not P*v + (1-P)*u: NaN * 0 is NaN, and a select's gradient into the
        # unselected side is an exact 0.
        p = present.unsqueeze(-1)
        u_b = u.unsqueeze(0).expand(v.shape)
        v_in = torch.where(p, v, u_b)
        out, latents = self.forward_cra(v_in.reshape(v.shape[0], m * d))
        v_fwd = out.view_as(v)
        fill = v_fwd if self.use_forward else u_b
        v_full = torch.where(p, v, fill)
        target = v.detach() if self.detach_target else v
        zero = v.new_zeros(())
        loss_fwd = zero
        if losses and self.training and self.use_forward:
            loss_fwd = masked_block_mse(v_fwd, target, observed)
        v_bwd, loss_bwd = None, zero
        if losses and self.training and self.use_backward:
            v_hat = torch.where(p, u_b, v_fwd)
            v_bwd = self.backward_cra(v_hat.reshape(v.shape[0], m * d))[0].view_as(v)
            loss_bwd = masked_block_mse(v_bwd, target, present)
        return ImputerOutput(v_full, v_fwd, v_bwd, latents, present, loss_fwd, loss_bwd)
