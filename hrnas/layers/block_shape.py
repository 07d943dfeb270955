"""What the searching block and its compact export share: the shortcut, the output size and the
analytic cost.

The block (HRNAS_SPEC.md section 1.3, ``InvertedResidualChannels``) with inputs ``x_b`` (one
input, or the branches of the dense head, which the authors concatenate at 1/4 resolution):

    pre  = sum_b resize_bilinear(W_e[:, cols_b] @ x_b)           expand 1x1 over alive rows
    h    = ReLU(BN_e(pre))
    d    = ReLU(BN_d(depthwise_{k_c}(h_c, stride)))               mixed depthwise, alive channels
    out  = BN_p(W_p[:, alive] @ d) + shortcut(x)

``shortcut(x) = x`` when ``stride == 1`` and the block keeps its (single) input's channels,
otherwise ``Conv2d(inp -> oup, 1x1, stride, groups=gcd(inp, oup), bias=False)`` (no BN) on the
concatenated, upsampled inputs. With a token transformer T (HRNAS_SPEC.md section 2) the
shortcut of a residual block is ``T(x)`` (which adds ``x`` itself), of another block
``conv(x) + T(x)``. A transformer with no alive token is left out, a block with no alive
channel is its shortcut.

Transformer MACs per sample with L alive tokens of dimension d (grid²), C in and C_out out
channels: ``L d (C + 2 + C_out)`` (input and reverse projections) + ``12 L d²`` (q/k/v/out
projections and the two-layer FFN of the encoder and of the decoder) + ``4 L² d`` (scores and
weighted values, in both layers). The marginal MACs of one more token at L alive are
``d (C + 2 + C_out) + 12 d² + 4 d (2L - 1)``: the linear part plus the quadratic attention term.

Expanding each branch at its own resolution and then upsampling is the authors' "upsample,
concatenate, expand" exactly (bilinear resizing is a per-channel linear map, the 1x1 conv a
channel mix, so they commute), at a fraction of the MACs: see docs/SUPERNET.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from hrnas_kernels.nn import DynamicTokenTransformer

Size = tuple[int, int]


def transformer_macs(in_channels: int, out_channels: int, tokens: int, dim: int) -> int:
    """MACs of one token transformer (see the module docstring); 0 without tokens."""
    return (
        tokens * dim * (in_channels + 2 + out_channels)
        + 12 * tokens * dim * dim
        + (4 * tokens * tokens * dim)
    )


def conv_out(size: Size, stride: int) -> Size:
    """Spatial size after a conv with padding ``k // 2`` and this stride."""
    return ((size[0] - 1) // stride + 1, (size[1] - 1) // stride + 1)


class BlockShape(nn.Module):
    """Base of the supernet block and the compact block: channels, stride, shortcut, MACs.

    Args:
        in_channels: an int, or one int per input branch (the dense head; stride must be 1).
        out_channels, stride: as the block's.
        fusion: a ``Fusion`` module, used to resize the head's branches.
    """

    def __init__(self, in_channels, out_channels: int, stride: int, fusion: nn.Module):
        super().__init__()
        self.multi_input = not isinstance(in_channels, int)
        self.in_channels = tuple(in_channels) if self.multi_input else (in_channels,)
        if self.multi_input and stride != 1:
            raise ValueError("a block over several input branches must have stride 1")
        if stride not in (1, 2):
            raise ValueError(f"block stride must be 1 or 2, got {stride!r}")
        self.out_channels, self.stride = out_channels, stride
        total = sum(self.in_channels)
        self.residual = not self.multi_input and stride == 1 and total == out_channels
        self.shortcut = (
            None
            if self.residual
            else nn.Conv2d(
                total,
                out_channels,
                1,
                stride,
                groups=math.gcd(total, out_channels),
                bias=False,
            )
        )
        self.fusion = fusion
        self.transformer = None

    def tokens(self) -> int:
        """Alive transformer tokens (0 without a transformer)."""
        return 0 if self.transformer is None else self.transformer.alive_tokens

    def inputs(self, x) -> list[torch.Tensor]:
        """The block's inputs as a list (one tensor, or the head's branches)."""
        if self.multi_input:
            if not isinstance(x, (list, tuple)) or len(x) != len(self.in_channels):
                raise ValueError(
                    f"this block takes a list of {len(self.in_channels)} branch tensors"
                )
            return list(x)
        return [x]

    def shortcut_path(self, xs: list[torch.Tensor]) -> torch.Tensor:
        if self.multi_input:
            size = xs[0].shape[-2:]
            x = torch.cat([xs[0]] + [self.fusion([x], size, "bilinear", None) for x in xs[1:]], 1)
        else:
            x = xs[0]
        transformer = self.transformer if self.tokens() else None
        if self.residual:
            return x if transformer is None else transformer(x)
        out = self.shortcut(x)
        if transformer is None:
            return out
        # the transformer halves with floor, strided convs with ceil: resize odd sizes to match
        return self.fusion([out, transformer(x)], out.shape[-2:], "bilinear", None)

    def out_size(self, in_sizes: Sequence[Size]) -> Size:
        return conv_out(in_sizes[0], self.stride)

    def unit_cost(self, kernel_size: int, in_sizes: Sequence[Size]) -> int:
        """MACs one hidden channel of this kernel size costs: its expand row (at each input's
        resolution), its depthwise filter and its project column (at the output resolution)."""
        h, w = self.out_size(in_sizes)
        expand = sum(c * s[0] * s[1] for c, s in zip(self.in_channels, in_sizes))
        return expand + (kernel_size * kernel_size + self.out_channels) * h * w

    def macs(self, in_sizes: Sequence[Size], alive: Sequence[tuple[int, int]]) -> int:
        """Conv MACs of the block with ``alive = [(kernel_size, channels), ...]``: the alive
        hidden channels' costs plus the shortcut conv (BN, ReLU and resizes are not counted,
        as in the authors' profiler and ``torch.utils.flop_counter``)."""
        h, w = self.out_size(in_sizes)
        total = sum(count * self.unit_cost(k, in_sizes) for k, count in alive)
        if self.shortcut is not None:
            total += self.shortcut.in_channels // self.shortcut.groups * self.out_channels * h * w
        if self.tokens():
            t = self.transformer
            total += transformer_macs(t.in_channels, t.out_channels, self.tokens(), t.grid**2)
        return total

    def token_cost(self) -> int:
        """Marginal MACs of one more token at the current alive count (see the docstring)."""
        t, alive = self.transformer, max(self.tokens(), 1)
        d = t.grid**2
        return d * (t.in_channels + 2 + t.out_channels) + 12 * d * d + 4 * d * (2 * alive - 1)

    def shape_dict(self) -> dict:
        channels = list(self.in_channels) if self.multi_input else self.in_channels[0]
        return {"in_channels": channels, "out_channels": self.out_channels, "stride": self.stride}

    def transformer_allowed(self, spec) -> bool:
        """Whether the space (``TransformerSpec``) puts a transformer on this block."""
        return spec.enabled and (self.residual or spec.downsampling)

    def make_transformer(self, spec, num_tokens: int, impl: str, cls=DynamicTokenTransformer):
        """This block's transformer (a ``cls``) with ``num_tokens`` tokens (None for 0)."""
        if not num_tokens:
            return None
        if not self.transformer_allowed(spec):
            raise ValueError(
                f"a {'residual' if self.residual else 'non-residual'} block has no transformer "
                f"in this space (transformers enabled={spec.enabled}, "
                f"downsampling={spec.downsampling}), got {num_tokens} tokens"
            )
        return cls(
            sum(self.in_channels),
            None if self.residual else self.out_channels,
            num_tokens=num_tokens,
            downsample=self.stride == 2,
            dropout=spec.dropout,
            impl=impl,
        )
