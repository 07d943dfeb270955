"""Masked mixed-kernel depthwise conv + BatchNorm + activation (the HR-NAS searching block's
hidden layer): ``act(BN(depthwise_conv_k(x)))`` with a kernel size per channel group."""

from .api import mixed_dwconv_bn_act
from .module import MixedDepthwiseConvBNAct, fuse_depthwise

__all__ = ["mixed_dwconv_bn_act", "MixedDepthwiseConvBNAct", "fuse_depthwise"]
