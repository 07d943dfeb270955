"""``CompactBlock``: a searched block as plain PyTorch layers (what export builds).

It holds only what survived the search, with the same math as the masked ``MixedBlock``:

    expand      Conv2d(inp -> A, 1x1) (one per input branch for the dense head, resized and
                summed), BatchNorm2d(A), ReLU
    depthwise   one Conv2d(A_k -> A_k, k x k, groups=A_k) per kept kernel size k, on consecutive
                channel slices, concatenated; BatchNorm2d(A), ReLU
    project     Conv2d(A -> oup, 1x1), BatchNorm2d(oup)
    + shortcut  identity or the grouped 1x1 conv

with ``A = sum_k A_k``. A block with no channel left (``channels == []``) is only its shortcut.
"""

from __future__ import annotations

import torch
from torch import nn

import hrnas_kernels
from hrnas_kernels.nn import DynamicTokenTransformer

from .block_shape import BlockShape


class CompactTokenTransformer(DynamicTokenTransformer):
    """A transformer whose tokens are all alive by construction: same parameters and math,
    but no token-mask lookup (a data-dependent ``nonzero`` that ``torch.export`` cannot trace);
    it calls the public functional op on the eager reference."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm_in, norm_out = self.input_norm, self.reverse_norm
        return hrnas_kernels.token_transformer(
            x,
            self.coords,
            self.input_proj.weight.flatten(1),
            norm_in.weight,
            norm_in.bias,
            norm_in.running_mean,
            norm_in.running_var,
            self.encoder.weights(),
            self.query_embed.weight,
            self.decoder.weights(),
            self.reverse_proj.weight.flatten(1),
            norm_out.weight,
            norm_out.bias,
            norm_out.running_mean,
            norm_out.running_var,
            num_heads=self.num_heads,
            downsample=self.downsample,
            training=self.training,
            momentum=self.momentum,
            eps=self.eps,
            dropout=self.dropout,
            impl="reference",
        )


class CompactBlock(BlockShape):
    """Args: ``in_channels``, ``out_channels``, ``stride`` as ``MixedBlock``; ``kernel_sizes`` and
    ``channels``: the kept kernel sizes and the channels kept for each (all positive);
    ``bn_momentum``, ``bn_eps``; ``fusion``: a ``Fusion("reference")``; ``transformer``: the
    space's ``TransformerSpec`` and ``tokens`` the alive tokens of the block's transformer (0:
    none). The transformer runs on the plain eager reference."""

    def __init__(
        self,
        in_channels,
        out_channels: int,
        stride: int,
        kernel_sizes,
        channels,
        *,
        bn_momentum: float,
        bn_eps: float,
        fusion: nn.Module,
        transformer=None,
        tokens: int = 0,
    ):
        super().__init__(in_channels, out_channels, stride, fusion)
        if tokens:
            self.transformer = self.make_transformer(
                transformer, tokens, "reference", CompactTokenTransformer
            )
        self.kernel_sizes, self.channels = tuple(kernel_sizes), tuple(channels)
        if len(self.kernel_sizes) != len(self.channels) or not all(
            isinstance(c, int) and c > 0 for c in self.channels
        ):
            raise ValueError(
                f"a compact block needs one positive channel count per kept kernel size, got "
                f"kernel_sizes={list(kernel_sizes)} channels={list(channels)}"
            )
        alive = sum(self.channels)
        self.hidden = alive
        if not alive:
            return
        bn = {"momentum": bn_momentum, "eps": bn_eps}
        self.expand = nn.ModuleList(nn.Conv2d(c, alive, 1, bias=False) for c in self.in_channels)
        self.expand_bn = nn.BatchNorm2d(alive, **bn)
        self.dw = nn.ModuleList(
            nn.Conv2d(c, c, k, stride, k // 2, groups=c, bias=False)
            for k, c in zip(self.kernel_sizes, self.channels)
        )
        self.dw_bn = nn.BatchNorm2d(alive, **bn)
        self.project = nn.Conv2d(alive, out_channels, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(out_channels, **bn)

    def alive_per_kernel(self) -> list[tuple[int, int]]:
        return list(zip(self.kernel_sizes, self.channels))

    def tokens(self) -> int:
        return 0 if self.transformer is None else self.transformer.num_tokens

    def forward(self, x):
        xs = self.inputs(x)
        shortcut = self.shortcut_path(xs)
        if not self.hidden:
            return shortcut
        parts = [conv(xb) for conv, xb in zip(self.expand, xs)]
        pre = self.fusion(parts, xs[0].shape[-2:], "bilinear", None)
        h = torch.relu(self.expand_bn(pre))
        groups = torch.split(h, list(self.channels), 1)
        h = torch.cat([conv(g) for conv, g in zip(self.dw, groups)], 1)
        h = torch.relu(self.dw_bn(h))
        return self.project_bn(self.project(h)) + shortcut
