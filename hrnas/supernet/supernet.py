"""``Supernet``: the HR-NAS network of masked searching blocks, with its searchable units.

Searchable units (HRNAS_SPEC.md section 3.2): every hidden channel of every block, grouped per
(block, kernel size); its importance is the depthwise BN gamma, its cost the MACs it adds:

    cost(channel of kernel k) = sum_b inp_b * H_b * W_b + (k^2 + oup) * H' * W'

(expand row at each input's resolution, depthwise filter and project column at the output's).
Masks are live: clearing a unit's mask removes its compute from the next forward; setting it
again brings the unit back with the parameters and statistics it had.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import init

from ..layers.fusion import Fusion
from ..layers.mixed_block import MixedBlock
from ..space import SpaceSpec
from .hrnet import HRNet, init_weights


@dataclass
class SearchUnit:
    """A group of searchable units: the channels ``[start, stop)`` of one block's hidden layer
    (``kind="channels"``, one kernel size), or the tokens of one transformer (``"tokens"``).

    ``gamma`` and ``mask`` are views of the owning BN weight (depthwise BN, or the transformer's
    ``input_norm``) and bool mask buffer (``channel_mask`` / ``token_mask``); writes to the mask
    take effect on the next forward. ``cost`` is the MACs of one unit at the size
    ``search_units`` was asked for; for tokens, the marginal cost at the alive count then."""

    name: str
    kind: str
    kernel_size: int | None
    weight: torch.Tensor
    mask_buffer: torch.Tensor
    start: int
    stop: int
    cost: float

    @property
    def gamma(self) -> torch.Tensor:
        return self.weight[self.start : self.stop]

    @property
    def mask(self) -> torch.Tensor:
        return self.mask_buffer[self.start : self.stop]

    @property
    def size(self) -> int:
        return self.stop - self.start

    def set_mask(self, alive) -> None:
        """Set this group's mask from a bool tensor (or list) of ``size`` entries."""
        alive = torch.as_tensor(alive, device=self.mask.device)
        if alive.dtype != torch.bool or alive.shape != (self.size,):
            raise ValueError(
                f"{self.name}: mask must be a bool tensor of shape [{self.size}], got "
                f"{alive.dtype} {tuple(alive.shape)}"
            )
        with torch.no_grad():
            self.mask.copy_(alive)


class Supernet(HRNet):
    """The masked supernet of a ``SpaceSpec``; see the module docstring. Build it with
    ``hrnas.build_supernet``. ``impl`` goes to every fused op (``set_impl`` changes it)."""

    def __init__(self, spec: SpaceSpec, num_classes: int, *, impl: str = "auto"):
        fusion = Fusion(impl)

        def make_block(name, inp, oup, stride):
            return MixedBlock(
                inp,
                oup,
                stride,
                spec.kernel_sizes,
                spec.expand_ratio,
                bn_momentum=spec.bn_momentum,
                bn_eps=spec.bn_eps,
                fusion=fusion,
                transformer=spec.transformer,
                impl=impl,
            )

        super().__init__(spec, num_classes, make_block, fusion)
        init_weights(self, spec.init)
        for _, block in self.blocks():
            for w in block.dw.weights:
                if spec.init == "heatmap":
                    init.normal_(w, std=0.001)
                else:
                    init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")
        self.impl = impl

    def set_impl(self, impl: str) -> None:
        """Run every fused op of the network on ``impl`` from the next forward on."""
        for m in self.modules():
            if hasattr(m, "impl"):
                m.impl = impl

    def search_units(self, input_size=None) -> list[SearchUnit]:
        """Every channel group (block x kernel size) and every transformer's tokens, with the
        per-unit MACs at ``input_size`` (default: the space's ``profile_size``, 224x224 as the
        authors profile)."""
        found, _ = self.block_input_sizes(tuple(input_size or self.space.profile_size))
        units = []
        for name, block in self.blocks():
            per = block.hidden // len(block.kernel_sizes)
            for g, k in enumerate(block.kernel_sizes):
                units.append(
                    SearchUnit(
                        name=name,
                        kind="channels",
                        kernel_size=k,
                        weight=block.dw.weight,
                        mask_buffer=block.dw.channel_mask,
                        start=g * per,
                        stop=(g + 1) * per,
                        cost=float(block.unit_cost(k, found[block])),
                    )
                )
            t = block.transformer
            if t is not None:
                units.append(
                    SearchUnit(
                        name=f"{name}.transformer",
                        kind="tokens",
                        kernel_size=None,
                        weight=t.input_norm.weight,
                        mask_buffer=t.token_mask,
                        start=0,
                        stop=t.num_tokens,
                        cost=float(block.token_cost()),
                    )
                )
        return units

    def num_parameters(self) -> int:
        """Parameters of the network with only its alive channels (what export keeps)."""
        inside = set()
        total = 0
        for _, block in self.blocks():
            inside.update(id(p) for p in block.parameters())
            if block.shortcut is not None:
                total += block.shortcut.weight.numel()
            alive = block.alive_per_kernel()
            count = sum(c for _, c in alive)
            if count:
                total += count * (sum(block.in_channels) + 4 + block.out_channels)
                total += sum(c * k * k for k, c in alive) + 2 * block.out_channels
            tokens = block.tokens()
            if tokens:
                t = block.transformer
                d = t.grid**2
                # per token: input_proj row, input_norm pair, query; fixed: the two layers'
                # attention (4 d^2) + FFN (2 d^2) + two LayerNorms (4 d); reverse proj and norm
                total += tokens * (t.in_channels + 2 + 2 + d) + 2 * (6 * d * d + 4 * d)
                total += t.out_channels * (tokens + 2)
        return total + sum(p.numel() for p in self.parameters() if id(p) not in inside)
