"""``cra_forward``: the CRA cascade of SPEC section 1."""

from __future__ import annotations

import torch

from omnifuse_fast import _checks, _device_checks, _dispatch


def _autocast(device: torch.device, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # Like nn.Linear under autocast: a matmul op runs in the autocast dtype.
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
        return tuple(t.to(dtype) for t in tensors)
    return tensors


def cra_forward(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    activation: str = "relu",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cascade of K residual autoencoders on ``x [B, F]``.

    Args:
        x: input ``[B, F]`` (F = M*D), fp32/bf16/fp16.
        w1, b1: encoder weights ``[K, H, F]`` and biases ``[K, H]`` (nn.Linear convention).
        w2, b2: decoder weights ``[K, F, H]`` and biases ``[K, F]``.
        activation: ``"relu"``, ``"gelu"``, ``"silu"`` or ``"tanh"``.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``(out [B, F], latents [B, K*H])`` in the input dtype.
    """
    _checks.floating("x", x, ndim=2, shape=(None, None))
    bsz, feat = x.shape
    _checks.floating("w1", w1, ndim=3, shape=(None, None, None))
    _checks.cra_width(x, w1)
    k, h, _ = w1.shape
    if k < 1 or h < 1:
        raise ValueError(f"w1 must have K >= 1 and H >= 1, got shape {tuple(w1.shape)}")
    _checks.floating("b1", b1, ndim=2, shape=(k, h))
    _checks.floating("w2", w2, ndim=3, shape=(k, feat, h))
    _checks.floating("b2", b2, ndim=2, shape=(k, feat))
    _checks.choice("activation", activation, _checks.ACTIVATIONS)
    device = _checks.same_device(x=x, w1=w1, b1=b1, w2=w2, b2=b2)
    x, w1, b1, w2, b2 = _autocast(device, x, w1, b1, w2, b2)
    _checks.same_dtype(x=x, w1=w1, b1=b1, w2=w2, b2=b2)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w1, b1, w2, b2))
    choice = _dispatch.resolve("cra_forward", backend, device, needs_grad=needs_grad)
    if _checks.python_value_checks(choice.backend, "x"):  # else: checked on the device
        _checks.finite("x", x)
    elif _checks.device_value_checks(choice.backend, "x"):  # no host sync
        _device_checks.check_finite("cra_forward", _device_checks.X, x, x=x)
    return choice.impl(x, w1, b1, w2, b2, activation)
