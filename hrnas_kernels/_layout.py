"""The output memory-format rule shared by every op, its fake kernels and its C++ kernels.

An op writes its output channels-last only when the deciding tensor is channels-last dense and
*not* also NCHW-contiguous; shapes that are both (C == 1, or H == W == 1) resolve to NCHW.
``csrc/common/checks.h: output_memory_format`` implements the same rule: the two must agree, or
``torch.compile`` would see strides the kernels do not produce.
"""

import torch


def output_memory_format(t: torch.Tensor) -> torch.memory_format:
    if (
        t.dim() == 4
        and not t.is_contiguous()
        and t.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.channels_last
    return torch.contiguous_format
