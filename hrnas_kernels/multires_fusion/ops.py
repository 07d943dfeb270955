"""Dispatcher contract of multi-resolution fusion: schemas, fake kernels, Triton registration.

Imports torch only. Two op families share one schema and one fake each:
``multires_fusion_{fwd,bwd}`` carry the C++ kernels (CPU and CUDA, registered by
``csrc/multires_fusion``), ``multires_fusion_{fwd,bwd}_triton`` the Triton kernels (a dispatch key
holds one kernel, so the families cannot share an op name). Triton is imported only when a Triton
kernel actually runs.

    fwd(inputs: list of [N, C, H_j, W_j], size: [H, W], mode, activation) -> out [N, C, H, W]
    bwd(grad_out [N, C, H, W], out, input_sizes: [H_0, W_0, H_1, W_1, ...], mode, activation)
        -> [grad of each input]

``mode`` is "bilinear" or "nearest", ``activation`` "none", "relu" or "relu6". Outputs and
gradients are laid out as ``_layout.output_memory_format`` of inputs[0] / out.
"""

import torch

from .._impl import TRITON_INTERPRET
from .._layout import output_memory_format

_FWD_SCHEMA = "(Tensor[] inputs, SymInt[] size, str mode, str activation) -> Tensor"
_BWD_SCHEMA = (
    "(Tensor grad_out, Tensor out, SymInt[] input_sizes, str mode, str activation) -> Tensor[]"
)


def _fwd_fake(inputs, size, mode, activation):
    x0 = inputs[0]
    return torch.empty(
        (x0.shape[0], x0.shape[1], size[0], size[1]),
        dtype=x0.dtype,
        device=x0.device,
        memory_format=output_memory_format(x0),
    )


def _bwd_fake(grad_out, out, input_sizes, mode, activation):
    fmt = output_memory_format(out)
    return [
        torch.empty(
            (out.shape[0], out.shape[1], input_sizes[2 * j], input_sizes[2 * j + 1]),
            dtype=out.dtype,
            device=out.device,
            memory_format=fmt,
        )
        for j in range(len(input_sizes) // 2)
    ]


for _suffix in ("", "_triton"):
    torch.library.define(f"hrnas_kernels::multires_fusion_fwd{_suffix}", _FWD_SCHEMA)
    torch.library.define(f"hrnas_kernels::multires_fusion_bwd{_suffix}", _BWD_SCHEMA)
    torch.library.register_fake(f"hrnas_kernels::multires_fusion_fwd{_suffix}", _fwd_fake)
    torch.library.register_fake(f"hrnas_kernels::multires_fusion_bwd{_suffix}", _bwd_fake)


def _fwd_triton(inputs, size, mode, activation):
    from . import triton as kernels

    return kernels.fwd(inputs, size, mode, activation)


def _bwd_triton(grad_out, out, input_sizes, mode, activation):
    from . import triton as kernels

    return kernels.bwd(grad_out, out, input_sizes, mode, activation)


# Under TRITON_INTERPRET=1 the Triton kernels also serve CPU tensors: that is how CI tests them.
for _device in ("cuda", "cpu") if TRITON_INTERPRET else ("cuda",):
    torch.library.impl("hrnas_kernels::multires_fusion_fwd_triton", _device, _fwd_triton)
    torch.library.impl("hrnas_kernels::multires_fusion_bwd_triton", _device, _bwd_triton)

fwd = torch.ops.hrnas_kernels.multires_fusion_fwd.default
bwd = torch.ops.hrnas_kernels.multires_fusion_bwd.default
fwd_triton = torch.ops.hrnas_kernels.multires_fusion_fwd_triton.default
bwd_triton = torch.ops.hrnas_kernels.multires_fusion_bwd_triton.default
