"""The search loop: task loss plus the resource-aware sparsity term, with live masks.

Per step ``t`` (HRNAS_SPEC.md section 3.4):

    loss = task_loss + rho(t) * sum_units penalty_u * |gamma_u| * alive_u

Every ``interval`` steps the controller kills units whose ``|gamma|`` stayed under
``threshold`` for ``patience`` checks and, with a budget, cuts the least important units down to
the budget of that step: the full MACs ramp linearly to the target over the first
``budget_ramp`` of the steps, so the network loses width gradually while it trains; the last
step cuts to the target itself (within one unit's MACs). Masks change in place: no module is
rebuilt, the optimizer keeps its parameters and state.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..latency import load_table, unit_costs
from ..train import batches, make_optimizer, one_cycle, task_loss, to_net
from .controller import BudgetController
from .penalty import RhoSchedule, SparsityPenalty


@dataclass
class SearchConfig:
    """Search hyper-parameters (steps count optimizer steps)."""

    steps: int = 200
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-5
    rho: float = 1e-3
    rho_free_steps: int = 0
    rho_warmup_steps: int = 50
    threshold: float = 1e-3
    patience: int = 2
    interval: int = 10
    target_macs: float | None = None
    target_ratio: float | None = None
    cost: str = "macs"
    latency_table: str | None = None
    target_latency: float | None = None
    budget_ramp: float = 0.6
    seed: int = 0

    def __post_init__(self):
        problems = []
        for key in ("steps", "batch_size", "interval", "patience"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                problems.append(f"{key} must be a positive int, got {getattr(self, key)!r}")
        for key in ("lr", "weight_decay", "rho", "threshold"):
            if getattr(self, key) < 0:
                problems.append(f"{key} must be >= 0, got {getattr(self, key)!r}")
        targets = ("target_macs", "target_ratio", "target_latency")
        if sum(getattr(self, key) is not None for key in targets) > 1:
            problems.append("give one of target_macs, target_ratio, target_latency")
        if self.cost not in ("macs", "latency"):
            problems.append(f"cost must be 'macs' or 'latency', got {self.cost!r}")
        elif self.cost == "latency":
            if self.latency_table is None:
                problems.append("cost 'latency' needs latency_table (hrnas bench-latency)")
            if self.target_macs is not None:
                problems.append("cost 'latency' takes target_latency or target_ratio")
        elif self.target_latency is not None:
            problems.append("target_latency needs cost 'latency'")
        if self.target_latency is not None and not self.target_latency > 0:
            problems.append(f"target_latency must be positive, got {self.target_latency!r}")
        if self.target_ratio is not None and not 0 < self.target_ratio <= 1:
            problems.append(f"target_ratio must be in (0, 1], got {self.target_ratio!r}")
        if self.target_macs is not None and not self.target_macs > 0:
            problems.append(f"target_macs must be positive, got {self.target_macs!r}")
        if not 0 < self.budget_ramp <= 1:
            problems.append(f"budget_ramp must be in (0, 1], got {self.budget_ramp!r}")
        if problems:
            raise ValueError("search config: " + "; ".join(problems))


@dataclass
class SearchResult:
    """``history``: one record per check (step, loss, task loss, rho, MACs, alive units)."""

    target_macs: float | None
    full_macs: float
    final_macs: float
    alive_units: int
    total_units: int
    seconds: float
    history: list[dict]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def search(
    net,
    dataset,
    config: SearchConfig,
    on_step: Callable[[int, dict], None] | None = None,
) -> SearchResult:
    """Search ``net`` (a ``Supernet``) on ``dataset`` (a ``hrnas.data`` dataset of the net's
    task); masks are left at the searched architecture. ``on_step(step, record)`` after every
    step (record: loss, task, rho, macs, alive).

    With ``config.cost == "latency"`` the penalties, the controller and the target are in the
    latency table's milliseconds (``hrnas.latency``): the records' and the result's "macs"
    are then the table's predicted latency."""
    input_size = tuple(dataset.batch([0])["image"].shape[-2:])
    units = net.search_units(input_size)
    costs = base = None
    target, unit = config.target_macs, "MACs"
    if config.cost == "latency":
        costs, base = unit_costs(load_table(config.latency_table), units, input_size)
        target, unit = config.target_latency, "ms"
    penalty = SparsityPenalty(net.search_units() if costs is None else units, costs)
    ctrl = BudgetController(net, units, input_size, costs, base)
    full = ctrl.full_macs
    if config.target_ratio is not None:
        target = config.target_ratio * full
    if target is not None and target < ctrl.min_macs:
        raise ValueError(
            f"target {target:.4g} {unit} is under the floor {ctrl.min_macs:.4g} of this network "
            f"(full {full:.4g}); raise the target"
        )
    ramp = max(1, round(config.budget_ramp * config.steps))
    rho = RhoSchedule(config.rho, config.rho_free_steps, config.rho_warmup_steps)
    opt = make_optimizer(net, config.lr, config.weight_decay)
    sched = one_cycle(opt, config.lr, config.steps)
    data = batches(dataset, config.batch_size, config.seed)
    history = []
    start = time.perf_counter()
    net.train()
    for step in range(config.steps):
        x, batch = to_net(next(data), net)
        task = task_loss(dataset.task, net(x), batch)
        r = rho(step)
        loss = task + r * penalty() if r > 0 else task
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        last = step == config.steps - 1
        if (step + 1) % config.interval == 0 or last:
            floor = None
            if target is not None:
                floor = full - (full - target) * min(1.0, (step + 1) / ramp)
            ctrl.kill_below(config.threshold, config.patience, floor)
            if floor is not None:
                ctrl.cut_to(target if last else floor)
        record = {
            "step": step + 1,
            "loss": loss.item(),
            "task": task.item(),
            "rho": r,
            "macs": ctrl.alive_macs(),
            "alive": ctrl.alive_units(),
        }
        history.append(record)
        if on_step is not None:
            on_step(step, record)
    return SearchResult(
        target_macs=target,
        full_macs=full,
        final_macs=ctrl.alive_macs(),
        alive_units=ctrl.alive_units(),
        total_units=len(ctrl.cost),
        seconds=time.perf_counter() - start,
        history=history,
    )
