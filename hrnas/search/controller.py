"""The budget controller: unit deaths by threshold, and cuts to an explicit MACs target.

Alive MACs are linear in the alive units: ``macs = base + sum_alive cost_c`` with ``cost_c`` a
unit's MACs at the search input size (``Supernet.search_units(input_size)``) and ``base`` the
stem, shortcuts and classifier. Any other cost linear in the alive units works the same way:
given ``costs`` (one per unit group) and ``base``, e.g. a latency table's ms per unit and base
ms (``hrnas.latency.unit_costs``), every "MACs" below is that cost instead.

The importance of a unit is ``|gamma|``: the sparsity penalty already weighs every gamma by its
cost, so ranking by ``|gamma|`` and summing costs up to the excess is the authors' FLOPs-target
slimming (``cal_mask_network_slimming_by_flops``: sort ``|gamma|``, cumulative cost,
threshold), applied to the live masks.

- ``kill_below(threshold, patience)``: a unit whose ``|gamma|`` was under ``threshold`` at
  ``patience`` consecutive checks dies (the authors' ``model_shrink_threshold`` 1e-3), never
  taking the MACs under the current floor (the budget, when there is one).
- ``cut_to(target)``: cuts the least important alive units until the alive MACs are the closest
  they can get to ``target`` from above or below (one unit of difference at most).

Units only die; masks change in place (``SearchUnit.set_mask``), nothing is rebuilt.
"""

from __future__ import annotations

import torch


class BudgetController:
    """Live masks of ``units`` (``SearchUnit``s with costs at the size ``net.macs`` uses), or
    with ``costs`` (per unit of each group of ``units``) and ``base`` another linear cost."""

    def __init__(self, net, units, input_size=None, costs=None, base: float | None = None):
        self.net, self.units = net, list(units)
        self.input_size = tuple(input_size or net.space.input_size)
        if (costs is None) != (base is None):
            raise ValueError("give both costs and base (a linear cost model), or neither")
        if costs is None:
            costs = [u.cost for u in self.units]
        elif len(costs) != len(self.units):
            raise ValueError(f"need one cost per unit group: {len(costs)} for {len(self.units)}")
        self.cost = torch.cat(
            [
                torch.full((u.size,), float(c), dtype=torch.float64)
                for u, c in zip(self.units, costs)
            ]
        )
        if base is None:
            base = net.macs(self.input_size) - float((self.cost * self._mask().double()).sum())
        self.base = float(base)
        self.below = torch.zeros(len(self.cost), dtype=torch.long)

    @property
    def full_macs(self) -> float:
        """MACs with every unit alive."""
        return self.base + float(self.cost.sum())

    @property
    def min_macs(self) -> float:
        """MACs with every unit dead (the floor no target can go under)."""
        return self.base

    def _mask(self) -> torch.Tensor:
        return torch.cat([u.mask.detach().cpu() for u in self.units])

    def _importance(self) -> torch.Tensor:
        return torch.cat([u.gamma.detach().abs().double().cpu() for u in self.units])

    def alive_macs(self) -> float:
        """MACs of the current masks (equals ``net.macs(input_size)``)."""
        return self.base + float((self.cost * self._mask().double()).sum())

    def alive_units(self) -> int:
        return int(self._mask().sum())

    def _kill(self, mask: torch.Tensor, dead: torch.Tensor) -> None:
        mask = mask.clone()
        mask[dead] = False
        start = 0
        for u in self.units:
            u.set_mask(mask[start : start + u.size].to(u.mask.device))
            start += u.size

    def _cut(self, candidates: torch.Tensor, excess: float, mask: torch.Tensor) -> int:
        """Kill the least important of ``candidates`` (indices) whose summed cost comes closest
        to ``excess``; returns how many died."""
        if excess <= 0 or candidates.numel() == 0:
            return 0
        order = candidates[torch.argsort(self._importance()[candidates], stable=True)]
        cum = torch.cumsum(self.cost[order], 0)
        n = int(torch.searchsorted(cum, torch.tensor([excess], dtype=torch.float64))[0]) + 1
        n = min(n, len(order))
        if n > 1 and abs(float(cum[n - 2]) - excess) < abs(float(cum[n - 1]) - excess):
            n -= 1
        self._kill(mask, order[:n])
        return n

    def cut_to(self, target: float) -> int:
        """Cut units until the alive MACs are closest to ``target``; returns units cut."""
        if target < self.min_macs:
            raise ValueError(
                f"target {target:.4g} MACs is below the network's floor {self.min_macs:.4g} "
                "(every searchable unit dead)"
            )
        mask = self._mask()
        return self._cut(torch.nonzero(mask).flatten(), self.alive_macs() - target, mask)

    def kill_below(self, threshold: float, patience: int = 1, floor: float | None = None) -> int:
        """Count a check for every alive unit with ``|gamma| < threshold``; kill those with
        ``patience`` consecutive ones, least important first, keeping MACs >= ``floor``."""
        mask = self._mask()
        low = (self._importance() < threshold) & mask
        self.below = torch.where(low, self.below + 1, torch.zeros_like(self.below))
        ready = torch.nonzero(self.below >= patience).flatten()
        if ready.numel() == 0:
            return 0
        if floor is None:
            self._kill(mask, ready)
            return ready.numel()
        room = self.alive_macs() - floor
        order = ready[torch.argsort(self._importance()[ready], stable=True)]
        n = int((torch.cumsum(self.cost[order], 0) <= room).sum())
        self._kill(mask, order[:n])
        return n
