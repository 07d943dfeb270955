"""Compact networks from a searched architecture.

``build_from_arch(arch)`` builds the network an ``export_arch`` dict describes from plain PyTorch
layers (``CompactBlock``s; fusion on the eager reference), randomly initialised, for retraining
from scratch (as the authors do). ``export_subnet(net)`` builds the same network and copies the
supernet's alive weights and BN statistics into it, so that in eval mode it computes what the masked
supernet computes (float64: to rounding), with no custom op, mask or index left.
"""

from __future__ import annotations

import torch

from .arch import export_arch, parse_arch
from .layers.compact_block import CompactBlock
from .layers.fusion import Fusion
from .supernet.hrnet import HRNet, init_weights


class CompactNet(HRNet):
    """The searched network; same topology and module names as its supernet."""

    def __init__(self, arch: dict):
        space, num_classes, entries = parse_arch(arch)
        fusion = Fusion("reference")
        used = []

        def make_block(name, inp, oup, stride):
            entry = entries.get(name)
            if entry is None:
                raise ValueError(f"arch: no entry for block {name!r} of space {space.name!r}")
            expected = {"in_channels": inp, "out_channels": oup, "stride": stride}
            got = {k: entry[k] for k in expected}
            if isinstance(inp, tuple):
                got["in_channels"] = tuple(got["in_channels"])
            if got != expected:
                raise ValueError(f"arch: block {name!r} is {got}, the space builds {expected}")
            per_kernel = round(sum(inp if isinstance(inp, tuple) else (inp,)) * space.expand_ratio)
            if any(c > per_kernel for c in entry["channels"]):
                raise ValueError(
                    f"arch: block {name!r} keeps {entry['channels']} channels; a kernel size "
                    f"has at most {per_kernel}"
                )
            used.append(name)
            return CompactBlock(
                inp,
                oup,
                stride,
                entry["kernel_sizes"],
                entry["channels"],
                bn_momentum=space.bn_momentum,
                bn_eps=space.bn_eps,
                fusion=fusion,
                transformer=space.transformer,
                tokens=entry["tokens"],
            )

        super().__init__(space, num_classes, make_block, fusion)
        extra = sorted(set(entries) - set(used))
        if extra:
            raise ValueError(f"arch: blocks {extra} are not in space {space.name!r}")
        init_weights(self, space.init)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_from_arch(arch: dict) -> CompactNet:
    """A randomly initialised compact network of the architecture ``arch`` (see ``hrnas.arch``)."""
    return CompactNet(arch)


def _gather_bn(dst, weight, bias, mean, var, tracked, index) -> None:
    def pick(t):
        return t if index is None else t.index_select(0, index)

    dst.weight.copy_(pick(weight))
    dst.bias.copy_(pick(bias))
    dst.running_mean.copy_(pick(mean))
    dst.running_var.copy_(pick(var))
    dst.num_batches_tracked.copy_(tracked)


def _copy_transformer(src, dst) -> None:
    """The alive tokens' rows/columns of a transformer into one built with only them."""
    index = torch.nonzero(src.token_mask).flatten()
    state = src.state_dict()
    token_rows = ("input_proj.weight", "query_embed.weight") + tuple(
        f"input_norm.{k}" for k in ("weight", "bias", "running_mean", "running_var")
    )
    for key, value in dst.state_dict().items():
        if key in token_rows:
            value.copy_(state[key].index_select(0, index))
        elif key == "reverse_proj.weight":
            value.copy_(state[key].index_select(1, index))
        else:
            value.copy_(state[key])


@torch.no_grad()
def _copy_block(src, dst: CompactBlock) -> None:
    """Alive weights of a ``MixedBlock`` into the ``CompactBlock`` built from its arch entry."""
    if dst.shortcut is not None:
        dst.shortcut.weight.copy_(src.shortcut.weight)
    if dst.transformer is not None:
        _copy_transformer(src.transformer, dst.transformer)
    if not dst.hidden:
        return
    index = torch.nonzero(src.mask).flatten()
    rows, start = src.expand.weight.index_select(0, index), 0
    for conv, c in zip(dst.expand, dst.in_channels):
        conv.weight.copy_(rows[:, start : start + c])
        start += c
    bn = src.expand_bn
    args = (bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked)
    _gather_bn(dst.expand_bn, *args, index)
    per = src.hidden // len(src.kernel_sizes)
    convs = iter(dst.dw)
    for g, weight in enumerate(src.dw.weights):
        alive = torch.nonzero(src.mask[g * per : (g + 1) * per]).flatten()
        if alive.numel():
            next(convs).weight.copy_(weight.index_select(0, alive))
    dw = src.dw
    args = (dw.weight, dw.bias, dw.running_mean, dw.running_var, dw.num_batches_tracked)
    _gather_bn(dst.dw_bn, *args, index)
    dst.project.weight.copy_(src.project.weight.index_select(1, index))
    dst.project_bn.load_state_dict(src.project_bn.state_dict())


def export_subnet(net) -> CompactNet:
    """The compact network of ``net``'s alive units with its weights (same dtype, device and
    train/eval mode as ``net``); its output equals the masked supernet's."""
    ref = next(net.parameters())
    compact = build_from_arch(export_arch(net)).to(device=ref.device, dtype=ref.dtype)
    blocks = dict(net.blocks())
    state = net.state_dict()
    prefixes = tuple(f"{name}." for name in blocks)
    with torch.no_grad():
        for key, value in compact.state_dict().items():
            if not key.startswith(prefixes):
                value.copy_(state[key])
    for name, block in compact.blocks():
        _copy_block(blocks[name], block)
    compact.train(net.training)
    return compact
