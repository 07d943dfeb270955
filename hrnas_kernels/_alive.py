"""The scatter of compact gradients back to full size, shared by the autograd functions of the
searched ops (``mixed_dwconv_bn_act``, ``token_transformer``): their kernels see only the alive
channels or tokens, and the parameters stay full size.
"""

import torch


def expand(grad: torch.Tensor, index: torch.Tensor | None, size: int, dim: int = 0) -> torch.Tensor:
    """``grad``, compact along ``dim`` (entry i belongs to unit ``index[i]``), at full ``size``
    along ``dim``: the entries of units outside ``index`` exactly zero. ``grad`` itself when
    ``index`` is None (every unit alive)."""
    if index is None:
        return grad
    shape = list(grad.shape)
    shape[dim] = size
    return grad.new_zeros(shape).index_copy_(dim, index, grad)
