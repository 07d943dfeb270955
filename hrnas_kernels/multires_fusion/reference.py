"""Multi-resolution fusion in plain eager PyTorch: the oracle every kernel is tested against.

    out = act(sum_j resize(x_j, size)),   resize = F.interpolate(align_corners=False for bilinear)

An input already at ``size`` is used as is. This is the HRNet fuse step (HR-NAS
``FuseModule.forward``: every path resized to the target and summed, then ReLU), written to be read,
differentiable by autograd, and exact in float64. The output is laid out like ``inputs[0]``
(``_layout.output_memory_format``).
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .._layout import output_memory_format


def multires_fusion(
    inputs: Sequence[torch.Tensor],
    size: tuple[int, int],
    mode: str = "bilinear",
    activation: str | None = "relu",
) -> torch.Tensor:
    out = None
    for x in inputs:
        if tuple(x.shape[-2:]) != tuple(size):
            align = False if mode == "bilinear" else None
            x = F.interpolate(x, size=tuple(size), mode=mode, align_corners=align)
        out = x if out is None else out + x
    if activation == "relu":
        out = torch.relu(out)
    elif activation == "relu6":
        out = F.relu6(out)
    if out is inputs[0]:
        out = out.clone()
    return out.contiguous(memory_format=output_memory_format(inputs[0]))
