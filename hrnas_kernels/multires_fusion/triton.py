"""Triton kernels of multi-resolution fusion: one fused forward, one gather backward per input.

    forward:  out[n, c, h, w] = act(sum_j resize_j(x_j)[n, c, h, w])          out: [N, C, H, W]
    backward: gm = grad_out * act'(out)
              grad x_j = resize_j^T(gm)                                        [N, C, H_j, W_j]

``resize_j`` is ``F.interpolate(x_j, (H, W), mode, align_corners=False)``, separable per axis,
and the identity (no resampling at all) for an input already at ``(H, W)``. The source taps
follow ATen's ``aten/src/ATen/native/UpSample.h`` exactly as ``csrc/multires_fusion/
multires_fusion.h`` does, so the Triton, C++ and eager results pick the same pixels:

* bilinear (``area_pixel_compute_source_index`` + ``guard_index_and_lambda``): with
  ``scale = in / out`` in the opmath type (float32 for fp16/bf16/fp32, float64 for fp64),
  ``src = max(scale * (dst + 0.5) - 0.5, 0)``, ``i0 = min(floor(float32(src)), in - 1)`` (ATen
  floors through ``floorf`` even for double), ``l1 = clamp(src - i0, 0, 1)``, ``l0 = 1 - l1``,
  ``i1 = i0 + (i0 < in - 1)`` (``i1 = i0`` when ``in == out``, as ATen's
  ``compute_source_index_and_lambda``, so a neighbouring NaN does not leak in through ``0 * NaN``);
  the output is ``l0 * x[i0] + l1 * x[i1]`` per axis.
* nearest (legacy ``nearest_idx``, not "nearest-exact"): ``dst`` if ``out == in``, ``dst >> 1``
  if ``out == 2 * in``, else ``min(floor(float32(dst) * float32(in / out)), in - 1)``.
* act is none, relu (``v < 0 ? 0 : v``) or relu6 (clamp to [0, 6]); NaN propagates. The
  gradient passes where ``!(out <= 0)`` (relu) or ``!(out <= 0 || out >= 6)`` (relu6), decided
  from the saved output as ``threshold_backward`` / ``hardtanh_backward`` do.

Scales are divided in-kernel with ``tl.div_rn`` (IEEE division: a plain fp32 ``/`` lowers to an
approximate division on NVIDIA GPUs, which could move a tap). Sums run in float32 (float64 for
fp64 inputs) and are stored in the input dtype.

Layouts: every tensor is dense in the output's memory format (``_layout.output_memory_format`` of
``inputs[0]``, resp. ``out``): inputs are made ``.contiguous(memory_format=fmt)`` and the kernels
decompose a flat index as NCHW (``w`` fastest) or NHWC (``c`` fastest) under the constexpr
``CHANNELS_LAST``. Offsets are int64 throughout.

Forward: ``_multires_fusion_fwd_kernel``, ONE launch for all (up to 8) inputs: each program owns
``BLOCK`` consecutive output elements, reads the 1 (identity), 1 (nearest) or 4 (bilinear) source
pixels of every input, sums, activates and stores once. Unused pointer slots repeat input 0 and
are compiled out by the constexpr ``NUM_INPUTS``.

Backward: ``_multires_fusion_bwd_kernel``, one launch per input, and no separate pass for ``gm``:
the activation mask is recomputed from ``out`` on the fly where ``grad_out`` is read. The
transposed resize is a *gather*, not a scatter: each program owns ``BLOCK`` elements of one
input's gradient and, for each, visits the output pixels that can read it. No atomics, a fixed
summation order, hence deterministic (the C++ kernel's transposed tap lists, recomputed instead
of stored). Since taps are monotone in ``dst``, the outputs reading input index ``p`` along an
axis form a short contiguous range. The kernel opens a ``KH`` x ``KW`` window of candidate
output pixels (constexpr lengths, visited as ``[BLOCK, KH_CHUNK, KW_CHUNK]`` tiles) at an integer
lower bound of those ranges, recomputes the exact forward taps of every candidate and
accumulates ``weight * gm`` only where a tap equals ``p`` (both weights when both taps land on
``p`` at the border). The host finds the window length and start margin per axis by running the
same tap function over every output index (``_window``, cached), with one index of slack at
either end for a GPU whose fused multiply-add rounds a tap differently. Gradients of
identity-size inputs are ``gm`` itself.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from .._impl import TRITON_INTERPRET
from .._layout import output_memory_format

MAX_INPUTS = 8  # csrc/multires_fusion/multires_fusion.h: kMaxInputs
BLOCK = 1024  # forward: output elements per program
# Backward: gradient elements per program x candidate window. A GPU wants a tile that fits in
# registers; the interpreter pays per operation, not per element, so it gets far larger tiles.
BWD_TILE = 65536 if TRITON_INTERPRET else 4096
MAX_WINDOW_CHUNK = 16
_ACTIVATIONS = {"none": 0, "relu": 1, "relu6": 2}
_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float32,
    torch.bfloat16: tl.float32,
    torch.float64: tl.float64,
}  # storage dtype -> accumulation (opmath) dtype
_MODES = ("bilinear", "nearest")


@triton.jit
def _bilinear_tap(dst, in_size, out_size, ACC: tl.constexpr):
    if ACC == tl.float64:
        scale = in_size.to(tl.float64) / out_size.to(tl.float64)
    else:
        scale = tl.div_rn(in_size.to(tl.float32), out_size.to(tl.float32))
    src = scale * (dst.to(ACC) + 0.5) - 0.5
    src = tl.where(src < 0.0, 0.0, src).to(ACC)
    i0 = tl.minimum(tl.floor(src.to(tl.float32)).to(tl.int64), in_size - 1)
    lam = src - i0.to(ACC)
    lam = tl.where(lam < 0.0, 0.0, tl.where(lam > 1.0, 1.0, lam)).to(ACC)
    i1 = i0 + ((i0 < in_size - 1) & (in_size != out_size)).to(tl.int64)
    return i0, i1, (1.0 - lam).to(ACC), lam


@triton.jit
def _nearest_tap(dst, in_size, out_size):
    scale = tl.div_rn(in_size.to(tl.float32), out_size.to(tl.float32))
    idx = tl.minimum(tl.floor(dst.to(tl.float32) * scale).to(tl.int64), in_size - 1)
    idx = tl.where(out_size == 2 * in_size, dst >> 1, idx)
    return tl.where(out_size == in_size, dst, idx)


@triton.jit
def _hits(dst, p, valid, size_in, size_out, BILINEAR: tl.constexpr, ACC: tl.constexpr):
    # Whether output index dst reads input index p along one axis, and with which weight
    # (the sum of both bilinear weights when both taps land on p).
    if BILINEAR:
        i0, i1, l0, l1 = _bilinear_tap(dst, size_in, size_out, ACC)
        hit0 = valid & (i0 == p)
        hit1 = valid & (i1 == p)
        weight = tl.where(hit0, l0, 0.0).to(ACC) + tl.where(hit1, l1, 0.0).to(ACC)
        return hit0 | hit1, weight
    else:
        hit = valid & (_nearest_tap(dst, size_in, size_out) == p)
        return hit, tl.where(hit, 1.0, 0.0).to(ACC)


@triton.jit
def _unravel(idx, C, H, W, CHANNELS_LAST: tl.constexpr):
    # (n, c, h, w) of a flat index into a dense [N, C, H, W] tensor in NHWC or NCHW order.
    if CHANNELS_LAST:
        c = idx % C
        t = idx // C
        w = t % W
        t = t // W
        h = t % H
        n = t // H
        return n, c, h, w
    else:
        w = idx % W
        t = idx // W
        h = t % H
        t = t // H
        c = t % C
        n = t // C
        return n, c, h, w


@triton.jit
def _resampled(
    x_ptr,
    n,
    c,
    h,
    w,
    mask,
    C,
    H_in,
    W_in,
    H,
    W,
    IDENTITY: tl.constexpr,
    BILINEAR: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    ACC: tl.constexpr,
):
    H_in = tl.cast(H_in, tl.int64)
    W_in = tl.cast(W_in, tl.int64)
    if CHANNELS_LAST:
        x_ptr += n * (H_in * W_in * C) + c
        stride_h = W_in * C
        stride_w = C
    else:
        x_ptr += (n * C + c) * (H_in * W_in)
        stride_h = W_in
        stride_w = 1
    if IDENTITY:
        v = tl.load(x_ptr + h * stride_h + w * stride_w, mask=mask, other=0.0).to(ACC)
    elif BILINEAR:
        h0, h1, a0, a1 = _bilinear_tap(h, H_in, H, ACC)
        w0, w1, b0, b1 = _bilinear_tap(w, W_in, W, ACC)
        row0 = x_ptr + h0 * stride_h
        row1 = x_ptr + h1 * stride_h
        x00 = tl.load(row0 + w0 * stride_w, mask=mask, other=0.0).to(ACC)
        x01 = tl.load(row0 + w1 * stride_w, mask=mask, other=0.0).to(ACC)
        x10 = tl.load(row1 + w0 * stride_w, mask=mask, other=0.0).to(ACC)
        x11 = tl.load(row1 + w1 * stride_w, mask=mask, other=0.0).to(ACC)
        v = a0 * (b0 * x00 + b1 * x01) + a1 * (b0 * x10 + b1 * x11)
    else:
        hi = _nearest_tap(h, H_in, H)
        wi = _nearest_tap(w, W_in, W)
        v = tl.load(x_ptr + hi * stride_h + wi * stride_w, mask=mask, other=0.0).to(ACC)
    return v


@triton.jit
def _multires_fusion_fwd_kernel(
    out_ptr,
    x0,
    x1,
    x2,
    x3,
    x4,
    x5,
    x6,
    x7,
    H0,
    W0,
    H1,
    W1,
    H2,
    W2,
    H3,
    W3,
    H4,
    W4,
    H5,
    W5,
    H6,
    W6,
    H7,
    W7,
    total,
    C,
    H,
    W,
    NUM_INPUTS: tl.constexpr,
    IDENTITY_MASK: tl.constexpr,
    BILINEAR: tl.constexpr,
    ACTIVATION: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Sizes may arrive as int32 scalars or, when equal to 1, as specialised constexprs.
    C = tl.cast(C, tl.int64)
    H = tl.cast(H, tl.int64)
    W = tl.cast(W, tl.int64)
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < total
    n, c, h, w = _unravel(idx, C, H, W, CHANNELS_LAST)
    acc = _resampled(
        x0,
        n,
        c,
        h,
        w,
        mask,
        C,
        H0,
        W0,
        H,
        W,
        (IDENTITY_MASK & 1) != 0,
        BILINEAR,
        CHANNELS_LAST,
        ACC,
    )
    if NUM_INPUTS > 1:
        acc += _resampled(
            x1,
            n,
            c,
            h,
            w,
            mask,
            C,
            H1,
            W1,
            H,
            W,
            (IDENTITY_MASK & 2) != 0,
            BILINEAR,
            CHANNELS_LAST,
            ACC,
        )
    if NUM_INPUTS > 2:
        acc += _resampled(
            x2,
            n,
            c,
            h,
            w,
            mask,
            C,
            H2,
            W2,
            H,
            W,
            (IDENTITY_MASK & 4) != 0,
            BILINEAR,
            CHANNELS_LAST,
            ACC,
        )
    if NUM_INPUTS > 3:
        acc += _resampled(
            x3,
            n,
            c,
            h,
            w,
            mask,
            C,
            H3,
            W3,
            H,
            W,
            (IDENTITY_MASK & 8) != 0,
            BILINEAR,
            CHANNELS_LAST,
            ACC,
        )
    if NUM_INPUTS > 4:
        acc += _resampled(
            x4,
            n,
            c,
            h,
            w,
            mask,
            C,
            H4,
            W4,
            H,
            W,
            (IDENTITY_MASK & 16) != 0,
            BILINEAR,
            CHANNELS_LAST,
            ACC,
        )
    if NUM_INPUTS > 5:
        acc += _resampled(
            x5,
            n,
            c,
            h,
            w,
            mask,
            C,
            H5,
            W5,
            H,
            W,
            (IDENTITY_MASK & 32) != 0,
            BILINEAR,
            CHANNELS_LAST,
            ACC,
        )
    if NUM_INPUTS > 6:
        acc += _resampled(
            x6,
            n,
            c,
            h,
            w,
            mask,
            C,
            H6,
            W6,
            H,
            W,
            (IDENTITY_MASK & 64) != 0,
            BILINEAR,
            CHANNELS_LAST,
            ACC,
        )
    if NUM_INPUTS > 7:
        acc += _resampled(
            x7,
            n,
            c,
            h,
            w,
            mask,
            C,
            H7,
            W7,
            H,
            W,
            (IDENTITY_MASK & 128) != 0,
            BILINEAR,
            CHANNELS_LAST,
            ACC,
        )
    if ACTIVATION == 1:
        acc = tl.where(acc < 0.0, 0.0, acc).to(ACC)
    elif ACTIVATION == 2:
        acc = tl.where(acc < 0.0, 0.0, tl.where(acc > 6.0, 6.0, acc)).to(ACC)
    tl.store(out_ptr + idx, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _multires_fusion_bwd_kernel(
    gx_ptr,
    g_ptr,
    out_ptr,
    total,
    C,
    H_in,
    W_in,
    H,
    W,
    margin_h,
    margin_w,
    IDENTITY: tl.constexpr,
    BILINEAR: tl.constexpr,
    ACTIVATION: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    KH_CHUNK: tl.constexpr,
    KW_CHUNK: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    C = tl.cast(C, tl.int64)
    H_in = tl.cast(H_in, tl.int64)
    W_in = tl.cast(W_in, tl.int64)
    H = tl.cast(H, tl.int64)
    W = tl.cast(W, tl.int64)
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < total
    if IDENTITY:
        # Same shape and layout as grad_out: the flat index addresses the same pixel.
        g = tl.load(g_ptr + idx, mask=mask, other=0.0)
        if ACTIVATION == 1:
            o = tl.load(out_ptr + idx, mask=mask, other=0.0).to(ACC)
            g = tl.where(o <= 0.0, 0.0, g).to(g.dtype)
        elif ACTIVATION == 2:
            o = tl.load(out_ptr + idx, mask=mask, other=0.0).to(ACC)
            g = tl.where((o <= 0.0) | (o >= 6.0), 0.0, g).to(g.dtype)
        tl.store(gx_ptr + idx, g.to(gx_ptr.dtype.element_ty), mask=mask)
    else:
        n, c, ph, pw = _unravel(idx, C, H_in, W_in, CHANNELS_LAST)
        # Offsets into grad_out / out, whose [N, C, H, W] share the gradient's layout.
        if CHANNELS_LAST:
            base = n * (H * W * C) + c
            stride_h = W * C
            stride_w = C
        else:
            base = (n * C + c) * (H * W)
            stride_h = W
            stride_w = 1
        # Lower bound of the first output index whose taps reach p: bilinear needs
        # src >= p - 1, i.e. dst >= ((2p - 1) * out - in) / (2 * in); nearest needs
        # dst * in / out >= p. Numerators are kept non-negative so // is a floor.
        if BILINEAR:
            start_h = tl.maximum((2 * ph - 1) * H - H_in, 0) // (2 * H_in) - margin_h
            start_w = tl.maximum((2 * pw - 1) * W - W_in, 0) // (2 * W_in) - margin_w
        else:
            start_h = (ph * H) // H_in - margin_h
            start_w = (pw * W) // W_in - margin_w
        # Candidates are tiles [BLOCK, KH_CHUNK, KW_CHUNK] (one pass for windows up to the chunk
        # sizes). Each output column is first summed vertically, then the columns horizontally,
        # the order of the C++ kernel's two passes.
        acc = tl.zeros([BLOCK], dtype=ACC)
        for w_begin in range(0, KW, KW_CHUNK):
            ow = start_w[:, None] + (w_begin + tl.arange(0, KW_CHUNK)).to(tl.int64)[None, :]
            valid_w = mask[:, None] & (ow >= 0) & (ow < W)
            hit_w, weight_w = _hits(ow, pw[:, None], valid_w, W_in, W, BILINEAR, ACC)
            column = tl.zeros([BLOCK, KW_CHUNK], dtype=ACC)
            for h_begin in range(0, KH, KH_CHUNK):
                oh = start_h[:, None] + (h_begin + tl.arange(0, KH_CHUNK)).to(tl.int64)[None, :]
                valid_h = mask[:, None] & (oh >= 0) & (oh < H)
                hit_h, weight_h = _hits(oh, ph[:, None], valid_h, H_in, H, BILINEAR, ACC)
                hit = hit_h[:, :, None] & hit_w[:, None, :]
                off = (base[:, None] + oh * stride_h)[:, :, None] + (ow * stride_w)[:, None, :]
                g = tl.load(g_ptr + off, mask=hit, other=0.0).to(ACC)
                if ACTIVATION == 1:
                    o = tl.load(out_ptr + off, mask=hit, other=0.0).to(ACC)
                    g = tl.where(o <= 0.0, 0.0, g).to(ACC)
                elif ACTIVATION == 2:
                    o = tl.load(out_ptr + off, mask=hit, other=0.0).to(ACC)
                    g = tl.where((o <= 0.0) | (o >= 6.0), 0.0, g).to(ACC)
                column += tl.sum(tl.where(hit, weight_h[:, :, None] * g, 0.0).to(ACC), axis=1)
            acc += tl.sum(tl.where(hit_w, weight_w * column, 0.0).to(ACC), axis=1)
        tl.store(gx_ptr + idx, acc.to(gx_ptr.dtype.element_ty), mask=mask)


def _require(ok: bool, message: str) -> None:
    # RuntimeError, as TORCH_CHECK raises in the C++ family: the public API has already raised
    # ValueError/TypeError for user input, this guards direct torch.ops calls.
    if not ok:
        raise RuntimeError(f"multires_fusion: {message}")


def _check(mode: str, activation: str, t: torch.Tensor) -> tuple[bool, int, tl.dtype]:
    _require(mode in _MODES, f"unknown mode '{mode}' (expected bilinear or nearest)")
    _require(
        activation in _ACTIVATIONS,
        f"unknown activation '{activation}' (expected none, relu or relu6)",
    )
    _require(t.dtype in _DTYPES, f"the Triton kernel got dtype {t.dtype}")
    return mode == "bilinear", _ACTIVATIONS[activation], _DTYPES[t.dtype]


def _device(t: torch.Tensor):
    # Triton launches on the current device: make it the tensors' one.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@functools.lru_cache(maxsize=4096)
def _window(in_size: int, out_size: int, bilinear: bool, fp64: bool) -> tuple[int, int]:
    """(margin, K) of one axis of the backward gather.

    For every input index p, the output indices whose taps read p lie in
    ``[bound(p) - margin, bound(p) - margin + K)``, ``bound`` being the integer lower bound the
    kernel computes. Found by running the kernel's tap function over every output index (on CPU,
    in the same float type), then widened by one index at either end for a GPU that rounds a tap
    differently (FMA contraction)."""
    dst = torch.arange(out_size, dtype=torch.int64)
    f32 = torch.float32
    if bilinear:
        ft = torch.float64 if fp64 else f32
        scale = torch.tensor(in_size, dtype=ft) / torch.tensor(out_size, dtype=ft)
        src = (scale * (dst.to(ft) + 0.5) - 0.5).clamp_min(0)
        i0 = torch.floor(src.to(f32)).to(torch.int64).clamp_max(in_size - 1)
        taps = (i0, i0 + ((i0 < in_size - 1) & (in_size != out_size)).to(torch.int64))
    elif out_size == in_size:
        taps = (dst,)
    elif out_size == 2 * in_size:
        taps = (dst >> 1,)
    else:
        scale = torch.tensor(in_size, dtype=f32) / torch.tensor(out_size, dtype=f32)
        idx = torch.floor(dst.to(f32) * scale).to(torch.int64)
        taps = (idx.clamp_max(in_size - 1),)
    first = torch.full((in_size,), out_size, dtype=torch.int64)
    last = torch.full((in_size,), -1, dtype=torch.int64)
    for tap in taps:
        first = first.scatter_reduce(0, tap, dst, "amin")
        last = last.scatter_reduce(0, tap, dst, "amax")
    p = torch.arange(in_size, dtype=torch.int64)
    if bilinear:
        bound = ((2 * p - 1) * out_size - in_size).clamp_min(0) // (2 * in_size)
    else:
        bound = (p * out_size) // in_size
    read = last >= 0
    if not bool(read.any()):
        return 1, 1
    margin = max(1, int((bound - first)[read].max()) + 1)
    k = int((last - (bound - margin))[read].max()) + 2
    return margin, k


def fwd(inputs: list[torch.Tensor], size: list[int], mode: str, activation: str) -> torch.Tensor:
    """``act(sum_j resize(inputs[j], size))``, ``[N, C, H, W]`` laid out as ``inputs[0]``."""
    n_in = len(inputs)
    _require(1 <= n_in <= MAX_INPUTS, f"expected 1 to {MAX_INPUTS} inputs, got {n_in}")
    x0 = inputs[0]
    bilinear, act, acc = _check(mode, activation, x0)
    _require(
        len(size) == 2 and size[0] > 0 and size[1] > 0,
        f"size must be a positive (H, W), got {list(size)}",
    )
    for j, x in enumerate(inputs):
        _require(x.dim() == 4, f"inputs[{j}] must be 4-d [N, C, H, W], got {x.dim()}-d")
        _require(
            x.dtype == x0.dtype and x.device == x0.device,
            f"inputs[{j}] is {x.dtype} on {x.device}, inputs[0] {x0.dtype} on {x0.device}",
        )
        _require(
            x.shape[:2] == x0.shape[:2] and x.shape[2] > 0 and x.shape[3] > 0,
            f"inputs[{j}] has shape {tuple(x.shape)}, inputs[0] {tuple(x0.shape)}",
        )
    H, W = int(size[0]), int(size[1])
    fmt = output_memory_format(x0)
    out = torch.empty(
        (x0.shape[0], x0.shape[1], H, W), dtype=x0.dtype, device=x0.device, memory_format=fmt
    )
    if out.numel() == 0:
        return out
    xs = [x.contiguous(memory_format=fmt) for x in inputs]
    sizes = []
    identity_mask = 0
    for j, x in enumerate(xs):
        sizes += [x.shape[2], x.shape[3]]
        if x.shape[2] == H and x.shape[3] == W:
            identity_mask |= 1 << j
    xs += [xs[0]] * (MAX_INPUTS - n_in)
    sizes += sizes[:2] * (MAX_INPUTS - n_in)
    total = out.numel()
    with _device(out):
        _multires_fusion_fwd_kernel[(triton.cdiv(total, BLOCK),)](
            out,
            *xs,
            *sizes,
            total,
            x0.shape[1],
            H,
            W,
            NUM_INPUTS=n_in,
            IDENTITY_MASK=identity_mask,
            BILINEAR=bilinear,
            ACTIVATION=act,
            CHANNELS_LAST=fmt == torch.channels_last,
            ACC=acc,
            BLOCK=BLOCK,
        )
    return out


def bwd(
    grad_out: torch.Tensor, out: torch.Tensor, input_sizes: list[int], mode: str, activation: str
) -> list[torch.Tensor]:
    """Gradient of every input, ``[N, C, H_j, W_j]`` in ``output_memory_format(out)``."""
    bilinear, act, acc = _check(mode, activation, out)
    _require(
        len(input_sizes) % 2 == 0
        and 2 <= len(input_sizes) <= 2 * MAX_INPUTS
        and all(s > 0 for s in input_sizes),
        f"input_sizes must hold positive (H, W) of 1 to {MAX_INPUTS} inputs, "
        f"got {list(input_sizes)}",
    )
    _require(
        out.dim() == 4 and grad_out.shape == out.shape,
        f"grad_out has shape {tuple(grad_out.shape)}, out {tuple(out.shape)}; "
        "expected one 4-d shape",
    )
    _require(
        grad_out.dtype == out.dtype and grad_out.device == out.device,
        f"grad_out is {grad_out.dtype} on {grad_out.device}, out {out.dtype} on {out.device}",
    )
    fmt = output_memory_format(out)
    N, C, H, W = out.shape
    grads = [
        torch.empty(
            (N, C, int(input_sizes[2 * j]), int(input_sizes[2 * j + 1])),
            dtype=out.dtype,
            device=out.device,
            memory_format=fmt,
        )
        for j in range(len(input_sizes) // 2)
    ]
    if out.numel() == 0:
        return grads
    g = grad_out.contiguous(memory_format=fmt)
    o = out.contiguous(memory_format=fmt)
    channels_last = fmt == torch.channels_last
    fp64 = out.dtype == torch.float64
    with _device(out):
        for gx in grads:
            H_in, W_in = gx.shape[2], gx.shape[3]
            identity = H_in == H and W_in == W
            if identity:
                (margin_h, kh), (margin_w, kw) = (1, 1), (1, 1)
            else:
                margin_h, kh = _window(H_in, H, bilinear, fp64)
                margin_w, kw = _window(W_in, W, bilinear, fp64)
            kh_chunk = min(triton.next_power_of_2(kh), MAX_WINDOW_CHUNK)
            kw_chunk = min(triton.next_power_of_2(kw), MAX_WINDOW_CHUNK)
            block = BLOCK if identity else max(16, BWD_TILE // (kh_chunk * kw_chunk))
            total = gx.numel()
            _multires_fusion_bwd_kernel[(triton.cdiv(total, block),)](
                gx,
                g,
                o,
                total,
                C,
                H_in,
                W_in,
                H,
                W,
                margin_h,
                margin_w,
                IDENTITY=identity,
                BILINEAR=bilinear,
                ACTIVATION=act,
                CHANNELS_LAST=channels_last,
                KH=kh,
                KW=kw,
                KH_CHUNK=kh_chunk,
                KW_CHUNK=kw_chunk,
                ACC=acc,
                BLOCK=block,
                num_warps=8,
            )
    return grads
