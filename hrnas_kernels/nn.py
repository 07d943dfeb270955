"""Drop-in ``nn.Module``s backed by the fused ops."""

from .multires_fusion import MultiResolutionFusion

__all__ = ["MultiResolutionFusion"]
