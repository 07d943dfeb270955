"""Multi-resolution fusion for the networks: ``act(sum_j resize(x_j, size))``.

``Fusion`` calls the fused op ``hrnas_kernels.multires_fusion`` with an ``impl``: the supernet's
(so it runs on ``impl="reference"`` too), or ``"reference"`` in the compact exported network,
where it is plain eager PyTorch (``F.interpolate``, a sum and the activation) that
``torch.export`` and ``torch.compile`` trace. It is a stateless module so that ``set_impl``
finds it with the other modules.
"""

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
