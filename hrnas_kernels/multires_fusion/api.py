"""Public multi-resolution fusion: validation, implementation choice, autograd."""

from collections.abc import Sequence

import torch

from .. import _impl
from . import ops, reference

MAX_INPUTS = 8  # csrc/multires_fusion/multires_fusion.h: kMaxInputs
MODES = ("bilinear", "nearest")
ACTIVATIONS = (None, "relu", "relu6")
_OPS = {"native": (ops.fwd, ops.bwd), "triton": (ops.fwd_triton, ops.bwd_triton)}
# Every fused implementation takes these dtypes on every device it runs on.
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_OP = "multires_fusion"


class _MultiresFusion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, size, mode, activation, impl, *inputs):
        out = _OPS[impl][0](list(inputs), size, mode, activation)
        ctx.save_for_backward(out)
        ctx.input_sizes = [d for x in inputs for d in x.shape[-2:]]
        ctx.mode, ctx.activation, ctx.impl = mode, activation, impl
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (out,) = ctx.saved_tensors
        grads = _OPS[ctx.impl][1](grad_out, out, ctx.input_sizes, ctx.mode, ctx.activation)
        return (None, None, None, None, *grads)


def _check_size(size, x0) -> tuple:
    if size is None:
        return (x0.shape[-2], x0.shape[-1])
    if isinstance(size, (int, torch.SymInt)) and not isinstance(size, bool):
        size = (size, size)
    if (
        not isinstance(size, (tuple, list, torch.Size))
        or len(size) != 2
        or any(isinstance(s, bool) or not isinstance(s, (int, torch.SymInt)) for s in size)
    ):
        raise TypeError(f"{_OP}: size must be None, an int or a pair of ints (H, W), got {size!r}")
    if size[0] <= 0 or size[1] <= 0:
        raise ValueError(f"{_OP}: size must be positive, got {tuple(size)}")
    return (size[0], size[1])


def _check_inputs(inputs) -> list:
    if isinstance(inputs, (torch.Tensor, str, bytes)) or not isinstance(inputs, Sequence):
        raise TypeError(
            f"{_OP}: inputs must be a list or tuple of tensors, got {type(inputs).__name__}"
        )
    inputs = list(inputs)
    if not 1 <= len(inputs) <= MAX_INPUTS:
        raise ValueError(f"{_OP}: expected 1 to {MAX_INPUTS} inputs, got {len(inputs)}")
    for j, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{_OP}: inputs[{j}] is a {type(x).__name__}, expected a tensor")
        if x.dim() != 4:
            raise ValueError(
                f"{_OP}: inputs[{j}] must be 4-d [N, C, H, W], got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"{_OP}: inputs[{j}] has dtype {x.dtype}, expected a floating dtype")
    x0 = inputs[0]
    for j, x in enumerate(inputs[1:], start=1):
        if x.dtype != x0.dtype:
            raise TypeError(
                f"{_OP}: inputs[{j}] has dtype {x.dtype}, inputs[0] has {x0.dtype}; "
                "all inputs must share one dtype"
            )
        if x.device != x0.device:
            raise ValueError(
                f"{_OP}: inputs[{j}] is on {x.device}, inputs[0] on {x0.device}; "
                "all inputs must be on one device"
            )
        if x.shape[0] != x0.shape[0] or x.shape[1] != x0.shape[1]:
            raise ValueError(
                f"{_OP}: inputs[{j}] has N, C = {x.shape[0]}, {x.shape[1]}, inputs[0] has "
                f"{x0.shape[0]}, {x0.shape[1]}; N and C must match"
            )
    for j, x in enumerate(inputs):
        if x.shape[2] <= 0 or x.shape[3] <= 0:
            raise ValueError(f"{_OP}: inputs[{j}] has an empty spatial size {tuple(x.shape[2:])}")
    return inputs


def multires_fusion(
    inputs: Sequence[torch.Tensor],
    size=None,
    mode: str = "bilinear",
    activation: str | None = "relu",
    impl: str = "auto",
) -> torch.Tensor:
    """Fuse feature maps of several resolutions: ``act(sum_j resize(x_j, size))``.

    Args:
        inputs: 1 to 8 tensors ``[N, C, H_j, W_j]`` sharing N, C, dtype and device; any spatial
            sizes (up- and downsampling, integer or not). NCHW or channels_last.
        size: output ``(H, W)`` (or one int for both); defaults to the first input's.
        mode: ``"bilinear"`` (``align_corners=False``) or ``"nearest"``, as ``F.interpolate``.
            An input already at ``size`` is used as is.
        activation: ``None``, ``"relu"`` or ``"relu6"``.
        impl: ``"auto"``, ``"native"``, ``"triton"`` or ``"reference"`` (see ``available_impls()``).

    Returns:
        ``[N, C, H, W]`` in the memory format of ``inputs[0]``. The fused kernels read each input
        once and write the output once; their backward gathers every input's gradient (no atomics,
        deterministic) with the activation's mask applied on the fly.
    """
    inputs = _check_inputs(inputs)
    size = _check_size(size, inputs[0])
    if mode not in MODES:
        raise ValueError(f"{_OP}: mode must be one of {MODES}, got {mode!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{_OP}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    x0 = inputs[0]

    def call_reasons(name):
        if name != "reference" and x0.dtype not in _DTYPES:
            yield f"dtype {x0.dtype} is not supported"

    impl = _impl.resolve(_OP, impl, x0.device, call_reasons)
    if impl == "reference":
        return reference.multires_fusion(inputs, size, mode, activation)
    if torch.is_grad_enabled() and any(x.requires_grad for x in inputs):
        return _MultiresFusion.apply(size, mode, activation or "none", impl, *inputs)
    # nothing to differentiate (inference): the op alone, no autograd node
    return _OPS[impl][0](inputs, size, mode, activation or "none")
