"""Multi-resolution fusion (the HRNet fuse step): ``act(sum_j resize(x_j, size))``."""

from .api import multires_fusion
from .module import MultiResolutionFusion

__all__ = ["multires_fusion", "MultiResolutionFusion"]
