"""Masked mixed-kernel depthwise conv + BatchNorm + activation in plain eager PyTorch: the oracle.

    channels are split into groups by kernel size (e.g. 3/5/7, concatenated in order);
    conv_c = depthwise_conv(x_c, w_c, padding=k_c // 2, stride)      for every alive channel c
    y_c    = act(gamma_c * (conv_c - mean_c) / sqrt(var_c + eps) + beta_c)

This is HR-NAS's searching block hidden layer (HRNAS_SPEC.md section 1.3: one depthwise
ConvBNReLU per kernel size, the BN gamma being the searched importance) written the way the
authors' code computes it: per kernel size ``F.conv2d(groups=C_k)`` + ``F.batch_norm``. With
``channel_index`` only the listed (alive) channels exist in ``x`` and in the output; parameters
and running statistics stay full size, and only the alive entries are read or updated.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .._layout import output_memory_format


def group_counts(channel_index: torch.Tensor | None, sizes: Sequence[int]) -> list[int]:
    """How many of the alive channels fall in each kernel-size group (a host sync on CUDA)."""
    if channel_index is None:
        return list(sizes)
    bounds = torch.tensor([0] + list(sizes), device=channel_index.device).cumsum(0)
    edges = torch.searchsorted(channel_index, bounds).tolist()
    return [b - a for a, b in zip(edges[:-1], edges[1:])]


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
) -> torch.Tensor:
    sizes = [w.shape[0] for w in weights]
    counts = group_counts(channel_index, sizes)
    convs, start, offset = [], 0, 0
    for w, size, count in zip(weights, sizes, counts):
        if count:
            rows = (
                w
                if channel_index is None
                else w.index_select(0, channel_index[start : start + count] - offset)
            )
            k = w.shape[-1]
            convs.append(
                F.conv2d(
                    x[:, start : start + count], rows, stride=stride, padding=k // 2, groups=count
                )
            )
        start, offset = start + count, offset + size
    n, _, h, w_ = x.shape
    ho, wo = (h - 1) // stride + 1, (w_ - 1) // stride + 1
    conv = torch.cat(convs, 1) if convs else x.new_empty((n, 0, ho, wo))

    def alive(t):
        return t if channel_index is None or t is None else t.index_select(0, channel_index)

    use_batch_stats = training or running_mean is None
    rm, rv = alive(running_mean), alive(running_var)
    if conv.shape[1]:
        y = F.batch_norm(
            conv, rm, rv, alive(bn_weight), alive(bn_bias), use_batch_stats, momentum, eps
        )
    else:
        y = conv
    if channel_index is not None and running_mean is not None and use_batch_stats:
        with torch.no_grad():  # F.batch_norm updated the gathered copies; write them back
            running_mean.index_copy_(0, channel_index, rm)
            running_var.index_copy_(0, channel_index, rv)
    if activation == "relu6":
        y = F.relu6(y)
    elif activation == "relu":
        y = F.relu(y)
    return y.contiguous(memory_format=output_memory_format(x))
