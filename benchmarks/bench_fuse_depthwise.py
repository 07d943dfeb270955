"""Benchmark of ``hrnas_kernels.nn.fuse_depthwise`` as a drop-in: a whole MobileNetV2, eager vs
the same model with every depthwise conv + BN + ReLU6 swapped for the fused module.

The model is MobileNetV2 (Sandler et al., CVPR 2018, table 2: a 3x3 stride-2 stem of 32 channels,
17 inverted-residual blocks of expansion 6 (the first 1) with (channels, repeats, stride)
(16, 1, 1), (24, 2, 2), (32, 3, 2), (64, 4, 2), (96, 3, 1), (160, 3, 2), (320, 1, 1), a 1x1 conv
to 1280, global average pooling and a 1000-way classifier), written here as nn.Sequential runs of
``Conv2d -> BatchNorm2d -> ReLU6`` so that ``fuse_depthwise`` finds its 17 depthwise convs (all
3x3, stride 1 or 2). Only those change: the pointwise convs, the stem and the classifier stay
eager in both providers, so the ratio is what a user of the drop-in sees on the whole network.

Cases: N=8 at 224x224, fp32: training (batch statistics; modes ``forward`` and ``full`` =
forward + backward to every parameter) and eval (``torch.no_grad`` inference, ``forward``).

Providers (baseline ``eager``): ``eager`` (the unfused model), ``native`` and ``triton`` (GPU):
``fuse_depthwise(model, impl=...)`` on a copy of it (same weights).

Run ``python benchmarks/bench_fuse_depthwise.py --help``; see benchmarks/README.md.
"""

from __future__ import annotations

import copy
import sys

import _harness as h
import torch
from torch import nn

from hrnas_kernels.nn import fuse_depthwise

OP = "fuse_depthwise_mobilenet_v2"
CASES = [
    dict(N=8, H=224, width=1.0, train=True),
    dict(N=8, H=224, width=1.0, train=False),
]
# Smoke runs: a quarter-width network on small images.
QUICK_CASES = [dict(N=2, H=64, width=0.25, train=True)]
PROVIDERS = ("eager", "native", "triton")
BASELINE = "eager"
MODES = ("forward", "full")
THREADS = (1, 2)
MEMORY_FORMATS = ("nchw", "channels_last")
DTYPE = torch.float32

# (expansion, output channels, repeats, stride of the first repeat): MobileNetV2, table 2
_BLOCKS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1)]
_BLOCKS += [(6, 160, 3, 2), (6, 320, 1, 1)]
DEPTHWISE_CONVS = sum(repeats for _, _, repeats, _ in _BLOCKS)  # one per block: 17


def _channels(c: float) -> int:
    """Width-scaled channels: the nearest multiple of 8, at least 8 and at least 90% of c."""
    rounded = max(8, int(c + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * c else rounded


def _conv_bn(c_in: int, c_out: int, k: int, stride: int, groups: int, act: bool) -> list:
    layers = [nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False)]
    layers.append(nn.BatchNorm2d(c_out))
    return layers + [nn.ReLU6(inplace=True)] if act else layers


class _InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int):
        super().__init__()
        hidden = c_in * expansion
        layers = _conv_bn(c_in, hidden, 1, 1, 1, True) if expansion != 1 else []
        layers += _conv_bn(hidden, hidden, 3, stride, hidden, True)  # the depthwise conv
        layers += _conv_bn(hidden, c_out, 1, 1, 1, False)
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


def mobilenet_v2(width: float = 1.0, classes: int = 1000) -> nn.Module:
    c_in = _channels(32 * width)
    layers = [nn.Sequential(*_conv_bn(3, c_in, 3, 2, 1, True))]
    for expansion, c, repeats, stride in _BLOCKS:
        c_out = _channels(c * width)
        for i in range(repeats):
            layers.append(_InvertedResidual(c_in, c_out, stride if i == 0 else 1, expansion))
            c_in = c_out
    last = _channels(1280 * max(1.0, width))
    layers.append(nn.Sequential(*_conv_bn(c_in, last, 1, 1, 1, True)))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(last, classes)]
    return nn.Sequential(*layers)


def label(case: dict) -> str:
    mode = "train" if case["train"] else "eval"
    return f"MobileNetV2 x{case['width']:g} N{case['N']} {case['H']}x{case['H']} {mode}"


def setup(case, provider, mode, device, dtype, memory_format):
    reason = h.provider_unavailable(provider, device)
    if reason:
        return reason
    if not case["train"] and mode != "forward":
        return "eval cases time the inference forward only"
    torch.manual_seed(0)
    model = mobilenet_v2(case["width"]).to(device=device, dtype=dtype)
    model = model.to(memory_format=memory_format).train(case["train"])
    if provider != "eager":
        model = copy.deepcopy(model)
        fused = fuse_depthwise(model, impl=provider)
        if fused != DEPTHWISE_CONVS:
            raise RuntimeError(f"fuse_depthwise replaced {fused} of {DEPTHWISE_CONVS} convs")
    gen = torch.Generator().manual_seed(0)
    n, s = case["N"], case["H"]
    x = torch.randn(n, 3, s, s, generator=gen, dtype=dtype)
    x = x.to(device=device, memory_format=memory_format)
    if case["train"]:

        def forward():
            return model(x)
    else:

        def forward():
            with torch.no_grad():
                return model(x)

    fn = h.autograd_call(forward, list(model.parameters()), mode)
    return h.Prepared(fn=fn)


def main(argv=None) -> int:
    return h.run(
        op=OP,
        cases=CASES,
        quick_cases=QUICK_CASES,
        providers=PROVIDERS,
        baseline=BASELINE,
        setup=setup,
        label=label,
        args=h.parse_args(__doc__, argv, modes=MODES),
        threads=THREADS,
        memory_formats=MEMORY_FORMATS,
    )


if __name__ == "__main__":
    sys.exit(main())
