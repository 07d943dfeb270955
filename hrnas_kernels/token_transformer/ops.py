"""Dispatcher contract of the dynamic-token transformer: schemas and fake kernels. Imports torch
only.

The ops take the full per-token parameters and an optional ``token_index`` (an int64 ``[A]`` of
distinct alive tokens of ``[0, L)``; None: all L alive) and gather the alive tokens' rows of
``w_in``, ``bn_in_w``, ``bn_in_b``, ``rm_in``, ``rv_in``, ``query`` and columns of ``w_out``
themselves (the CUDA and Triton forward programs read them through the index, without copies):
a masked call is one op call, with no gather or scatter calls around it. The kernels inside work
on the A compact tokens; the backward returns those parameters' gradients at full size, dead
tokens' entries exactly zero.
The whole block is one forward and one backward op, in two families with one schema:
``token_transformer_{fwd,bwd}`` (the C++ kernels) and ``token_transformer_{fwd,bwd}_triton``
(``triton.py``: Triton forward, backward composed of torch operations; imported on first call).

    fwd(x [N, C, H, W], coords [2, g, g], w_in [L, C + 2], bn_in_w [L], bn_in_b [L],
        rm_in [L]?, rv_in [L]?, encoder: 8 tensors (reference.LAYER_WEIGHTS), query [L, d]?,
        decoder: 8 tensors or none, w_out [C_out, L], bn_out_w [C_out], bn_out_b [C_out],
        rm_out [C_out]?, rv_out [C_out]?, num_heads, out_size [Ho, Wo], residual, eps,
        save_tape=True, token_index [A]?=None)
      -> (y [N, C_out, Ho, Wo], tape [N * tape_size(..., A, ...)] (what backward reads; [0] when
          not save_tape: inference, where the CPU kernel then writes no tape at all),
          mean_in [A], var_in [A], mean_out [C_out], var_out [C_out])
    bwd(grad_y, tape, coords, w_in, bn_in_w, bn_in_b, var_in [A], encoder, query?, decoder, w_out,
        bn_out_w, var_out, num_heads, in_size [H, W], residual, use_batch_stats, eps,
        token_index [A]?=None)
      -> (grad_x, grad_w_in, grad_bn_in_w, grad_bn_in_b, [grad of each encoder weight],
          grad_query ([0] without a decoder), [grad of each decoder weight], grad_w_out,
          grad_bn_out_w, grad_bn_out_b), the per-token ones full size

Autograd: the native forward op has a C++ autograd kernel
(csrc/token_transformer/token_transformer_autograd.cpp): called with inputs that need gradients it
writes the tape whatever ``save_tape`` says and returns an output whose backward calls the native
backward op. The Triton pair has no autograd registration; ``api`` wraps it in an
``autograd.Function``.

``A`` is ``token_index``'s length (L without one): the statistics of the input BatchNorm are the
alive tokens', in ``token_index``'s order.

``d = g * g``. The running statistics are given either all four (eval: normalise with them) or
none (normalise with the batch statistics); the statistics outputs are the ones used (biased
batch variance in training), so the caller updates the running averages. ``residual`` adds x
(C_out == C and out_size == (H, W)).
"""

import torch

from .._impl import TRITON_INTERPRET

N_LAYER_WEIGHTS = 8  # reference.LAYER_WEIGHTS

_FWD_SCHEMA = (
    "(Tensor x, Tensor coords, Tensor input_proj_weight, Tensor input_norm_weight, "
    "Tensor input_norm_bias, Tensor? input_running_mean, Tensor? input_running_var, "
    "Tensor[] encoder, Tensor? query_embed, Tensor[] decoder, Tensor reverse_proj_weight, "
    "Tensor reverse_norm_weight, Tensor reverse_norm_bias, Tensor? reverse_running_mean, "
    "Tensor? reverse_running_var, int num_heads, SymInt[] out_size, bool residual, float eps, "
    "bool save_tape=True, Tensor? token_index=None) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_BWD_SCHEMA = (
    "(Tensor grad_out, Tensor tape, Tensor coords, Tensor input_proj_weight, "
    "Tensor input_norm_weight, Tensor input_norm_bias, Tensor input_var, Tensor[] encoder, "
    "Tensor? query_embed, Tensor[] decoder, Tensor reverse_proj_weight, "
    "Tensor reverse_norm_weight, Tensor reverse_var, int num_heads, SymInt[] in_size, "
    "bool residual, bool use_batch_stats, float eps, Tensor? token_index=None) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor[], Tensor, Tensor[], Tensor, Tensor, Tensor)"
)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are kept in the accumulation type: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tape_size(channels, tokens, dim, num_heads, layers, out_channels):
    """Values saved per sample for backward; csrc/token_transformer/token_transformer.h lays
    them out (TapeLayout) and must agree: the resized input ``[C, d]``, the normalised tokens
    ``[L, d]``, per layer Q, K, V, the head outputs, the two LayerNorm-normalised values and the
    ReLU output (7 ``[L, d]``), the attention probabilities ``[heads, L, L]`` and the two
    LayerNorm reciprocal deviations ``[L]``, and the normalised output ``[C_out, d]``."""
    per_layer = 7 * tokens * dim + num_heads * tokens * tokens + 2 * tokens
    return channels * dim + tokens * dim + layers * per_layer + out_channels * dim


def _fwd_fake(
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
    num_heads,
    out_size,
    residual,
    eps,
    save_tape=True,
    token_index=None,
):
    n, c = x.shape[0], x.shape[1]
    tokens = input_proj_weight.shape[0] if token_index is None else token_index.shape[0]
    c_out = reverse_proj_weight.shape[0]
    dim = coords.shape[-1] * coords.shape[-2]
    layers = 1 + (len(decoder) > 0)
    y = x.new_empty((n, c_out, out_size[0], out_size[1]))
    tape_len = n * tape_size(c, tokens, dim, num_heads, layers, c_out) if save_tape else 0
    tape = x.new_empty((tape_len,))
    sd = stats_dtype(x.dtype)
    stats = [x.new_empty((k,), dtype=sd) for k in (tokens, tokens, c_out, c_out)]
    return (y, tape, *stats)


def _bwd_fake(
    grad_out,
    tape,
    coords,
    input_proj_weight,
    input_norm_weight,
    input_norm_bias,
    input_var,
    encoder,
    query_embed,
    decoder,
    reverse_proj_weight,
    reverse_norm_weight,
    reverse_var,
    num_heads,
    in_size,
    residual,
    use_batch_stats,
    eps,
    token_index=None,
):
    n = grad_out.shape[0]
    c = input_proj_weight.shape[1] - 2
    grad_x = grad_out.new_empty((n, c, in_size[0], in_size[1]))
    grad_query = (
        torch.empty_like(query_embed) if query_embed is not None else grad_out.new_empty((0,))
    )
    return (
        grad_x,
        torch.empty_like(input_proj_weight),
        torch.empty_like(input_norm_weight),
        torch.empty_like(input_norm_weight),
        [torch.empty_like(t) for t in encoder],
        grad_query,
        [torch.empty_like(t) for t in decoder],
        torch.empty_like(reverse_proj_weight),
        torch.empty_like(reverse_norm_weight),
        torch.empty_like(reverse_norm_weight),
    )


for _suffix in ("", "_triton"):
    torch.library.define(f"hrnas_kernels::token_transformer_fwd{_suffix}", _FWD_SCHEMA)
    torch.library.define(f"hrnas_kernels::token_transformer_bwd{_suffix}", _BWD_SCHEMA)
    torch.library.register_fake(f"hrnas_kernels::token_transformer_fwd{_suffix}", _fwd_fake)
    torch.library.register_fake(f"hrnas_kernels::token_transformer_bwd{_suffix}", _bwd_fake)


def _fwd_triton(*args):
    from . import triton as kernels

    return kernels.fwd(*args)


def _bwd_triton(*args):
    from . import triton as kernels

    return kernels.bwd(*args)


# Under TRITON_INTERPRET=1 the Triton kernels also serve CPU tensors: that is how CI tests them.
for _device in ("cuda", "cpu") if TRITON_INTERPRET else ("cuda",):
    torch.library.impl("hrnas_kernels::token_transformer_fwd_triton", _device, _fwd_triton)
    torch.library.impl("hrnas_kernels::token_transformer_bwd_triton", _device, _bwd_triton)

fwd = torch.ops.hrnas_kernels.token_transformer_fwd.default
bwd = torch.ops.hrnas_kernels.token_transformer_bwd.default
fwd_triton = torch.ops.hrnas_kernels.token_transformer_fwd_triton.default
bwd_triton = torch.ops.hrnas_kernels.token_transformer_bwd_triton.default
