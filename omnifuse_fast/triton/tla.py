"""TLA (SPEC section 3) in Triton: ``combination_ids``, ``tla_stats`` and ``tla_loss``.

``tla_stats`` fuses the per-sample distance with the per-combination reduction into ``2**M``
bins. The reduction is two-stage and deterministic: a few programs per SM each loop over every
P-th block of rows, keep a histogram of their rows (sums and counts per bin) in registers and
write it once; a second kernel adds the P partial histograms per bin in a fixed order.
Atomics per bin would save that second launch, but fp32 atomic sums depend on the order the
programs arrive in, and these sums are accumulated over an epoch and compared by argmax (ties
go to the smallest id): a run, or a resumed run, must mine the same lazy combination.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from omnifuse_fast import _device_checks, _dispatch
from omnifuse_fast.reference import tla as _reference
from omnifuse_fast.triton._common import (
    interpreting,
    jit,
    launch,
    lse_finish,
    next_pow2,
    online_lse,
    use_reference,
)
from omnifuse_fast.triton._flags import COMB, LABELS, LOGITS, PRESENT, flag_if, flag_nonfinite

_DISTANCE_IDS = {"ce": 0, "l1": 1, "l2": 2}
_TILE = 4096  # fp32 elements of one [BLOCK_B, BLOCK_C] tile
_COMB_HI_ANY_M = 1 << 8  # tla_loss does not know M: comb ids of up to 8 modalities
_CHECKED = (_device_checks.LABELS, _device_checks.COMB, _device_checks.LOGITS)


def _values(logits, labels, comb, num_modalities) -> dict:
    """What the Python checks of ``_CHECKED`` read (_device_checks.host_check). tla_loss's
    kernel checks only the lazy combination's logits (the others are never read): a flagged
    row is among all the rows the Python check reads, so its error is the reference's."""
    return dict(
        labels=labels,
        num_classes=logits.shape[1],
        logits=logits,
        comb=comb,
        num_modalities=num_modalities,
    )


@jit
def _combination_ids_kernel(
    p_ptr, out_ptr, flags_ptr, B, M, BLOCK_B: tl.constexpr, MP: tl.constexpr
):
    b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    m = tl.arange(0, MP)
    ok = (b[:, None] < B) & (m[None, :] < M)
    bits = tl.load(p_ptr + b[:, None] * M + m[None, :], mask=ok, other=0).to(tl.int64)
    ids = tl.sum(bits << m[None, :].to(tl.int64), axis=1)
    flag_if(flags_ptr, PRESENT, (b < B) & (ids == 0))  # a sample with no modality
    tl.store(out_ptr + b, ids, mask=b < B)


@jit
def _distance_part(z, is_y, m, s, DIST: tl.constexpr):
    """Per-tile term of the l1/l2 distance between softmax and the one-hot label."""
    diff = tl.exp(z - m) / s - tl.where(is_y, 1.0, 0.0)
    if DIST == 1:
        part = tl.abs(diff)
    else:
        part = diff * diff
    return tl.sum(part, axis=1, keep_dims=True)


@jit
def _row_block(
    z_ptr,
    y_ptr,
    comb_ptr,
    out_ptr,
    gin_ptr,
    flags_ptr,
    rb,
    B,
    C,
    lazy,
    comb_hi,
    MODE: tl.constexpr,
    DIST: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ONE_TILE: tl.constexpr,
    CHECK: tl.constexpr,
):
    """Rows ``rb * BLOCK_B ...``: ``(comb, row_ok, d)`` with d the distance (MODE 0) or the CE
    (MODE 1) per row; MODE 2 writes the gradient rows instead (and returns d = 0)."""
    b = (rb * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)[:, None]  # [BB, 1]; rows < 2**31
    c = tl.arange(0, BLOCK_C)[None, :]
    comb = tl.load(comb_ptr + b, mask=b < B, other=0)
    row_ok = b < B
    if MODE != 0:  # only the lazy combination's rows matter: the others are never read
        row_ok = row_ok & (comb == lazy)
    y = tl.load(y_ptr + b, mask=b < B, other=0)
    if CHECK:  # both are only compared (with class ids, bins, lazy), never an address
        flag_if(flags_ptr, LABELS, (b < B) & ((y < 0) | (y >= C)))
        flag_if(flags_ptr, COMB, (b < B) & ((comb < 1) | (comb >= comb_hi)))
    zrow = z_ptr + b * C
    ninf = float("-inf")

    m_run = tl.full([BLOCK_B, 1], ninf, tl.float32)
    s_run = tl.zeros([BLOCK_B, 1], tl.float32)
    zt = tl.zeros([BLOCK_B, 1], tl.float32)
    if ONE_TILE:
        ok = row_ok & (c < C)
        z = tl.load(zrow + c, mask=ok, other=ninf).to(tl.float32)
        if CHECK:  # the rows read: all for the stats, the lazy combination's for the loss
            flag_nonfinite(flags_ptr, LOGITS, z, ok)
        is_y = c == y
        m_run, s_run = online_lse(m_run, s_run, z, 1)
        zt = tl.sum(tl.where(is_y & ok, z, 0.0), axis=1, keep_dims=True)
    else:
        for c0 in range(0, C, BLOCK_C):
            okc = row_ok & (c0 + c < C)
            zc = tl.load(zrow + c0 + c, mask=okc, other=ninf).to(tl.float32)
            if CHECK:
                flag_nonfinite(flags_ptr, LOGITS, zc, okc)
            m_run, s_run = online_lse(m_run, s_run, zc, 1)
            zt += tl.sum(tl.where((c0 + c == y) & okc, zc, 0.0), axis=1, keep_dims=True)
    m, s, log_s = lse_finish(m_run, s_run)

    d = tl.zeros([BLOCK_B, 1], tl.float32)
    if MODE == 2:  # d/dz of scale * CE on the lazy rows; the others get 0
        g = tl.load(gin_ptr).to(tl.float32)
        gty = out_ptr.dtype.element_ty
        if ONE_TILE:
            grad = tl.where(ok, g * (tl.exp(z - m) / s - tl.where(is_y, 1.0, 0.0)), 0.0)
            tl.store(out_ptr + b * C + c, grad.to(gty), mask=(b < B) & (c < C))
        else:
            for c0 in range(0, C, BLOCK_C):
                okc = row_ok & (c0 + c < C)
                zc = tl.load(zrow + c0 + c, mask=okc, other=ninf).to(tl.float32)
                grad = g * (tl.exp(zc - m) / s - tl.where(c0 + c == y, 1.0, 0.0))
                grad = tl.where(okc, grad, 0.0)
                tl.store(out_ptr + b * C + c0 + c, grad.to(gty), mask=(b < B) & (c0 + c < C))
    elif DIST == 0:
        d = (m - zt) + log_s  # lse - z_y without rounding lse at the logits' magnitude
    elif ONE_TILE:
        d = _distance_part(z, is_y, m, s, DIST)
    else:
        for c0 in range(0, C, BLOCK_C):
            okc = row_ok & (c0 + c < C)
            zc = tl.load(zrow + c0 + c, mask=okc, other=ninf).to(tl.float32)
            d += _distance_part(zc, c0 + c == y, m, s, DIST)
    return comb, row_ok, tl.where(row_ok, d, 0.0)


@jit
def _tla_kernel(
    z_ptr,
    y_ptr,
    comb_ptr,
    out_ptr,
    cnt_ptr,
    gin_ptr,
    flags_ptr,
    B,
    C,
    lazy,
    comb_hi,
    P,
    MODE: tl.constexpr,  # 0 stats partials, 1 loss partials, 2 loss gradient
    DIST: tl.constexpr,  # 0 ce, 1 l1, 2 l2
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ONE_TILE: tl.constexpr,
    NB: tl.constexpr,  # bins (2**M) of the histogram, MODE 0
    CHECK: tl.constexpr,  # report labels outside [0, C), comb outside [1, comb_hi), NaN/inf
):
    """P programs, each looping over every P-th block of rows and keeping its partial sums (a
    histogram of NB bins for MODE 0) in registers: the partials stay few, whatever B."""
    pid = tl.program_id(0)
    bins = tl.arange(0, NB)[None, :]
    hist_s = tl.zeros([1, NB], tl.float32)
    hist_n = tl.zeros([1, NB], tl.int32)
    total = tl.zeros([BLOCK_B, 1], tl.float32)
    count = tl.zeros([BLOCK_B, 1], tl.int32)
    for rb in range(pid, tl.cdiv(B, BLOCK_B), P):
        comb, row_ok, d = _row_block(
            z_ptr,
            y_ptr,
            comb_ptr,
            out_ptr,
            gin_ptr,
            flags_ptr,
            rb,
            B,
            C,
            lazy,
            comb_hi,
            MODE,
            DIST,
            BLOCK_B,
            BLOCK_C,
            ONE_TILE,
            CHECK,
        )
        if MODE == 0:
            hit = row_ok & (comb == bins)  # [BB, NB]
            hist_s += tl.sum(tl.where(hit, d, 0.0), axis=0, keep_dims=True)
            hist_n += tl.sum(hit.to(tl.int32), axis=0, keep_dims=True)
        elif MODE == 1:
            total += d
            count += row_ok.to(tl.int32)
    if MODE == 0:
        tl.store(out_ptr + pid * NB + bins, hist_s)
        tl.store(cnt_ptr + pid * NB + bins, hist_n)
    elif MODE == 1:
        tl.store(out_ptr + pid, tl.sum(total))
        tl.store(cnt_ptr + pid, tl.sum(count))


@jit
def _bin_reduce_kernel(
    psum_ptr, pcnt_ptr, sums_ptr, cnts_ptr, P, NB, BLOCK_P: tl.constexpr, BLOCK: tl.constexpr
):
    """Second stage: add the programs' partial histograms per bin, in a fixed order."""
    bo = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = bo < NB
    acc = tl.zeros([BLOCK_P, BLOCK], tl.float32)
    cnt = tl.zeros([BLOCK_P, BLOCK], tl.int64)
    for p0 in range(0, P, BLOCK_P):
        p = (p0 + tl.arange(0, BLOCK_P))[:, None]
        mask = (p < P) & ok[None, :]
        acc += tl.load(psum_ptr + p * NB + bo[None, :], mask=mask, other=0.0)
        cnt += tl.load(pcnt_ptr + p * NB + bo[None, :], mask=mask, other=0).to(tl.int64)
    tl.store(sums_ptr + bo, tl.sum(acc, axis=0), mask=ok)
    tl.store(cnts_ptr + bo, tl.sum(cnt, axis=0), mask=ok)


def _config(logits: torch.Tensor, nbins: int = 1) -> tuple[int, int, int]:
    """``(BLOCK_B, BLOCK_C, programs)``: a [BLOCK_B, BLOCK_C] logits tile of at most ``_TILE``
    elements (and a [BLOCK_B, bins] histogram tile of at most 2 * ``_TILE``); programs loop."""
    bsz, c = logits.shape
    block_c = min(next_pow2(c), _TILE)
    block_b = max(1, min(next_pow2(bsz), _TILE // block_c, 2 * _TILE // nbins, 64))
    blocks = triton.cdiv(bsz, block_b)
    if interpreting(logits):
        cap = 4  # few programs, but several row blocks each: the loop is exercised
    else:
        cap = 4 * torch.cuda.get_device_properties(logits.device).multi_processor_count
    return block_b, block_c, max(1, min(blocks, cap))


def _launch(
    mode, dist, logits, labels, comb, out, cnt, gin, lazy=0, nbins=1, flags=None, comb_hi=0
) -> None:
    """One launch of ``_tla_kernel``; with ``flags`` it reports labels outside [0, C) and comb
    outside [1, comb_hi)."""
    bsz, c = logits.shape
    if bsz == 0:
        return
    block_b, block_c, programs = _config(logits, nbins)
    big = block_b * max(block_c, nbins) > 2048
    launch(
        _tla_kernel,
        (programs,),
        logits,
        labels,
        comb,
        out,
        cnt,
        gin,
        out if flags is None else flags,
        bsz,
        c,
        lazy,
        comb_hi,
        programs,
        MODE=mode,
        DIST=dist,
        BLOCK_B=block_b,
        BLOCK_C=block_c,
        ONE_TILE=block_c >= c,
        NB=nbins,
        CHECK=flags is not None,
        num_warps=8 if big else 4,
    )


@triton_op("omnifuse_fast_triton::combination_ids", mutates_args=())
def _combination_ids_op(present: torch.Tensor) -> torch.Tensor:
    bsz, m = present.shape
    out = torch.empty(bsz, dtype=torch.int64, device=present.device)
    flags = _device_checks.new_flags(present.device)
    if bsz:
        block_b = 128
        launch(
            _combination_ids_kernel,
            (triton.cdiv(bsz, block_b),),
            present.contiguous().view(torch.uint8),
            out,
            flags,
            bsz,
            m,
            BLOCK_B=block_b,
            MP=next_pow2(m),
        )
    _device_checks.raise_if_flagged(
        flags, "combination_ids", (_device_checks.PRESENT,), present=present
    )
    return out


@triton_op("omnifuse_fast_triton::tla_stats", mutates_args=())
def _tla_stats_op(
    logits: torch.Tensor,
    labels: torch.Tensor,
    comb: torch.Tensor,
    num_modalities: int,
    distance: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    nbins = 1 << num_modalities
    device = logits.device
    sums = torch.empty(nbins, dtype=torch.float32, device=device)
    counts = torch.empty(nbins, dtype=torch.int64, device=device)
    programs = _config(logits, nbins)[2]
    psum = torch.zeros(programs, nbins, dtype=torch.float32, device=device)
    pcnt = torch.zeros(programs, nbins, dtype=torch.int32, device=device)
    dist = _DISTANCE_IDS[distance]
    flags = _device_checks.new_flags(device)
    _launch(
        0,
        dist,
        logits.contiguous(),
        labels.contiguous(),
        comb.contiguous(),
        psum,
        pcnt,
        psum,
        nbins=nbins,
        flags=flags,
        comb_hi=nbins,
    )
    _device_checks.raise_if_flagged(
        flags, "tla_stats", _CHECKED, **_values(logits, labels, comb, num_modalities)
    )
    block = min(nbins, 64)
    launch(
        _bin_reduce_kernel,
        (triton.cdiv(nbins, block),),
        psum,
        pcnt,
        sums,
        counts,
        programs,
        nbins,
        BLOCK_P=32,
        BLOCK=block,
    )
    return sums, counts


@triton_op("omnifuse_fast_triton::tla_loss", mutates_args=())
def _tla_loss_op(
    logits: torch.Tensor, labels: torch.Tensor, comb: torch.Tensor, lazy: int
) -> torch.Tensor:
    programs = _config(logits)[2]
    psum = torch.zeros(programs, dtype=torch.float32, device=logits.device)
    pcnt = torch.zeros(programs, dtype=torch.int32, device=logits.device)
    flags = _device_checks.new_flags(logits.device)
    _launch(
        1,
        0,
        logits.contiguous(),
        labels.contiguous(),
        comb.contiguous(),
        psum,
        pcnt,
        psum,
        lazy=lazy,
        flags=flags,
        comb_hi=_COMB_HI_ANY_M,
    )
    _device_checks.raise_if_flagged(
        flags, "tla_loss", _CHECKED, **_values(logits, labels, comb, None)
    )
    # sum / count, and a real 0 (not NaN) when no sample is of the lazy combination
    return (psum.sum() / pcnt.sum().clamp_min(1)).to(logits.dtype)


@triton_op("omnifuse_fast_triton::tla_loss_backward", mutates_args=())
def _tla_loss_backward_op(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    comb: torch.Tensor,
    lazy: int,
) -> torch.Tensor:
    comb = comb.contiguous()
    scale = grad_loss.float() / (comb == lazy).sum().clamp_min(1)  # on the device: no sync
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    _launch(
        2,
        0,
        logits.contiguous(),
        labels.contiguous(),
        comb,
        grad,
        grad,
        scale.reshape(1),
        lazy=lazy,
    )
    return grad


def _tla_loss_setup(ctx, inputs, output):
    logits, labels, comb, lazy = inputs
    ctx.save_for_backward(logits, labels, comb)
    ctx.lazy = lazy


def _tla_loss_backward(ctx, grad_loss):
    logits, labels, comb = ctx.saved_tensors
    return _tla_loss_backward_op(grad_loss, logits, labels, comb, ctx.lazy), None, None, None


_tla_loss_op.register_autograd(_tla_loss_backward, setup_context=_tla_loss_setup)


def combination_ids(present: torch.Tensor) -> torch.Tensor:
    """``comb[b] = sum_m present[b, m] << m`` (int64)."""
    return _combination_ids_op(present)


def tla_stats(logits, labels, comb, num_modalities, distance="ce"):
    """Per-combination distance sums (fp32) and counts (int64), ``[2**M]``; not differentiable."""
    if use_reference("tla_stats", logits):  # the ops skipped the Python pass: run it
        _device_checks.host_checks(_CHECKED, **_values(logits, labels, comb, num_modalities))
        return _reference.tla_stats(logits, labels, comb, num_modalities, distance)
    return _tla_stats_op(logits.detach(), labels, comb, int(num_modalities), distance)


def tla_loss(
    logits: torch.Tensor, labels: torch.Tensor, comb: torch.Tensor, lazy: int
) -> torch.Tensor:
    """Mean CE over the samples with ``comb == lazy`` (0 when there are none)."""
    if use_reference("tla_loss", logits):  # the ops skipped the Python pass: run it
        _device_checks.host_checks(_CHECKED, **_values(logits, labels, comb, None))
        return _reference.tla_loss(logits, labels, comb, lazy)
    return _tla_loss_op(logits, labels, comb, int(lazy))


_dispatch.register("combination_ids", "triton", combination_ids)
_dispatch.register("tla_stats", "triton", tla_stats)
_dispatch.register("tla_loss", "triton", tla_loss)
