"""Triton forward of the dynamic-token transformer and its backward over the saved tape.

The math is ``reference``'s module docstring, on the L alive tokens only (``ops`` states the op
contract). The forward kernels read the alive tokens' parameters through ``token_index`` (rows of
``W_in``, BN_in, the running statistics and the queries, columns of ``W_out``); ``bwd`` gathers
them with ``index_select`` and scatters their gradients back to full size. Token dimension
``d = g * g``.

Forward, 3 launches (2 with no token alive), masked or not, training or eval (the kernels store
the statistics they normalise with, running ones included: no copy launches):

1. ``_tokenize_kernel``, one program per sample n: ``f = resize(x[n], (g, g))`` (bilinear,
   align_corners=False, ATen's source taps, shared with ``multires_fusion.triton``), stored on
   the tape, and ``u[n] = W_in[:, :C] f + W_in[:, C] P_x + W_in[:, C + 1] P_y`` ``[L, d]`` into
   an accumulation-type scratch (one ``tl.dot`` per block of channels).
2. ``_layers_kernel``, one program per sample n, everything ``[L, d]`` held on chip: BN_in
   (training: every program reduces the batch statistics of ``u`` over all N samples itself, in
   the same order, so no separate statistics launch is needed and all programs agree bit for
   bit; program 0 stores them), the encoder layer, the decoder layer, and ``z[n] = W_out o``
   ``[C_out, d]`` into a scratch. A layer is ``reference.layer``: Q/K/V projections, per head
   ``P = softmax(q_h k_h^T / sqrt(d / heads))`` over the L valid keys (head h is selected by
   zeroing the other heads' feature columns before the dot), ``attn = P v_h``, the output
   projection, residual ``memory``, LayerNorm, ReLU feed-forward, residual, LayerNorm.
3. ``_detokenize_kernel``, one program per (block of output channels, sample n): the BN_out
   statistics of its channels over the batch (training; reduced by every sample's program in
   the same order, stored by sample 0's), the normalised ``zhat[n]`` onto the tape, and
   ``y[n] = gamma * (resize(z[n]) - mean) * rstd + beta (+ x[n])``: resizing first is exact algebra
   (BN is affine per channel and the bilinear weights sum to one) and reads the accumulation
   scratch, not the rounded tape.

Everything is computed in float32 (float64 for float64 inputs); ``tl.dot`` runs with
``input_precision="ieee"`` (no TF32 on a GPU). The tape is the one ``ops.tape_size`` counts and
``csrc/token_transformer/token_transformer.h`` (``TapeLayout``) lays out; ``_tape_layout``
mirrors it.

Backward (``bwd``): NOT a Triton kernel. It is written as batched torch operations over the tape
(no recomputation of the forward): the adjoint of the output resize
(``aten.upsample_bilinear2d_backward``), BN_out, the output projection, each layer in reverse
(LayerNorm, feed-forward, attention with the saved probabilities, projections), BN_in, the input
projection and the adjoint of the input resize. Dead tokens never reach it (compact tokens), so
their parameters get exactly zero gradient from the scatter of the compact gradients.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .._alive import expand
from .._impl import TRITON_INTERPRET
from ..multires_fusion.triton import _bilinear_tap
from . import reference
from .ops import stats_dtype

_ACC = {
    torch.float32: tl.float32,
    torch.float16: tl.float32,
    torch.bfloat16: tl.float32,
    torch.float64: tl.float64,
}
BLOCK_C = 16  # channels per tl.dot of the input and output projections
# Detokenize tile: channels x output pixels. A GPU wants many programs of a register-sized tile;
# the interpreter pays per operation, not per element, so it takes far larger tiles.
DETOK_CHANNELS = 64 if TRITON_INTERPRET else 4
DETOK_TILE = 65536 if TRITON_INTERPRET else 1024
LN_EPS = tl.constexpr(reference.LAYER_NORM_EPS)  # a global a compiled kernel may read


def _require(ok: bool, message: str) -> None:
    # RuntimeError, as TORCH_CHECK in the C++ family: the public API has already raised
    # ValueError/TypeError for user input, this guards direct torch.ops calls.
    if not ok:
        raise RuntimeError(f"token_transformer: {message}")


def _device(t: torch.Tensor):
    # Triton launches on the current device: make it the tensors' one.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _tape_layout(n, c, tokens, dim, heads, layers, c_out):
    """Offsets of the tape's quantities, as ``make_tape_layout`` in token_transformer.h."""
    at = 0
    out = {}

    def take(name, per_sample):
        nonlocal at
        out[name] = at
        at += n * per_sample

    take("f", c * dim)
    take("uhat", tokens * dim)
    for i in range(layers):
        take(f"qkv{i}", 3 * tokens * dim)
        for name in ("o", "t1hat", "h", "t2hat"):
            take(f"{name}{i}", tokens * dim)
        take(f"p{i}", heads * tokens * tokens)
        take(f"rstd1_{i}", tokens)
        take(f"rstd2_{i}", tokens)
    take("zhat", c_out * dim)
    out["total"] = at
    return out


@triton.jit
def _resize_gather(plane, dst_h, dst_w, in_h, in_w, out_h, out_w, mask, ACC: tl.constexpr):
    # Bilinear (align_corners=False) value at output pixel (dst_h, dst_w) of an in_h x in_w
    # plane resized to out_h x out_w; the index tensors broadcast against ``plane``.
    h0, h1, a0, a1 = _bilinear_tap(dst_h, in_h, out_h, ACC)
    w0, w1, b0, b1 = _bilinear_tap(dst_w, in_w, out_w, ACC)
    v00 = tl.load(plane + h0 * in_w + w0, mask=mask, other=0.0).to(ACC)
    v01 = tl.load(plane + h0 * in_w + w1, mask=mask, other=0.0).to(ACC)
    v10 = tl.load(plane + h1 * in_w + w0, mask=mask, other=0.0).to(ACC)
    v11 = tl.load(plane + h1 * in_w + w1, mask=mask, other=0.0).to(ACC)
    return a0 * (b0 * v00 + b1 * v01) + a1 * (b0 * v10 + b1 * v11)


@triton.jit
def _alive_rows(index_ptr, rows, row_ok, INDEXED: tl.constexpr):
    # The parameter row of each compact token: token_index[rows] for a masked call, else rows.
    if INDEXED:
        tok = tl.load(index_ptr + rows, mask=row_ok, other=0)
    else:
        tok = rows.to(tl.int64)
    return tok


@triton.jit
def _tokenize_kernel(
    x_ptr,
    coords_ptr,
    w_in_ptr,
    index_ptr,
    tape_ptr,
    u_ptr,
    C,
    H,
    W,
    G,
    L,
    D,
    INDEXED: tl.constexpr,
    BL: tl.constexpr,
    BD: tl.constexpr,
    BC: tl.constexpr,
    ACC: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    # sizes of 1 arrive as constexprs: make them tensors for the tap arithmetic
    H = tl.cast(H, tl.int64)
    W = tl.cast(W, tl.int64)
    G = tl.cast(G, tl.int64)
    rows = tl.arange(0, BL)
    cols = tl.arange(0, BD)
    row_ok = rows < L
    col_ok = cols < D
    tok = _alive_rows(index_ptr, rows, row_ok, INDEXED)
    gy = (cols // G)[None, :]
    gx = (cols % G)[None, :]
    u = tl.zeros((BL, BD), dtype=ACC)
    cin = C + 2
    for c0 in range(0, C, BC):
        ch = c0 + tl.arange(0, BC)
        ok = (ch < C)[:, None] & col_ok[None, :]
        plane = x_ptr + ((n * C + ch) * H * W)[:, None]
        f = _resize_gather(plane, gy, gx, H, W, G, G, ok, ACC)
        f = tl.where(ok, f, 0.0).to(ACC)
        f_at = tape_ptr + (n * C + ch)[:, None] * D + cols[None, :]
        tl.store(f_at, f.to(tape_ptr.dtype.element_ty), mask=ok)
        w = tl.load(
            w_in_ptr + tok[:, None] * cin + ch[None, :],
            mask=row_ok[:, None] & (ch < C)[None, :],
            other=0.0,
        ).to(ACC)
        u += tl.dot(w, f, input_precision="ieee", out_dtype=ACC)
    px = tl.load(coords_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    py = tl.load(coords_ptr + D + cols, mask=col_ok, other=0.0).to(ACC)
    wx = tl.load(w_in_ptr + tok * cin + C, mask=row_ok, other=0.0).to(ACC)
    wy = tl.load(w_in_ptr + tok * cin + C + 1, mask=row_ok, other=0.0).to(ACC)
    u += wx[:, None] * px[None, :] + wy[:, None] * py[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    tl.store(u_ptr + (n * L + rows)[:, None] * D + cols[None, :], u, mask=ok)


@triton.jit
def _weight_t(w_ptr, first_row, D, BD: tl.constexpr, ACC: tl.constexpr):
    # [BD, BD] tile of W[first_row : first_row + D, :]^T, zero outside D x D.
    k = tl.arange(0, BD)
    j = tl.arange(0, BD)
    ok = (k < D)[:, None] & (j < D)[None, :]
    return tl.load(w_ptr + (first_row + j)[None, :] * D + k[:, None], mask=ok, other=0.0).to(ACC)


@triton.jit
def _vector(ptr, D, BD: tl.constexpr, ACC: tl.constexpr):
    j = tl.arange(0, BD)
    return tl.load(ptr + j, mask=j < D, other=0.0).to(ACC)


@triton.jit
def _layer_norm(s, col_ok, D):
    # Per row over the D valid columns: (s - mean) * rstd (zero in the padding) and rstd.
    mean = tl.sum(tl.where(col_ok[None, :], s, 0.0), axis=1) / D
    centred = tl.where(col_ok[None, :], s - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / D + LN_EPS)
    return centred * rstd[:, None], rstd


@triton.jit
def _layer(
    qin,
    mem,
    w_qkv,
    w_o,
    w_1,
    w_2,
    n1_w,
    n1_b,
    n2_w,
    n2_b,
    tape_ptr,
    off_qkv,
    off_o,
    off_t1,
    off_h,
    off_t2,
    off_p,
    off_r1,
    off_r2,
    n,
    N,
    L,
    D,
    HEADS,
    scale,
    BL: tl.constexpr,
    BD: tl.constexpr,
    ACC: tl.constexpr,
):
    """One post-norm layer of sample n on [BL, BD] register tiles (rows >= L and columns >= D
    are padding); stores its tape entries and returns the output (padding zeroed)."""
    rows = tl.arange(0, BL)
    cols = tl.arange(0, BD)
    row_ok = rows < L
    col_ok = cols < D
    ok = row_ok[:, None] & col_ok[None, :]
    dt = tape_ptr.dtype.element_ty
    q = tl.dot(qin, _weight_t(w_qkv, 0, D, BD, ACC), input_precision="ieee", out_dtype=ACC)
    k = tl.dot(mem, _weight_t(w_qkv, D, D, BD, ACC), input_precision="ieee", out_dtype=ACC)
    v = tl.dot(mem, _weight_t(w_qkv, 2 * D, D, BD, ACC), input_precision="ieee", out_dtype=ACC)
    qkv_at = tape_ptr + off_qkv + (n * L + rows)[:, None] * (3 * D) + cols[None, :]
    tl.store(qkv_at, q.to(dt), mask=ok)
    tl.store(qkv_at + D, k.to(dt), mask=ok)
    tl.store(qkv_at + 2 * D, v.to(dt), mask=ok)
    head_dim = D // HEADS
    attn = tl.zeros((BL, BD), dtype=ACC)
    key_ok = row_ok[None, :] & (rows[:, None] >= 0)
    for h in range(HEADS):
        in_head = (cols >= h * head_dim) & (cols < (h + 1) * head_dim)
        qh = tl.where(in_head[None, :], q, 0.0).to(ACC)
        s = tl.dot(qh, tl.trans(k), input_precision="ieee", out_dtype=ACC) * scale
        s = tl.where(key_ok, s, float("-inf"))
        e = tl.exp(s - tl.max(s, axis=1)[:, None])
        p = e / tl.sum(e, axis=1)[:, None]
        p_at = tape_ptr + off_p + ((h * N + n) * L + rows)[:, None] * L + rows[None, :]
        tl.store(p_at, p.to(dt), mask=row_ok[:, None] & key_ok)
        vh = tl.where(in_head[None, :], v, 0.0).to(ACC)
        attn += tl.dot(p, vh, input_precision="ieee", out_dtype=ACC)
    tile_at = (n * L + rows)[:, None] * D + cols[None, :]
    tl.store(tape_ptr + off_o + tile_at, attn.to(dt), mask=ok)
    s1 = mem + tl.dot(attn, _weight_t(w_o, 0, D, BD, ACC), input_precision="ieee", out_dtype=ACC)
    t1hat, rstd1 = _layer_norm(s1, col_ok, D)
    tl.store(tape_ptr + off_t1 + tile_at, t1hat.to(dt), mask=ok)
    tl.store(tape_ptr + off_r1 + n * L + rows, rstd1.to(dt), mask=row_ok)
    t1 = t1hat * _vector(n1_w, D, BD, ACC)[None, :] + _vector(n1_b, D, BD, ACC)[None, :]
    hid = tl.dot(t1, _weight_t(w_1, 0, D, BD, ACC), input_precision="ieee", out_dtype=ACC)
    hid = tl.maximum(hid, 0.0)
    tl.store(tape_ptr + off_h + tile_at, hid.to(dt), mask=ok)
    s2 = t1 + tl.dot(hid, _weight_t(w_2, 0, D, BD, ACC), input_precision="ieee", out_dtype=ACC)
    t2hat, rstd2 = _layer_norm(s2, col_ok, D)
    tl.store(tape_ptr + off_t2 + tile_at, t2hat.to(dt), mask=ok)
    tl.store(tape_ptr + off_r2 + n * L + rows, rstd2.to(dt), mask=row_ok)
    out = t2hat * _vector(n2_w, D, BD, ACC)[None, :] + _vector(n2_b, D, BD, ACC)[None, :]
    return tl.where(ok, out, 0.0).to(ACC)


@triton.jit
def _batch_stats(ptr, tile, ok, N, stride, D, ROWS: tl.constexpr, ACC: tl.constexpr):
    """BatchNorm statistics of each of ROWS rows over N samples: the row's D values of sample m
    are ``ptr + m * stride + tile`` (masked by ``ok``). Two passes in sample order (the mean, then
    the squared deviations; biased variance), so every program that calls this on the same data
    gets the same values."""
    total = tl.zeros((ROWS,), dtype=ACC)
    for m in range(N):
        total += tl.sum(tl.load(ptr + m * stride + tile, mask=ok, other=0.0), axis=1)
    mean = total / (N * D)
    sq = tl.zeros((ROWS,), dtype=ACC)
    for m in range(N):
        values = tl.load(ptr + m * stride + tile, mask=ok, other=0.0)
        dev = tl.where(ok, values - mean[:, None], 0.0)
        sq += tl.sum(dev * dev, axis=1)
    return mean, sq / (N * D)


@triton.jit
def _layers_kernel(
    u_ptr,
    tape_ptr,
    index_ptr,
    bn_w_ptr,
    bn_b_ptr,
    rm_ptr,
    rv_ptr,
    mean_ptr,
    var_ptr,
    query_ptr,
    e_qkv,
    e_o,
    e_1,
    e_2,
    e_n1w,
    e_n1b,
    e_n2w,
    e_n2b,
    d_qkv,
    d_o,
    d_1,
    d_2,
    d_n1w,
    d_n1b,
    d_n2w,
    d_n2b,
    w_out_ptr,
    z_ptr,
    off_uhat,
    e_qkv_at,
    e_o_at,
    e_t1_at,
    e_h_at,
    e_t2_at,
    e_p_at,
    e_r1_at,
    e_r2_at,
    d_qkv_at,
    d_o_at,
    d_t1_at,
    d_h_at,
    d_t2_at,
    d_p_at,
    d_r1_at,
    d_r2_at,
    N,
    L,
    L_ALL,
    D,
    C_OUT,
    HEADS,
    scale,
    eps,
    USE_BATCH: tl.constexpr,
    DECODER: tl.constexpr,
    INDEXED: tl.constexpr,
    BL: tl.constexpr,
    BD: tl.constexpr,
    BC: tl.constexpr,
    ACC: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BL)
    cols = tl.arange(0, BD)
    row_ok = rows < L
    col_ok = cols < D
    ok = row_ok[:, None] & col_ok[None, :]
    tile = rows[:, None] * D + cols[None, :]
    tok = _alive_rows(index_ptr, rows, row_ok, INDEXED)
    if USE_BATCH:
        mean, var = _batch_stats(u_ptr, tile, ok, N, L * D, D, BL, ACC)
    else:
        mean = tl.load(rm_ptr + tok, mask=row_ok, other=0.0).to(ACC)
        var = tl.load(rv_ptr + tok, mask=row_ok, other=1.0).to(ACC)
    if n == 0:
        tl.store(mean_ptr + rows, mean, mask=row_ok)
        tl.store(var_ptr + rows, var, mask=row_ok)
    rstd = 1.0 / tl.sqrt(var + eps)
    u = tl.load(u_ptr + n * L * D + tile, mask=ok, other=0.0)
    uhat = tl.where(ok, (u - mean[:, None]) * rstd[:, None], 0.0)
    dt = tape_ptr.dtype.element_ty
    tl.store(tape_ptr + off_uhat + n * L * D + tile, uhat.to(dt), mask=ok)
    gamma = tl.load(bn_w_ptr + tok, mask=row_ok, other=0.0).to(ACC)
    beta = tl.load(bn_b_ptr + tok, mask=row_ok, other=0.0).to(ACC)
    t = tl.where(ok, uhat * gamma[:, None] + beta[:, None], 0.0).to(ACC)
    o = _layer(
        t,
        t,
        e_qkv,
        e_o,
        e_1,
        e_2,
        e_n1w,
        e_n1b,
        e_n2w,
        e_n2b,
        tape_ptr,
        e_qkv_at,
        e_o_at,
        e_t1_at,
        e_h_at,
        e_t2_at,
        e_p_at,
        e_r1_at,
        e_r2_at,
        n,
        N,
        L,
        D,
        HEADS,
        scale,
        BL,
        BD,
        ACC,
    )
    if DECODER:
        query_at = query_ptr + tok[:, None] * D + cols[None, :]
        query = tl.load(query_at, mask=ok, other=0.0).to(ACC)
        o = _layer(
            query,
            o,
            d_qkv,
            d_o,
            d_1,
            d_2,
            d_n1w,
            d_n1b,
            d_n2w,
            d_n2b,
            tape_ptr,
            d_qkv_at,
            d_o_at,
            d_t1_at,
            d_h_at,
            d_t2_at,
            d_p_at,
            d_r1_at,
            d_r2_at,
            n,
            N,
            L,
            D,
            HEADS,
            scale,
            BL,
            BD,
            ACC,
        )
    for c0 in range(0, C_OUT, BC):
        ch = c0 + tl.arange(0, BC)
        ch_ok = ch < C_OUT
        w = tl.load(
            w_out_ptr + ch[:, None] * L_ALL + tok[None, :],
            mask=ch_ok[:, None] & row_ok[None, :],
            other=0.0,
        ).to(ACC)
        z = tl.dot(w, o, input_precision="ieee", out_dtype=ACC)
        z_at = z_ptr + (n * C_OUT + ch)[:, None] * D + cols[None, :]
        tl.store(z_at, z, mask=ch_ok[:, None] & col_ok[None, :])


@triton.jit
def _detokenize_kernel(
    z_ptr,
    tape_ptr,
    x_ptr,
    y_ptr,
    bn_w_ptr,
    bn_b_ptr,
    rm_ptr,
    rv_ptr,
    mean_ptr,
    var_ptr,
    off_zhat,
    N,
    C_OUT,
    G,
    D,
    HO,
    WO,
    eps,
    USE_BATCH: tl.constexpr,
    RESIDUAL: tl.constexpr,
    BCO: tl.constexpr,
    BD: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    ch = tl.program_id(0) * BCO + tl.arange(0, BCO).to(tl.int64)
    n = tl.program_id(1).to(tl.int64)
    G = tl.cast(G, tl.int64)
    HO = tl.cast(HO, tl.int64)
    WO = tl.cast(WO, tl.int64)
    cols = tl.arange(0, BD)
    ch_ok = ch < C_OUT
    ok = ch_ok[:, None] & (cols < D)[None, :]
    tile = ch[:, None] * D + cols[None, :]
    if USE_BATCH:
        mean, var = _batch_stats(z_ptr, tile, ok, N, C_OUT * D, D, BCO, ACC)
    else:
        mean = tl.load(rm_ptr + ch, mask=ch_ok, other=0.0).to(ACC)
        var = tl.load(rv_ptr + ch, mask=ch_ok, other=1.0).to(ACC)
    if n == 0:
        tl.store(mean_ptr + ch, mean, mask=ch_ok)
        tl.store(var_ptr + ch, var, mask=ch_ok)
    rstd = 1.0 / tl.sqrt(var + eps)
    zn = tl.load(z_ptr + n * C_OUT * D + tile, mask=ok, other=0.0)
    zhat = (zn - mean[:, None]) * rstd[:, None]
    zhat_at = tape_ptr + off_zhat + n * C_OUT * D + tile
    tl.store(zhat_at, zhat.to(tape_ptr.dtype.element_ty), mask=ok)
    scale = (tl.load(bn_w_ptr + ch, mask=ch_ok, other=0.0).to(ACC) * rstd)[:, None]
    shift = tl.load(bn_b_ptr + ch, mask=ch_ok, other=0.0).to(ACC)[:, None] - mean[:, None] * scale
    plane = z_ptr + ((n * C_OUT + ch) * D)[:, None]
    out_plane = ((n * C_OUT + ch) * HO * WO)[:, None]
    for p0 in range(0, HO * WO, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        p_ok = ch_ok[:, None] & (p < HO * WO)[None, :]
        oh = (p // WO)[None, :]
        ow = (p % WO)[None, :]
        y = _resize_gather(plane, oh, ow, G, G, HO, WO, p_ok, ACC) * scale + shift
        if RESIDUAL:
            y += tl.load(x_ptr + out_plane + p[None, :], mask=p_ok, other=0.0).to(ACC)
        tl.store(y_ptr + out_plane + p[None, :], y.to(y_ptr.dtype.element_ty), mask=p_ok)


def _block(size: int) -> int:
    # tl.dot needs every tile dimension >= 16
    return max(16, triton.next_power_of_2(max(size, 1)))


def _check_token_index(token_index, tokens: int, ref: torch.Tensor) -> None:
    """``check_token_index`` of csrc/token_transformer/token_transformer.h, with its messages: the
    range and the order are checked on the CPU only (on a GPU that would cost a device
    synchronisation; the public API checks both before the op)."""
    if token_index is None:
        return
    _require(
        token_index.dim() == 1 and token_index.dtype == torch.int64,
        f"token_index must be a 1-d int64 tensor, got {token_index.dtype} of shape "
        f"{list(token_index.shape)}",
    )
    _require(
        token_index.device == ref.device,
        f"token_index is on {token_index.device}, expected {ref.device}",
    )
    _require(
        token_index.numel() <= tokens,
        f"token_index lists {token_index.numel()} tokens of {tokens}",
    )
    if token_index.device.type == "cpu":
        values = token_index.tolist()
        for i, value in enumerate(values):
            _require(
                0 <= value < tokens,
                f"token_index holds {value}, outside the tokens [0, {tokens})",
            )
            _require(
                i == 0 or value > values[i - 1],
                "token_index must be strictly increasing (sorted, no duplicates), got "
                f"{values[i - 1]} then {value}",
            )


def _alive_tokens(token_index, *rows, w_out):
    """The alive tokens' rows of each of ``rows`` (None stays None) and columns of ``w_out``, as
    the native backward gathers them (csrc/token_transformer/token_transformer.h, AliveTokens);
    the tensors themselves without an index."""
    _check_token_index(token_index, w_out.shape[1], w_out)
    if token_index is None:
        return (*rows, w_out)
    gathered = [None if t is None else t.index_select(0, token_index) for t in rows]
    return (*gathered, w_out.index_select(1, token_index))


def fwd(
    x,
    coords,
    w_in,
    bn_in_w,
    bn_in_b,
    rm_in,
    rv_in,
    encoder,
    query,
    decoder,
    w_out,
    bn_out_w,
    bn_out_b,
    rm_out,
    rv_out,
    num_heads,
    out_size,
    residual,
    eps,
    save_tape=True,
    token_index=None,
):
    """The op ``token_transformer_fwd_triton`` (contract: ``ops``; without ``save_tape`` the
    kernels still write the tape, which is not returned). The kernels read the alive tokens'
    parameters through ``token_index``: a masked call launches what an unmasked one does."""
    _require(x.dtype in _ACC, f"the Triton kernels got dtype {x.dtype}")
    _require(x.dim() == 4 and coords.dim() == 3, "x must be [N, C, H, W] and coords [2, g, g]")
    n, c, h, w = x.shape
    grid = coords.shape[-1]
    d = grid * grid
    all_tokens = w_in.shape[0]
    _check_token_index(token_index, all_tokens, x)
    tokens = all_tokens if token_index is None else token_index.numel()
    c_out = w_out.shape[0]
    _require(
        w_in.shape == (all_tokens, c + 2) and w_out.shape == (c_out, all_tokens),
        f"input_proj_weight {tuple(w_in.shape)} / reverse_proj_weight {tuple(w_out.shape)} "
        f"do not fit x {tuple(x.shape)}",
    )
    _require(len(encoder) == 8 and len(decoder) in (0, 8), "a layer has 8 weights")
    _require(num_heads >= 1 and d % num_heads == 0, f"num_heads {num_heads} does not divide {d}")
    running = (rm_in, rv_in, rm_out, rv_out)
    use_batch = rm_in is None
    _require(
        all((t is None) == use_batch for t in running),
        "pass all four running statistics or none",
    )
    ho, wo = int(out_size[0]), int(out_size[1])
    use_decoder = len(decoder) == 8
    layers = 1 + use_decoder
    layout = _tape_layout(n, c, tokens, d, num_heads, layers, c_out)
    acc_dtype = stats_dtype(x.dtype)
    acc = _ACC[x.dtype]
    y = torch.empty((n, c_out, ho, wo), dtype=x.dtype, device=x.device)
    # every tape entry is written by the kernels: no fill launch
    tape = torch.empty((layout["total"],), dtype=x.dtype, device=x.device)
    stats = [torch.empty((k,), dtype=acc_dtype, device=x.device) for k in (tokens, c_out)]
    mean_in, var_in = stats[0], torch.empty_like(stats[0])
    mean_out, var_out = stats[1], torch.empty_like(stats[1])
    _require(n > 0 or not use_batch, "batch statistics of an empty batch are undefined")
    if n == 0:  # eval on an empty batch: no program runs, the statistics used are the running ones
        if token_index is not None:
            rm_in, rv_in = rm_in.index_select(0, token_index), rv_in.index_select(0, token_index)
        for dst, src in zip((mean_in, var_in, mean_out, var_out), (rm_in, rv_in, rm_out, rv_out)):
            dst.copy_(src)
        return y, tape if save_tape else tape.new_empty((0,)), mean_in, var_in, mean_out, var_out
    x = x.contiguous()
    # no token: W_out o is an empty sum, exactly zero
    z_new = torch.empty if tokens else torch.zeros
    z = z_new((n, c_out, d), dtype=acc_dtype, device=x.device)
    block_l, block_d = _block(tokens), _block(d)
    indexed = token_index is not None
    # Pointers a launch does not read (no index; batch statistics) get a stand-in tensor.
    index = token_index.contiguous() if indexed else w_in
    running_in = (mean_in, var_in) if use_batch else (rm_in.contiguous(), rv_in.contiguous())
    running_out = (mean_out, var_out) if use_batch else (rm_out.contiguous(), rv_out.contiguous())
    with _device(x):
        if tokens:
            u = torch.empty((n, tokens, d), dtype=acc_dtype, device=x.device)
            _tokenize_kernel[(n,)](
                x,
                coords.contiguous(),
                w_in.contiguous(),
                index,
                tape,
                u,
                c,
                h,
                w,
                grid,
                tokens,
                d,
                INDEXED=indexed,
                BL=block_l,
                BD=block_d,
                BC=BLOCK_C,
                ACC=acc,
            )
            enc = [t.contiguous() for t in encoder]
            dec = [t.contiguous() for t in decoder] if use_decoder else enc
            names = ("qkv", "o", "t1hat", "h", "t2hat", "p", "rstd1_", "rstd2_")
            offs = [[layout[f"{k}{i}"] for k in names] for i in range(layers)]
            _layers_kernel[(n,)](
                u,
                tape,
                index,
                bn_in_w,
                bn_in_b,
                *running_in,
                mean_in,
                var_in,
                query.contiguous() if use_decoder else enc[0],
                *enc,
                *dec,
                w_out.contiguous(),
                z,
                layout["uhat"],
                *offs[0],
                *offs[layers - 1],
                n,
                tokens,
                all_tokens,
                d,
                c_out,
                num_heads,
                (d // num_heads) ** -0.5,
                eps,
                USE_BATCH=use_batch,
                DECODER=use_decoder,
                INDEXED=indexed,
                BL=block_l,
                BD=block_d,
                BC=BLOCK_C,
                ACC=acc,
                num_warps=8,
            )
        block_co = min(_block(c_out), DETOK_CHANNELS)
        _detokenize_kernel[(triton.cdiv(c_out, block_co), n)](
            z,
            tape,
            x,
            y,
            bn_out_w,
            bn_out_b,
            *running_out,
            mean_out,
            var_out,
            layout["zhat"],
            n,
            c_out,
            grid,
            d,
            ho,
            wo,
            eps,
            USE_BATCH=use_batch,
            RESIDUAL=bool(residual),
            BCO=block_co,
            BD=block_d,
            BLOCK=max(16, DETOK_TILE // block_co),
            ACC=acc,
        )
    return y, tape if save_tape else tape.new_empty((0,)), mean_in, var_in, mean_out, var_out


def _ln_backward(g_out, xhat, rstd, weight):
    """LayerNorm over the last dim, ``out = weight * xhat + bias``: (grad of its input, grad
    weight, grad bias)."""
    g_hat = g_out * weight
    g_in = rstd[..., None] * (
        g_hat - g_hat.mean(-1, keepdim=True) - xhat * (g_hat * xhat).mean(-1, keepdim=True)
    )
    return g_in, (g_out * xhat).sum((0, 1)), g_out.sum((0, 1))


def _bn_backward(g_out, xhat, var, weight, use_batch_stats, eps):
    """BatchNorm over dims 0 and 2 of ``[N, K, d]``: (grad input, grad weight, grad bias)."""
    g_w = (g_out * xhat).sum((0, 2))
    g_b = g_out.sum((0, 2))
    g_hat = g_out * weight[:, None]
    rstd = (var + eps).rsqrt()[:, None]
    if use_batch_stats:
        g_hat = g_hat - g_hat.mean((0, 2), keepdim=True) - xhat * (g_hat * xhat).mean((0, 2), True)
    return g_hat * rstd, g_w, g_b


def _outer(a, b):
    # sum over samples and tokens of a[n, l, i] b[n, l, j]: a weight gradient [I, J]
    return torch.einsum("nli,nlj->ij", a, b)


def _layer_backward(g_out, qin, mem, weights, saved, heads):
    """Gradients of one ``reference.layer`` from the saved tape entries: (grad query input,
    grad memory, grads of the 8 weights in ``LAYER_WEIGHTS`` order)."""
    in_w, out_w, w1, w2, n1_w, n1_b, n2_w, _ = weights
    qkv, attn, t1hat, hid, t2hat, p, rstd1, rstd2 = saved
    n, length, d = attn.shape
    g_s2, g_n2_w, g_n2_b = _ln_backward(g_out, t2hat, rstd2, n2_w)
    t1 = t1hat * n1_w + n1_b
    g_w2 = _outer(g_s2, hid)
    g_hid = (g_s2 @ w2) * (hid > 0)
    g_w1 = _outer(g_hid, t1)
    g_s1, g_n1_w, g_n1_b = _ln_backward(g_s2 + g_hid @ w1, t1hat, rstd1, n1_w)
    g_wo = _outer(g_s1, attn)
    head_dim = d // heads

    def split(t):  # [N, L, d] -> [heads, N, L, head_dim]
        return t.reshape(n, length, heads, head_dim).permute(2, 0, 1, 3)

    def merge(t):
        return t.permute(1, 2, 0, 3).reshape(n, length, d)

    q, k, v = (split(t) for t in qkv.chunk(3, dim=-1))
    g_a = split(g_s1 @ out_w)
    g_p = g_a @ v.transpose(-1, -2)
    g_v = p.transpose(-1, -2) @ g_a
    g_s = p * (g_p - (g_p * p).sum(-1, keepdim=True)) * head_dim**-0.5
    g_q = merge(g_s @ k)
    g_k = merge(g_s.transpose(-1, -2) @ q)
    g_v = merge(g_v)
    w_q, w_k, w_v = in_w.chunk(3)
    g_in_w = torch.cat([_outer(g_q, qin), _outer(g_k, mem), _outer(g_v, mem)])
    g_mem = g_s1 + g_k @ w_k + g_v @ w_v
    grads = [g_in_w, g_wo, g_w1, g_w2, g_n1_w, g_n1_b, g_n2_w, g_n2_b]
    return g_q @ w_q, g_mem, grads


def bwd(
    grad_y,
    tape,
    coords,
    w_in,
    bn_in_w,
    bn_in_b,
    var_in,
    encoder,
    query,
    decoder,
    w_out,
    bn_out_w,
    var_out,
    num_heads,
    in_size,
    residual,
    use_batch_stats,
    eps,
    token_index=None,
):
    """The op ``token_transformer_bwd_triton``: batched torch operations over the tape, in the
    accumulation type (see the module docstring)."""
    full = w_in.shape[0]
    w_in, bn_in_w, bn_in_b, query, w_out = _alive_tokens(
        token_index, w_in, bn_in_w, bn_in_b, query, w_out=w_out
    )
    _require(grad_y.dtype in _ACC, f"the Triton kernels got dtype {grad_y.dtype}")
    acc = stats_dtype(grad_y.dtype)
    dtype = grad_y.dtype
    n, c_out = grad_y.shape[:2]
    tokens, c = w_in.shape[0], w_in.shape[1] - 2
    grid = coords.shape[-1]
    d = grid * grid
    use_decoder = len(decoder) == 8
    layers = 1 + use_decoder
    layout = _tape_layout(n, c, tokens, d, num_heads, layers, c_out)
    _require(tape.numel() == layout["total"], f"the tape has {tape.numel()} values")

    def cast(ts):
        return [t.to(acc) for t in ts]

    def saved(name, *shape):
        at = layout[name]
        size = n * torch.Size(shape).numel()
        return tape[at : at + size].view(n, *shape).to(acc)

    def layer_saved(i):
        sq = (tokens, d)
        p = saved(f"p{i}", num_heads, tokens, tokens).view(num_heads, n, tokens, tokens)
        return (
            saved(f"qkv{i}", tokens, 3 * d),
            *(saved(f"{k}{i}", *sq) for k in ("o", "t1hat", "h", "t2hat")),
            p,
            saved(f"rstd1_{i}", tokens),
            saved(f"rstd2_{i}", tokens),
        )

    def layer_output(weights, i):
        return saved(f"t2hat{i}", tokens, d) * weights[6] + weights[7]

    g = grad_y.to(acc)
    g_z = torch.ops.aten.upsample_bilinear2d_backward(
        g, list(grad_y.shape[2:]), [n, c_out, grid, grid], False
    ).reshape(n, c_out, d)
    g_z, g_bn_out_w, g_bn_out_b = _bn_backward(
        g_z, saved("zhat", c_out, d), var_out.to(acc), bn_out_w.to(acc), use_batch_stats, eps
    )
    enc = cast(encoder)
    dec = cast(decoder)
    w_out_a = w_out.to(acc)
    o = layer_output(dec if use_decoder else enc, layers - 1)
    g_w_out = torch.einsum("ncd,nld->cl", g_z, o)
    g_o = torch.einsum("cl,ncd->nld", w_out_a, g_z)
    g_query = grad_y.new_zeros((0,))
    g_dec = []
    if use_decoder:
        queries = query.to(acc).expand(n, tokens, d)
        g_queries, g_o, g_dec = _layer_backward(
            g_o, queries, layer_output(enc, 0), dec, layer_saved(1), num_heads
        )
        g_query = g_queries.sum(0).to(dtype)
    uhat = saved("uhat", tokens, d)
    t_in = uhat * bn_in_w.to(acc)[:, None] + bn_in_b.to(acc)[:, None]
    g_qin, g_mem, g_enc = _layer_backward(g_o, t_in, t_in, enc, layer_saved(0), num_heads)
    g_u, g_bn_in_w, g_bn_in_b = _bn_backward(
        g_qin + g_mem, uhat, var_in.to(acc), bn_in_w.to(acc), use_batch_stats, eps
    )
    f = saved("f", c, d)
    f_all = torch.cat([f, coords.to(acc).reshape(1, 2, d).expand(n, 2, d)], dim=1)
    g_w_in = torch.einsum("nld,ncd->lc", g_u, f_all)
    g_f = torch.einsum("lc,nld->ncd", w_in.to(acc)[:, :c], g_u).reshape(n, c, grid, grid)
    g_x = torch.ops.aten.upsample_bilinear2d_backward(
        g_f, [grid, grid], [n, c, int(in_size[0]), int(in_size[1])], False
    )
    if residual:
        g_x = g_x + g
    return (
        g_x.to(dtype),
        expand(g_w_in.to(dtype), token_index, full, 0),
        expand(g_bn_in_w.to(dtype), token_index, full, 0),
        expand(g_bn_in_b.to(dtype), token_index, full, 0),
        [t.to(dtype) for t in g_enc],
        expand(g_query, token_index, full, 0) if use_decoder else g_query,
        [t.to(dtype) for t in g_dec],
        expand(g_w_out.to(dtype), token_index, full, 1),
        g_bn_out_w.to(dtype),
        g_bn_out_b.to(dtype),
    )
