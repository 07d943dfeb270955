"""``MixedDepthwiseConvBNAct``: the fused op as an ``nn.Module`` with a channel mask, and
``fuse_depthwise``, which swaps it into existing models.

    channels are split into groups by kernel size (e.g. 3/5/7, concatenated in order);
    y_c = act(BN_c(depthwise_conv_{k_c}(x_c, stride, padding=k_c // 2)))   for alive channels c
    y_c = 0                                                                for dead channels c

Its state is that of one depthwise ``nn.Conv2d(bias=False)`` per kernel size plus one
``nn.BatchNorm2d(C)``: one depthwise weight ``[C_k, 1, k, k]`` per kernel size
(``weights``, an ``nn.ParameterList``), the BN affine ``weight``/``bias`` and the buffers
``running_mean``, ``running_var``, ``num_batches_tracked``, plus a bool buffer ``channel_mask``
``[C]`` (HR-NAS's progressive shrinking kills channels by clearing it).

``forward(x)`` takes ``x`` in NCHW or channels_last (the output follows ``x``), either

* with all ``C`` channels: the output has ``C`` channels, dead ones exactly zero (in the output
  and in every gradient), computed at the alive channels' cost (gather, fused op, scatter), or
* with only the ``A`` alive channels, in order ("compact"): the output has ``A`` channels. This
  is what a shrinking supernet uses between layers.

The alive index and the per-kernel-size alive counts are cached and recomputed only when the
mask changes (its ``_version`` or identity), so a forward does no host synchronization.

Under autocast, a half-precision ``x`` is computed (and returned) in the parameters' dtype, as
autocast does for its float32 ops; outside autocast ``x`` must have the parameters' dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import init

from .. import _impl
from .._layout import output_memory_format
from . import api

_OP = "MixedDepthwiseConvBNAct"
_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Identity: None}


def _split_channels(channels, kernel_sizes: Sequence[int]) -> list[int]:
    if isinstance(channels, bool):
        raise TypeError(f"{_OP}: channels must be an int or a sequence of ints, got a bool")
    if isinstance(channels, int):
        if channels < len(kernel_sizes):
            raise ValueError(
                f"{_OP}: channels={channels} is fewer than the "
                f"{len(kernel_sizes)} kernel sizes; every group needs a channel"
            )
        base, extra = divmod(channels, len(kernel_sizes))
        return [base + (g < extra) for g in range(len(kernel_sizes))]
    sizes = list(channels)
    if len(sizes) != len(kernel_sizes) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes
    ):
        raise ValueError(
            f"{_OP}: channels must be a positive int or one positive int per kernel "
            f"size ({len(kernel_sizes)}), got {channels!r}"
        )
    return sizes


class MixedDepthwiseConvBNAct(nn.Module):
    """Mixed-kernel depthwise conv + BatchNorm + activation with a channel mask.

    Args:
        channels: total channels ``C`` (split over the kernel sizes as evenly as possible, the
            first groups taking the remainder), or one channel count per kernel size.
        kernel_sizes: odd kernel sizes, one group each, in channel order (e.g. ``(3, 5, 7)``).
        stride: 1 or 2.
        activation: ``"relu6"``, ``"relu"`` or None.
        momentum, eps: as ``nn.BatchNorm2d`` (``momentum=None``: cumulative moving average).
        impl: ``"auto"``, ``"native"``, ``"triton"`` or ``"reference"``, resolved per call.

    Shapes: ``x [N, C or A, H, W] -> [N, C or A, (H - 1) // stride + 1, (W - 1) // stride + 1]``
    where ``A = channel_mask.sum()``; see the module docstring.
    """

    def __init__(
        self,
        channels,
        kernel_sizes: Sequence[int],
        stride: int = 1,
        activation: str | None = "relu6",
        momentum: float | None = 0.1,
        eps: float = 1e-5,
        impl: str = "auto",
        *,
        device=None,
        dtype=None,
    ):
        super().__init__()
        kernel_sizes = [kernel_sizes] if isinstance(kernel_sizes, int) else list(kernel_sizes)
        if not kernel_sizes or not all(
            isinstance(k, int) and not isinstance(k, bool) and k > 0 and k % 2 == 1
            for k in kernel_sizes
        ):
            raise ValueError(
                f"{_OP}: kernel_sizes must be a non-empty list of positive odd ints "
                f"(padding k // 2 keeps the size), got {kernel_sizes!r}"
            )
        sizes = _split_channels(channels, kernel_sizes)
        if stride not in (1, 2) or isinstance(stride, bool):
            raise ValueError(f"{_OP}: stride must be 1 or 2, got {stride!r}")
        if activation not in api.ACTIVATIONS:
            raise ValueError(
                f"{_OP}: activation must be one of {api.ACTIVATIONS}, got {activation!r}"
            )
        if momentum is not None and not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"{_OP}: momentum must be in [0, 1] or None, got {momentum!r}")
        if not float(eps) > 0.0:
            raise ValueError(f"{_OP}: eps must be positive, got {eps!r}")
        if impl not in _impl.IMPL_CHOICES:
            raise ValueError(f"{_OP}: impl must be one of {_impl.IMPL_CHOICES}, got {impl!r}")
        factory = {"device": device, "dtype": dtype}
        self.kernel_sizes = tuple(kernel_sizes)
        self.group_channels = tuple(sizes)
        self.channels = sum(sizes)
        self.stride, self.activation, self.momentum, self.eps = stride, activation, momentum, eps
        self.impl = impl
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(c, 1, k, k, **factory)) for c, k in zip(sizes, kernel_sizes)
        )
        self.weight = nn.Parameter(torch.empty(self.channels, **factory))
        self.bias = nn.Parameter(torch.empty(self.channels, **factory))
        self.register_buffer("running_mean", torch.zeros(self.channels, **factory))
        self.register_buffer("running_var", torch.ones(self.channels, **factory))
        self.register_buffer(
            "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
        )
        self.register_buffer(
            "channel_mask", torch.ones(self.channels, dtype=torch.bool, device=device)
        )
        self._alive_cache = None
        self.reset_parameters()

    # -- parameters and state ------------------------------------------------------------------

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """``nn.Conv2d``'s weight init per kernel size, ``nn.BatchNorm2d``'s for the rest."""
        for w in self.weights:
            init.kaiming_uniform_(w, a=math.sqrt(5))
        init.ones_(self.weight)
        init.zeros_(self.bias)
        self.reset_running_stats()

    def set_channel_mask(self, mask) -> None:
        """Set which channels are alive: a bool ``[C]`` (or anything ``torch.as_tensor`` turns
        into one, e.g. a list of bools); copied into the ``channel_mask`` buffer."""
        mask = torch.as_tensor(mask, device=self.channel_mask.device)
        if mask.dtype != torch.bool or mask.shape != (self.channels,):
            raise ValueError(
                f"{_OP}: channel mask must be a bool tensor of shape "
                f"[{self.channels}], got {mask.dtype} {tuple(mask.shape)}"
            )
        with torch.no_grad():
            self.channel_mask.copy_(mask)

    @torch.compiler.disable
    def _alive(self):
        """(index [A] or None when every channel is alive, per-group alive counts, A), cached
        per mask tensor and version: the one host sync happens when the mask changes.

        Run eagerly under torch.compile (a graph break): the counts are Python ints that the
        compiled code specializes on, and the mask's version is no traceable value."""
        mask = self.channel_mask
        cache = self._alive_cache
        if cache is not None and cache[0] is mask and cache[1] == mask._version:
            return cache[2]
        if (
            not isinstance(mask, torch.Tensor)
            or mask.dtype != torch.bool
            or mask.shape != (self.channels,)
        ):
            raise ValueError(
                f"{_OP}: channel_mask must be a bool tensor of shape "
                f"[{self.channels}], got {getattr(mask, 'dtype', type(mask))} "
                f"{tuple(getattr(mask, 'shape', ()))}"
            )
        index = torch.nonzero(mask).flatten()
        counts = torch.stack([m.sum() for m in mask.split(list(self.group_channels))]).tolist()
        alive = sum(counts)
        result = (None if alive == self.channels else index, counts, alive)
        self._alive_cache = (mask, mask._version, result)
        return result

    # -- forward ----------------------------------------------------------------------------------

    def _check_input(self, x) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{_OP}: x must be a 4-d [N, C, H, W] tensor, got {got}")
        dtype = self.weight.dtype
        if (
            x.device == self.weight.device
            and x.dtype != dtype
            and x.is_floating_point()
            and torch.is_autocast_enabled(x.device.type)
        ):
            # Under autocast the convs before hand us half-precision activations: run (and
            # return) in the parameters' precision, as autocast does for its float32 ops.
            x = x.to(dtype)
        if x.dtype != dtype or x.device != self.weight.device:
            raise TypeError(
                f"{_OP}: x is {x.dtype} on {x.device}, the module's parameters are "
                f"{dtype} on {self.weight.device}"
            )
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check_input(x)
        index, counts, alive = self._alive()
        n, c, h, w = x.shape
        if c == self.channels:
            compact = alive == self.channels
        elif c == alive:
            compact = True
        else:
            raise ValueError(
                f"{_OP}: x has {c} channels; expected all {self.channels} channels "
                f"or the {alive} alive channels of channel_mask"
            )
        ho, wo = (h - 1) // self.stride + 1, (w - 1) // self.stride + 1
        training = self.training
        if training and n * ho * wo == 1 and alive:
            raise ValueError(
                f"{_OP}: batch statistics need more than 1 value per channel "
                f"in training, got input shape {tuple(x.shape)}"
            )
        impl = api.resolve_impl(self.impl, x)
        factor = 0.0
        if training:
            # nn.BatchNorm2d's bookkeeping: count every training batch, momentum=None averages
            self.num_batches_tracked.add_(1)
            factor = (
                1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            )
            if n == 0:
                # no samples: nothing to normalize or to average into the running statistics
                # (nn.BatchNorm2d returns an empty output too); running statistics give the
                # empty output its autograd graph
                training = False
        if not compact:  # all C channels in, only the alive ones computed
            fmt = output_memory_format(x)
            if fmt == torch.channels_last:  # gather along the contiguous dim, keep the layout
                x = x.permute(0, 2, 3, 1).index_select(3, index).permute(0, 3, 1, 2)
            else:
                x = x.index_select(1, index)
        y = api.fused_forward(
            x,
            list(self.weights),
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            stride=self.stride,
            training=training,
            momentum=factor,
            eps=self.eps,
            activation=self.activation,
            channel_index=index,
            counts=counts,
            impl=impl,
        )
        if compact:
            return y
        out = torch.empty(
            (n, self.channels, ho, wo), dtype=y.dtype, device=y.device, memory_format=fmt
        ).zero_()
        return out.index_copy_(1, index, y)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # A checkpoint of the unfused model (its keys mapped as fuse_depthwise documents) has no
        # channel mask: keep the current one rather than fail a strict load.
        state_dict.setdefault(prefix + "channel_mask", self.channel_mask)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return (
            f"channels={list(self.group_channels)}, kernel_sizes={list(self.kernel_sizes)}, "
            f"stride={self.stride}, activation={self.activation!r}, eps={self.eps}, "
            f"momentum={self.momentum}, impl={self.impl!r}"
        )

    # -- construction from standard layers --------------------------------------------------------

    @classmethod
    def from_modules(
        cls,
        convs: Sequence[nn.Conv2d],
        bns: Sequence[nn.BatchNorm2d],
        activation: str | nn.Module | None = "relu6",
        *,
        impl: str = "auto",
    ) -> MixedDepthwiseConvBNAct:
        """The module computing ``cat([act(bns[g](convs[g](x_g))) for g], dim=1)`` where ``x_g``
        are consecutive channel slices of ``x`` (one per conv), with copies of their parameters
        and BN state, on their device and dtype, in ``bns[0]``'s train/eval mode.

        Every conv must be depthwise (``groups == in_channels == out_channels``) with an odd
        square kernel, padding ``k // 2``, dilation 1, no bias, zero padding and one shared
        stride of 1 or 2; every BN an affine, tracking ``nn.BatchNorm2d`` over its conv's
        channels, all with one eps and momentum. ``activation``: ``"relu6"``, ``"relu"``, None,
        or an ``nn.ReLU``/``nn.ReLU6``/``nn.Identity`` module.
        """
        convs, bns = list(convs), list(bns)
        if not convs or len(convs) != len(bns):
            raise ValueError(
                f"{_OP}.from_modules: need one BatchNorm2d per conv, got "
                f"{len(convs)} convs and {len(bns)} BNs"
            )
        specs = []
        for g, (conv, bn) in enumerate(zip(convs, bns)):
            spec = _depthwise_spec(conv)
            if isinstance(spec, str):
                raise ValueError(f"{_OP}.from_modules: convs[{g}] {spec}")
            why = _bn_mismatch(bn, spec[0])
            if why:
                raise ValueError(f"{_OP}.from_modules: bns[{g}] {why}")
            specs.append(spec)
        if len({s[2] for s in specs}) != 1:
            raise ValueError(
                f"{_OP}.from_modules: the convs have different strides {[s[2] for s in specs]}"
            )
        if len({(bn.eps, bn.momentum) for bn in bns}) != 1:
            raise ValueError(
                f"{_OP}.from_modules: the BNs have different eps/momentum "
                f"{[(bn.eps, bn.momentum) for bn in bns]}"
            )
        if bns[0].momentum is None and len({int(bn.num_batches_tracked) for bn in bns}) != 1:
            raise ValueError(
                f"{_OP}.from_modules: momentum=None averages over "
                "num_batches_tracked, which differs between the BNs"
            )
        if isinstance(activation, nn.Module):
            if type(activation) not in _ACTIVATION_MODULES:
                raise ValueError(
                    f"{_OP}.from_modules: activation must be nn.ReLU, nn.ReLU6 or "
                    f"nn.Identity, got {type(activation).__name__}"
                )
            activation = _ACTIVATION_MODULES[type(activation)]
        ref = convs[0].weight
        module = cls(
            [s[0] for s in specs],
            [s[1] for s in specs],
            stride=specs[0][2],
            activation=activation,
            momentum=bns[0].momentum,
            eps=bns[0].eps,
            impl=impl,
            device=ref.device,
            dtype=ref.dtype,
        )
        with torch.no_grad():
            for w, conv in zip(module.weights, convs):
                w.copy_(conv.weight)
                w.requires_grad_(conv.weight.requires_grad)
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(module, name).copy_(torch.cat([getattr(bn, name) for bn in bns]))
            module.weight.requires_grad_(bns[0].weight.requires_grad)
            module.bias.requires_grad_(bns[0].bias.requires_grad)
            module.num_batches_tracked.copy_(max(bn.num_batches_tracked for bn in bns))
        module.train(bns[0].training)
        return module


def _depthwise_spec(conv) -> tuple[int, int, int] | str:
    """(channels, kernel size, stride) of a conv the fused module reproduces, or why not."""
    if not isinstance(conv, nn.Conv2d):
        return f"is a {type(conv).__name__}, not an nn.Conv2d"
    c, k = conv.in_channels, conv.kernel_size
    if not (conv.groups == c == conv.out_channels):
        return (
            f"is not depthwise (in_channels={c}, out_channels={conv.out_channels}, "
            f"groups={conv.groups})"
        )
    if k[0] != k[1] or k[0] % 2 == 0:
        return f"has kernel size {k}; need a square odd kernel"
    padding = conv.padding
    if isinstance(padding, str):  # "same" is k // 2 for an odd kernel; "valid" is 0
        padding = (k[0] // 2,) * 2 if padding == "same" else (0, 0)
    if tuple(padding) != (k[0] // 2,) * 2:
        return f"has padding {conv.padding}; need k // 2 = {k[0] // 2}"
    if conv.stride not in ((1, 1), (2, 2)):
        return f"has stride {conv.stride}; need 1 or 2 (square)"
    if conv.dilation != (1, 1):
        return f"has dilation {conv.dilation}; need 1"
    if conv.bias is not None:
        return "has a bias; need bias=False (the BN that follows makes it redundant)"
    if conv.padding_mode != "zeros":
        return f"has padding_mode={conv.padding_mode!r}; need 'zeros'"
    return c, k[0], conv.stride[0]


def _bn_mismatch(bn, channels: int) -> str | None:
    if not isinstance(bn, nn.BatchNorm2d):
        return f"is a {type(bn).__name__}, not an nn.BatchNorm2d"
    if bn.num_features != channels:
        return f"has {bn.num_features} features, its conv {channels} channels"
    if not (bn.affine and bn.track_running_stats):
        return "must have affine=True and track_running_stats=True"
    return None


def fuse_depthwise(model: nn.Module, *, impl: str = "auto") -> int:
    """Replace every depthwise ``Conv2d -> BatchNorm2d [-> ReLU | ReLU6 | Identity]`` run of
    consecutive children of an ``nn.Sequential`` (anywhere in ``model``, subclasses such as
    torchvision's ``Conv2dNormActivation`` included) by one ``MixedDepthwiseConvBNAct``, in place.
    Returns the number of runs replaced.

    The conv must satisfy ``MixedDepthwiseConvBNAct.from_modules``'s conditions and the BN follow
    it directly; only exact ``nn.Conv2d``/``nn.BatchNorm2d``/activation types are matched (a
    subclass may compute something else). The fused module takes the conv's place, with copies
    of the conv weight and of the BN parameters and state (``num_batches_tracked``, eps,
    momentum), on the same device and dtype and in the BN's train/eval mode; the BN and the
    activation become ``nn.Identity`` so the container's indices stay put. Outputs are
    unchanged (up to rounding), in train and eval, and follow the input's memory format.

    ``state_dict`` keys change, for the run at ``<seq>.<i>`` (``<seq>.<i+1>`` the BN):

    * ``<seq>.<i>.weight`` (the conv weight) becomes ``<seq>.<i>.weights.0``;
    * ``<seq>.<i+1>.{weight, bias, running_mean, running_var, num_batches_tracked}`` become
      ``<seq>.<i>.{...}``;
    * ``<seq>.<i>.channel_mask`` is new (all True); a state_dict without it loads, strictly,
      keeping the current mask, so a checkpoint of the unfused model loads once its keys are
      mapped as above.

    Hooks registered on the replaced modules do not carry over.
    """
    replaced = 0
    for seq in list(model.modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        i = 0
        while i + 1 < len(names):
            conv, bn = seq._modules[names[i]], seq._modules[names[i + 1]]
            if (
                type(conv) is not nn.Conv2d
                or type(bn) is not nn.BatchNorm2d
                or isinstance(_depthwise_spec(conv), str)
                or _bn_mismatch(bn, conv.in_channels)
            ):
                i += 1
                continue
            act = seq._modules[names[i + 2]] if i + 2 < len(names) else None
            has_act = type(act) in _ACTIVATION_MODULES
            fused = MixedDepthwiseConvBNAct.from_modules(
                [conv], [bn], act if has_act else None, impl=impl
            )
            seq._modules[names[i]] = fused
            seq._modules[names[i + 1]] = nn.Identity()
            if has_act:
                seq._modules[names[i + 2]] = nn.Identity()
            replaced += 1
            i += 3 if has_act else 2
    return replaced
