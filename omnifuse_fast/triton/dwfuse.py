"""DWFuse (SPEC section 2) in Triton: ``dwfuse_weights`` and ``dwfuse_loss``.

One program owns a block of samples with *all M modality rows* of each sample, so the weight
of modality m (a sum over the other modalities) never leaves the program. Per (sample,
modality) row the kernel streams the logits once for the log-space statistics
(``logsumexp`` over all classes and over the classes != y, the true logit), then builds
``omega`` and the cross-entropy in registers. When the class dim fits one tile
(``ONE_TILE``) the gradient reuses the tile already in registers: the logits are read once.

The backward recomputes these statistics instead of saving a gradient computed in the
forward: reading the logits twice (forward, backward) and writing the gradient once moves
fewer bytes than writing a gradient in the forward and rescaling it by ``grad_output`` in the
backward, allocates nothing in eval mode, and reads ``grad_output`` on the device (no sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from omnifuse_fast import _device_checks, _dispatch
from omnifuse_fast.reference import dwfuse as _reference
from omnifuse_fast.triton._common import (
    jit,
    launch,
    lse_finish,
    next_pow2,
    online_lse,
    sigmoid,
    softplus,
    use_reference,
)
from omnifuse_fast.triton._flags import LABELS, LOGITS, MULTILABEL, flag_if, flag_nonfinite

_TILE = 4096  # fp32 elements of one [BLOCK_B, M, BLOCK_C] tile


@jit
def _sum_others(x, m3, MP: tl.constexpr):
    """``out[:, m] = sum_{n != m} x[:, n]`` along axis 1, summed explicitly (not total - own:
    exact when one modality's term dwarfs the others)."""
    acc = tl.zeros_like(x)
    for n in tl.static_range(MP):
        xn = tl.sum(tl.where(m3 == n, x, 0.0), axis=1, keep_dims=True)
        acc += tl.where(m3 == n, 0.0, xn)
    return acc


@jit
def _mc_grad(z, is_y, m_a, s_a, m_o, s_o, lc, p_y, w_ce, w_lc):
    """``w_ce * dCE/dz + w_lc * dlog(1-p)/dz`` for one tile of classes, cancellation-free:
    ``p - onehot`` is ``-exp(log(1-p))`` at the label, and ``d log(1-p)/dz = p_y (q - onehot)``
    with q the softmax over the classes != y (the plain ``q - p`` cancels when p_y ~ 0)."""
    p = tl.exp(z - m_a) / s_a
    q = tl.where(is_y, 0.0, tl.exp(z - m_o) / s_o)
    d_ce = tl.where(is_y, -tl.exp(lc), p)
    d_lc = p_y * tl.where(is_y, -1.0, q)
    return w_ce * d_ce + w_lc * d_lc


@jit
def _dwfuse_mc_kernel(
    z_ptr,
    y_ptr,
    out_ptr,
    gin_ptr,
    flags_ptr,
    B,
    M,
    C,
    coef,
    scale,
    MODE: tl.constexpr,  # 0 omega, 1 loss partials, 2 loss grad, 3 omega grad
    DETACH: tl.constexpr,
    CHECK: tl.constexpr,  # report bad labels and logits in flags_ptr (the forward modes)
    BLOCK_B: tl.constexpr,
    MP: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ONE_TILE: tl.constexpr,
):
    pid = tl.program_id(0)
    b3 = (pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64))[:, None, None]
    m3 = tl.arange(0, MP)[None, :, None]
    c3 = tl.arange(0, BLOCK_C)[None, None, :]
    row_ok = (b3 < B) & (m3 < M)  # [BB, MP, 1]
    row = b3 * M + m3
    zrow = z_ptr + row * C
    y = tl.load(y_ptr + b3, mask=b3 < B, other=0)
    if CHECK:  # y is only compared with class ids, never an address: report, nothing to mask
        flag_if(flags_ptr, LABELS, (b3 < B) & ((y < 0) | (y >= C)))

    ninf = float("-inf")
    m_all = tl.full([BLOCK_B, MP, 1], ninf, tl.float32)
    m_oth = tl.full([BLOCK_B, MP, 1], ninf, tl.float32)
    s_all = tl.zeros([BLOCK_B, MP, 1], tl.float32)
    s_oth = tl.zeros([BLOCK_B, MP, 1], tl.float32)
    zt = tl.zeros([BLOCK_B, MP, 1], tl.float32)
    if ONE_TILE:
        ok = row_ok & (c3 < C)
        z = tl.load(zrow + c3, mask=ok, other=ninf).to(tl.float32)
        if CHECK:
            flag_nonfinite(flags_ptr, LOGITS, z, ok)
        is_y = c3 == y
        m_all, s_all = online_lse(m_all, s_all, z, 2)
        m_oth, s_oth = online_lse(m_oth, s_oth, tl.where(is_y, ninf, z), 2)
        zt = tl.sum(tl.where(is_y & ok, z, 0.0), axis=2, keep_dims=True)
    else:
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + c3
            okc = row_ok & (cc < C)
            zc = tl.load(zrow + cc, mask=okc, other=ninf).to(tl.float32)
            if CHECK:
                flag_nonfinite(flags_ptr, LOGITS, zc, okc)
            is_yc = cc == y
            m_all, s_all = online_lse(m_all, s_all, zc, 2)
            m_oth, s_oth = online_lse(m_oth, s_oth, tl.where(is_yc, ninf, zc), 2)
            zt += tl.sum(tl.where(is_yc & okc, zc, 0.0), axis=2, keep_dims=True)
    m_a, s_a, ls_a = lse_finish(m_all, s_all)
    m_o, s_o, ls_o = lse_finish(m_oth, s_oth)
    # log(1 - p) = lse(others) - lse(all), exact for every p; CE = lse(all) - z_y
    lc = tl.where(row_ok, (m_o - m_a) + (ls_o - ls_a), 0.0)
    ce = tl.where(row_ok, (m_a - zt) + ls_a, 0.0)
    p_y = tl.exp(zt - m_a) / s_a
    omega = tl.exp(coef * _sum_others(lc, m3, MP))

    if MODE == 0:
        tl.store(out_ptr + row, omega.to(out_ptr.dtype.element_ty), mask=row_ok)
    elif MODE == 1:
        tl.store(out_ptr + pid, tl.sum(tl.where(row_ok, omega * ce, 0.0)))
    else:
        if MODE == 2:
            g = tl.load(gin_ptr).to(tl.float32) * scale
            w_ce = g * omega
            if DETACH:
                w_lc = tl.zeros_like(omega)
            else:  # d omega_m / d log(1-p_n) = coef * omega_m for n != m
                w_lc = g * coef * _sum_others(omega * ce, m3, MP)
        else:
            go = tl.load(gin_ptr + row, mask=row_ok, other=0.0).to(tl.float32)
            w_ce = tl.zeros_like(omega)
            w_lc = coef * _sum_others(go * omega, m3, MP)
        gty = out_ptr.dtype.element_ty
        if ONE_TILE:
            grad = _mc_grad(z, is_y, m_a, s_a, m_o, s_o, lc, p_y, w_ce, w_lc)
            tl.store(out_ptr + row * C + c3, grad.to(gty), mask=ok)
        else:
            for c0 in range(0, C, BLOCK_C):
                cc = c0 + c3
                okc = row_ok & (cc < C)
                zc = tl.load(zrow + cc, mask=okc, other=ninf).to(tl.float32)
                grad = _mc_grad(zc, cc == y, m_a, s_a, m_o, s_o, lc, p_y, w_ce, w_lc)
                tl.store(out_ptr + row * C + cc, grad.to(gty), mask=okc)


@jit
def _dwfuse_ml_kernel(
    z_ptr,
    y_ptr,
    out_ptr,
    gin_ptr,
    flags_ptr,
    B,
    M,
    C,
    coef,
    scale,
    MODE: tl.constexpr,
    DETACH: tl.constexpr,
    CHECK: tl.constexpr,
    BLOCK_B: tl.constexpr,
    MP: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Multilabel: every (sample, modality, label) is independent but for the sum over the
    # other modalities, so one pass over the labels does everything.
    pid = tl.program_id(0)
    b3 = (pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64))[:, None, None]
    m3 = tl.arange(0, MP)[None, :, None]
    c3 = tl.arange(0, BLOCK_C)[None, None, :]
    row_ok = (b3 < B) & (m3 < M)
    row = b3 * M + m3
    gty = out_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_B, MP, BLOCK_C], tl.float32)
    if MODE == 2:
        g = tl.load(gin_ptr).to(tl.float32) * scale
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + c3
        ok = row_ok & (cc < C)
        z = tl.load(z_ptr + row * C + cc, mask=ok, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + b3 * C + cc, mask=(b3 < B) & (cc < C), other=0.0).to(tl.float32)
        if CHECK:
            flag_if(flags_ptr, MULTILABEL, (b3 < B) & (cc < C) & (y != 0.0) & (y != 1.0))
            flag_nonfinite(flags_ptr, LOGITS, z, ok)
        sg = 1.0 - 2.0 * y  # +1 for label 0, -1 for label 1
        t = sg * z
        ce = tl.where(ok, softplus(t), 0.0)  # BCE with logits
        lc = tl.where(ok, -softplus(-t), 0.0)  # log of the wrong value's probability
        omega = tl.exp(coef * _sum_others(lc, m3, MP))
        if MODE == 0:
            tl.store(out_ptr + row * C + cc, omega.to(gty), mask=ok)
        elif MODE == 1:
            acc += omega * ce
        else:
            if MODE == 2:
                w_ce = g * omega
                if DETACH:
                    w_lc = tl.zeros_like(omega)
                else:
                    w_lc = g * coef * _sum_others(omega * ce, m3, MP)
            else:
                go = tl.load(gin_ptr + row * C + cc, mask=ok, other=0.0).to(tl.float32)
                w_ce = tl.zeros_like(omega)
                w_lc = coef * _sum_others(go * omega, m3, MP)
            grad = sg * (w_ce * sigmoid(t) + w_lc * sigmoid(-t))
            tl.store(out_ptr + row * C + cc, grad.to(gty), mask=ok)
    if MODE == 1:
        tl.store(out_ptr + pid, tl.sum(acc))


def _config(logits: torch.Tensor) -> tuple[int, int, int, int]:
    """``(BLOCK_B, MP, BLOCK_C, programs)``: a tile of at most ``_TILE`` fp32 elements."""
    bsz, m, c = logits.shape
    mp = next_pow2(m)
    block_c = min(next_pow2(c), max(16, _TILE // mp))
    block_b = max(1, min(next_pow2(bsz), _TILE // (mp * block_c), 64))
    return block_b, mp, block_c, triton.cdiv(bsz, block_b)


def _launch(mode: int, logits, labels, out, gin, beta: float, detach: bool, flags=None) -> None:
    """One kernel launch; with ``flags`` (the forward ops) the kernel reports bad labels."""
    bsz, m, c = logits.shape
    block_b, mp, block_c, programs = _config(logits)
    check = flags is not None
    common = dict(MODE=mode, DETACH=detach, CHECK=check, BLOCK_B=block_b, MP=mp, BLOCK_C=block_c)
    common["num_warps"] = 4 if block_b * mp * block_c <= 2048 else 8
    args = (logits, labels, out, gin, flags if check else out, bsz, m, c, beta / (m - 1))
    if labels.dim() == 2:
        launch(_dwfuse_ml_kernel, (programs,), *args, 1.0 / (bsz * c), **common)
    else:
        launch(_dwfuse_mc_kernel, (programs,), *args, 1.0 / bsz, ONE_TILE=block_c >= c, **common)


def _slots(labels: torch.Tensor) -> tuple[int, int]:
    """The rules the forward kernels check: the labels' (class ids or 0/1), finite logits."""
    slot = _device_checks.MULTILABEL if labels.dim() == 2 else _device_checks.LABELS
    return slot, _device_checks.LOGITS


def _values(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """What the Python checks of these slots read (_device_checks.host_check)."""
    return dict(
        labels=labels, num_classes=logits.shape[2], logits=logits, logits_name="modality_logits"
    )


def _raise_if_bad_values(flags: torch.Tensor, op: str, logits, labels) -> None:
    _device_checks.raise_if_flagged(flags, op, _slots(labels), **_values(logits, labels))


@triton_op("omnifuse_fast_triton::dwfuse_weights", mutates_args=())
def _weights_op(logits: torch.Tensor, labels: torch.Tensor, beta: float) -> torch.Tensor:
    logits, labels = logits.contiguous(), labels.contiguous()
    shape = logits.shape if labels.dim() == 2 else logits.shape[:2]
    omega = torch.empty(shape, dtype=logits.dtype, device=logits.device)
    flags = _device_checks.new_flags(logits.device)
    _launch(0, logits, labels, omega, omega, beta, True, flags)
    _raise_if_bad_values(flags, "dwfuse_weights", logits, labels)
    return omega


@triton_op("omnifuse_fast_triton::dwfuse_weights_backward", mutates_args=())
def _weights_backward_op(
    grad_omega: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, beta: float
) -> torch.Tensor:
    logits, labels = logits.contiguous(), labels.contiguous()
    grad = torch.empty_like(logits)
    _launch(3, logits, labels, grad, grad_omega.contiguous(), beta, False)
    return grad


@triton_op("omnifuse_fast_triton::dwfuse_loss", mutates_args=())
def _loss_op(
    logits: torch.Tensor, labels: torch.Tensor, beta: float, detach_weight: bool
) -> torch.Tensor:
    logits, labels = logits.contiguous(), labels.contiguous()
    partials = torch.empty(_config(logits)[3], dtype=torch.float32, device=logits.device)
    flags = _device_checks.new_flags(logits.device)
    _launch(1, logits, labels, partials, partials, beta, detach_weight, flags)
    _raise_if_bad_values(flags, "dwfuse_loss", logits, labels)
    denom = logits.shape[0] * (logits.shape[2] if labels.dim() == 2 else 1)
    return (partials.sum() / denom).to(logits.dtype)


@triton_op("omnifuse_fast_triton::dwfuse_loss_backward", mutates_args=())
def _loss_backward_op(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    beta: float,
    detach_weight: bool,
) -> torch.Tensor:
    logits, labels = logits.contiguous(), labels.contiguous()
    grad = torch.empty_like(logits)
    _launch(2, logits, labels, grad, grad_loss.reshape(1), beta, detach_weight)
    return grad


def _weights_setup(ctx, inputs, output):
    logits, labels, beta = inputs
    ctx.save_for_backward(logits, labels)
    ctx.beta = beta


def _weights_backward(ctx, grad_omega):
    logits, labels = ctx.saved_tensors
    return _weights_backward_op(grad_omega, logits, labels, ctx.beta), None, None


def _loss_setup(ctx, inputs, output):
    logits, labels, beta, detach_weight = inputs
    ctx.save_for_backward(logits, labels)
    ctx.beta, ctx.detach_weight = beta, detach_weight


def _loss_backward(ctx, grad_loss):
    logits, labels = ctx.saved_tensors
    grad = _loss_backward_op(grad_loss, logits, labels, ctx.beta, ctx.detach_weight)
    return grad, None, None, None


_weights_op.register_autograd(_weights_backward, setup_context=_weights_setup)
_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup)


def dwfuse_weights(logits: torch.Tensor, labels: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """omega ``[B, M]`` (``[B, M, C]`` multilabel); gradients flow into the logits."""
    if use_reference("dwfuse_weights", logits):  # the ops skipped the Python pass: run it
        _device_checks.host_checks(_slots(labels), **_values(logits, labels))
        return _reference.dwfuse_weights(logits, labels, beta)
    return _weights_op(logits, labels, float(beta))


def dwfuse_loss(
    logits: torch.Tensor, labels: torch.Tensor, beta: float = 0.5, detach_weight: bool = True
) -> torch.Tensor:
    """``L_enc`` (eq. 12); with ``detach_weight=False`` the gradient includes d omega/d logits."""
    if use_reference("dwfuse_loss", logits):  # the ops skipped the Python pass: run it
        _device_checks.host_checks(_slots(labels), **_values(logits, labels))
        return _reference.dwfuse_loss(logits, labels, beta, detach_weight)
    return _loss_op(logits, labels, float(beta), bool(detach_weight))


_dispatch.register("dwfuse_weights", "triton", dwfuse_weights)
_dispatch.register("dwfuse_loss", "triton", dwfuse_loss)
