"""The dynamic-token lightweight transformer in plain eager PyTorch: the oracle.

HR-NAS's ``Transformer`` (HRNAS_SPEC.md section 2; ``models/transformer.py`` of the authors'
code) written step by step as the authors compute it, with L alive tokens of dimension
``d = grid * grid``:

    f = interpolate(x, (grid, grid), bilinear, align_corners=False)        [N, C, g, g]
    f = cat([f, P])                        P: the 2 standardised coordinate channels [x, y]
    u = BN_in(W_in f)                      W_in [L, C + 2] (a 1x1 conv), BN over the L tokens
    t = u viewed as L tokens of dimension d, per sample                    [L, N, d]
    m = Layer(query=t, memory=t)           the encoder layer
    o = Layer(query=Q, memory=m)           the decoder layer, Q = query_embed [L, d] (optional)
    z = BN_out(W_out o)                    W_out [C_out, L] (a 1x1 conv), z [N, C_out, g, g]
    y = interpolate(z, (H, W) or (H // 2, W // 2) when downsampling, bilinear)
    y = y + x                              only when neither downsampling nor changing channels

    Layer(q, mem):  a = MHA(q, mem, mem)   (no biases, scaled dot product, softmax over keys)
                    t = LN1(mem + drop(a))                     post-norm; the residual is mem
                    out = LN2(t + drop(W2 drop(relu(W1 t))))

(In the encoder ``q`` is ``mem``, so "the residual is the memory" covers both layers.)

Token masking: with ``token_index`` only the listed tokens exist. The rows of ``W_in``, of BN_in's
parameters and running statistics and of ``query_embed`` and the columns of ``W_out`` are
gathered, so the result is that of a transformer built with only the alive tokens, dead tokens'
parameters get exactly zero gradient and their running statistics are left alone. With no token
alive the transformer has zero tokens: ``W_out o`` is an empty sum, exactly zero, and the output
is ``interpolate(BN_out(0))`` (plus ``x``), i.e. BN_out's bias in training.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which the authors' layers use
# Per layer: the order of the 8 weights in an encoder/decoder list.
LAYER_WEIGHTS = (
    "in_proj_weight",
    "out_proj_weight",
    "linear1_weight",
    "linear2_weight",
    "norm1_weight",
    "norm1_bias",
    "norm2_weight",
    "norm2_bias",
)


def grid_coordinates(
    grid: int, *, dtype=None, device=None, standardised: bool = True
) -> torch.Tensor:
    """The authors' ``get_points_single((grid, grid))``: ``[2, grid, grid]``, channel 0 the column
    (x) index, channel 1 the row (y) index, each standardised to zero mean and unit (population)
    standard deviation over the grid. Computed in float64, then cast to ``dtype`` (default: torch's
    default dtype)."""
    r = torch.arange(grid, dtype=torch.float64)
    ys, xs = torch.meshgrid(r, r, indexing="ij")
    p = torch.stack([xs, ys])
    if standardised:
        mean = p.mean(dim=(1, 2), keepdim=True)
        std = p.std(dim=(1, 2), keepdim=True, correction=0)
        p = (p - mean) / std
    return p.to(dtype=dtype or torch.get_default_dtype(), device=device)


def attention(query, key, value, in_proj_weight, out_proj_weight, num_heads, dropout, training):
    """``nn.MultiheadAttention(bias=False)`` math on sequence-first ``[L, N, d]`` tensors: the
    query, key and value projections are the three row blocks of ``in_proj_weight`` and head h
    uses the feature slice ``[h * d / heads, (h + 1) * d / heads)``."""
    length, n, d = query.shape
    source = key.shape[0]
    head_dim = d // num_heads
    w_q, w_k, w_v = in_proj_weight.chunk(3)
    q = query @ w_q.t()
    k = key @ w_k.t()
    v = value @ w_v.t()
    q = q.reshape(length, n * num_heads, head_dim).transpose(0, 1) * head_dim**-0.5
    k = k.reshape(source, n * num_heads, head_dim).transpose(0, 1)
    v = v.reshape(source, n * num_heads, head_dim).transpose(0, 1)
    p = torch.softmax(q @ k.transpose(1, 2), dim=-1)
    p = F.dropout(p, dropout, training)
    o = (p @ v).transpose(0, 1).reshape(length, n, d)
    return o @ out_proj_weight.t()


def layer(query, memory, weights: Sequence[torch.Tensor], num_heads, dropout, training):
    """One post-norm layer (``LAYER_WEIGHTS`` order): attention of ``query`` over ``memory``,
    residual ``memory``, LayerNorm, ReLU feed-forward, residual, LayerNorm."""
    in_w, out_w, w1, w2, n1_w, n1_b, n2_w, n2_b = weights
    d = memory.shape[-1]
    a = attention(query, memory, memory, in_w, out_w, num_heads, dropout, training)
    t = memory + F.dropout(a, dropout, training)
    t = F.layer_norm(t, (d,), n1_w, n1_b, LAYER_NORM_EPS)
    h = F.dropout(torch.relu(t @ w1.t()), dropout, training)
    t = t + F.dropout(h @ w2.t(), dropout, training)
    return F.layer_norm(t, (d,), n2_w, n2_b, LAYER_NORM_EPS)


def _batch_norm(z, running_mean, running_var, weight, bias, index, use_batch_stats, momentum, eps):
    """``F.batch_norm`` over the entries ``index`` (None: all) of full-size parameters/statistics;
    the running statistics of the other entries are left alone."""

    def pick(t):
        return t if t is None or index is None else t.index_select(0, index)

    rm, rv = pick(running_mean), pick(running_var)
    out = F.batch_norm(z, rm, rv, pick(weight), pick(bias), use_batch_stats, momentum, eps)
    if index is not None and running_mean is not None and use_batch_stats:
        with torch.no_grad():  # F.batch_norm updated the gathered copies; write them back
            running_mean.index_copy_(0, index, rm)
            running_var.index_copy_(0, index, rv)
    return out


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
) -> torch.Tensor:
    """See the module docstring; arguments as ``hrnas_kernels.token_transformer``."""
    n, c, h, w = x.shape
    grid = coords.shape[-1]
    # the 1x1 projections' weights as matrices (conv-shaped [rows, cols, 1, 1] accepted)
    w_in, w_out = input_proj_weight.flatten(1), reverse_proj_weight.flatten(1)
    query = query_embed
    if token_index is not None:
        w_in = w_in.index_select(0, token_index)
        query = None if query is None else query.index_select(0, token_index)
        w_out = w_out.index_select(1, token_index)
    tokens = w_in.shape[0]

    f = F.interpolate(x, (grid, grid), mode="bilinear", align_corners=False)
    f = torch.cat([f, coords.expand(n, 2, grid, grid)], dim=1)
    u = torch.einsum("lc,nchw->nlhw", w_in, f)
    use_in_stats = training or input_running_mean is None
    if tokens:
        u = _batch_norm(
            u,
            input_running_mean,
            input_running_var,
            input_norm_weight,
            input_norm_bias,
            token_index,
            use_in_stats,
            momentum,
            eps,
        )
    t = u.flatten(2).permute(1, 0, 2)  # [L, N, d]: sequence first, as nn.MultiheadAttention
    memory = layer(t, t, encoder, num_heads, dropout, training)
    if query is not None:
        queries = query.unsqueeze(1).expand(tokens, n, grid * grid)
        t = layer(queries, memory, decoder, num_heads, dropout, training)
    else:
        t = memory
    o = t.reshape(tokens, n, grid, grid).permute(1, 0, 2, 3)
    z = torch.einsum("ol,nlhw->nohw", w_out, o)
    z = _batch_norm(
        z,
        reverse_running_mean,
        reverse_running_var,
        reverse_norm_weight,
        reverse_norm_bias,
        None,
        training or reverse_running_mean is None,
        momentum,
        eps,
    )
    size = (h // 2, w // 2) if downsample else (h, w)
    y = F.interpolate(z, size, mode="bilinear", align_corners=False)
    if downsample or z.shape[1] != c:
        return y
    return y + x
