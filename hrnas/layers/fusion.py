"""Multi-resolution fusion for the networks: ``act(sum_j resize(x_j, size))``.

``Fusion`` calls the fused op ``hrnas_kernels.multires_fusion`` with the network's ``impl`` (so
the supernet runs on ``impl="reference"`` too); ``PlainFusion`` is the same math in plain
PyTorch for the compact exported network, which must not depend on the custom ops.
Both are stateless modules so that ``set_impl`` finds the former with the other modules.
"""

import torch
import torch.nn.functional as F
from torch import nn

import hrnas_kernels


class Fusion(nn.Module):
    """``forward(inputs, size, mode, activation)``: the fused op on ``self.impl``."""

    def __init__(self, impl: str = "auto"):
        super().__init__()
        self.impl = impl

    def forward(self, inputs, size, mode: str, activation):
        return hrnas_kernels.multires_fusion(inputs, size, mode, activation, impl=self.impl)

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}"


class PlainFusion(nn.Module):
    """``forward(inputs, size, mode, activation)`` with ``F.interpolate`` (bilinear with
    ``align_corners=False``, or nearest), a sum and the activation."""

    def forward(self, inputs, size, mode: str, activation):
        out = None
        for x in inputs:
            if tuple(x.shape[-2:]) != tuple(size):
                align = False if mode == "bilinear" else None
                x = F.interpolate(x, size=tuple(size), mode=mode, align_corners=align)
            out = x if out is None else out + x
        if activation == "relu":
            return torch.relu(out)
        return out
