"""Resource-aware penalties and the rho schedule (HRNAS_SPEC.md section 3, ``utils/prune.py``).

Per-unit costs are normalised by their unit-weighted mean, so the penalties average to 1:

    Z = sum_u n_u * cost_u / sum_u n_u          (n_u: units in group u, cost_u: MACs of one)
    penalty_u = cost_u / Z

A transformer token's penalty follows its alive count c (recomputed every step; n0 initial
tokens, F the transformer's profiled MACs, d = 64 values per token):

    penalty(c) = [ (F - 2 * n0^2 * d) / n0 + 2 * (c^2 - (c - 1)^2) * d ] / Z

(the linear cost per token plus the marginal cost of the quadratic attention term). With other
``costs`` than MACs (a latency table's ms per unit), every penalty is ``cost_u / Z`` with ``Z``
as above over those costs: the table's model is linear in the tokens too. The sparsity
term of the loss is ``rho(t) * sum_units penalty * |gamma| * alive`` (dead units add nothing and
get no gradient), with ``rho(t)`` 0 until ``free_steps``, a linear ramp to ``rho`` at
``warmup_steps``, then constant (the authors' ``get_rho_scheduler``, stepwise).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

TOKEN_DIM = 64  # values per token: the transformer's fixed 8x8 grid


def normaliser(costs: Sequence[float], sizes: Sequence[int]) -> float:
    """``Z = sum(size * cost) / sum(size)`` over unit groups."""
    if len(costs) != len(sizes) or not costs:
        raise ValueError(f"need one size per cost, got {len(costs)} costs and {len(sizes)} sizes")
    if any(s <= 0 for s in sizes) or any(c < 0 for c in costs):
        raise ValueError("sizes must be positive and costs non-negative")
    z = sum(c * s for c, s in zip(costs, sizes)) / sum(sizes)
    if z <= 0:
        raise ValueError("every unit costs 0 MACs: nothing to normalise by")
    return z


def token_penalty(transformer_macs: float, initial: int, alive: int, z: float) -> float:
    """The penalty of one token of a transformer with ``alive`` of ``initial`` tokens left."""
    linear = (transformer_macs - 2 * initial**2 * TOKEN_DIM) / initial
    return (linear + 2 * (alive**2 - (alive - 1) ** 2) * TOKEN_DIM) / z


class RhoSchedule:
    """``rho(step)``: 0 before ``free_steps``, linear from 0 to ``rho`` up to ``warmup_steps``,
    then ``rho``."""

    def __init__(self, rho: float, free_steps: int = 0, warmup_steps: int = 0):
        if rho < 0 or free_steps < 0 or warmup_steps < free_steps:
            raise ValueError(
                f"need rho >= 0 and 0 <= free_steps <= warmup_steps, got rho={rho}, "
                f"free_steps={free_steps}, warmup_steps={warmup_steps}"
            )
        self.rho, self.free, self.warmup = rho, free_steps, warmup_steps

    def __call__(self, step: int) -> float:
        if step < self.free:
            return 0.0
        if step >= self.warmup:
            return self.rho
        return self.rho * (step - self.free) / (self.warmup - self.free)


class SparsityPenalty:
    """``sum_units penalty * |gamma| * alive`` over ``units`` (``SearchUnit``s whose ``cost`` is
    at the profiling size). Channel penalties are fixed; token penalties follow the alive
    count at every call. ``costs`` (one per unit group, e.g. ms per unit): fixed penalties
    ``cost / Z`` for every group instead of the units' MACs."""

    def __init__(self, units, costs=None):
        if not units:
            raise ValueError("no search units")
        self.units = list(units)
        self.linear = costs is not None
        if costs is None:
            costs = [u.cost for u in self.units]
        elif len(costs) != len(self.units):
            raise ValueError(f"need one cost per unit group: {len(costs)} for {len(self.units)}")
        self.z = normaliser(list(costs), [u.size for u in self.units])
        self.penalties = [c / self.z for c in costs]

    def unit_penalty(self, i: int) -> float:
        unit = self.units[i]
        if unit.kind == "tokens" and not self.linear:
            alive = int(unit.mask.sum())
            return token_penalty(unit.cost * unit.size, unit.size, alive, self.z)
        return self.penalties[i]

    def __call__(self) -> torch.Tensor:
        terms = [
            self.unit_penalty(i) * (u.gamma.abs() * u.mask).sum() for i, u in enumerate(self.units)
        ]
        return torch.stack(terms).sum()
