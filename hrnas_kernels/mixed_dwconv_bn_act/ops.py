"""Dispatcher contract of the mixed-kernel depthwise conv + BN + activation: schemas, fakes,
Triton registration. Imports torch only.

The ops work on *compact* channels: ``x`` holds only the alive channels ``[N, A, H, W]``, grouped
by kernel size in order, and every per-channel tensor is already gathered to those A channels
(the public API's autograd function gathers them and scatters the gradients back, so parameters
stay full size and dead rows get exactly zero gradient without the kernels knowing about masks).

    fwd(x [N, A, H, W], weights: per group [A_g, 1, k_g, k_g] (A_g may be 0, sum A_g = A),
        bn_weight [A], bn_bias [A], running_mean [A]?, running_var [A]?,
        stride, use_batch_stats, eps, activation, save_tape=True)
      -> (y [N, A, Ho, Wo], conv [N, A, Ho, Wo] (pre-BN tape for backward: pass it back
          unchanged; without save_tape, for inference, it is empty [0], and with running
          statistics the kernels then write no tape at all),
          mean [A], var [A] (fp32/fp64 statistics: the batch's, biased, or the running ones))
    bwd(grad_y, y, x, conv, weights, bn_weight, bn_bias, mean, var, stride, use_batch_stats, eps,
        activation)
      -> (grad_x, [grad of each group's weights], grad_bn_weight, grad_bn_bias)

Padding is k_g // 2 per group; Ho = (H - 1) // stride + 1. ``activation`` is "none", "relu" or
"relu6"; its gradient mask is y's (the activation passes the gradient where y is strictly inside
its range). A kernel reads the mask from ``y`` or recomputes y from ``conv``, ``mean``, ``var``
and the BN affine exactly as its forward did (same function, same values, so the same bits): the
CPU kernel recomputes, which spares its backward two reads of y per element; the CUDA and Triton
kernels read ``y``. Outputs follow ``_layout.output_memory_format(x)``.
"""

import torch

from .._impl import TRITON_INTERPRET
from .._layout import output_memory_format

_FWD_SCHEMA = (
    "(Tensor x, Tensor[] weights, Tensor bn_weight, Tensor bn_bias, Tensor? running_mean, "
    "Tensor? running_var, int stride, bool use_batch_stats, float eps, str activation, "
    "bool save_tape=True) -> (Tensor, Tensor, Tensor, Tensor)"
)
_BWD_SCHEMA = (
    "(Tensor grad_y, Tensor y, Tensor x, Tensor conv, Tensor[] weights, Tensor bn_weight, "
    "Tensor bn_bias, Tensor mean, Tensor var, int stride, bool use_batch_stats, float eps, "
    "str activation) "
    "-> (Tensor, Tensor[], Tensor, Tensor)"
)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are kept in the accumulation type: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fwd_fake(
    x,
    weights,
    bn_weight,
    bn_bias,
    running_mean,
    running_var,
    stride,
    use_batch_stats,
    eps,
    activation,
    save_tape=True,
):
    n, a, h, w = x.shape
    shape = (n, a, (h - 1) // stride + 1, (w - 1) // stride + 1)
    fmt = output_memory_format(x)
    y = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    if save_tape:
        conv = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    else:
        conv = x.new_empty((0,))
    stats = [torch.empty((a,), dtype=stats_dtype(x.dtype), device=x.device) for _ in range(2)]
    return y, conv, stats[0], stats[1]


def _bwd_fake(grad_y, y, x, conv, weights, bn_weight, *_bias_stats_and_options):
    grad_x = torch.empty(
        x.shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x)
    )
    grad_w = [torch.empty(w.shape, dtype=w.dtype, device=w.device) for w in weights]
    return grad_x, grad_w, torch.empty_like(bn_weight), torch.empty_like(bn_weight)


for _suffix in ("", "_triton"):
    torch.library.define(f"hrnas_kernels::mixed_dwconv_bn_act_fwd{_suffix}", _FWD_SCHEMA)
    torch.library.define(f"hrnas_kernels::mixed_dwconv_bn_act_bwd{_suffix}", _BWD_SCHEMA)
    torch.library.register_fake(f"hrnas_kernels::mixed_dwconv_bn_act_fwd{_suffix}", _fwd_fake)
    torch.library.register_fake(f"hrnas_kernels::mixed_dwconv_bn_act_bwd{_suffix}", _bwd_fake)


def _fwd_triton(*args):
    from . import triton as kernels

    return kernels.fwd(*args)


def _bwd_triton(*args):
    from . import triton as kernels

    return kernels.bwd(*args)


# Under TRITON_INTERPRET=1 the Triton kernels also serve CPU tensors: that is how CI tests them.
for _device in ("cuda", "cpu") if TRITON_INTERPRET else ("cuda",):
    torch.library.impl("hrnas_kernels::mixed_dwconv_bn_act_fwd_triton", _device, _fwd_triton)
    torch.library.impl("hrnas_kernels::mixed_dwconv_bn_act_bwd_triton", _device, _bwd_triton)

fwd = torch.ops.hrnas_kernels.mixed_dwconv_bn_act_fwd.default
bwd = torch.ops.hrnas_kernels.mixed_dwconv_bn_act_bwd.default
fwd_triton = torch.ops.hrnas_kernels.mixed_dwconv_bn_act_fwd_triton.default
bwd_triton = torch.ops.hrnas_kernels.mixed_dwconv_bn_act_bwd_triton.default
