"""The HR-NAS multi-branch network topology, shared by the supernet and the compact export.

``HRNet`` builds what HRNAS_SPEC.md section 1 describes from a ``SpaceSpec`` and a block factory
``make_block(name, in_channels, out_channels, stride)``: the stem, one ``FuseModule`` and one
``ParallelModule`` per stage, and the task head. The supernet's factory makes masked
``MixedBlock``s, the export's makes ``CompactBlock``s; names are the module paths, in the
authors' ``get_named_block_list`` order (Fuse paths ``[i][j]``, new branches, Parallel
branch-major, head ``incre`` then ``downsamp``, then ``transform``).

Fusion (``FuseModule``): output ``i`` is ``ReLU(sum_j path_ij(x_j))`` over neighbours
``j in {i-1, i, i+1}``: ``j == i`` a stride-1 block, ``j == i-1`` a stride-2 block, ``j == i+1``
a stride-1 block at the low resolution whose output is resized (nearest) to branch ``i``. The
authors upsample x2 (nearest) and then bilinearly resize to the target; for inputs divisible by
32 that resize is the identity and both agree exactly. A branch the stage adds is
``block(out_{i-1} -> out_i, stride 2)`` on the fused output ``i - 1``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import init

from ..layers.block_shape import BlockShape, Size, conv_out
from ..space import ClassificationHead, SpaceSpec


def conv_bn_relu(cin: int, cout: int, kernel: int, stride: int, bn_momentum, bn_eps):
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(cout, momentum=bn_momentum, eps=bn_eps),
        nn.ReLU(inplace=True),
    )


def _conv_macs(conv: nn.Conv2d, out: Size) -> int:
    k = conv.kernel_size[0] * conv.kernel_size[1]
    return conv.in_channels // conv.groups * conv.out_channels * k * out[0] * out[1]


class FuseModule(nn.Module):
    """Neighbour-only fusion from ``len(in_channels)`` to ``len(out_channels)`` branches."""

    def __init__(self, name, in_channels, out_channels, make_block, fusion):
        super().__init__()
        self.num_in, self.num_out = len(in_channels), len(out_channels)
        self.paths = nn.ModuleDict()
        for i in range(min(self.num_in, self.num_out)):
            for j in (i - 1, i, i + 1):
                if 0 <= j < self.num_in:
                    stride = 2 if j < i else 1
                    key = f"{i}_{j}"
                    self.paths[key] = make_block(
                        f"{name}.paths.{key}", in_channels[j], out_channels[i], stride
                    )
        self.new = nn.ModuleDict(
            {
                str(i): make_block(f"{name}.new.{i}", out_channels[i - 1], out_channels[i], 2)
                for i in range(self.num_in, self.num_out)
            }
        )
        self.fusion = fusion

    def _sources(self, i):
        return [j for j in (i - 1, i, i + 1) if f"{i}_{j}" in self.paths]

    def forward(self, xs):
        outs = []
        for i in range(min(self.num_in, self.num_out)):
            ys = [self.paths[f"{i}_{j}"](xs[j]) for j in self._sources(i)]
            outs.append(self.fusion(ys, xs[i].shape[-2:], "nearest", "relu"))
        for i in range(self.num_in, self.num_out):
            outs.append(self.new[str(i)](outs[i - 1]))
        return outs

    def sizes(self, sizes: list[Size], record) -> list[Size]:
        outs = []
        for i in range(min(self.num_in, self.num_out)):
            for j in self._sources(i):
                record(self.paths[f"{i}_{j}"], [sizes[j]])
            outs.append(sizes[i])
        for i in range(self.num_in, self.num_out):
            record(self.new[str(i)], [outs[i - 1]])
            outs.append(conv_out(outs[i - 1], 2))
        return outs


class ParallelModule(nn.Module):
    """``num_blocks[b]`` residual blocks on each branch ``b``."""

    def __init__(self, name, num_blocks, channels, make_block):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(*(make_block(f"{name}.branches.{b}.{k}", c, c, 1) for k in range(n)))
            for b, (n, c) in enumerate(zip(num_blocks, channels))
        )

    def forward(self, xs):
        return [branch(x) for branch, x in zip(self.branches, xs)]

    def sizes(self, sizes: list[Size], record) -> list[Size]:
        for branch, size in zip(self.branches, sizes):
            for block in branch:
                record(block, [size])
        return sizes


class ClassificationHeadModule(nn.Module):
    """``x = incre_0(x_0); x = incre_{i+1}(x_{i+1}) + downsamp_i(x)``, then
    ``ConvBNReLU(-> last_channel, 1x1)``, global average pool, dropout, linear."""

    def __init__(self, spec: SpaceSpec, in_channels, num_classes, make_block, fusion):
        super().__init__()
        head = spec.head_channels
        self.incre = nn.ModuleList(
            make_block(f"head.incre.{i}", c, h, 1)
            for i, (c, h) in enumerate(zip(in_channels, head))
        )
        self.downsamp = nn.ModuleList(
            make_block(f"head.downsamp.{i}", head[i], head[i + 1], 2) for i in range(len(head) - 1)
        )
        self.final = conv_bn_relu(head[-1], spec.last_channel, 1, 1, spec.bn_momentum, spec.bn_eps)
        self.dropout = nn.Dropout(spec.head.dropout)
        self.classifier = nn.Linear(spec.last_channel, num_classes)
        self.fusion = fusion

    def forward(self, xs):
        x = self.incre[0](xs[0])
        for i, down in enumerate(self.downsamp):
            y = self.incre[i + 1](xs[i + 1])
            x = self.fusion([y, down(x)], y.shape[-2:], "nearest", None)
        x = self.final(x).mean((2, 3))
        return self.classifier(self.dropout(x))

    def sizes(self, sizes, record) -> int:
        for block, size in zip(self.incre, sizes):
            record(block, [size])
        for block, size in zip(self.downsamp, sizes):
            record(block, [size])
        linear = self.classifier.in_features * self.classifier.out_features
        return _conv_macs(self.final[0], sizes[-1]) + linear


class DenseHeadModule(nn.Module):
    """One block over all branches (upsampled to the first) to ``last_channel``, then a 1x1
    classifier with bias: ``[N, num_classes, H/4, W/4]``."""

    def __init__(self, spec: SpaceSpec, in_channels, num_classes, make_block):
        super().__init__()
        self.transform = make_block("head.transform", tuple(in_channels), spec.last_channel, 1)
        self.classifier = nn.Conv2d(spec.last_channel, num_classes, 1)

    def forward(self, xs):
        return self.classifier(self.transform(xs))

    def sizes(self, sizes, record) -> int:
        record(self.transform, list(sizes))
        return _conv_macs(self.classifier, sizes[0])


class HRNet(nn.Module):
    """Stem, stages, head. ``make_block(name, in_channels, out_channels, stride)``; ``fusion``
    a ``Fusion`` module shared by every fusion point."""

    def __init__(self, spec: SpaceSpec, num_classes: int, make_block, fusion: nn.Module):
        super().__init__()
        self.space, self.num_classes = spec, num_classes
        c0, c1 = spec.stem_channels
        bn = (spec.bn_momentum, spec.bn_eps)
        self.stem = nn.Sequential(conv_bn_relu(3, c0, 3, 2, *bn), conv_bn_relu(c0, c1, 3, 2, *bn))
        features, channels = [], (c1,)
        for s, stage in enumerate(spec.stages):
            out = spec.stage_channels(s)
            features.append(FuseModule(f"features.{2 * s}", channels, out, make_block, fusion))
            features.append(
                ParallelModule(f"features.{2 * s + 1}", stage.num_blocks, out, make_block)
            )
            channels = out
        self.features = nn.Sequential(*features)
        if isinstance(spec.head, ClassificationHead):
            self.head = ClassificationHeadModule(spec, channels, num_classes, make_block, fusion)
        else:
            self.head = DenseHeadModule(spec, channels, num_classes, make_block)
        self.fusion = fusion

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [N, 3, H, W]`` -> logits ``[N, classes]`` (cls) or ``[N, classes, H', W']`` at the
        stem's 1/4 resolution (seg/kpt), ``H' = ceil(ceil(H / 2) / 2)``."""
        xs = [self.stem(x)]
        for module in self.features:
            xs = module(xs)
        return self.head(xs)

    def blocks(self) -> list[tuple[str, BlockShape]]:
        """Every searching block with its module path, in construction order."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, BlockShape)]

    def block_input_sizes(self, input_size: Size) -> tuple[dict, int]:
        """(``{block: input sizes}`` at this image size, MACs of the convs and linears outside
        the blocks: stem, classification conv and classifier)."""
        if len(input_size) != 2 or not all(isinstance(s, int) and s > 0 for s in input_size):
            raise ValueError(f"input_size must be two positive ints (H, W), got {input_size!r}")
        found = {}

        def record(block, sizes):
            found[block] = sizes

        size = tuple(input_size)
        fixed = 0
        for unit in self.stem:
            size = conv_out(size, unit[0].stride[0])
            fixed += _conv_macs(unit[0], size)
        sizes = [size]
        for module in self.features:
            sizes = module.sizes(sizes, record)
        fixed += self.head.sizes(sizes, record)
        return found, fixed

    def macs(self, input_size: Size | None = None) -> int:
        """Multiply-accumulates of one image at ``input_size`` (default: the space's), counting
        convs and linears of alive channels only (BN, activations and resizes excluded)."""
        found, fixed = self.block_input_sizes(tuple(input_size or self.space.input_size))
        return fixed + sum(b.macs(found[b], b.alive_per_kernel()) for _, b in self.blocks())


def init_weights(net: nn.Module, scheme: str) -> None:
    """``mnas``: convs He-normal (fan_out), linears N(0, 0.01), BN gamma 1 / beta 0.
    ``heatmap`` (the keypoint config): convs N(0, 0.001), biases 0."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            if scheme == "heatmap":
                init.normal_(m.weight, std=0.001)
            else:
                init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            init.normal_(m.weight, std=0.01)
            if m.bias is not None:
                init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            init.ones_(m.weight)
            init.zeros_(m.bias)
