"""Triton kernels of the mixed-kernel depthwise conv + BatchNorm + activation (compact channels).

Per alive channel c of group g (kernel k_g, padding p_g = k_g // 2, stride s), P = N * Ho * Wo:

    conv[n, c, i, j] = sum_{a, b < k_g} w[c, a, b] x[n, c, i s + a - p_g, j s + b - p_g]
                       (x is 0 outside the image)
    mean_c, var_c    = batch mean and biased variance of conv[:, c] (training), or running stats
    y                = act((conv - mean_c) * gamma_c / sqrt(var_c + eps) + beta_c)
    dz               = grad_y where act passes (decided from y), else 0
    grad beta_c      = sum dz,   grad gamma_c = rstd_c sum dz (conv - mean_c)
    d(conv)          = gamma_c rstd_c (dz - [training] (sum dz
                       + rstd_c^2 (conv - mean_c) sum dz (conv - mean_c)) / P)
    grad x           = transposed conv of d(conv)
    grad w[c, a, b]  = sum d(conv) (tap (a, b) of x)

Work split: a program owns a tile of BLOCK_C channels of ONE kernel-size group times BLOCK_P
consecutive positions (n, i, j) of the output (or of the input, for grad x). Up to
GROUPS_PER_LAUNCH groups share one launch: the second grid axis enumerates the channel tiles of
all of them, and each program finds its group by comparing its tile index with the groups' tile
bounds; every group's branch is compiled with its kernel size as a constexpr (loops over the
k x k taps fully unrolled, any odd k). More groups take more launches.

Forward, training (3 launches): (1) conv -> store the tape ``conv`` (the schema keeps it for
backward) + per-(channel, position block) partial mean and sum of squared deviations from it;
(2) per channel, the partials are combined in a fixed order (Chan et al.'s pairwise update:
M2 = sum M2_b + n_b (mean_b - mean)^2), which stays accurate where E[x^2] - mean^2 would cancel;
(3) normalize + activation from the tape. Eval (1 launch): conv, normalize, activation, store.
Backward (4 launches + one per group for its weight gradient): (1) partial sums of dz and
dz (conv - mean) per (channel, position block); (2) per channel: grad gamma/beta and the three
coefficients of d(conv); (3) d(conv) of each output pixel, from grad_y, y and conv, stored once
in the accumulation type, and the weight-gradient partials per (channel, tap, position block);
(4) grad x, a gather over the k x k output pixels that read each input pixel, from the stored
d(conv) (one load per tap instead of three plus the BN-backward arithmetic); (5) the weight
partials summed over blocks in block order.
No atomics anywhere: results are deterministic. Partials and statistics are float32 (float64 for
float64 inputs), stored values are in the input dtype; the tape is rounded to the input dtype
before the statistics are taken, as the eager chain computes BatchNorm on the stored conv.

Layouts: every tensor is dense in ``_layout.output_memory_format(x)`` and addressed through its
strides, so one kernel serves NCHW and channels_last; the tile shape differs (positions-major
for NCHW, channels-major for channels_last, the contiguous dimension in each case). Offsets are
int64.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .._impl import TRITON_INTERPRET
from .._layout import output_memory_format
from .ops import stats_dtype

GROUPS_PER_LAUNCH = 3
# (BLOCK_C, BLOCK_P) by channels_last. A GPU wants the tile's contiguous dimension long enough
# for full 128-byte transactions; the interpreter pays per operation, not per element, so it
# takes whole small problems in one tile.
_TILES = (
    {False: (16, 256), True: (16, 256)} if TRITON_INTERPRET else {False: (2, 256), True: (32, 32)}
)
_BLOCK_R = 16 if TRITON_INTERPRET else 32  # channels per program of the per-channel reductions
_CHUNK = 256 if TRITON_INTERPRET else 64  # position blocks per step of those reductions
_BLOCK_W = 1024  # weight-gradient elements per program of the final reduction
_ACTIVATIONS = {"none": 0, "relu": 1, "relu6": 2}
_ACC = {
    torch.float32: tl.float32,
    torch.float16: tl.float32,
    torch.bfloat16: tl.float32,
    torch.float64: tl.float64,
}  # storage dtype -> accumulation (statistics) dtype
_OP = "mixed_dwconv_bn_act"


# ---------------------------------------------------------------------------------------------
# Device helpers


@triton.jit
def _tile(
    pid_p,
    t_local,
    c_begin,
    count,
    P,
    HW_inner,
    W_inner,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # Channels of this tile (local index cl within the group, global c) and positions p of an
    # [N, HW_inner / W_inner, W_inner] grid, p = (n * H + h) * W + w.
    cl = t_local * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cl < count
    c = (c_begin + cl).to(tl.int64)
    p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    pmask = p < P
    n = p // HW_inner
    r = p - n * HW_inner
    h = r // W_inner
    w = r - h * W_inner
    return cl, c, cmask, p, pmask, n, h, w


@triton.jit
def _rstd(var, eps, ACC: tl.constexpr):
    if ACC == tl.float64:
        return 1.0 / tl.sqrt(var + eps)
    else:
        return tl.div_rn(1.0, tl.sqrt_rn(var + eps))


@triton.jit
def _activate(v, ACTIVATION: tl.constexpr):
    # NaN propagates (comparisons with NaN are false), as in torch.relu / F.relu6.
    if ACTIVATION == 1:
        v = tl.where(v < 0.0, 0.0, v)
    elif ACTIVATION == 2:
        v = tl.where(v < 0.0, 0.0, tl.where(v > 6.0, 6.0, v))
    return v


@triton.jit
def _masked_grad(gy_ptr, y_ptr, off, m, ACTIVATION: tl.constexpr, ACC: tl.constexpr):
    # dz = grad_y where the activation passes the gradient, decided from its output as
    # threshold_backward (relu) and hardtanh_backward (relu6) do; 0 outside the mask.
    g = tl.load(gy_ptr + off, mask=m, other=0.0).to(ACC)
    if ACTIVATION != 0:
        o = tl.load(y_ptr + off, mask=m, other=0.0).to(ACC)
        if ACTIVATION == 1:
            g = tl.where(o <= 0.0, 0.0, g)
        else:
            g = tl.where((o <= 0.0) | (o >= 6.0), 0.0, g)
    return g


@triton.jit
def _conv_grad(
    gy_ptr,
    y_ptr,
    conv_ptr,
    off,
    m,
    k_dz,
    k_conv,
    k_const,
    mean,
    BATCH_STATS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    ACC: tl.constexpr,
):
    # d(conv) = k_dz * dz + k_conv * (conv - mean) + k_const on the tile, 0 outside the mask.
    d = k_dz[:, None] * _masked_grad(gy_ptr, y_ptr, off, m, ACTIVATION, ACC)
    if BATCH_STATS:
        cv = tl.load(conv_ptr + off, mask=m, other=0.0).to(ACC)
        d += k_conv[:, None] * (cv - mean[:, None]) + k_const[:, None]
    return tl.where(m, d, 0.0)


@triton.jit
def _conv_tile(
    x_ptr,
    w_ptr,
    woff,
    cl,
    c,
    cmask,
    n,
    ho,
    wo,
    pmask,
    H,
    W,
    sN,
    sC,
    sH,
    sW,
    K: tl.constexpr,
    S: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # The depthwise conv of a [BLOCK_C, BLOCK_P] output tile; taps outside the image read 0.
    base = x_ptr + n[None, :] * sN + c[:, None] * sC
    wrow = w_ptr + woff + cl * (K * K)
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    for a in tl.static_range(K):
        h = ho * S + (a - K // 2)
        h_ok = pmask & (h >= 0) & (h < H)
        row = base + (h * sH)[None, :]
        for b in tl.static_range(K):
            w = wo * S + (b - K // 2)
            ok = cmask[:, None] & (h_ok & (w >= 0) & (w < W))[None, :]
            v = tl.load(row + (w * sW)[None, :], mask=ok, other=0.0).to(ACC)
            wt = tl.load(wrow + (a * K + b), mask=cmask, other=0.0).to(ACC)
            acc += wt[:, None] * v
    return acc


@triton.jit
def _group_slot(t, t1, t2, v0, v1, v2):
    # The value of the group that channel tile t belongs to: tiles [0, t1), [t1, t2), [t2, ...).
    return tl.where(t >= t2, v2, tl.where(t >= t1, v1, v0))


@triton.jit
def _group_tile(
    t,
    t1,
    t2,
    c0,
    c1,
    c2,
    n0,
    n1,
    n2,
    o0,
    o1,
    o2,
    pid_p,
    P,
    HW_inner,
    W_inner,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # The tile of program (pid_p, t) and its group's weight offset. Group g holds channels
    # [c_g, c_g + n_g) and its weights start at o_g of the packed weight buffer.
    t_local = t - _group_slot(t, t1, t2, 0, t1, t2)
    cl, c, cmask, p, pmask, n, h, w = _tile(
        pid_p,
        t_local,
        _group_slot(t, t1, t2, c0, c1, c2),
        _group_slot(t, t1, t2, n0, n1, n2),
        P,
        HW_inner,
        W_inner,
        BLOCK_C,
        BLOCK_P,
    )
    return cl, c, cmask, p, pmask, n, h, w, _group_slot(t, t1, t2, o0, o1, o2)


# ---------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _fwd_conv_kernel(
    x_ptr,
    w_ptr,
    conv_ptr,
    y_ptr,
    pmean_ptr,
    pm2_ptr,
    mean_ptr,
    var_ptr,
    gamma_ptr,
    beta_ptr,
    t1,
    t2,
    c0,
    c1,
    c2,
    n0,
    n1,
    n2,
    o0,
    o1,
    o2,
    NBP,
    P,
    H,
    W,
    Ho,
    Wo,
    sN,
    sC,
    sH,
    sW,
    oN,
    oC,
    oH,
    oW,
    eps,
    K0: tl.constexpr,
    K1: tl.constexpr,
    K2: tl.constexpr,
    S: tl.constexpr,
    BATCH_STATS: tl.constexpr,
    TAPE: tl.constexpr,
    ACTIVATION: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # Training: conv -> tape + per-block partial statistics. Eval: conv -> y (and the tape when
    # TAPE; without it conv_ptr is y's and only sets the rounding type).
    pid_p = tl.program_id(0)
    t = tl.program_id(1)
    Ho = tl.cast(Ho, tl.int64)
    Wo = tl.cast(Wo, tl.int64)
    cl, c, cmask, p, pmask, n, ho, wo, woff = _group_tile(
        t, t1, t2, c0, c1, c2, n0, n1, n2, o0, o1, o2, pid_p, P, Ho * Wo, Wo, BLOCK_C, BLOCK_P
    )
    if t < t1:
        acc = _conv_tile(
            x_ptr, w_ptr, woff, cl, c, cmask, n, ho, wo, pmask, H, W, sN, sC, sH, sW,
            K0, S, ACC, BLOCK_C, BLOCK_P,
        )  # fmt: skip
    elif t < t2:
        acc = _conv_tile(
            x_ptr, w_ptr, woff, cl, c, cmask, n, ho, wo, pmask, H, W, sN, sC, sH, sW,
            K1, S, ACC, BLOCK_C, BLOCK_P,
        )  # fmt: skip
    else:
        acc = _conv_tile(
            x_ptr, w_ptr, woff, cl, c, cmask, n, ho, wo, pmask, H, W, sN, sC, sH, sW,
            K2, S, ACC, BLOCK_C, BLOCK_P,
        )  # fmt: skip
    m = cmask[:, None] & pmask[None, :]
    off = n[None, :] * oN + c[:, None] * oC + (ho * oH + wo * oW)[None, :]
    stored = acc.to(conv_ptr.dtype.element_ty)
    if TAPE:
        tl.store(conv_ptr + off, stored, mask=m)
    acc = stored.to(ACC)
    if BATCH_STATS:
        cnt = tl.minimum(P - pid_p.to(tl.int64) * BLOCK_P, BLOCK_P).to(ACC)
        block_mean = tl.sum(tl.where(m, acc, 0.0), axis=1) / cnt
        dev = tl.where(m, acc - block_mean[:, None], 0.0)
        tl.store(pmean_ptr + c * NBP + pid_p, block_mean, mask=cmask)
        tl.store(pm2_ptr + c * NBP + pid_p, tl.sum(dev * dev, axis=1), mask=cmask)
    else:
        mean = tl.load(mean_ptr + c, mask=cmask, other=0.0)
        var = tl.load(var_ptr + c, mask=cmask, other=1.0)
        scale = tl.load(gamma_ptr + c, mask=cmask, other=0.0).to(ACC) * _rstd(var, eps, ACC)
        beta = tl.load(beta_ptr + c, mask=cmask, other=0.0).to(ACC)
        out = _activate((acc - mean[:, None]) * scale[:, None] + beta[:, None], ACTIVATION)
        tl.store(y_ptr + off, out.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _fwd_stats_kernel(
    pmean_ptr,
    pm2_ptr,
    mean_ptr,
    var_ptr,
    A,
    NBP,
    P,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
    CHUNK: tl.constexpr,
):
    # Per channel: mean = sum_b n_b mean_b / P, var = (sum_b M2_b + n_b (mean_b - mean)^2) / P,
    # blocks visited in order.
    c = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cmask = c < A
    total = tl.zeros([BLOCK_R], dtype=ACC)
    for j0 in range(0, NBP, CHUNK):
        j = j0 + tl.arange(0, CHUNK).to(tl.int64)
        m = cmask[:, None] & (j < NBP)[None, :]
        cnt = tl.minimum(P - j * BLOCK_P, BLOCK_P).to(ACC)
        bm = tl.load(pmean_ptr + c[:, None] * NBP + j[None, :], mask=m, other=0.0)
        total += tl.sum(tl.where(m, cnt[None, :] * bm, 0.0), axis=1)
    mean = total / P
    m2 = tl.zeros([BLOCK_R], dtype=ACC)
    for j0 in range(0, NBP, CHUNK):
        j = j0 + tl.arange(0, CHUNK).to(tl.int64)
        m = cmask[:, None] & (j < NBP)[None, :]
        cnt = tl.minimum(P - j * BLOCK_P, BLOCK_P).to(ACC)
        bm = tl.load(pmean_ptr + c[:, None] * NBP + j[None, :], mask=m, other=0.0)
        bm2 = tl.load(pm2_ptr + c[:, None] * NBP + j[None, :], mask=m, other=0.0)
        d = bm - mean[:, None]
        m2 += tl.sum(tl.where(m, bm2 + cnt[None, :] * d * d, 0.0), axis=1)
    tl.store(mean_ptr + c, mean, mask=cmask)
    tl.store(var_ptr + c, m2 / P, mask=cmask)


@triton.jit
def _fwd_apply_kernel(
    conv_ptr,
    y_ptr,
    mean_ptr,
    var_ptr,
    gamma_ptr,
    beta_ptr,
    A,
    P,
    HWo,
    Wo,
    oN,
    oC,
    oH,
    oW,
    eps,
    ACTIVATION: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    cl, c, cmask, p, pmask, n, ho, wo = _tile(
        tl.program_id(0), tl.program_id(1), 0, A, P, HWo, Wo, BLOCK_C, BLOCK_P
    )
    m = cmask[:, None] & pmask[None, :]
    off = n[None, :] * oN + c[:, None] * oC + (ho * oH + wo * oW)[None, :]
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0)
    var = tl.load(var_ptr + c, mask=cmask, other=1.0)
    scale = tl.load(gamma_ptr + c, mask=cmask, other=0.0).to(ACC) * _rstd(var, eps, ACC)
    beta = tl.load(beta_ptr + c, mask=cmask, other=0.0).to(ACC)
    v = tl.load(conv_ptr + off, mask=m, other=0.0).to(ACC)
    out = _activate((v - mean[:, None]) * scale[:, None] + beta[:, None], ACTIVATION)
    tl.store(y_ptr + off, out.to(y_ptr.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _bwd_sums_kernel(
    gy_ptr,
    y_ptr,
    conv_ptr,
    mean_ptr,
    psum_ptr,
    pdot_ptr,
    A,
    NBP,
    P,
    HWo,
    Wo,
    oN,
    oC,
    oH,
    oW,
    ACTIVATION: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # Per (channel, position block): sum dz and sum dz * (conv - mean).
    pid_p = tl.program_id(0)
    cl, c, cmask, p, pmask, n, ho, wo = _tile(
        pid_p, tl.program_id(1), 0, A, P, HWo, Wo, BLOCK_C, BLOCK_P
    )
    m = cmask[:, None] & pmask[None, :]
    off = n[None, :] * oN + c[:, None] * oC + (ho * oH + wo * oW)[None, :]
    dz = _masked_grad(gy_ptr, y_ptr, off, m, ACTIVATION, ACC)
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0)
    xc = tl.load(conv_ptr + off, mask=m, other=0.0).to(ACC) - mean[:, None]
    tl.store(psum_ptr + c * NBP + pid_p, tl.sum(dz, axis=1), mask=cmask)
    tl.store(pdot_ptr + c * NBP + pid_p, tl.sum(tl.where(m, dz * xc, 0.0), axis=1), mask=cmask)


@triton.jit
def _bwd_coef_kernel(
    psum_ptr,
    pdot_ptr,
    var_ptr,
    gamma_ptr,
    ggamma_ptr,
    gbeta_ptr,
    coef_ptr,
    A,
    NBP,
    P,
    eps,
    BATCH_STATS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    CHUNK: tl.constexpr,
):
    # Per channel: grad beta = sum dz, grad gamma = rstd sum dz (conv - mean), and d(conv) =
    # k_dz dz + k_conv (conv - mean) + k_const with k_dz = gamma rstd and, for batch statistics,
    # k_conv = -gamma rstd^3 sum dz (conv - mean) / P, k_const = -gamma rstd sum dz / P.
    c = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cmask = c < A
    sdz = tl.zeros([BLOCK_R], dtype=ACC)
    sdx = tl.zeros([BLOCK_R], dtype=ACC)
    for j0 in range(0, NBP, CHUNK):
        j = j0 + tl.arange(0, CHUNK).to(tl.int64)
        m = cmask[:, None] & (j < NBP)[None, :]
        sdz += tl.sum(tl.load(psum_ptr + c[:, None] * NBP + j[None, :], mask=m, other=0.0), 1)
        sdx += tl.sum(tl.load(pdot_ptr + c[:, None] * NBP + j[None, :], mask=m, other=0.0), 1)
    rstd = _rstd(tl.load(var_ptr + c, mask=cmask, other=1.0), eps, ACC)
    gamma = tl.load(gamma_ptr + c, mask=cmask, other=0.0).to(ACC)
    tl.store(gbeta_ptr + c, sdz.to(gbeta_ptr.dtype.element_ty), mask=cmask)
    tl.store(ggamma_ptr + c, (sdx * rstd).to(ggamma_ptr.dtype.element_ty), mask=cmask)
    k_dz = gamma * rstd
    tl.store(coef_ptr + c, k_dz, mask=cmask)
    if BATCH_STATS:
        tl.store(coef_ptr + A + c, -k_dz * rstd * rstd * sdx / P, mask=cmask)
        tl.store(coef_ptr + 2 * A + c, -k_dz * sdz / P, mask=cmask)


@triton.jit
def _coefs(coef_ptr, mean_ptr, c, cmask, A):
    # The d(conv) coefficients of the tile's channels (k_conv = k_const = 0 for running stats).
    k_dz = tl.load(coef_ptr + c, mask=cmask, other=0.0)
    k_conv = tl.load(coef_ptr + A + c, mask=cmask, other=0.0)
    k_const = tl.load(coef_ptr + 2 * A + c, mask=cmask, other=0.0)
    return k_dz, k_conv, k_const, tl.load(mean_ptr + c, mask=cmask, other=0.0)


@triton.jit
def _dgrad_tile(
    d_ptr,
    w_ptr,
    woff,
    cl,
    c,
    cmask,
    n,
    h,
    w,
    pmask,
    Ho,
    Wo,
    oN,
    oC,
    oH,
    oW,
    K: tl.constexpr,
    S: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # grad x at input pixel (h, w) = sum over taps (a, b) of w[a, b] * d(conv)[ho, wo] where
    # ho * S + a - K // 2 == h (and the same for w): a gather, no atomics.
    base = d_ptr + n[None, :] * oN + c[:, None] * oC
    wrow = w_ptr + woff + cl * (K * K)
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    for a in tl.static_range(K):
        hn = h + (K // 2 - a)
        if S == 1:
            h_ok = pmask & (hn >= 0) & (hn < Ho)
            row = base + (hn * oH)[None, :]
        else:
            h_ok = pmask & (hn >= 0) & ((hn & 1) == 0) & ((hn >> 1) < Ho)
            row = base + ((hn >> 1) * oH)[None, :]  # arithmetic shift; negatives are masked
        for b in tl.static_range(K):
            wn = w + (K // 2 - b)
            if S == 1:
                ok = h_ok & (wn >= 0) & (wn < Wo)
                col = wn * oW
            else:
                ok = h_ok & (wn >= 0) & ((wn & 1) == 0) & ((wn >> 1) < Wo)
                col = (wn >> 1) * oW
            d = tl.load(row + col[None, :], mask=cmask[:, None] & ok[None, :], other=0.0)
            wt = tl.load(wrow + (a * K + b), mask=cmask, other=0.0).to(ACC)
            acc += wt[:, None] * d
    return acc


@triton.jit
def _dgrad_kernel(
    d_ptr,
    w_ptr,
    gx_ptr,
    t1,
    t2,
    c0,
    c1,
    c2,
    n0,
    n1,
    n2,
    o0,
    o1,
    o2,
    PX,
    H,
    W,
    Ho,
    Wo,
    sN,
    sC,
    sH,
    sW,
    oN,
    oC,
    oH,
    oW,
    K0: tl.constexpr,
    K1: tl.constexpr,
    K2: tl.constexpr,
    S: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # grad x of one tile of input pixels, from the d(conv) the weight-gradient kernel stored.
    t = tl.program_id(1)
    H = tl.cast(H, tl.int64)
    W = tl.cast(W, tl.int64)
    cl, c, cmask, p, pmask, n, h, w, woff = _group_tile(
        t, t1, t2, c0, c1, c2, n0, n1, n2, o0, o1, o2, tl.program_id(0), PX, H * W, W,
        BLOCK_C, BLOCK_P,
    )  # fmt: skip
    if t < t1:
        acc = _dgrad_tile(
            d_ptr, w_ptr, woff, cl, c, cmask, n, h, w, pmask, Ho, Wo, oN, oC, oH, oW,
            K0, S, ACC, BLOCK_C, BLOCK_P,
        )  # fmt: skip
    elif t < t2:
        acc = _dgrad_tile(
            d_ptr, w_ptr, woff, cl, c, cmask, n, h, w, pmask, Ho, Wo, oN, oC, oH, oW,
            K1, S, ACC, BLOCK_C, BLOCK_P,
        )  # fmt: skip
    else:
        acc = _dgrad_tile(
            d_ptr, w_ptr, woff, cl, c, cmask, n, h, w, pmask, Ho, Wo, oN, oC, oH, oW,
            K2, S, ACC, BLOCK_C, BLOCK_P,
        )  # fmt: skip
    m = cmask[:, None] & pmask[None, :]
    off = n[None, :] * sN + c[:, None] * sC + (h * sH + w * sW)[None, :]
    tl.store(gx_ptr + off, acc.to(gx_ptr.dtype.element_ty), mask=m)


@triton.jit
def _wgrad_taps(
    x_ptr,
    d,
    part_ptr,
    woff,
    cl,
    c,
    cmask,
    n,
    ho,
    wo,
    pmask,
    H,
    W,
    sN,
    sC,
    sH,
    sW,
    K: tl.constexpr,
    S: tl.constexpr,
    ACC: tl.constexpr,
):
    # part[woff + cl * K * K + a * K + b] = sum over the tile of d(conv) * x at tap (a, b); x
    # outside the image reads 0 (the zero padding).
    base = x_ptr + n[None, :] * sN + c[:, None] * sC
    for a in tl.static_range(K):
        h = ho * S + (a - K // 2)
        h_ok = pmask & (h >= 0) & (h < H)
        row = base + (h * sH)[None, :]
        for b in tl.static_range(K):
            w = wo * S + (b - K // 2)
            ok = cmask[:, None] & (h_ok & (w >= 0) & (w < W))[None, :]
            v = tl.load(row + (w * sW)[None, :], mask=ok, other=0.0).to(ACC)
            tl.store(part_ptr + woff + cl * (K * K) + (a * K + b), tl.sum(d * v, 1), mask=cmask)


@triton.jit
def _wgrad_kernel(
    gy_ptr,
    y_ptr,
    conv_ptr,
    x_ptr,
    coef_ptr,
    mean_ptr,
    part_ptr,
    d_ptr,
    t1,
    t2,
    c0,
    c1,
    c2,
    n0,
    n1,
    n2,
    o0,
    o1,
    o2,
    A,
    WT,
    P,
    H,
    W,
    Ho,
    Wo,
    sN,
    sC,
    sH,
    sW,
    oN,
    oC,
    oH,
    oW,
    K0: tl.constexpr,
    K1: tl.constexpr,
    K2: tl.constexpr,
    S: tl.constexpr,
    BATCH_STATS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # d(conv) of one tile of output pixels, stored for the input gradient, and its weight-gradient
    # partials: part[pid_p, packed weight index].
    pid_p = tl.program_id(0)
    t = tl.program_id(1)
    Ho = tl.cast(Ho, tl.int64)
    Wo = tl.cast(Wo, tl.int64)
    cl, c, cmask, p, pmask, n, ho, wo, woff = _group_tile(
        t, t1, t2, c0, c1, c2, n0, n1, n2, o0, o1, o2, pid_p, P, Ho * Wo, Wo, BLOCK_C, BLOCK_P
    )
    m = cmask[:, None] & pmask[None, :]
    off = n[None, :] * oN + c[:, None] * oC + (ho * oH + wo * oW)[None, :]
    k_dz, k_conv, k_const, mean = _coefs(coef_ptr, mean_ptr, c, cmask, A)
    d = _conv_grad(
        gy_ptr, y_ptr, conv_ptr, off, m, k_dz, k_conv, k_const, mean, BATCH_STATS, ACTIVATION, ACC
    )
    tl.store(d_ptr + off, d, mask=m)
    part = part_ptr + pid_p.to(tl.int64) * WT
    if t < t1:
        _wgrad_taps(
            x_ptr, d, part, woff, cl, c, cmask, n, ho, wo, pmask, H, W, sN, sC, sH, sW, K0, S, ACC
        )
    elif t < t2:
        _wgrad_taps(
            x_ptr, d, part, woff, cl, c, cmask, n, ho, wo, pmask, H, W, sN, sC, sH, sW, K1, S, ACC
        )
    else:
        _wgrad_taps(
            x_ptr, d, part, woff, cl, c, cmask, n, ho, wo, pmask, H, W, sN, sC, sH, sW, K2, S, ACC
        )


@triton.jit
def _wgrad_sum_kernel(
    part_ptr, gw_ptr, begin, size, WT, NBP, ACC: tl.constexpr, BLOCK_W: tl.constexpr
):
    # gw[e] = sum over position blocks j (in order) of part[j, begin + e].
    e = (tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)).to(tl.int64)
    m = e < size
    acc = tl.zeros([BLOCK_W], dtype=ACC)
    ptrs = part_ptr + begin + e
    for _ in range(0, NBP):
        acc += tl.load(ptrs, mask=m, other=0.0)
        ptrs += WT
    tl.store(gw_ptr + e, acc.to(gw_ptr.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------------------
# Host side


def _require(ok: bool, message: str) -> None:
    # RuntimeError, as TORCH_CHECK raises in the C++ family: the public API has already raised
    # ValueError/TypeError for user input, this guards direct torch.ops calls.
    if not ok:
        raise RuntimeError(f"{_OP}: {message}")


def _device(t: torch.Tensor):
    # Triton launches on the current device: make it the tensors' one.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check_bias(x, bn_weight, bn_bias):
    """bn_bias is shaped like bn_weight, in x's dtype on x's device (both ops take it)."""
    _require(
        bn_bias.shape == bn_weight.shape
        and bn_bias.dtype == x.dtype
        and bn_bias.device == x.device,
        f"bn_bias must be [{x.shape[1]}] {x.dtype} on {x.device}, got {tuple(bn_bias.shape)} "
        f"{bn_bias.dtype} on {bn_bias.device}",
    )


def _groups(x, weights, bn_weight, stride, activation) -> list[tuple[int, int, int]]:
    """(first channel, channel count, kernel size) per group, after the checks the C++ kernels'
    ``check_and_group`` makes."""
    _require(x.dim() == 4, f"expected x as a 4-d [N, C, H, W] tensor, got {x.dim()}-d")
    _require(x.dtype in _ACC, f"the Triton kernel got dtype {x.dtype}")
    _require(stride in (1, 2), f"stride must be 1 or 2, got {stride}")
    _require(
        activation in _ACTIVATIONS,
        f"unknown activation '{activation}' (expected none, relu or relu6)",
    )
    _require(len(weights) > 0, "expected at least one weight group")
    groups, begin = [], 0
    for g, w in enumerate(weights):
        _require(
            w.dim() == 4 and w.shape[1] == 1 and w.shape[2] == w.shape[3] and w.shape[2] % 2 == 1,
            f"weights[{g}] must be [A_g, 1, k, k] with odd k, got {tuple(w.shape)}",
        )
        _require(
            w.dtype == x.dtype and w.device == x.device,
            f"weights[{g}] is {w.dtype} on {w.device}, x is {x.dtype} on {x.device}",
        )
        groups.append((begin, w.shape[0], w.shape[2]))
        begin += w.shape[0]
    _require(begin == x.shape[1], f"x has {x.shape[1]} channels, the weight groups hold {begin}")
    _require(
        bn_weight.shape == (begin,) and bn_weight.dtype == x.dtype,
        f"bn_weight must be [{begin}] {x.dtype}, got {tuple(bn_weight.shape)} {bn_weight.dtype}",
    )
    return groups


def _pack(weights, groups) -> tuple[torch.Tensor, list[int], int]:
    """The alive groups' weights as one flat buffer, each group's offset in it, its size."""
    offsets, total, flat = [], 0, []
    for w, (_, count, k) in zip(weights, groups):
        offsets.append(total)
        total += count * k * k
        if count:
            flat.append(w.reshape(-1))
    return torch.cat(flat).contiguous(), offsets, total


def _launches(groups, offsets, block_c):
    """Per launch: its number of channel tiles, the group table arguments (t1, t2, c0..c2,
    n0..n2, o0..o2) and the kernel sizes K0..K2. Empty groups are left out; empty slots get no
    tiles (never selected) and K = 1 (the cheapest to compile)."""
    live = [(c, n, k, o) for (c, n, k), o in zip(groups, offsets) if n]
    for i in range(0, len(live), GROUPS_PER_LAUNCH):
        chunk = live[i : i + GROUPS_PER_LAUNCH]
        chunk += [(0, 0, 1, 0)] * (GROUPS_PER_LAUNCH - len(chunk))
        tiles = [triton.cdiv(n, block_c) for _, n, _, _ in chunk]
        t1, t2 = tiles[0], tiles[0] + tiles[1]
        table = [t1, t2] + [g[0] for g in chunk] + [g[1] for g in chunk] + [g[3] for g in chunk]
        ks = {f"K{j}": g[2] for j, g in enumerate(chunk)}
        yield t2 + tiles[2], table, ks


def fwd(x, weights, bn_weight, bn_bias, running_mean, running_var, stride, use_batch_stats, eps,
        activation, save_tape=True):  # fmt: skip
    """``(y, conv, mean, var)`` of the compact-channel op; see ``ops.py`` for the contract
    (without ``save_tape`` conv is empty, and with running statistics none is written)."""
    groups = _groups(x, weights, bn_weight, stride, activation)
    _check_bias(x, bn_weight, bn_bias)
    if not use_batch_stats:
        _require(
            running_mean is not None and running_var is not None,
            "running statistics are required when batch statistics are not used",
        )
        for t in (running_mean, running_var):
            _require(
                t.shape == bn_weight.shape and t.dtype == x.dtype,
                f"running statistics must be [{x.shape[1]}] {x.dtype}, got {tuple(t.shape)}",
            )
    _require(eps > 0, f"eps must be positive, got {eps}")
    fmt = output_memory_format(x)
    x = x.contiguous(memory_format=fmt)
    N, A, H, W = x.shape
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    y = torch.empty((N, A, Ho, Wo), dtype=x.dtype, device=x.device, memory_format=fmt)
    tape = save_tape or use_batch_stats
    conv = torch.empty_like(y) if tape else y
    tape_out = conv if save_tape else x.new_empty((0,))
    sdt = stats_dtype(x.dtype)
    mean = torch.empty((A,), dtype=sdt, device=x.device)
    var = torch.empty((A,), dtype=sdt, device=x.device)
    if A == 0:
        return y, tape_out, mean, var
    P = N * Ho * Wo
    if use_batch_stats:
        _require(P > 0, "batch statistics of an empty batch are undefined")
    else:
        mean.copy_(running_mean)
        var.copy_(running_var)
        if P == 0:
            return y, tape_out, mean, var
    acc = _ACC[x.dtype]
    block_c, block_p = _TILES[fmt == torch.channels_last]
    nbp = triton.cdiv(P, block_p)
    wpack, offsets, _ = _pack(weights, groups)
    gamma, beta = bn_weight.contiguous(), bn_bias.contiguous()
    # partial (mean, M2) per (channel, position block); unused for running statistics
    partial = torch.empty((2, A, nbp) if use_batch_stats else (2, 1, 1), dtype=sdt, device=x.device)
    with _device(x):
        for tiles, table, ks in _launches(groups, offsets, block_c):
            _fwd_conv_kernel[(nbp, tiles)](
                x, wpack, conv, y, partial[0], partial[1], mean, var, gamma, beta, *table,
                nbp, P, H, W, Ho, Wo, *x.stride(), *y.stride(), eps, **ks,
                S=stride, BATCH_STATS=use_batch_stats, TAPE=tape,
                ACTIVATION=_ACTIVATIONS[activation],
                ACC=acc, BLOCK_C=block_c, BLOCK_P=block_p,
            )  # fmt: skip
        if use_batch_stats:
            _fwd_stats_kernel[(triton.cdiv(A, _BLOCK_R),)](
                partial[0], partial[1], mean, var, A, nbp, P,
                ACC=acc, BLOCK_P=block_p, BLOCK_R=_BLOCK_R, CHUNK=_CHUNK,
            )  # fmt: skip
            _fwd_apply_kernel[(nbp, triton.cdiv(A, block_c))](
                conv, y, mean, var, gamma, beta, A, P, Ho * Wo, Wo, *y.stride(), eps,
                ACTIVATION=_ACTIVATIONS[activation], ACC=acc, BLOCK_C=block_c, BLOCK_P=block_p,
            )  # fmt: skip
    return y, tape_out, mean, var


def bwd(grad_y, y, x, conv, weights, bn_weight, bn_bias, mean, var, stride, use_batch_stats, eps,
        activation):  # fmt: skip
    """``(grad_x, [grad weights], grad_bn_weight, grad_bn_bias)``; see ``ops.py``. The
    activation's mask is read from ``y``; ``bn_bias`` is only checked."""
    groups = _groups(x, weights, bn_weight, stride, activation)
    N, A, H, W = x.shape
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    for name, t in (("grad_y", grad_y), ("y", y), ("conv", conv)):
        _require(
            t.shape == (N, A, Ho, Wo) and t.dtype == x.dtype and t.device == x.device,
            f"{name} must be [{N}, {A}, {Ho}, {Wo}] {x.dtype}, got {tuple(t.shape)} {t.dtype}",
        )
    sdt = stats_dtype(x.dtype)
    for name, t in (("mean", mean), ("var", var)):
        _require(
            t.shape == (A,) and t.dtype == sdt,
            f"{name} must be [{A}] {sdt}, got {tuple(t.shape)} {t.dtype}",
        )
    _check_bias(x, bn_weight, bn_bias)
    fmt = output_memory_format(x)
    x = x.contiguous(memory_format=fmt)
    gy, y, conv = (t.contiguous(memory_format=fmt) for t in (grad_y, y, conv))
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    gw = [torch.empty(w.shape, dtype=w.dtype, device=w.device) for w in weights]
    ggamma, gbeta = torch.empty_like(bn_weight), torch.empty_like(bn_weight)
    if A == 0:
        return gx, gw, ggamma, gbeta
    P = N * Ho * Wo
    if P == 0:  # no samples: every gradient is an empty sum
        for t in (gx, *gw, ggamma, gbeta):
            t.zero_()
        return gx, gw, ggamma, gbeta
    acc = _ACC[x.dtype]
    act = _ACTIVATIONS[activation]
    block_c, block_p = _TILES[fmt == torch.channels_last]
    nbp = triton.cdiv(P, block_p)
    wpack, offsets, wt = _pack(weights, groups)
    gamma, mean, var = bn_weight.contiguous(), mean.contiguous(), var.contiguous()
    sums = torch.empty((2, A, nbp), dtype=sdt, device=x.device)
    coef = torch.zeros((3 * A,), dtype=sdt, device=x.device)  # k_dz, k_conv, k_const
    part = torch.empty((nbp, wt), dtype=sdt, device=x.device)
    # d(conv) in the accumulation type, laid out as grad_y
    dconv = torch.empty(gy.shape, dtype=sdt, device=x.device, memory_format=fmt)
    with _device(x):
        _bwd_sums_kernel[(nbp, triton.cdiv(A, block_c))](
            gy, y, conv, mean, sums[0], sums[1], A, nbp, P, Ho * Wo, Wo, *gy.stride(),
            ACTIVATION=act, ACC=acc, BLOCK_C=block_c, BLOCK_P=block_p,
        )  # fmt: skip
        _bwd_coef_kernel[(triton.cdiv(A, _BLOCK_R),)](
            sums[0], sums[1], var, gamma, ggamma, gbeta, coef, A, nbp, P, eps,
            BATCH_STATS=use_batch_stats, ACC=acc, BLOCK_R=_BLOCK_R, CHUNK=_CHUNK,
        )  # fmt: skip
        for tiles, table, ks in _launches(groups, offsets, block_c):
            _wgrad_kernel[(nbp, tiles)](
                gy, y, conv, x, coef, mean, part, dconv, *table, A, wt, P, H, W, Ho, Wo,
                *x.stride(), *gy.stride(), **ks, S=stride, BATCH_STATS=use_batch_stats,
                ACTIVATION=act, ACC=acc, BLOCK_C=block_c, BLOCK_P=block_p,
            )  # fmt: skip
            _dgrad_kernel[(triton.cdiv(N * H * W, block_p), tiles)](
                dconv, wpack, gx, *table, N * H * W, H, W, Ho, Wo, *x.stride(), *gy.stride(),
                **ks, S=stride, ACC=acc, BLOCK_C=block_c, BLOCK_P=block_p,
            )  # fmt: skip
        for g, offset, (_, count, k) in zip(gw, offsets, groups):
            if count:
                size = count * k * k
                _wgrad_sum_kernel[(triton.cdiv(size, _BLOCK_W),)](
                    part, g, offset, size, wt, nbp, ACC=acc, BLOCK_W=_BLOCK_W
                )
    return gx, gw, ggamma, gbeta
