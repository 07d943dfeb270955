"""HR-NAS: resource-aware search of efficient high-resolution networks (Ding et al., CVPR 2021).

Search spaces (``list_spaces``, ``build_supernet``), the masked supernet with its searchable
units, and export of a searched network (``export_arch``, ``build_from_arch``,
``export_subnet``), built on the fused ops of ``hrnas_kernels``.
"""

from .arch import export_arch
from .export import CompactNet, build_from_arch, export_subnet
from .space import SpaceSpec, StageSpec
from .supernet.registry import build_supernet, get_space, list_spaces
from .supernet.supernet import SearchUnit, Supernet

__version__ = "0.1.0"
__all__ = [
    "CompactNet",
    "build_from_arch",
    "export_arch",
    "export_subnet",
    "SearchUnit",
    "SpaceSpec",
    "StageSpec",
    "Supernet",
    "build_supernet",
    "get_space",
    "list_spaces",
]
