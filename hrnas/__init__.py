"""HR-NAS: resource-aware search of efficient high-resolution networks (Ding et al., CVPR 2021).

The search space, supernet, search loop, export and CLI build on ``hrnas_kernels``. This package
is still being built: see the README's status table for what exists today.
"""

__version__ = "0.1.0"
