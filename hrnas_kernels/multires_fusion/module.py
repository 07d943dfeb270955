"""``MultiResolutionFusion``: the fused op as a drop-in ``nn.Module``."""

import torch
from torch import nn

from .api import multires_fusion


class MultiResolutionFusion(nn.Module):
    """``forward(inputs) = act(sum_j resize(inputs[j], size))``; see ``multires_fusion``.

    Stateless (no parameters). ``size=None`` fuses onto the first input's resolution.
    """

    def __init__(
        self, size=None, mode: str = "bilinear", activation: str | None = "relu", impl: str = "auto"
    ):
        super().__init__()
        self.size, self.mode, self.activation, self.impl = size, mode, activation, impl

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return multires_fusion(inputs, self.size, self.mode, self.activation, impl=self.impl)

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, mode={self.mode!r}, activation={self.activation!r}, "
            f"impl={self.impl!r}"
        )
