"""Drop-in ``nn.Module``s backed by the fused ops."""

from .mixed_dwconv_bn_act import MixedDepthwiseConvBNAct, fuse_depthwise
from .multires_fusion import MultiResolutionFusion
from .token_transformer import DynamicTokenTransformer

__all__ = [
    "DynamicTokenTransformer",
    "MixedDepthwiseConvBNAct",
    "MultiResolutionFusion",
    "fuse_depthwise",
]
