"""Fused, sparsity-aware PyTorch ops for HR-NAS and for any model that wants them.

Schemas and fake kernels are registered first (pure Python, always present), then the C++
extension ``_C`` is loaded if it was built: loading it registers the CPU/CUDA kernels. Whatever
fails to load is reported by ``available_impls()`` instead of breaking the import.
"""

from . import _impl, _running_stats  # noqa: F401  (schemas before the kernels)
from . import memory as _memory  # noqa: F401
from .mixed_dwconv_bn_act import ops as _mixed_dwconv_bn_act_ops  # noqa: F401  (schemas before kernels)
from .multires_fusion import ops as _multires_fusion_ops  # noqa: F401
from .token_transformer import ops as _token_transformer_ops  # noqa: F401

try:
    from . import _C
except ImportError as _error:  # not built, or built against another torch
    _impl._set_native(None, f"{type(_error).__name__}: {_error}")
else:
    _impl._set_native(_C, None)

from . import nn  # noqa: E402
from ._impl import available_impls, cpu_isa  # noqa: E402
from .memory import cpu_output_pool_info, release_cpu_output_pool  # noqa: E402
from .mixed_dwconv_bn_act import mixed_dwconv_bn_act  # noqa: E402
from .multires_fusion import multires_fusion  # noqa: E402
from .token_transformer import token_transformer  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "available_impls",
    "cpu_isa",
    "cpu_output_pool_info",
    "mixed_dwconv_bn_act",
    "multires_fusion",
    "nn",
    "release_cpu_output_pool",
    "token_transformer",
]
