"""The search loop: task loss plus the resource-aware sparsity term, with live masks.

Per step ``t`` (HRNAS_SPEC.md section 3.4):

    loss = task_loss + rho(t) * sum_units penalty_u * |gamma_u| * alive_u

Every ``interval`` steps the controller kills units whose ``|gamma|`` stayed under
``threshold`` for ``patience`` checks and, with a budget, cuts the least important units down to
the budget of that step: the full MACs ramp linearly to the target over the first
``budget_ramp`` of the steps, so the network loses width gradually while it trains; the last
step cuts to the target itself (within one unit's MACs). Masks change in place: no module is
rebuilt, the optimizer keeps its parameters and state.

Distributed (``hrnas.distributed``): the global batch of ``batch_size`` is split into ``shards``
equal slices; rank ``r`` of ``N`` computes slice ``r`` (``shards`` = ``N``), DDP averages the
gradients, and the reported loss is the mean over ranks. BN statistics are those of each slice
(as plain DDP: no SyncBatchNorm), so a one-process run with ``shards=N`` (gradient accumulation
over the same slices) is the same computation as an ``N``-rank run. Every rank runs the
controller on the identical gammas; masks, gammas and patience counters are checked bitwise
identical across ranks after every check.

Checkpoints (``checkpoint``): every ``checkpoint_every`` steps and after the last, the whole
state (network, masks, optimizer, scheduler, EMA, controller counters, history, data position,
RNG states of every rank) goes to one file, written by rank 0 (``hrnas.checkpoint``);
``resume`` continues from such a state and ends bitwise where the uninterrupted run ends (CPU).
A non-finite loss stops the search (``NonFiniteLoss``) before the step changes any weight.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import checkpoint as ckpt
from ..distributed import Dist, check_identical, gather, mean, unused_parameters, wrap
from ..ema import EMA
from ..latency import load_table, unit_costs
from ..train import BatchStream, make_optimizer, one_cycle, task_loss, to_net
from .controller import BudgetController
from .penalty import RhoSchedule, SparsityPenalty

log = logging.getLogger("hrnas")


class NonFiniteLoss(RuntimeError):
    """The search loss (or a weight about to be checkpointed) became NaN or infinite."""


@dataclass
class SearchConfig:
    """Search hyper-parameters (steps count optimizer steps). ``shards``: slices of the global
    batch with their own BN statistics (the ranks of a distributed run); ``ema``: decay of the
    weights' moving average (0: off); ``checkpoint_every``: steps between checkpoints (0: only
    after the last step)."""

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
    shards: int = 1
    ema: float = 0.0
    checkpoint_every: int = 0

    def __post_init__(self):
        problems = []
        for key in ("steps", "batch_size", "interval", "patience", "shards"):
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
        if isinstance(self.shards, int) and self.shards >= 1 and self.batch_size % self.shards:
            problems.append(
                f"batch_size {self.batch_size} is not a multiple of shards {self.shards}"
            )
        if not 0 <= self.ema < 1:
            problems.append(f"ema must be in [0, 1) (0: off), got {self.ema!r}")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            problems.append(f"checkpoint_every must be an int >= 0, got {self.checkpoint_every!r}")
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


def _rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _shards(config: SearchConfig, d: Dist) -> int:
    if not d.active:
        return config.shards
    if config.shards not in (1, d.world) or config.batch_size % d.world:
        raise ValueError(
            f"search on {d.world} ranks: batch_size ({config.batch_size}) must be a multiple of "
            f"the world size and shards ({config.shards}) 1 or {d.world}"
        )
    return d.world


def _sync_state(ctrl: BudgetController) -> torch.Tensor:
    """Masks, gammas and patience counters in one vector (what must agree across ranks)."""
    return torch.cat([ctrl._mask().double(), ctrl._importance(), ctrl.below.double()])


class _Run:
    """The mutable state of one search (see ``search``)."""

    def __init__(self, net, dataset, config: SearchConfig, d: Dist):
        self.net, self.dataset, self.config, self.d = net, dataset, config, d
        self.input_size = tuple(dataset.batch([0])["image"].shape[-2:])
        self.units = net.search_units()
        sized = net.search_units(self.input_size)
        costs = base = None
        if config.cost == "latency":
            costs, base = unit_costs(load_table(config.latency_table), sized, self.input_size)
        self.penalty = SparsityPenalty(self.units if costs is None else sized, costs)
        self.ctrl = BudgetController(net, sized, self.input_size, costs, base)
        self.opt = make_optimizer(net, config.lr, config.weight_decay)
        self.sched = one_cycle(self.opt, config.lr, config.steps)
        self.stream = BatchStream(dataset, config.batch_size, config.seed)
        self.ema = EMA(net, config.ema) if config.ema else None
        self.shards = _shards(config, d)
        self.history: list[dict] = []
        self.step, self.seconds = 0, 0.0
        self.saved = None  # (step, path) of the last checkpoint written
        self.model, self.ignored, self.probed_alive = net, None, None
        self.example = to_net(dataset.batch([0, 1]), net)[0] if d.active else None

    def rewrap(self) -> None:
        """(DDP) a new wrapper when the set of parameters without gradient changed (probed
        only when units died since the last probe: units never come back)."""
        alive = self.ctrl.alive_units()
        if not self.d.active or alive == self.probed_alive:
            return
        self.probed_alive = alive
        unused = unused_parameters(self.net, self.example)
        if unused != self.ignored:
            self.ignored, self.model = unused, wrap(self.net, self.d, unused)

    def state(self) -> dict:
        return {
            "step": self.step,
            "config": dataclasses.asdict(self.config),
            "world": self.d.world,
            "net": self.net.state_dict(),
            "masks": [u.mask.clone() for u in self.units],
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "controller": {"below": self.ctrl.below.clone()},
            "ema": None if self.ema is None else self.ema.state_dict(),
            "data": self.stream.state_dict(),
            "history": self.history,
            "seconds": self.seconds,
        }

    def restore(self, state: dict) -> None:
        mine = dataclasses.asdict(self.config)
        if state["config"] != mine:
            diff = sorted(k for k in mine if state["config"].get(k) != mine[k])
            raise ckpt.CheckpointError(f"checkpoint of a search with other settings: {diff}")
        if state["world"] != self.d.world:
            raise ckpt.CheckpointError(
                f"checkpoint written by {state['world']} ranks, resuming on {self.d.world}"
            )
        self.net.load_state_dict(state["net"])
        for u, m in zip(self.units, state["masks"], strict=True):
            u.set_mask(m)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.ctrl.below = state["controller"]["below"].clone()
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.stream.load_state_dict(state["data"])
        self.history = list(state["history"])
        self.step, self.seconds = state["step"], state["seconds"]

    def save(self, path: Path) -> None:
        """All ranks: gather RNG states; rank 0 writes ``path``."""
        for name, p in self.net.named_parameters():
            if not torch.isfinite(p).all():
                raise NonFiniteLoss(
                    f"search: parameter {name} is not finite after step {self.step}; "
                    f"{self._last_good()}"
                )
        state = self.state()
        state["rng"] = gather(self.d, _rng_state())
        if self.d.main:
            from .. import __version__

            ckpt.save(path, state, space=self.net.space.to_dict(), version=__version__)
            log.info("checkpoint step %d -> %s", self.step, path)
        self.saved = (self.step, path)

    def _last_good(self) -> str:
        if self.saved is None:
            return "no checkpoint was written"
        return f"the last good checkpoint (step {self.saved[0]}) is {self.saved[1]}"

    def forward(self, step: int, rho: float) -> tuple[torch.Tensor, float, float]:
        """This rank's loss of step ``step`` (its slices of the global batch), and the loss and
        task loss averaged over ranks."""
        per = self.shards // self.d.world
        slices = self.stream.indices().view(self.shards, -1)
        tasks = []
        for idx in slices[self.d.rank * per : (self.d.rank + 1) * per]:
            x, batch = to_net(self.dataset.batch(idx), self.net)
            tasks.append(task_loss(self.dataset.task, self.model(x), batch))
        task = tasks[0] if len(tasks) == 1 else torch.stack(tasks).mean()
        loss = task + rho * self.penalty() if rho > 0 else task
        loss_mean, task_mean = mean(self.d, [loss.item(), task.item()])
        if not (math.isfinite(loss_mean) and math.isfinite(task_mean)):
            raise NonFiniteLoss(
                f"search: non-finite loss {loss_mean} (task {task_mean}) at step {step + 1}; "
                f"{self._last_good()}. Lower search.lr or check the data."
            )
        return loss, loss_mean, task_mean


def search(
    net,
    dataset,
    config: SearchConfig,
    on_step: Callable[[int, dict], None] | None = None,
    *,
    checkpoint: str | Path | None = None,
    resume: dict | None = None,
    dist: Dist | None = None,
) -> SearchResult:
    """Search ``net`` (a ``Supernet``) on ``dataset`` (a ``hrnas.data`` dataset of the net's
    task); masks are left at the searched architecture (with ``config.ema``, the weights are the
    moving averages). ``on_step(step, record)`` after every step (record: loss, task, rho,
    macs, alive). ``checkpoint``: the file to write every ``config.checkpoint_every`` steps
    and at the end; ``resume``: a state read by ``hrnas.checkpoint.load`` to continue from;
    ``dist``: this process's rank (default: one process).

    With ``config.cost == "latency"`` the penalties, the controller and the target are in the
    latency table's milliseconds (``hrnas.latency``): the records' and the result's "macs"
    are then the table's predicted latency."""
    d = dist or Dist()
    run = _Run(net, dataset, config, d)
    ctrl, full = run.ctrl, run.ctrl.full_macs
    target, unit = config.target_macs, "MACs"
    if config.cost == "latency":
        target, unit = config.target_latency, "ms"
    if config.target_ratio is not None:
        target = config.target_ratio * full
    if target is not None and target < ctrl.min_macs:
        raise ValueError(
            f"target {target:.4g} {unit} is under the floor {ctrl.min_macs:.4g} of this network "
            f"(full {full:.4g}); raise the target"
        )
    ramp = max(1, round(config.budget_ramp * config.steps))
    rho = RhoSchedule(config.rho, config.rho_free_steps, config.rho_warmup_steps)
    if resume is not None:
        run.restore(resume)
        if checkpoint is not None:
            run.saved = (run.step, checkpoint)
    run.rewrap()
    if resume is not None:
        _set_rng_state(resume["rng"][d.rank])
    start = time.perf_counter() - run.seconds
    net.train()
    for step in range(run.step, config.steps):
        r = rho(step)
        loss, loss_mean, task_mean = run.forward(step, r)
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        run.opt.step()
        run.sched.step()
        if run.ema is not None:
            run.ema.update()
        last = step == config.steps - 1
        if (step + 1) % config.interval == 0 or last:
            floor = None
            if target is not None:
                floor = full - (full - target) * min(1.0, (step + 1) / ramp)
            ctrl.kill_below(config.threshold, config.patience, floor)
            if floor is not None:
                ctrl.cut_to(target if last else floor)
            check_identical(d, _sync_state(ctrl), f"masks/gammas after step {step + 1}")
            run.rewrap()
        record = {
            "step": step + 1,
            "loss": loss_mean,
            "task": task_mean,
            "rho": r,
            "macs": ctrl.alive_macs(),
            "alive": ctrl.alive_units(),
        }
        run.history.append(record)
        run.step, run.seconds = step + 1, time.perf_counter() - start
        # the step's report (run folder files) before its checkpoint: a run killed between the
        # two resumes from an earlier checkpoint and drops the report's later steps
        if on_step is not None:
            on_step(step, record)
        every = config.checkpoint_every
        if checkpoint is not None and (last or (every and (step + 1) % every == 0)):
            run.save(Path(checkpoint))
    if run.ema is not None:
        run.ema.copy_to()
    return SearchResult(
        target_macs=target,
        full_macs=full,
        final_macs=ctrl.alive_macs(),
        alive_units=ctrl.alive_units(),
        total_units=len(ctrl.cost),
        seconds=time.perf_counter() - start,
        history=run.history,
    )
