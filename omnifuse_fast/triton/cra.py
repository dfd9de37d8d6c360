"""The CRA cascade (SPEC section 1) in Triton, fully fused (the tiny-cuda-nn idea).

Forward: one program owns a tile of ``BLOCK_B`` rows and keeps the running sum ``s_k`` of the
tile in registers (fp32, ``[BLOCK_B, F]``) across all K residual autoencoders. For each RA it
streams ``W1_k`` / ``W2_k`` in slices of ``BLOCK_H`` latent units through ``tl.dot``:
``a = s W1[h]^T + b1[h]`` and ``c = act(a)`` stay in registers (``c`` is written once, as the
latents output), and ``c W2[:, h]^T`` accumulates the update, so ``s`` is read from memory once
(``x``) and written once (``out``). Nothing else touches memory unless a backward will follow,
in which case the forward also stashes ``s_{k-1}`` and the pre-activation ``a_k`` (fp32).

Backward, two kernels:
  * the chain, fused like the forward (one row tile in registers, k = K..1):
    ``g_c = g_s W2_k + g_lat_k``, ``g_a = g_c act'(a_k)``, ``g_s += g_a W1_k``; it writes ``dx``
    and stashes ``g_a`` and ``g_s`` per RA for the weight gradients;
  * the weight gradients ``dW1_k = g_a^T s_{k-1}``, ``dW2_k = g_s^T c_k`` (and the bias sums),
    as a reduction over the batch: each program owns an output tile and one of ``SPLIT``
    segments of rows, writes an fp32 partial, and the partials are summed. Per-row-tile partials
    of a whole ``K x H x F`` weight would be far larger than the batch; this split keeps the
    partials small and the result deterministic (no atomics).

The fused kernels keep ``[BLOCK_B, F]`` fp32 tiles in registers, so F is limited (padded to a
power of two, at most ``MAX_F = 1024``, and the dot operands' tiles must fit the device's shared
memory); H is streamed in slices, so any H works (the GPU tests go to 256). Beyond that, and for
fp64 inputs, the op falls back to the reference path with a warning that says why. bf16/fp16
inputs run their dots on tensor cores (fp32 accumulation, s kept in fp32); fp32 inputs run exact
fp32 dots. In the interpreter every dot runs in fp32 (its bf16 dots are wrong).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from omnifuse_fast import _device_checks, _dispatch
from omnifuse_fast.reference import cra as _reference
from omnifuse_fast.triton._common import (
    ACTIVATION_IDS,
    activation,
    activation_grad,
    fallback_reason,
    fp32_dot_precision,
    interpreting,
    jit,
    launch,
    next_pow2,
    report_fallback,
)
from omnifuse_fast.triton._flags import X, flag_nonfinite

MAX_F = 1024
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@jit
def _cra_forward_kernel(
    x_ptr,
    w1_ptr,
    b1_ptr,
    w2_ptr,
    b2_ptr,
    out_ptr,
    lat_ptr,
    ss_ptr,
    sa_ptr,
    flags_ptr,
    B,
    F,
    H,
    K,
    ACT: tl.constexpr,
    STASH: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_DT: tl.constexpr,
    PREC: tl.constexpr,
):
    r = (tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64))[:, None]
    f = tl.arange(0, BLOCK_F)[None, :]
    f_col = tl.arange(0, BLOCK_F)[:, None]
    hh = tl.arange(0, BLOCK_H)
    rok = r < B
    fok = f < F
    s = tl.load(x_ptr + r * F + f, mask=rok & fok, other=0.0).to(tl.float32)
    flag_nonfinite(flags_ptr, X, s, rok & fok)  # the value check of x, where it is read
    for k in range(0, K):
        if STASH:
            tl.store(ss_ptr + (k * B + r) * F + f, s, mask=rok & fok)
        s_op = s.to(DOT_DT)  # s_{k-1}, the input of every latent slice of RA k
        for h0 in range(0, H, BLOCK_H):
            h = h0 + hh
            hok = h < H
            # W1_k^T slice [F, BLOCK_H]: element (f, h) is w1[k, h, f]
            w1t = tl.load(
                w1_ptr + (k * H + h[None, :]) * F + f_col,
                mask=(f_col < F) & hok[None, :],
                other=0.0,
            )
            b1 = tl.load(b1_ptr + k * H + h, mask=hok, other=0.0).to(tl.float32)
            a = tl.dot(s_op, w1t.to(DOT_DT), input_precision=PREC) + b1[None, :]
            c = activation(a, ACT)
            lat_mask = rok & hok[None, :]
            tl.store(
                lat_ptr + r * (K * H) + k * H + h[None, :],
                c.to(lat_ptr.dtype.element_ty),
                mask=lat_mask,
            )
            if STASH:
                tl.store(sa_ptr + (k * B + r) * H + h[None, :], a, mask=lat_mask)
            # W2_k^T slice [BLOCK_H, F]: element (h, f) is w2[k, f, h]
            w2t = tl.load(
                w2_ptr + (k * F + f) * H + h[:, None],
                mask=hok[:, None] & fok,
                other=0.0,
            )
            # s_k accumulates in place: only s and s_op stay live (registers are the limit)
            s += tl.dot(c.to(DOT_DT), w2t.to(DOT_DT), input_precision=PREC)
        s += tl.load(b2_ptr + k * F + f, mask=fok, other=0.0).to(tl.float32)
    tl.store(out_ptr + r * F + f, s.to(out_ptr.dtype.element_ty), mask=rok & fok)


@jit
def _cra_backward_kernel(
    gout_ptr,
    glat_ptr,
    w1_ptr,
    w2_ptr,
    sa_ptr,
    dx_ptr,
    ga_ptr,
    gs_ptr,
    B,
    F,
    H,
    K,
    ACT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_DT: tl.constexpr,
    PREC: tl.constexpr,
):
    r = (tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64))[:, None]
    f = tl.arange(0, BLOCK_F)[None, :]
    f_col = tl.arange(0, BLOCK_F)[:, None]
    hh = tl.arange(0, BLOCK_H)
    rok = r < B
    fok = f < F
    g = tl.load(gout_ptr + r * F + f, mask=rok & fok, other=0.0).to(tl.float32)  # d/d s_K
    for kk in range(0, K):
        k = K - 1 - kk
        tl.store(gs_ptr + (k * B + r) * F + f, g, mask=rok & fok)  # d/d s_k, for dW2_k
        g_op = g.to(DOT_DT)  # d/d s_k, the input of every latent slice
        for h0 in range(0, H, BLOCK_H):
            h = h0 + hh
            hok = h < H
            mask = rok & hok[None, :]
            # W2_k slice [F, BLOCK_H]: element (f, h) is w2[k, f, h]
            w2s = tl.load(
                w2_ptr + (k * F + f_col) * H + h[None, :],
                mask=(f_col < F) & hok[None, :],
                other=0.0,
            )
            gc = tl.dot(g_op, w2s.to(DOT_DT), input_precision=PREC)
            gc += tl.load(glat_ptr + r * (K * H) + k * H + h[None, :], mask=mask, other=0.0).to(
                tl.float32
            )
            a = tl.load(sa_ptr + (k * B + r) * H + h[None, :], mask=mask, other=0.0)
            ga = tl.where(mask, gc * activation_grad(a, ACT), 0.0)
            tl.store(ga_ptr + (k * B + r) * H + h[None, :], ga, mask=mask)
            # W1_k slice [BLOCK_H, F]: element (h, f) is w1[k, h, f]
            w1s = tl.load(w1_ptr + (k * H + h[:, None]) * F + f, mask=hok[:, None] & fok, other=0.0)
            g += tl.dot(ga.to(DOT_DT), w1s.to(DOT_DT), input_precision=PREC)  # d/d s_{k-1}
    tl.store(dx_ptr + r * F + f, g.to(dx_ptr.dtype.element_ty), mask=rok & fok)


@jit
def _cra_weight_grad_kernel(
    p_ptr,
    q_ptr,
    out_ptr,
    bias_ptr,
    B,
    NI,
    NJ,
    K,
    rows_per_split,
    ACT_Q: tl.constexpr,  # -1: use q as is; else q = act(q)
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PREC: tl.constexpr,
):
    """``out[sp, k] = sum_{b in segment sp} P[k, b, :]^T Q'[k, b, :]`` (``[I, J]``, fp32) and
    ``bias[sp, k] = sum_b P[k, b, :]``; P and Q are fp32 stashes ``[K, B, I]``/``[K, B, J]``."""
    tiles_j = tl.cdiv(NJ, BLOCK_J)
    ti = tl.program_id(0) // tiles_j
    tj = tl.program_id(0) % tiles_j
    k = tl.program_id(1).to(tl.int64)
    sp = tl.program_id(2).to(tl.int64)
    i = ti * BLOCK_I + tl.arange(0, BLOCK_I)
    j = tj * BLOCK_J + tl.arange(0, BLOCK_J)
    iok = i < NI
    jok = j < NJ
    r0 = sp * rows_per_split
    r1 = tl.minimum(r0 + rows_per_split, B)
    acc = tl.zeros([BLOCK_I, BLOCK_J], tl.float32)
    acc_b = tl.zeros([BLOCK_I], tl.float32)
    for b0 in range(r0, r1, BLOCK_R):
        b = b0 + tl.arange(0, BLOCK_R).to(tl.int64)
        bok = b < r1
        pt = tl.load(
            p_ptr + (k * B + b[None, :]) * NI + i[:, None],
            mask=iok[:, None] & bok[None, :],
            other=0.0,
        )
        q = tl.load(
            q_ptr + (k * B + b[:, None]) * NJ + j[None, :],
            mask=bok[:, None] & jok[None, :],
            other=0.0,
        )
        if ACT_Q >= 0:
            q = activation(q, ACT_Q)  # act(0) == 0: the padding stays 0
        acc += tl.dot(pt, q, input_precision=PREC)
        acc_b += tl.sum(pt, axis=1)
    tl.store(
        out_ptr + ((sp * K + k) * NI + i[:, None]) * NJ + j[None, :],
        acc,
        mask=iok[:, None] & jok[None, :],
    )
    if tj == 0:
        tl.store(bias_ptr + (sp * K + k) * NI + i, acc_b, mask=iok)


# ------------------------------------------------------------------------- host side


# (BLOCK_B, BLOCK_H, num_warps) per padded F. The fused kernels hold [BLOCK_B, F] fp32 tiles in
# registers, so these were chosen by compiling every candidate for sm_90 without a GPU and
# reading the register use and spills of the cubin (cuobjdump --dump-resource-usage): wider F
# gets fewer rows and more warps. "tc": bf16/fp16 operands on tensor cores; "fp32": exact fp32
# FMA dots ("ieee"; 3xTF32 made ptxas spill kilobytes per thread at F >= 256).
_CONFIGS = {
    "tc": {
        64: (32, 32, 4),
        128: (32, 32, 8),
        256: (32, 32, 8),
        512: (16, 16, 8),
        1024: (16, 16, 16),
    },
    "fp32": {128: (32, 32, 8), 256: (16, 16, 8), 512: (16, 16, 16), 1024: (16, 16, 32)},
}


def _plan(x: torch.Tensor, hidden: int) -> dict:
    """Launch configuration of the fused kernels for ``x [B, F]`` (tl.dot needs dims >= 16)."""
    fp = max(16, next_pow2(x.shape[1]))
    if interpreting(x):  # tiny tiles; and the interpreter runs bf16 dots wrongly: fp32 there
        return dict(BLOCK_B=16, BLOCK_F=fp, BLOCK_H=16, DOT_DT=tl.float32, PREC="ieee")
    kind = "tc" if x.dtype in _TL_DTYPES else "fp32"
    table = _CONFIGS[kind]
    block_b, block_h, num_warps = table[max(fp, min(table))]
    return dict(
        BLOCK_B=block_b,
        BLOCK_F=fp,
        BLOCK_H=min(block_h, max(16, next_pow2(hidden))),
        DOT_DT=_TL_DTYPES.get(x.dtype, tl.float32),
        PREC="tf32" if kind == "tc" else "ieee",  # the precision only applies to fp32 operands
        num_warps=num_warps,
        num_stages=2 if kind == "tc" else 1,  # the streamed W tiles take the shared memory
    )


def _smem_bytes(plan: dict) -> int:
    """Shared memory of the fused kernels (measured on sm_90: the dot operands' tiles)."""
    elt = 4 if plan["DOT_DT"] == tl.float32 else 2
    return (plan["BLOCK_B"] + plan["BLOCK_H"]) * plan["BLOCK_F"] * elt + 4096


def unsupported_reason(x: torch.Tensor, w1: torch.Tensor) -> str | None:
    """Why the fused kernels cannot take these shapes (``None`` when they can)."""
    feat = x.shape[1]
    if next_pow2(feat) > MAX_F:
        return (
            f"F = {feat} pads to {next_pow2(feat)} > {MAX_F}, wider than the row tile the fused "
            "kernels keep in registers"
        )
    if x.device.type == "cuda":
        props = torch.cuda.get_device_properties(x.device)
        have = getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024
        need = _smem_bytes(_plan(x, w1.shape[1]))
        if need > have:
            return f"F = {feat} in {x.dtype} needs ~{need} bytes of shared memory, {have} here"
    return None


def _weight_grad(p: torch.Tensor, q: torch.Tensor, act_q: int, prec: str):
    """``(sum_b p^T act(q), sum_b p)`` per RA: ``[K, I, J]`` and ``[K, I]`` fp32."""
    k, bsz, ni = p.shape
    nj = q.shape[2]
    interp = interpreting(p)
    block = 32 if interp else 64
    block_r = 16 if interp else 32
    tiles = triton.cdiv(ni, block) * triton.cdiv(nj, block)
    # enough programs to fill the device (the interpreter: few, but still a split in two)
    if interp:
        target = 2 * tiles * k
    else:
        target = 4 * torch.cuda.get_device_properties(p.device).multi_processor_count
    split = max(1, min(triton.cdiv(bsz, block_r), target // (tiles * k)))
    rows = triton.cdiv(triton.cdiv(bsz, split), block_r) * block_r
    split = triton.cdiv(bsz, rows)
    out = torch.empty(split, k, ni, nj, dtype=torch.float32, device=p.device)
    bias = torch.empty(split, k, ni, dtype=torch.float32, device=p.device)
    launch(
        _cra_weight_grad_kernel,
        (tiles, k, split),
        p,
        q,
        out,
        bias,
        bsz,
        ni,
        nj,
        k,
        rows,
        ACT_Q=act_q,
        BLOCK_I=block,
        BLOCK_J=block,
        BLOCK_R=block_r,
        PREC=prec,
    )
    return out.sum(dim=0), bias.sum(dim=0)  # fixed order: deterministic


@triton_op("omnifuse_fast_triton::cra_forward", mutates_args=())
def _forward_op(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    activation: str,
    stash: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, w1, b1, w2, b2 = (t.contiguous() for t in (x, w1, b1, w2, b2))
    bsz, feat = x.shape
    k, hidden, _ = w1.shape
    out = torch.empty_like(x)
    lat = torch.empty(bsz, k * hidden, dtype=x.dtype, device=x.device)
    shape_s, shape_a = ((k, bsz, feat), (k, bsz, hidden)) if stash else ((0,), (0,))
    ss = torch.empty(shape_s, dtype=torch.float32, device=x.device)
    sa = torch.empty(shape_a, dtype=torch.float32, device=x.device)
    flags = _device_checks.new_flags(x.device)
    if bsz:
        plan = _plan(x, hidden)
        launch(
            _cra_forward_kernel,
            (triton.cdiv(bsz, plan["BLOCK_B"]),),
            x,
            w1,
            b1,
            w2,
            b2,
            out,
            lat,
            ss,
            sa,
            flags,
            bsz,
            feat,
            hidden,
            k,
            ACT=ACTIVATION_IDS[activation],
            STASH=stash,
            **plan,
        )
    _device_checks.raise_if_flagged(flags, "cra_forward", (_device_checks.X,), x=x)
    return out, lat, ss, sa


@triton_op("omnifuse_fast_triton::cra_backward", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor,
    grad_lat: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    ss: torch.Tensor,
    sa: torch.Tensor,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_out, grad_lat, w1, w2 = (t.contiguous() for t in (grad_out, grad_lat, w1, w2))
    bsz, feat = grad_out.shape
    k, hidden, _ = w1.shape
    act = ACTIVATION_IDS[activation]
    dx = torch.empty_like(grad_out)
    ga = torch.empty(k, bsz, hidden, dtype=torch.float32, device=dx.device)
    gs = torch.empty(k, bsz, feat, dtype=torch.float32, device=dx.device)
    if bsz == 0:
        zeros = torch.zeros_like
        return dx, zeros(w1), w1.new_zeros(k, hidden), zeros(w2), w2.new_zeros(k, feat)
    plan = _plan(grad_out, hidden)
    launch(
        _cra_backward_kernel,
        (triton.cdiv(bsz, plan["BLOCK_B"]),),
        grad_out,
        grad_lat,
        w1,
        w2,
        sa,
        dx,
        ga,
        gs,
        bsz,
        feat,
        hidden,
        k,
        ACT=act,
        **plan,
    )
    # the stashes are fp32: 3xTF32 (about fp32-accurate) where tensor cores have it
    prec = "ieee" if interpreting(dx) else fp32_dot_precision(dx)
    dw1, db1 = _weight_grad(ga, ss, -1, prec)  # dW1_k = g_a^T s_{k-1}
    dw2, db2 = _weight_grad(gs, sa, act, prec)  # dW2_k = g_s^T act(a_k)
    dt = w1.dtype
    return dx, dw1.to(dt), db1.to(dt), dw2.to(dt), db2.to(dt)


def _setup(ctx, inputs, output):
    _, w1, _, w2, _, activation, _ = inputs
    _, _, ss, sa = output
    ctx.save_for_backward(w1, w2, ss, sa)
    ctx.activation = activation
    ctx.mark_non_differentiable(ss, sa)


def _backward(ctx, grad_out, grad_lat, _grad_ss, _grad_sa):
    w1, w2, ss, sa = ctx.saved_tensors
    grads = _backward_op(grad_out, grad_lat, w1, w2, ss, sa, ctx.activation)
    return (*grads, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup)


def cra_forward(x, w1, b1, w2, b2, activation="relu"):
    """``(s_K, concat(c_1..c_K))`` by the fused kernels (the reference beyond ``MAX_F``)."""
    reason = unsupported_reason(x, w1) or fallback_reason(x)
    if reason is not None:
        report_fallback("cra_forward", reason)
        _device_checks.host_checks((_device_checks.X,), x=x)  # the ops left it to the kernel
        return _reference.cra_forward(x, w1, b1, w2, b2, activation)
    params = (x, w1, b1, w2, b2)
    stash = torch.is_grad_enabled() and any(t.requires_grad for t in params)
    out, lat, _, _ = _forward_op(x, w1, b1, w2, b2, activation, stash)
    return out, lat


_dispatch.register("cra_forward", "triton", cra_forward)
