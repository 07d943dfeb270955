"""Exponential moving average of a network's parameters (``search.ema`` / ``retrain.ema``).

After every optimizer step ``shadow = decay * shadow + (1 - decay) * param`` for every
parameter; buffers (BN statistics, masks) are not averaged. ``copy_to`` puts the averages into
the network (used for evaluation when the EMA is on); the state is part of the search
checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """The moving average of ``net``'s parameters with ``decay`` in ``(0, 1)``."""

    def __init__(self, net: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"ema decay must be in (0, 1) (0 turns the EMA off), got {decay!r}")
        self.decay = decay
        self.params = [p for p in net.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.mul_(self.decay).add_(p, alpha=1 - self.decay)

    @torch.no_grad()
    def copy_to(self) -> None:
        """Overwrite the network's parameters with their averages."""
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(
                f"ema state has {len(state['shadow'])} tensors, the network {len(self.shadow)}"
            )
        self.decay = state["decay"]
        for s, t in zip(self.shadow, state["shadow"]):
            s.copy_(t)
