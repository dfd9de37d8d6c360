"""MM learning (SPEC section 5) in Triton: ``modality_mix`` and ``soft_cross_entropy``.

``modality_mix`` gathers the mixed embeddings and builds the proportion labels in one kernel
(one program per block of mixed samples, all M modalities of each in the program, so "all
sources share a label" is decided in registers and gives an exact hard label).

Its backward is a scatter-add into ``v`` (several mixed rows may read one source), done
sort-free and deterministically: a one-program-per-modality scan links every mixed row to the
previous mixed row that read the same source (``prev``) and records the last one (``last``);
then one program per block of *source* rows walks its list and sums the rows in a fixed order,
in fp32, and writes each gradient row exactly once. Bitwise reproducible, no fp32 scratch
buffer, no zero fill, no cast pass; the scan is O(B) per modality. (An ``atomic_add`` variant
was dropped: its summation order varies from run to run, and it moved more bytes.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from omnifuse_fast import _device_checks, _dispatch
from omnifuse_fast.reference import mix as _reference
from omnifuse_fast.triton._common import (
    jit,
    launch,
    lse_finish,
    next_pow2,
    online_lse,
    use_reference,
)
from omnifuse_fast.triton._flags import (
    LABELS,
    LOGITS,
    SIMPLEX_TOL,
    SOFT_LABELS,
    SRC,
    WEIGHTS,
    flag_if,
    flag_nonfinite,
)

_TILE = 4096


# ------------------------------------------------------------------------------ forward


@jit
def _mix_kernel(
    v_ptr,
    y_ptr,
    src_ptr,
    w_ptr,
    vmix_ptr,
    soft_ptr,
    flags_ptr,
    B,
    M,
    D,
    C,
    HAS_W: tl.constexpr,
    BLOCK_B: tl.constexpr,
    MP: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b3 = (tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64))[
        :, None, None
    ]
    m3 = tl.arange(0, MP)[None, :, None]
    ok = (b3 < B) & (m3 < M)  # [BB, MP, 1]
    src = tl.load(src_ptr + m3 * B + b3, mask=ok, other=0)  # mixed row b takes m from src
    # src is an address: a source outside [0, B) is never read (zeros instead) and is reported
    src_ok = ok & (src >= 0) & (src < B)
    flag_if(flags_ptr, SRC, ok & ~src_ok)
    # every label is checked once, by the program of its row (labels are only compared)
    y_own = tl.load(y_ptr + b3, mask=b3 < B, other=0)
    flag_if(flags_ptr, LABELS, (b3 < B) & ((y_own < 0) | (y_own >= C)))
    # gather: v_mix[b, m, :] = v[src[m, b], m, :]
    d3 = tl.arange(0, BLOCK_D)[None, None, :]
    for d0 in range(0, D, BLOCK_D):
        okd = ok & (d0 + d3 < D)
        vals = tl.load(v_ptr + (src * M + m3) * D + d0 + d3, mask=okd & src_ok, other=0.0)
        tl.store(vmix_ptr + (b3 * M + m3) * D + d0 + d3, vals, mask=okd)
    # proportion labels: q[b] = sum_m w[b, m] onehot(y[src[m, b]])
    ys = tl.load(y_ptr + src, mask=src_ok, other=0)  # [BB, MP, 1]
    if HAS_W:  # on the simplex: >= 0 and summing to 1 over M (only read: reported)
        w = tl.load(w_ptr + b3 * M + m3, mask=ok, other=0.0)
        # written as "not inside" so that NaN weights are reported too
        off = ~(tl.abs(tl.sum(w, axis=1, keep_dims=True) - 1.0) <= SIMPLEX_TOL)
        flag_if(flags_ptr, WEIGHTS, (ok & ~(w >= 0.0)) | ((b3 < B) & off))
    else:
        w = tl.where(ok, 1.0 / M, 0.0)
    y0 = tl.sum(tl.where(m3 == 0, ys, 0), axis=1, keep_dims=True)  # [BB, 1, 1]
    n_other = tl.sum(tl.where(ok & (ys != y0), 1, 0), axis=1, keep_dims=True)
    c3 = tl.arange(0, BLOCK_C)[None, None, :]
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + c3
        soft = tl.sum(tl.where(ys == cc, w, 0.0), axis=1, keep_dims=True)  # [BB, 1, BC]
        soft = tl.where(n_other == 0, tl.where(cc == y0, 1.0, 0.0), soft)  # exact hard label
        tl.store(
            soft_ptr + b3 * C + cc, soft.to(soft_ptr.dtype.element_ty), mask=(b3 < B) & (cc < C)
        )


# ----------------------------------------------------------------------------- backward


@jit
def _link_kernel(src_ptr, last_ptr, prev_ptr, B, BLOCK: tl.constexpr):
    """Per modality (program), in order of b: ``prev[m, b]`` = the previous mixed row that
    read ``src[m, b]`` (-1 if none) and ``last[m, s]`` = the last mixed row that read s.

    Sequential over blocks of b (that is what makes it deterministic without a sort); inside a
    block, a BLOCK x BLOCK comparison finds the duplicates.
    """
    m = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)
    for b0 in range(0, B, BLOCK):
        b = b0 + i
        s = tl.load(src_ptr + m * B + b, mask=b < B, other=0)
        # a source outside [0, B) (reported by the forward) is left out: never an address
        ok = (b < B) & (s >= 0) & (s < B)
        same = (s[:, None] == s[None, :]) & ok[:, None] & ok[None, :]
        earlier = tl.max(tl.where(same & (i[None, :] < i[:, None]), b[None, :], -1), axis=1)
        has_later = tl.max(tl.where(same & (i[None, :] > i[:, None]), 1, 0), axis=1)
        # .cg: read `last` from L2, where the previous block's stores are
        before = tl.load(last_ptr + m * B + s, mask=ok, other=-1, cache_modifier=".cg")
        tl.debug_barrier()  # every lane has read `last` before any lane updates it
        tl.store(
            prev_ptr + m * B + b, tl.where(earlier >= 0, earlier, before).to(tl.int32), mask=ok
        )
        tl.store(last_ptr + m * B + s, b.to(tl.int32), mask=ok & (has_later == 0))
        tl.debug_barrier()  # the updates are visible to the next block


@jit
def _gather_back_kernel(
    g_ptr,
    last_ptr,
    prev_ptr,
    out_ptr,
    B,
    M,
    D,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``out[s, m, :] = sum of g[b, m, :]`` over the mixed rows b that read source s, walking
    the ``last``/``prev`` list: a fixed order, one write per row."""
    m = tl.program_id(1).to(tl.int64)
    s = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok_s = s < B
    ok_d = d[None, :] < D
    acc = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    b = tl.load(last_ptr + m * B + s, mask=ok_s, other=-1).to(tl.int64)
    while tl.max(b) >= 0:
        live = b >= 0
        row = tl.load(g_ptr + (b[:, None] * M + m) * D + d[None, :], mask=live[:, None] & ok_d)
        acc += tl.where(live[:, None], row.to(tl.float32), 0.0)
        b = tl.load(prev_ptr + m * B + b, mask=live, other=-1).to(tl.int64)
    out = out_ptr + (s[:, None] * M + m) * D + d[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=ok_s[:, None] & ok_d)


@jit
def _weights_back_kernel(
    gq_ptr, y_ptr, src_ptr, out_ptr, B, M, C, BLOCK_B: tl.constexpr, MP: tl.constexpr
):
    """d q[b, c] / d w[b, m] = [c == y[src[m, b]]], and 0 for a hard-label row."""
    b = (tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64))[:, None]
    m = tl.arange(0, MP)[None, :]
    inside = (b < B) & (m < M)
    src = tl.load(src_ptr + m * B + b, mask=inside, other=0)
    ok = inside & (src >= 0) & (src < B)  # bad sources and labels: reported by the forward
    ys = tl.load(y_ptr + src, mask=ok, other=0)
    ok = ok & (ys >= 0) & (ys < C)
    y0 = tl.sum(tl.where(m == 0, ys, 0), axis=1, keep_dims=True)
    hard = tl.sum(tl.where(ok & (ys != y0), 1, 0), axis=1, keep_dims=True) == 0
    g = tl.load(gq_ptr + b * C + ys, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * M + m, tl.where(hard, 0.0, g), mask=inside)


# ------------------------------------------------------------------ soft cross-entropy


@jit
def _soft_ce_kernel(
    z_ptr,
    q_ptr,
    out_ptr,
    gq_ptr,
    gin_ptr,
    flags_ptr,
    B,
    C,
    scale,
    MODE: tl.constexpr,  # 0 loss partials (and the finiteness check), 1 gradients
    NEED_GQ: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ONE_TILE: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64))[:, None]
    c = tl.arange(0, BLOCK_C)[None, :]
    ninf = float("-inf")
    m_run = tl.full([BLOCK_B, 1], ninf, tl.float32)
    s_run = tl.zeros([BLOCK_B, 1], tl.float32)
    qsum = tl.zeros([BLOCK_B, 1], tl.float32)
    if ONE_TILE:
        ok = (b < B) & (c < C)
        z = tl.load(z_ptr + b * C + c, mask=ok, other=ninf).to(tl.float32)
        q = tl.load(q_ptr + b * C + c, mask=ok, other=0.0).to(tl.float32)
        if MODE == 0:
            flag_nonfinite(flags_ptr, LOGITS, z, ok)
            flag_nonfinite(flags_ptr, SOFT_LABELS, q, ok)
        m_run, s_run = online_lse(m_run, s_run, z, 1)
        qsum = tl.sum(q, axis=1, keep_dims=True)
    else:
        for c0 in range(0, C, BLOCK_C):
            okc = (b < B) & (c0 + c < C)
            zc = tl.load(z_ptr + b * C + c0 + c, mask=okc, other=ninf).to(tl.float32)
            m_run, s_run = online_lse(m_run, s_run, zc, 1)
            qc = tl.load(q_ptr + b * C + c0 + c, mask=okc, other=0.0).to(tl.float32)
            if MODE == 0:
                flag_nonfinite(flags_ptr, LOGITS, zc, okc)
                flag_nonfinite(flags_ptr, SOFT_LABELS, qc, okc)
            qsum += tl.sum(qc, axis=1, keep_dims=True)
    m, s, log_s = lse_finish(m_run, s_run)
    if MODE == 0:
        # sum_c q_c (lse - z_c) per element, as q_c ((m - z_c) + log s): exact when z_c ~ lse
        if ONE_TILE:
            zs = tl.where(ok, z, 0.0)  # no 0 * inf on the padding
            acc = tl.sum(tl.where(ok, q * ((m - zs) + log_s), 0.0), axis=1, keep_dims=True)
        else:
            acc = tl.zeros([BLOCK_B, 1], tl.float32)
            for c0 in range(0, C, BLOCK_C):
                okc = (b < B) & (c0 + c < C)
                zc = tl.load(z_ptr + b * C + c0 + c, mask=okc, other=0.0).to(tl.float32)
                qc = tl.load(q_ptr + b * C + c0 + c, mask=okc, other=0.0).to(tl.float32)
                acc += tl.sum(tl.where(okc, qc * ((m - zc) + log_s), 0.0), axis=1, keep_dims=True)
        tl.store(out_ptr + pid, tl.sum(acc))
    else:
        g = tl.load(gin_ptr).to(tl.float32) * scale
        for c0 in range(0, C, BLOCK_C):
            if ONE_TILE:
                okc, zc, qc = ok, z, q
            else:
                okc = (b < B) & (c0 + c < C)
                zc = tl.load(z_ptr + b * C + c0 + c, mask=okc, other=ninf).to(tl.float32)
                qc = tl.load(q_ptr + b * C + c0 + c, mask=okc, other=0.0).to(tl.float32)
            gz = g * (qsum * (tl.exp(zc - m) / s) - qc)  # d/dz of -sum q log_softmax(z)
            tl.store(out_ptr + b * C + c0 + c, gz.to(out_ptr.dtype.element_ty), mask=okc)
            if NEED_GQ:
                gq = g * ((m - zc) + log_s)  # d/dq: -log_softmax(z)
                tl.store(gq_ptr + b * C + c0 + c, gq.to(gq_ptr.dtype.element_ty), mask=okc)


# ------------------------------------------------------------------------- host side


_SOFT_CE_SLOTS = (_device_checks.LOGITS, _device_checks.SOFT_LABELS)


def _mix_slots(weights: torch.Tensor | None) -> tuple[int, ...]:
    """The rules the mix kernel checks: src and labels, and the weights when given."""
    slots = (_device_checks.SRC, _device_checks.LABELS)
    return slots if weights is None else (*slots, _device_checks.WEIGHTS)


def _mix_values(labels, src, num_classes, weights) -> dict:
    """What the Python checks of those slots read (_device_checks.host_check)."""
    return dict(labels=labels, num_classes=num_classes, src=src, weights=weights)


def _row_block(bsz: int, width: int) -> int:
    return max(1, min(next_pow2(bsz), _TILE // width, 64))


@triton_op("omnifuse_fast_triton::modality_mix", mutates_args=())
def _mix_op(
    v: torch.Tensor,
    labels: torch.Tensor,
    src: torch.Tensor,
    num_classes: int,
    weights: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    bsz, m, d = v.shape
    # metadata only: the kernel reads src as [M, B] and bounds its values by B
    torch._check(tuple(src.shape) == (m, bsz), lambda: "src must be [M, B]")
    torch._check(tuple(labels.shape) == (bsz,), lambda: "labels must be [B]")
    v = v.contiguous()
    v_mix = torch.empty_like(v)
    soft = torch.empty(bsz, num_classes, dtype=v.dtype, device=v.device)
    mp = next_pow2(m)
    block_d = min(next_pow2(d), max(16, 2048 // mp))
    block_c = min(next_pow2(num_classes), max(16, 2048 // mp))
    block_b = _row_block(bsz, mp * max(block_d, block_c))
    has_w = weights is not None
    flags = _device_checks.new_flags(v.device)
    launch(
        _mix_kernel,
        (triton.cdiv(bsz, block_b),),
        v,
        labels.contiguous(),
        src.contiguous(),
        weights if has_w else v,  # not read without weights
        v_mix,
        soft,
        flags,
        bsz,
        m,
        d,
        num_classes,
        HAS_W=has_w,
        BLOCK_B=block_b,
        MP=mp,
        BLOCK_D=block_d,
        BLOCK_C=block_c,
    )
    _device_checks.raise_if_flagged(
        flags, "modality_mix", _mix_slots(weights), **_mix_values(labels, src, num_classes, weights)
    )
    return v_mix, soft


@triton_op("omnifuse_fast_triton::modality_mix_backward", mutates_args=())
def _mix_backward_op(grad_v_mix: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    bsz, m, d = grad_v_mix.shape
    grad_v_mix, src = grad_v_mix.contiguous(), src.contiguous()
    block_d = min(next_pow2(d), 1024)
    last = torch.full((m, bsz), -1, dtype=torch.int32, device=src.device)
    prev = torch.empty((m, bsz), dtype=torch.int32, device=src.device)
    launch(_link_kernel, (m,), src, last, prev, bsz, BLOCK=min(next_pow2(bsz), 128), num_warps=8)
    grad_v = torch.empty_like(grad_v_mix)
    block_s = max(1, min(next_pow2(bsz), 2048 // block_d))
    grid = (triton.cdiv(bsz, block_s), m, triton.cdiv(d, block_d))
    launch(
        _gather_back_kernel,
        grid,
        grad_v_mix,
        last,
        prev,
        grad_v,
        bsz,
        m,
        d,
        BLOCK_S=block_s,
        BLOCK_D=block_d,
    )
    return grad_v


@triton_op("omnifuse_fast_triton::modality_mix_weights_backward", mutates_args=())
def _mix_weights_backward_op(
    grad_soft: torch.Tensor, labels: torch.Tensor, src: torch.Tensor
) -> torch.Tensor:
    bsz, c = grad_soft.shape
    m = src.shape[0]
    out = torch.empty(bsz, m, dtype=torch.float32, device=src.device)
    block_b = 64
    launch(
        _weights_back_kernel,
        (triton.cdiv(bsz, block_b),),
        grad_soft.contiguous(),
        labels.contiguous(),
        src.contiguous(),
        out,
        bsz,
        m,
        c,
        BLOCK_B=block_b,
        MP=next_pow2(m),
    )
    return out


def _mix_setup(ctx, inputs, output):
    v, labels, src, num_classes, weights = inputs
    ctx.save_for_backward(labels, src)
    ctx.has_weights = weights is not None


def _mix_backward(ctx, grad_v_mix, grad_soft):
    labels, src = ctx.saved_tensors
    grad_v = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_v = _mix_backward_op(grad_v_mix, src)
    if ctx.has_weights and ctx.needs_input_grad[4]:
        grad_w = _mix_weights_backward_op(grad_soft, labels, src)
    return grad_v, None, None, None, grad_w


_mix_op.register_autograd(_mix_backward, setup_context=_mix_setup)


def _soft_ce_config(logits: torch.Tensor) -> tuple[int, int, int]:
    bsz, c = logits.shape
    block_c = min(next_pow2(c), 2048)
    block_b = _row_block(bsz, block_c)
    return block_b, block_c, triton.cdiv(bsz, block_b)


def _soft_ce_launch(mode, logits, soft, out, gq, gin, need_gq, flags=None) -> None:
    """With ``flags`` (the forward, mode 0) the kernel reports non-finite inputs."""
    bsz, c = logits.shape
    block_b, block_c, programs = _soft_ce_config(logits)
    launch(
        _soft_ce_kernel,
        (programs,),
        logits,
        soft,
        out,
        gq,
        gin,
        out if flags is None else flags,
        bsz,
        c,
        1.0 / bsz,
        MODE=mode,
        NEED_GQ=need_gq,
        BLOCK_B=block_b,
        BLOCK_C=block_c,
        ONE_TILE=block_c >= c,
    )


@triton_op("omnifuse_fast_triton::soft_cross_entropy", mutates_args=())
def _soft_ce_op(logits: torch.Tensor, soft_labels: torch.Tensor) -> torch.Tensor:
    logits, soft_labels = logits.contiguous(), soft_labels.contiguous()
    partials = torch.zeros(
        max(_soft_ce_config(logits)[2], 1), dtype=torch.float32, device=logits.device
    )
    flags = _device_checks.new_flags(logits.device)
    if logits.shape[0]:
        _soft_ce_launch(0, logits, soft_labels, partials, partials, partials, False, flags)
    _device_checks.raise_if_flagged(
        flags, "soft_cross_entropy", _SOFT_CE_SLOTS, logits=logits, soft_labels=soft_labels
    )
    return (partials.sum() / max(logits.shape[0], 1)).to(logits.dtype)  # empty batch: 0


@triton_op("omnifuse_fast_triton::soft_cross_entropy_backward", mutates_args=())
def _soft_ce_backward_op(
    grad_loss: torch.Tensor, logits: torch.Tensor, soft_labels: torch.Tensor, need_soft: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    logits, soft_labels = logits.contiguous(), soft_labels.contiguous()
    grad_z = torch.empty_like(logits)
    grad_q = torch.empty_like(soft_labels) if need_soft else grad_z.new_empty(0)
    if logits.shape[0]:
        _soft_ce_launch(
            1,
            logits,
            soft_labels,
            grad_z,
            grad_q if need_soft else grad_z,
            grad_loss.reshape(1),
            need_soft,
        )
    return grad_z, grad_q


def _soft_ce_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _soft_ce_backward(ctx, grad_loss):
    logits, soft = ctx.saved_tensors
    need_soft = ctx.needs_input_grad[1]
    grad_z, grad_q = _soft_ce_backward_op(grad_loss, logits, soft, need_soft)
    return grad_z, grad_q if need_soft else None


_soft_ce_op.register_autograd(_soft_ce_backward, setup_context=_soft_ce_setup)


def modality_mix(v, labels, src, num_classes, weights=None):
    """``(v_mix, soft_labels)``; gradients flow into ``v`` (scatter-add) and ``weights``."""
    if use_reference("modality_mix", v):  # the ops skipped the Python pass: run it
        slots = _mix_slots(weights)
        _device_checks.host_checks(slots, **_mix_values(labels, src, num_classes, weights))
        return _reference.modality_mix(v, labels, src, num_classes, weights)
    return _mix_op(v, labels, src, int(num_classes), weights)


def soft_cross_entropy(logits: torch.Tensor, soft_labels: torch.Tensor) -> torch.Tensor:
    """``mean_b(-sum_c q_{b,c} log_softmax(z_b)_c)``; gradients for logits and soft labels."""
    if use_reference("soft_cross_entropy", logits):  # the ops skipped the Python pass: run it
        _device_checks.host_checks(_SOFT_CE_SLOTS, logits=logits, soft_labels=soft_labels)
        return _reference.soft_cross_entropy(logits, soft_labels)
    return _soft_ce_op(logits, soft_labels)


_dispatch.register("modality_mix", "triton", modality_mix)
_dispatch.register("soft_cross_entropy", "triton", soft_cross_entropy)
