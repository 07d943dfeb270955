"""Public dynamic-token transformer: validation, implementation choice, autograd and the
running-statistics update (the ops gather the alive tokens themselves: ``ops``)."""

from collections.abc import Sequence

import torch

from .. import _impl, _running_stats
from . import ops, reference

# The forward op of each fused impl; the native one makes its own autograd node (C++), the
# Triton one is wrapped in _TritonTokenTransformer, whose backward calls ops.bwd_triton.
_FORWARD_OPS = {"native": ops.fwd, "triton": ops.fwd_triton}
# The kernels this op has: (impl, device type) -> dtypes. Pairs missing here are not written yet,
# so impl resolution reports them instead of letting the dispatcher fail.
SUPPORTED = {
    ("native", "cpu"): (torch.float32, torch.float64),
    ("native", "cuda"): (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    ("triton", "cuda"): (torch.float32, torch.float16, torch.bfloat16),
    ("triton", "cpu"): (torch.float32, torch.float64),  # TRITON_INTERPRET=1 only
}
_OP = "token_transformer"


def _forward_op(
    meta,
    token_index,
    x,
    coords,
    w_in,
    bn_in_w,
    bn_in_b,
    query,
    w_out,
    bn_out_w,
    bn_out_b,
    *rest,
    save_tape,
):
    """The forward op of ``meta``'s impl on the autograd function's argument list: y, the tape
    (empty without ``save_tape``) and the four statistics (the input ones of the alive tokens)."""
    impl, num_heads, out_size, residual, eps, n_enc = meta
    rm_in, rv_in, rm_out, rv_out, *layers = rest
    return _FORWARD_OPS[impl](
        x,
        coords,
        w_in,
        bn_in_w,
        bn_in_b,
        rm_in,
        rv_in,
        layers[:n_enc],
        query,
        layers[n_enc:],
        w_out,
        bn_out_w,
        bn_out_b,
        rm_out,
        rv_out,
        num_heads,
        out_size,
        residual,
        eps,
        save_tape,
        token_index,
    )


class _TritonTokenTransformer(torch.autograd.Function):
    """Autograd over the Triton op pair (the native forward op is its own autograd node, in C++:
    csrc/token_transformer/token_transformer_autograd.cpp; the two map the gradients alike). The
    ops take the full per-token parameters and the token index (they gather the alive tokens and
    give full-size gradients, dead tokens' entries zero): one autograd node and no gather or
    scatter call around it. The statistics come out for the running-average update and are not
    differentiable."""

    @staticmethod
    def forward(ctx, meta, token_index, x, coords, *params):
        _, num_heads, _out_size, residual, eps, n_enc = meta
        w_in, bn_in_w, bn_in_b, query, w_out = params[:5]
        bn_out_w, _bn_out_b, rm_in, _rv_in, _rm_out, _rv_out, *layers = params[5:]
        y, tape, mean_in, var_in, mean_out, var_out = _forward_op(
            meta, token_index, x, coords, *params, save_tape=True
        )
        ctx.save_for_backward(
            tape, coords, w_in, bn_in_w, bn_in_b, var_in, query, w_out, bn_out_w, var_out, *layers
        )
        ctx.token_index = token_index
        ctx.n_inputs = 4 + len(params)
        ctx.meta = (num_heads, [x.shape[2], x.shape[3]], residual, eps, rm_in is None, n_enc)
        ctx.mark_non_differentiable(mean_in, var_in, mean_out, var_out)
        # the statistics' gradients stay None instead of four zero tensors: backward ignores them
        ctx.set_materialize_grads(False)
        return y, mean_in, var_in, mean_out, var_out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, *_grad_stats):
        if grad_y is None:  # only the statistics were reached: nothing flows back
            return (None,) * ctx.n_inputs
        tape, coords, w_in, bn_in_w, bn_in_b, var_in, query, w_out, bn_out_w, var_out, *layers = (
            ctx.saved_tensors
        )
        num_heads, in_size, residual, eps, use_batch_stats, n_enc = ctx.meta
        grads = ops.bwd_triton(
            grad_y.contiguous(),
            tape,
            coords,
            w_in,
            bn_in_w,
            bn_in_b,
            var_in,
            layers[:n_enc],
            query,
            layers[n_enc:],
            w_out,
            bn_out_w,
            var_out,
            num_heads,
            in_size,
            residual,
            use_batch_stats,
            eps,
            ctx.token_index,
        )
        (
            g_x,
            g_w_in,
            g_bn_in_w,
            g_bn_in_b,
            g_enc,
            g_query,
            g_dec,
            g_w_out,
            g_bn_out_w,
            g_bn_out_b,
        ) = grads
        return (
            None,
            None,
            g_x,
            None,
            g_w_in,
            g_bn_in_w,
            g_bn_in_b,
            g_query if query is not None else None,
            g_w_out,
            g_bn_out_w,
            g_bn_out_b,
            None,
            None,
            None,
            None,
            *g_enc,
            *g_dec,
        )


def _shape(t):
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _check(
    x,
    coords,
    input_proj_weight,
    input_norm,
    input_running,
    encoder,
    query_embed,
    decoder,
    reverse_proj_weight,
    reverse_norm,
    reverse_running,
    token_index,
    num_heads,
    downsample,
    momentum,
    eps,
    dropout,
):
    """Validate every argument of ``token_transformer``; raise ValueError/TypeError naming it."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{_OP}: x must be a 4-d [N, C, H, W] tensor, got {_shape(x)}")
    if not x.is_floating_point():
        raise TypeError(f"{_OP}: x has dtype {x.dtype}, expected a floating dtype")
    n, c, h, w = x.shape
    if h < 1 or w < 1 or (downsample and (h < 2 or w < 2)):
        raise ValueError(
            f"{_OP}: x has spatial size {(h, w)}; need at least 1x1 (2x2 with downsample)"
        )

    def tensor(name, t, shape):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
            raise ValueError(f"{_OP}: {name} must have shape {list(shape)}, got {_shape(t)}")
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(
                f"{_OP}: {name} is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}"
            )

    if not isinstance(coords, torch.Tensor) or coords.dim() != 3 or coords.shape[0] != 2:
        raise ValueError(f"{_OP}: coords must have shape [2, g, g], got {_shape(coords)}")
    grid = coords.shape[-1]
    if grid < 2 or coords.shape[1] != grid:
        raise ValueError(
            f"{_OP}: coords must be a square grid of at least 2x2, got {_shape(coords)}"
        )
    tensor("coords", coords, (2, grid, grid))
    d = grid * grid

    def projection(name, w, what):  # [rows, cols] or conv-shaped [rows, cols, 1, 1]
        if not isinstance(w, torch.Tensor) or not (
            w.dim() == 2 or (w.dim() == 4 and w.shape[2:] == (1, 1))
        ):
            raise ValueError(
                f"{_OP}: {name} must be {what} or [{what[1:-1]}, 1, 1], got {_shape(w)}"
            )
        return w.shape[0]

    tokens = projection("input_proj_weight", input_proj_weight, "[num_tokens, C + 2]")
    w_in_shape = (tokens, c + 2, 1, 1)[: input_proj_weight.dim()]
    tensor("input_proj_weight", input_proj_weight, w_in_shape)
    c_out = projection("reverse_proj_weight", reverse_proj_weight, "[C_out, num_tokens]")
    w_out_shape = (c_out, tokens, 1, 1)[: reverse_proj_weight.dim()]
    tensor("reverse_proj_weight", reverse_proj_weight, w_out_shape)
    for prefix, pair, size in (
        ("input_norm", input_norm, tokens),
        ("reverse_norm", reverse_norm, c_out),
    ):
        for name, t in zip(("weight", "bias"), pair):
            tensor(f"{prefix}_{name}", t, (size,))
    running = list(input_running) + list(reverse_running)
    if any(t is None for t in running) and not all(t is None for t in running):
        raise ValueError(
            f"{_OP}: pass all four running statistics (input and reverse mean/var) or none"
        )
    if running[0] is not None:
        for name, t, size in zip(
            (
                "input_running_mean",
                "input_running_var",
                "reverse_running_mean",
                "reverse_running_var",
            ),
            running,
            (tokens, tokens, c_out, c_out),
        ):
            tensor(name, t, (size,))
    if (
        isinstance(num_heads, bool)
        or not isinstance(num_heads, int)
        or num_heads < 1
        or d % num_heads
    ):
        raise ValueError(
            f"{_OP}: num_heads must be a positive divisor of the token dim {d}, got {num_heads!r}"
        )
    layer_shapes = [(3 * d, d), (d, d), (d, d), (d, d), (d,), (d,), (d,), (d,)]
    layers = [("encoder", encoder)]
    if (query_embed is None) != (decoder is None):
        raise ValueError(f"{_OP}: pass both query_embed and decoder (use_decoder) or neither")
    if query_embed is not None:
        tensor("query_embed", query_embed, (tokens, d))
        layers.append(("decoder", decoder))
    for lname, weights in layers:
        if isinstance(weights, torch.Tensor) or not isinstance(weights, Sequence):
            raise TypeError(
                f"{_OP}: {lname} must be a list of {len(reference.LAYER_WEIGHTS)} tensors"
            )
        if len(weights) != len(reference.LAYER_WEIGHTS):
            raise ValueError(
                f"{_OP}: {lname} must hold {len(reference.LAYER_WEIGHTS)} tensors "
                f"{reference.LAYER_WEIGHTS}, got {len(weights)}"
            )
        for name, t, shape in zip(reference.LAYER_WEIGHTS, weights, layer_shapes):
            tensor(f"{lname}.{name}", t, shape)
    if token_index is not None:
        if (
            not isinstance(token_index, torch.Tensor)
            or token_index.dtype != torch.int64
            or token_index.dim() != 1
        ):
            raise TypeError(f"{_OP}: token_index must be a 1-d int64 tensor of alive tokens")
        if token_index.device != x.device:
            raise ValueError(f"{_OP}: token_index is on {token_index.device}, x on {x.device}")
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"{_OP}: momentum must be in [0, 1], got {momentum!r}")
    if not float(eps) > 0.0:
        raise ValueError(f"{_OP}: eps must be positive, got {eps!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"{_OP}: dropout must be in [0, 1), got {dropout!r}")


def resolve_impl(impl: str, x: torch.Tensor, *, dropout: float, training: bool) -> str:
    """The shared resolution, with one addition: dropout in training exists only in the
    reference, so ``auto`` takes the reference for it (an explicit fused impl raises)."""
    drops = training and dropout > 0

    def call_reasons(name):
        if name == "reference":
            return
        dtypes = SUPPORTED.get((name, x.device.type))
        if dtypes is None:
            yield f"{_OP} has no {name} kernel for {x.device.type} yet"
        elif x.dtype not in dtypes:
            yield f"dtype {x.dtype} is not supported on {x.device.type}"
        if drops:
            yield "dropout > 0 in training is implemented only by impl='reference'"

    if impl == "auto" and drops:
        return "reference"
    return _impl.resolve(_OP, impl, x.device, call_reasons)


def fused_forward(
    x,
    coords,
    input_proj_weight,
    input_norm_weight,
    input_norm_bias,
    input_running_mean,
    input_running_var,
    encoder,
    query_embed,
    decoder,
    reverse_proj_weight,
    reverse_norm_weight,
    reverse_norm_bias,
    reverse_running_mean,
    reverse_running_var,
    *,
    token_index,
    num_heads,
    downsample,
    training,
    momentum,
    eps,
    dropout,
    impl,
):
    """The op with validated arguments and a resolved impl (the nn.Module calls this)."""
    args = (
        x,
        coords,
        input_proj_weight,
        input_norm_weight,
        input_norm_bias,
        input_running_mean,
        input_running_var,
        encoder,
        query_embed,
        decoder,
        reverse_proj_weight,
        reverse_norm_weight,
        reverse_norm_bias,
        reverse_running_mean,
        reverse_running_var,
    )
    if impl == "reference":
        return reference.token_transformer(
            *args,
            token_index=token_index,
            num_heads=num_heads,
            downsample=downsample,
            training=training,
            momentum=momentum,
            eps=eps,
            dropout=dropout,
        )
    n, c, h, w = x.shape
    use_batch_stats = training or input_running_mean is None
    running = (
        (None,) * 4
        if use_batch_stats
        else (input_running_mean, input_running_var, reverse_running_mean, reverse_running_var)
    )
    out_size = [h // 2, w // 2] if downsample else [h, w]
    residual = not downsample and reverse_proj_weight.shape[0] == c
    enc = list(encoder)
    dec = [] if decoder is None else list(decoder)
    meta = (impl, num_heads, out_size, residual, float(eps), len(enc))
    if impl != "native":  # the native op takes conv-shaped projection weights as they are
        input_proj_weight = input_proj_weight.flatten(1)
        reverse_proj_weight = reverse_proj_weight.flatten(1)
    per_token = (
        input_proj_weight,
        input_norm_weight,
        input_norm_bias,
        query_embed,
        reverse_proj_weight,
    )
    rest = (reverse_norm_weight, reverse_norm_bias, *running, *enc, *dec)
    x, coords = x.contiguous(), coords.contiguous()
    if impl == "triton" and (
        torch.is_grad_enabled()
        and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (x, *per_token, *rest))
    ):
        y, mean_in, var_in, mean_out, var_out = _TritonTokenTransformer.apply(
            meta, token_index, x, coords, *per_token, *rest
        )
    else:  # native: the op makes its own autograd node (C++) when an input needs gradients;
        # with nothing to differentiate, no node and no tape
        y, _, mean_in, var_in, mean_out, var_out = _forward_op(
            meta, token_index, x, coords, *per_token, *rest, save_tape=False
        )
    if training and input_running_mean is not None:
        # the statistics carry no gradient and the buffers need none: no no_grad() around
        # (the input ones are the alive tokens', in token_index order)
        count = n * coords.shape[-1] * coords.shape[-2]
        _running_stats.update(
            input_running_mean, input_running_var, mean_in, var_in, token_index, momentum, count
        )
        _running_stats.update(
            reverse_running_mean, reverse_running_var, mean_out, var_out, None, momentum, count
        )
    return y


def token_transformer(
    x: torch.Tensor,
    coords: torch.Tensor,
    input_proj_weight: torch.Tensor,
    input_norm_weight: torch.Tensor,
    input_norm_bias: torch.Tensor,
    input_running_mean: torch.Tensor | None,
    input_running_var: torch.Tensor | None,
    encoder: Sequence[torch.Tensor],
    query_embed: torch.Tensor | None,
    decoder: Sequence[torch.Tensor] | None,
    reverse_proj_weight: torch.Tensor,
    reverse_norm_weight: torch.Tensor,
    reverse_norm_bias: torch.Tensor,
    reverse_running_mean: torch.Tensor | None,
    reverse_running_var: torch.Tensor | None,
    *,
    token_index: torch.Tensor | None = None,
    num_heads: int = 1,
    downsample: bool = False,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    dropout: float = 0.0,
    impl: str = "auto",
) -> torch.Tensor:
    """HR-NAS's lightweight transformer block on alive tokens (math: ``reference`` module doc).

    Args:
        x: ``[N, C, H, W]`` contiguous NCHW (a channels_last x is copied).
        coords: ``[2, g, g]`` coordinate channels (``reference.grid_coordinates(g)``); the
            token dimension is ``d = g * g``.
        input_proj_weight: ``[L, C + 2]`` (the 1x1 conv ``input_proj`` flattened), or the
            conv's own ``[L, C + 2, 1, 1]`` (then its gradient has that shape; the module passes
            its weights so, which spares a view and its autograd node per weight).
        input_norm_weight, input_norm_bias: ``[L]`` BatchNorm affine (gamma: token importance).
        input_running_mean, input_running_var: ``[L]`` or None.
        encoder: 8 tensors in ``reference.LAYER_WEIGHTS`` order: ``in_proj_weight [3d, d]``,
            ``out_proj_weight``, ``linear1_weight``, ``linear2_weight`` ``[d, d]``, the two
            LayerNorms' weight and bias ``[d]``.
        query_embed: ``[L, d]`` learned queries, and ``decoder`` (8 tensors as ``encoder``);
            both None for no decoder layer.
        reverse_proj_weight: ``[C_out, L]`` or ``[C_out, L, 1, 1]``; reverse_norm_weight/bias,
            running mean/var ``[C_out]`` (the four running statistics: all given or all None).
        token_index: None (all L tokens alive) or an int64 ``[A]`` of alive tokens; the result
            is that of a transformer built with only those tokens. Dead tokens cost nothing,
            keep their running statistics and get exactly zero gradient; with none alive the
            output is ``resize(BN_out(0))`` (+ x).
        num_heads: attention heads (a divisor of d). downsample: output at ``(H // 2, W // 2)``.
        training: batch statistics (updating the running ones in place, as ``F.batch_norm``)
            and dropout; False: running statistics (batch statistics when they are None).
        momentum, eps: BatchNorm's. dropout: on the attention probabilities, after attention,
            inside and after the feed-forward (as the authors' layers); training only.
        impl: ``"auto"``, ``"native"``, ``"triton"`` or ``"reference"``. ``auto`` takes the
            reference for dropout > 0 in training, the only impl that has dropout.

    Returns:
        ``[N, C_out, Ho, Wo]``; ``+ x`` when ``C_out == C`` and not ``downsample``.
    """
    _check(
        x,
        coords,
        input_proj_weight,
        (input_norm_weight, input_norm_bias),
        (input_running_mean, input_running_var),
        encoder,
        query_embed,
        decoder,
        reverse_proj_weight,
        (reverse_norm_weight, reverse_norm_bias),
        (reverse_running_mean, reverse_running_var),
        token_index,
        num_heads,
        downsample,
        momentum,
        eps,
        dropout,
    )
    if token_index is not None and token_index.numel():
        tokens = input_proj_weight.shape[0]
        if int(token_index.min()) < 0 or int(token_index.max()) >= tokens:
            raise ValueError(f"{_OP}: token_index must lie in [0, {tokens})")
        if token_index.numel() > 1 and not bool((token_index[1:] > token_index[:-1]).all()):
            raise ValueError(
                f"{_OP}: token_index must be strictly increasing (sorted, no duplicates)"
            )
    if (training or input_running_mean is None) and x.shape[0] == 0:
        raise ValueError(f"{_OP}: batch statistics need at least one sample, got N = 0")
    impl = resolve_impl(impl, x, dropout=float(dropout), training=training)
    return fused_forward(
        x,
        coords,
        input_proj_weight,
        input_norm_weight,
        input_norm_bias,
        input_running_mean,
        input_running_var,
        encoder,
        query_embed,
        decoder,
        reverse_proj_weight,
        reverse_norm_weight,
        reverse_norm_bias,
        reverse_running_mean,
        reverse_running_var,
        token_index=token_index,
        num_heads=num_heads,
        downsample=downsample,
        training=training,
        momentum=float(momentum),
        eps=float(eps),
        dropout=float(dropout),
        impl=impl,
    )
