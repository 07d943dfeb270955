"""``MixedBlock``: the HR-NAS searching block with a live mask on every hidden channel.

The authors' block runs, per kernel size k in 3/5/7, ``ConvBNReLU(inp -> h, 1x1)``,
``ConvBNReLU(h -> h, kxk, depthwise)``, ``Conv2d(h -> oup, 1x1)`` and sums the three before one
BN. Stacking the three expand convs as one ``[3h, inp]`` weight and the three project convs as
one ``[oup, 3h]`` weight gives the same sum with one GEMM each (see ``block_shape`` for the whole
formula). The hidden channels are the searchable units: channel c of kernel size k is alive when
``dw.channel_mask[c]`` is set; its importance is ``dw.weight[c]`` (the depthwise BN gamma).

Dead channels cost nothing: the expand GEMM uses only the alive rows of its weight, the mixed
depthwise op (``hrnas_kernels.nn.MixedDepthwiseConvBNAct``, fed the compact alive channels) only
their filters, the project GEMM only the alive columns. Every parameter stays full size; dead
entries get exactly zero gradient and their BN running statistics do not move. The alive index
is recomputed only when the mask changes (its version counter), so a step does no host sync.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hrnas_kernels.nn import MixedDepthwiseConvBNAct

from .block_shape import BlockShape


def batch_norm_alive(bn: nn.BatchNorm2d, x: torch.Tensor, index) -> torch.Tensor:
    """``bn`` applied to the channels ``index`` of its ``[C]`` features (``x`` holds only those),
    updating only their running statistics; ``index=None`` means all channels."""
    if index is None:
        return bn(x)
    rm = bn.running_mean.index_select(0, index)
    rv = bn.running_var.index_select(0, index)
    y = F.batch_norm(
        x,
        rm,
        rv,
        bn.weight.index_select(0, index),
        bn.bias.index_select(0, index),
        bn.training,
        bn.momentum,
        bn.eps,
    )
    if bn.training:
        with torch.no_grad():  # F.batch_norm updated the gathered copies: write them back
            bn.running_mean.index_copy_(0, index, rm)
            bn.running_var.index_copy_(0, index, rv)
            bn.num_batches_tracked.add_(1)
    return y


class MixedBlock(BlockShape):
    """Masked searching block; see the module docstring.

    Args:
        in_channels: an int, or one per input branch (the dense head's block).
        out_channels, stride: the block's.
        kernel_sizes: depthwise kernel sizes, each with ``round(sum(in) * expand_ratio)`` hidden
            channels (hidden channels are ordered by kernel size).
        bn_momentum, bn_eps: for every BN of the block.
        fusion: the network's ``Fusion`` module (``impl``-aware), used by the head's block.
        transformer: the space's ``TransformerSpec`` (a transformer with all its tokens where
            it places one), or None.
        impl: for the fused depthwise op.

    ``forward(x) -> [N, out_channels, H', W']``.
    """

    def __init__(
        self,
        in_channels,
        out_channels: int,
        stride: int,
        kernel_sizes,
        expand_ratio: float,
        *,
        bn_momentum: float,
        bn_eps: float,
        fusion: nn.Module,
        transformer=None,
        impl: str = "auto",
    ):
        super().__init__(in_channels, out_channels, stride, fusion)
        if transformer is not None and self.transformer_allowed(transformer):
            self.transformer = self.make_transformer(transformer, transformer.num_tokens, impl)
        total = sum(self.in_channels)
        hidden = round(total * expand_ratio)
        self.kernel_sizes = tuple(kernel_sizes)
        self.hidden = hidden * len(self.kernel_sizes)
        bn = {"momentum": bn_momentum, "eps": bn_eps}
        self.expand = nn.Conv2d(total, self.hidden, 1, bias=False)
        self.expand_bn = nn.BatchNorm2d(self.hidden, **bn)
        self.dw = MixedDepthwiseConvBNAct(
            [hidden] * len(self.kernel_sizes),
            self.kernel_sizes,
            stride,
            activation="relu",
            momentum=bn_momentum,
            eps=bn_eps,
            impl=impl,
        )
        self.project = nn.Conv2d(self.hidden, out_channels, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(out_channels, **bn)
        self._alive_cache = None

    @property
    def mask(self) -> torch.Tensor:
        """Bool ``[hidden]``: which hidden channels are alive (the depthwise op's mask)."""
        return self.dw.channel_mask

    @torch.compiler.disable
    def alive(self):
        """``(index or None when all are alive, alive count)``, cached per mask version."""
        mask = self.dw.channel_mask
        cache = self._alive_cache
        if cache is not None and cache[0] is mask and cache[1] == mask._version:
            return cache[2]
        count = int(mask.sum())
        index = None if count == self.hidden else torch.nonzero(mask).flatten()
        self._alive_cache = (mask, mask._version, (index, count))
        return index, count

    def alive_per_kernel(self) -> list[tuple[int, int]]:
        """``[(kernel_size, alive channels), ...]`` for every kernel size."""
        counts = self.mask.view(len(self.kernel_sizes), -1).sum(1).tolist()
        return list(zip(self.kernel_sizes, counts))

    def forward(self, x):
        xs = self.inputs(x)
        shortcut = self.shortcut_path(xs)
        index, count = self.alive()
        if count == 0:  # nothing alive: the block is its shortcut
            return shortcut
        w = self.expand.weight
        if index is not None:
            w = w.index_select(0, index)
        if self.multi_input:
            parts, start = [], 0
            for xb, c in zip(xs, self.in_channels):
                parts.append(F.conv2d(xb, w[:, start : start + c]))
                start += c
            pre = self.fusion(parts, xs[0].shape[-2:], "bilinear", None)
        else:
            pre = F.conv2d(xs[0], w)
        h = torch.relu(batch_norm_alive(self.expand_bn, pre, index))
        h = self.dw(h)
        wp = self.project.weight
        if index is not None:
            wp = wp.index_select(1, index)
        return self.project_bn(F.conv2d(h, wp)) + shortcut
