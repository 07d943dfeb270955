"""Public masked mixed-kernel depthwise conv + BN + activation: validation, implementation
choice, channel gathering, autograd and running-statistics update."""

from collections.abc import Sequence

import torch

from .. import _impl, _running_stats
from .._alive import expand
from . import ops, reference

ACTIVATIONS = (None, "relu", "relu6")
_OPS = {"native": (ops.fwd, ops.bwd), "triton": (ops.fwd_triton, ops.bwd_triton)}
# The kernels this op has: (impl, device type) -> dtypes. Pairs missing here are not written yet,
# so impl resolution reports them instead of letting the dispatcher fail.
SUPPORTED = {
    ("native", "cpu"): (torch.float32, torch.float64),
    ("native", "cuda"): (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    ("triton", "cuda"): (torch.float32, torch.float16, torch.bfloat16),
    ("triton", "cpu"): (torch.float32, torch.float64),  # TRITON_INTERPRET=1 only
}
_OP = "mixed_dwconv_bn_act"
# The CPU kernels' NCHW path vectorises along W, plane by plane; on narrow outputs their
# channels_last path (vectors along C) is faster even with a copy of x and of y each way, so NCHW
# inputs whose output is at most this wide run through it. Measured on the AMD EPYC (Zen 3, AVX2),
# 2 threads, N=8, all-3x3 and 3/5/7 layers of 96-960 channels (README): a call that records the
# graph (forward + backward) took 0.38-1.01 of its NCHW time at output widths 7-28 and 1.24 at 56;
# a forward alone (inference, no_grad) gained only at width 7, and lost up to 1.7x at 14-28.
NCHW_AS_CHANNELS_LAST_MAX_WIDTH = 28
NCHW_AS_CHANNELS_LAST_MAX_WIDTH_NO_GRAPH = 7


def _compact(channel_index, counts, weights, bn_weight, bn_bias):
    """The alive channels' kernels (per group), gammas and betas, and each group's alive
    channels numbered within the group (for the backward's scatter); all channels when
    ``channel_index`` is None."""
    if channel_index is None:
        return list(weights), bn_weight, bn_bias, None
    rows, local, start, offset = [], [], 0, 0
    for w, count in zip(weights, counts):
        local.append(channel_index[start : start + count] - offset)
        rows.append(w.index_select(0, local[-1]))
        start, offset = start + count, offset + w.shape[0]
    gamma = bn_weight.index_select(0, channel_index)
    return rows, gamma, bn_bias.index_select(0, channel_index), local


def _forward_op(
    x,
    bn_weight,
    bn_bias,
    running_mean,
    running_var,
    stride,
    use_batch_stats,
    eps,
    activation,
    impl,
    channel_index,
    counts,
    *weights,
    save_tape=True,
    routed=False,
):
    """The forward op of ``impl`` on the alive channels: ``(y, conv, mean, var)`` and the
    gathered parameters ``(rows, gamma, beta, local)`` (see ``_compact``); conv is the tape for
    backward, empty without ``save_tape``. ``routed`` (see NCHW_AS_CHANNELS_LAST_MAX_WIDTH):
    the op runs on a channels_last copy of the NCHW x and y is handed back NCHW; the tape stays
    channels_last, as the backward's copy of x will be. The CPU backward recomputes the
    activation's mask from the tape and only checks y's shape (ops.py), so no channels_last y
    is kept."""
    rows, gamma, beta, local = _compact(channel_index, counts, weights, bn_weight, bn_bias)
    if routed:
        x = x.contiguous(memory_format=torch.channels_last)
    y, conv, mean, var = _OPS[impl][0](
        x, rows, gamma, beta, running_mean, running_var, stride, use_batch_stats, eps, activation,
        save_tape,
    )  # fmt: skip
    if routed:
        y = y.contiguous()
    return (y, conv, mean, var), (rows, gamma, beta, local)


class _MixedDepthwiseConvBNAct(torch.autograd.Function):
    """Autograd over the compact-channel op pair. It takes ``routed`` and ``_forward_op``'s
    arguments (the full parameters and the alive index) and gathers the alive channels itself
    (plain ATen calls, outside autograd); its backward puts the compact gradients back at full
    size, dead channels' entries zero: one node instead of a differentiable gather per
    parameter. mean/var come out for the running-stat update.

    ``routed`` (see ``_forward_op``): the caller's NCHW x is saved and its channels_last copy
    made again in backward rather than kept (the op before usually keeps x anyway; keeping the
    copy cost hrnas-cls 23% more activation memory), and x's gradient is handed back NCHW (a
    channels_last gradient made the NCHW ops before run their backward on mixed layouts,
    several times slower)."""

    @staticmethod
    def forward(ctx, routed, *args):
        (y, conv, mean, var), (rows, gamma, beta, local) = _forward_op(*args, routed=routed)
        x, _, _, _, _, stride, use_batch_stats, eps, activation, impl, index, _, *weights = args
        ctx.save_for_backward(y, x, conv, gamma, beta, mean, var, *rows)
        ctx.routed, ctx.stride, ctx.use_batch_stats, ctx.eps = routed, stride, use_batch_stats, eps
        ctx.activation, ctx.impl = activation, impl
        ctx.channel_index, ctx.local = index, local
        ctx.sizes = [w.shape[0] for w in weights]
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        y, x, conv, gamma, beta, mean, var, *rows = ctx.saved_tensors
        if ctx.routed:
            x = x.contiguous(memory_format=torch.channels_last)
        grad_x, grad_w, grad_gamma, grad_beta = _OPS[ctx.impl][1](
            grad_y,
            y,
            x,
            conv,
            rows,
            gamma,
            beta,
            mean,
            var,
            ctx.stride,
            ctx.use_batch_stats,
            ctx.eps,
            ctx.activation,
        )
        if ctx.routed:
            grad_x = grad_x.contiguous()
        index = ctx.channel_index
        if index is not None:
            channels = sum(ctx.sizes)
            grad_w = [expand(g, i, n) for g, i, n in zip(grad_w, ctx.local, ctx.sizes)]
            grad_gamma = expand(grad_gamma, index, channels)
            grad_beta = expand(grad_beta, index, channels)
        return (None, grad_x, grad_gamma, grad_beta, *([None] * 9), *grad_w)


def _check(
    x,
    weights,
    bn_weight,
    bn_bias,
    running_mean,
    running_var,
    stride,
    momentum,
    eps,
    activation,
    channel_index,
):
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(
            f"{_OP}: x must be a 4-d [N, C, H, W] tensor, got "
            f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{_OP}: x has dtype {x.dtype}, expected a floating dtype")
    if isinstance(weights, torch.Tensor) or not isinstance(weights, Sequence) or not weights:
        raise TypeError(
            f"{_OP}: weights must be a non-empty list of depthwise weights "
            "[C_k, 1, k, k], one per kernel size"
        )
    for g, w in enumerate(weights):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"{_OP}: weights[{g}] is a {type(w).__name__}, expected a tensor")
        if w.dim() != 4 or w.shape[1] != 1 or w.shape[2] != w.shape[3]:
            raise ValueError(
                f"{_OP}: weights[{g}] must have shape [C_k, 1, k, k], got {tuple(w.shape)}"
            )
        if w.shape[2] % 2 == 0:
            raise ValueError(
                f"{_OP}: weights[{g}] has an even kernel size {w.shape[2]}; "
                "kernel sizes must be odd (padding k // 2 keeps the size)"
            )
        if w.dtype != x.dtype or w.device != x.device:
            raise TypeError(
                f"{_OP}: weights[{g}] is {w.dtype} on {w.device}, x is {x.dtype} on {x.device}"
            )
    channels = sum(w.shape[0] for w in weights)
    for name, t in (
        ("bn_weight", bn_weight),
        ("bn_bias", bn_bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ):
        if t is None and name.startswith("running"):
            continue
        if not isinstance(t, torch.Tensor) or t.shape != (channels,):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"{_OP}: {name} must have shape [{channels}] (the sum of the "
                f"weights' channels), got {shape}"
            )
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(
                f"{_OP}: {name} is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}"
            )
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{_OP}: pass both running_mean and running_var, or neither")
    if stride not in (1, 2) or isinstance(stride, bool):
        raise ValueError(f"{_OP}: stride must be 1 or 2, got {stride!r}")
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"{_OP}: momentum must be in [0, 1], got {momentum!r}")
    if not float(eps) > 0.0:
        raise ValueError(f"{_OP}: eps must be positive, got {eps!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{_OP}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if channel_index is None:
        if x.shape[1] != channels:
            raise ValueError(f"{_OP}: x has {x.shape[1]} channels, the weights define {channels}")
        return
    if (
        not isinstance(channel_index, torch.Tensor)
        or channel_index.dtype != torch.int64
        or channel_index.dim() != 1
    ):
        raise TypeError(f"{_OP}: channel_index must be a 1-d int64 tensor of alive channels")
    if channel_index.device != x.device:
        raise ValueError(f"{_OP}: channel_index is on {channel_index.device}, x on {x.device}")
    if x.shape[1] != channel_index.numel():
        raise ValueError(
            f"{_OP}: x has {x.shape[1]} channels but channel_index lists "
            f"{channel_index.numel()} alive channels"
        )
    if channel_index.numel():
        if int(channel_index.min()) < 0 or int(channel_index.max()) >= channels:
            raise ValueError(
                f"{_OP}: channel_index must lie in [0, {channels}), got values in "
                f"[{int(channel_index.min())}, {int(channel_index.max())}]"
            )
        if channel_index.numel() > 1 and not bool((channel_index[1:] > channel_index[:-1]).all()):
            raise ValueError(
                f"{_OP}: channel_index must be strictly increasing (sorted, no duplicates)"
            )


def fused_forward(
    x,
    weights,
    bn_weight,
    bn_bias,
    running_mean,
    running_var,
    *,
    stride,
    training,
    momentum,
    eps,
    activation,
    channel_index,
    counts,
    impl,
):
    """The op with validated arguments and known per-group alive counts (``counts``), so a
    caller that caches its alive index (the nn.Module, the supernet) skips the host sync."""
    records_graph = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, bn_weight, bn_bias, *weights)
    )
    if impl == "reference":
        return reference.mixed_dwconv_bn_act(
            x,
            weights,
            bn_weight,
            bn_bias,
            running_mean,
            running_var,
            stride=stride,
            training=training,
            momentum=momentum,
            eps=eps,
            activation=activation,
            channel_index=channel_index,
        )
    routed = _nchw_as_channels_last(x, impl, stride, records_graph)
    use_batch_stats = training or running_mean is None
    rm, rv = running_mean, running_var
    if channel_index is not None and not use_batch_stats:  # the alive channels' statistics
        rm, rv = (
            running_mean.index_select(0, channel_index),
            running_var.index_select(0, channel_index),
        )
    args = (
        x,
        bn_weight,
        bn_bias,
        None if use_batch_stats else rm,
        None if use_batch_stats else rv,
        stride,
        use_batch_stats,
        float(eps),
        activation or "none",
        impl,
        channel_index,
        counts,
        *weights,
    )
    if records_graph:
        y, mean, var = _MixedDepthwiseConvBNAct.apply(routed, *args)
    else:  # nothing to differentiate (inference): the op alone, no autograd node, no tape
        (y, _, mean, var), _ = _forward_op(*args, save_tape=False, routed=routed)
    if training and running_mean is not None and y.numel():
        # the statistics carry no gradient and the buffers need none: no no_grad() around
        # (they are the alive channels', in channel_index order)
        count = y.shape[0] * y.shape[2] * y.shape[3]
        _running_stats.update(running_mean, running_var, mean, var, channel_index, momentum, count)
    return y


def _nchw_as_channels_last(x, impl, stride, records_graph) -> bool:
    """Whether the native CPU call on ``x`` (not channels_last) runs on a channels_last copy of
    it, its output copied back to NCHW: see NCHW_AS_CHANNELS_LAST_MAX_WIDTH."""
    if (
        impl != "native"
        or x.device.type != "cpu"
        or x.is_contiguous(memory_format=torch.channels_last)
    ):
        return False
    widest = (
        NCHW_AS_CHANNELS_LAST_MAX_WIDTH
        if records_graph
        else NCHW_AS_CHANNELS_LAST_MAX_WIDTH_NO_GRAPH
    )
    return (x.shape[3] - 1) // stride + 1 <= widest


def resolve_impl(impl: str, x: torch.Tensor) -> str:
    def call_reasons(name):
        if name == "reference":
            return
        dtypes = SUPPORTED.get((name, x.device.type))
        if dtypes is None:
            yield f"{_OP} has no {name} kernel for {x.device.type} yet"
        elif x.dtype not in dtypes:
            yield f"dtype {x.dtype} is not supported on {x.device.type}"

    return _impl.resolve(_OP, impl, x.device, call_reasons)


def mixed_dwconv_bn_act(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    *,
    stride: int = 1,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str | None = "relu6",
    channel_index: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Depthwise conv with a kernel size per channel group, then BatchNorm, then activation.

    Args:
        x: ``[N, C, H, W]``, or ``[N, A, H, W]`` holding only the channels in ``channel_index``.
            NCHW or channels_last (the output follows x).
        weights: one depthwise weight ``[C_k, 1, k, k]`` per kernel size (odd k, any mix such as
            3/5/7); the layer has ``C = sum(C_k)`` channels, groups concatenated in order, padding
            ``k // 2`` per group.
        bn_weight, bn_bias: ``[C]`` BatchNorm affine parameters (gamma is the channel's importance).
        running_mean, running_var: ``[C]`` or None (then batch statistics are always used).
            Updated in place in training exactly as ``F.batch_norm`` does, alive entries only.
        stride: 1 or 2. ``training``: batch statistics (True) or running statistics (False).
        activation: ``"relu6"``, ``"relu"`` or None.
        channel_index: None, or a strictly increasing int64 ``[A]`` of alive channels. Channels
            outside it cost nothing, keep their running statistics, and get exactly zero gradient.
        impl: ``"auto"``, ``"native"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``[N, A or C, (H - 1) // stride + 1, (W - 1) // stride + 1]``.
    """
    _check(
        x,
        weights,
        bn_weight,
        bn_bias,
        running_mean,
        running_var,
        stride,
        momentum,
        eps,
        activation,
        channel_index,
    )
    if (
        (training or running_mean is None)
        and x.shape[0] * ((x.shape[2] - 1) // stride + 1) * ((x.shape[3] - 1) // stride + 1) == 1
        and x.shape[1] > 0
    ):
        raise ValueError(
            f"{_OP}: batch statistics need more than 1 value per channel, got input "
            f"shape {tuple(x.shape)}"
        )
    impl = resolve_impl(impl, x)
    counts = reference.group_counts(channel_index, [w.shape[0] for w in weights])
    return fused_forward(
        x,
        weights,
        bn_weight,
        bn_bias,
        running_mean,
        running_var,
        stride=stride,
        training=training,
        momentum=momentum,
        eps=eps,
        activation=activation,
        channel_index=channel_index,
        counts=counts,
        impl=impl,
    )
