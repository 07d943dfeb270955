"""Search value: the searched network against uniform and random width scaling at equal MACs.

For every task and seed ``s``, three architectures of the same supernet, at the same MACs:

* ``searched``: the search exactly as ``hrnas search`` runs it (the task's config, seeds
  ``search.seed = retrain.seed = s``, ``torch.manual_seed(s)`` before the supernet is built),
  to ``search.target_ratio`` (0.5) of the supernet's MACs; its exported ``arch``;
* ``uniform``: every searchable unit group (a block's channels of one kernel size; a
  transformer's tokens) keeps ``round(f * size)`` of its units, ``f`` found by bisection so that
  the MACs equal the searched arch's within ``MACS_TOLERANCE`` (1%);
* ``random``: group ``g`` keeps ``round(min(1, c * r_g) * size)`` units with ``r_g ~ U(0, 1)``
  drawn from a generator seeded by ``s``, ``c`` found by bisection to the same MACs;

each retrained from scratch with the task's retrain settings (``torch.manual_seed(s)``, then
``hrnas.build_from_arch``, ``hrnas.train.train``), its BN statistics recalibrated on
``eval.recalibrate_batches`` training batches (``hrnas.search.recalibrate_bn``) and evaluated on
the test split (``hrnas.train.evaluate``): mIoU for segmentation, top-1 for classification.
This is what ``hrnas search`` does after its search (``hrnas/cli.py``), done here with the same
library calls. Which units of a group are kept does not matter for a net trained from scratch:
only the per-(block, kernel size) counts reach the arch.

Tasks (``TASKS``): ``seg`` is the default job's config unchanged (``hrnas/configs/default.yaml``:
``hrnas-seg-tiny`` without transformers, ``fashion-seg`` 2048/512 canvases of 64x64, 240 search
+ 240 retrain steps); ``cls`` is that config with the ``hrnas-cls-tiny`` space on the embedded
Fashion-MNIST classification subset (8,000 train / 2,000 test images, 28x28), everything else
(steps, optimizer, rho, budget) the default's. ``--quick`` shrinks data and steps to a smoke test.

Rows (appended to the CSV as each network finishes, so an interrupted run keeps them): task,
seed, variant, MACs, params, metric name and value, retrain seconds, search seconds (searched),
the arch's alive hidden channels per block, and the run's device, threads and git sha. The table
printed at the end gives per-variant mean and std over seeds and ``searched - uniform`` per seed.

Run ``python benchmarks/bench_search_value.py [--tasks seg cls] [--seeds 0 1 2] [--quick]``
(one torch thread: the default job's setting).
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import statistics
from collections.abc import Callable
from pathlib import Path

import _harness as h
import torch

import hrnas
from hrnas import job
from hrnas.config import load_config
from hrnas.search import SearchConfig, search
from hrnas.train import evaluate

OP = "search_value"
VARIANTS = ("searched", "uniform", "random")
MACS_TOLERANCE = 0.01
TASKS = {
    "seg": [],
    "cls": [
        "space=hrnas-cls-tiny",
        "data.name=fashion-cls",
        "data.train_count=null",
        "data.test_count=null",
    ],
}
# --quick: a smoke test of every code path in seconds (numbers meaningless).
QUICK = [
    "search.steps=6",
    "search.interval=2",
    "search.rho_warmup_steps=2",
    "search.batch_size=4",
    "retrain.steps=3",
    "retrain.batch_size=4",
    "eval.batch_size=16",
    "eval.recalibrate_batches=2",
]
QUICK_SEG = ["data.train_count=32", "data.test_count=16"]
# fashion-cls has no ``count`` option: --quick keeps its first images instead.
QUICK_CLS_COUNTS = (32, 16)
CSV_COLUMNS = (
    "task",
    "seed",
    "variant",
    "macs",
    "params",
    "metric",
    "value",
    "retrain_seconds",
    "search_seconds",
    "alive_per_block",
    "quick",
    "threads",
    "device",
    "torch_version",
    "git_sha",
    "timestamp",
)


class Prefix(torch.utils.data.Dataset):
    """The first ``count`` samples of a ``hrnas.data`` dataset (``batch`` and task kept)."""

    def __init__(self, dataset, count: int):
        if not 1 <= count <= len(dataset):
            raise ValueError(f"count must be in [1, {len(dataset)}], got {count}")
        self.dataset, self.count = dataset, count
        self.task, self.num_classes = dataset.task, dataset.num_classes

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.count:
            raise IndexError(i)
        return self.dataset[i]

    def batch(self, indices) -> dict:
        indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if indices.numel() and (int(indices.max()) >= self.count or int(indices.min()) < 0):
            raise IndexError(f"indices out of [0, {self.count})")
        return self.dataset.batch(indices)


def task_config(task: str, quick: bool) -> dict:
    overrides = TASKS[task] + (QUICK + (QUICK_SEG if task == "seg" else []) if quick else [])
    return load_config(None, overrides)


def datasets(config: dict, task: str, quick: bool):
    """(train, test) as ``hrnas search`` builds them from ``config["data"]``."""
    train_set, test_set = job.datasets(config)
    if quick and task == "cls":
        train_set, test_set = (
            Prefix(d, n) for d, n in zip((train_set, test_set), QUICK_CLS_COUNTS)
        )
    return train_set, test_set


def input_size(dataset) -> tuple[int, int]:
    return tuple(dataset.batch([0])["image"].shape[-2:])


def set_keep(net, counts: list[int]) -> None:
    """Keep the first ``counts[g]`` units of every search unit group ``g`` of ``net``."""
    for unit, n in zip(net.search_units(), counts):
        keep = torch.zeros(unit.size, dtype=torch.bool)
        keep[:n] = True
        unit.set_mask(keep)


def match_macs(net, fractions: Callable[[float], list[float]], hi: float, target: float) -> dict:
    """The arch of ``net`` whose group ``g`` keeps ``round(fractions(x)[g] * size_g)`` units
    (clipped to ``[0, size_g]``), MACs within ``MACS_TOLERANCE`` of ``target``.

    ``x`` is bisected in ``[0, hi]`` (MACs grow with ``x``). Groups of equal size and fraction
    cross a rounding step at the same ``x``, so MACs can jump by more than the tolerance there:
    then the groups whose count differs between the two ends of the final bracket switch to the
    upper count one at a time, in construction order (every group still keeps ``round(f * size)``
    for some ``f`` of that bracket). Raises if even that misses the tolerance."""
    sizes = [u.size for u in net.search_units()]
    size = tuple(net.space.input_size)

    def counts_at(x: float) -> list[int]:
        return [round(min(1.0, max(0.0, f)) * s) for f, s in zip(fractions(x), sizes)]

    def macs_of(counts: list[int]) -> int:
        set_keep(net, counts)
        return net.macs(size)

    def close(macs: int) -> bool:
        return abs(macs - target) <= MACS_TOLERANCE * target

    lo = 0.0
    for _ in range(60):
        mid = (lo + hi) / 2
        macs = macs_of(counts_at(mid))
        if close(macs):
            return hrnas.export_arch(net)
        lo, hi = (mid, hi) if macs < target else (lo, mid)
    counts, upper = counts_at(lo), counts_at(hi)
    for g in [g for g, (a, b) in enumerate(zip(counts, upper)) if a != b]:
        counts[g] = upper[g]
        macs = macs_of(counts)
        if close(macs):
            return hrnas.export_arch(net)
    raise RuntimeError(f"no scale reaches {target:.4g} MACs within 1% (last {macs:.4g})")


def uniform_arch(net, target: float) -> dict:
    groups = len(net.search_units())
    return match_macs(net, lambda f: [f] * groups, 1.0, target)


def random_arch(net, target: float, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    r = torch.rand(len(net.search_units()), generator=gen, dtype=torch.float64).tolist()
    return match_macs(net, lambda c: [c * v for v in r], 1.0 / max(min(r), 1e-6), target)


def retrain_and_eval(config: dict, arch: dict, train_set, test_set) -> dict:
    """Retrain ``arch`` from scratch with ``config["retrain"]``, recalibrate BN, evaluate."""
    net, seconds = job.retrain(config, arch, train_set)
    result = evaluate(net, test_set, config["eval"]["batch_size"])
    return {
        **result,
        "macs": net.macs(tuple(net.space.input_size)),
        "params": net.num_parameters(),
        "retrain_seconds": seconds,
    }


def alive_per_block(arch: dict) -> str:
    """Alive hidden channels per block, in construction order, ``/``-separated."""
    return "/".join(str(sum(b["channels"])) for b in arch["blocks"])


def architectures(config: dict, train_set, seed: int) -> tuple[dict, float]:
    """``({variant: arch}, search seconds)`` for one seed."""
    torch.manual_seed(seed)
    net = job.supernet(config, train_set)
    result = search(net, train_set, SearchConfig(**config["search"]))
    searched = hrnas.export_arch(net)
    target = hrnas.build_from_arch(searched).macs(input_size(train_set))
    print(
        f"  searched to {result.final_macs:.4g} MACs (target {result.target_macs:.4g}, "
        f"full {result.full_macs:.4g}) in {result.seconds:.0f} s",
        flush=True,
    )
    scaled = job.supernet(config, train_set)
    archs = {
        "searched": searched,
        "uniform": uniform_arch(scaled, target),
        "random": random_arch(scaled, target, seed),
    }
    return archs, result.seconds


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} +- {std:.4f}"


def summary(rows: list[dict]) -> str:
    """Per task: each variant's mean +- std (sample std) over seeds of metric and MACs, and
    ``searched - uniform`` / ``searched - random`` per seed."""
    lines = []
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        lines.append(
            f"[{task}: {mine[0]['metric']} over seeds {sorted({r['seed'] for r in mine})}]"
        )
        for variant in VARIANTS:
            got = [r for r in mine if r["variant"] == variant]
            if got:
                macs = statistics.fmean(r["macs"] for r in got)
                params = statistics.fmean(r["params"] for r in got)
                lines.append(
                    f"  {variant:9s} {_mean_std([r['value'] for r in got])}  "
                    f"MACs {macs / 1e6:.3f} M  params {params:.0f}"
                )
        by = {(r["seed"], r["variant"]): r["value"] for r in mine}
        for other in VARIANTS[1:]:
            diffs = {
                s: by[s, "searched"] - by[s, other]
                for s in sorted({r["seed"] for r in mine})
                if (s, "searched") in by and (s, other) in by
            }
            if diffs:
                text = "  ".join(f"seed {s}: {d:+.4f}" for s, d in diffs.items())
                lines.append(
                    f"  searched - {other}: {text}  mean {statistics.fmean(diffs.values()):+.4f}"
                )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=["seg", "cls"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--quick", action="store_true", help="tiny data and steps: a smoke test")
    p.add_argument(
        "--out",
        type=Path,
        help="CSV to append to (default benchmarks/results/search_value_<cpu>.csv)",
    )
    p.add_argument(
        "--table",
        type=Path,
        nargs="+",
        metavar="CSV",
        help="run nothing: print one table of the full-budget rows of these CSVs (runs in "
        "parallel processes must each write their own --out: appends from several processes "
        "to one file can overwrite each other on some filesystems)",
    )
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be positive")
    if min(args.seeds) < 0:
        p.error("--seeds must be non-negative")
    return args


def read_rows(path: Path) -> list[dict]:
    """The rows of a CSV this script wrote that are not ``--quick``, typed as ``main`` makes
    them."""
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["quick"] == "0"]
    for r in rows:
        r.update(seed=int(r["seed"]), macs=int(r["macs"]), params=int(r["params"]))
        r["value"] = float(r["value"])
    return rows


def main(argv=None) -> list[dict]:
    """Run the benchmark of the module docstring; returns the rows."""
    args = parse_args(argv)
    if args.table is not None:
        rows = [r for path in args.table for r in read_rows(path)]
        print(summary(rows))
        return rows
    torch.set_num_threads(args.threads)
    dev = h.device_name("cpu")
    out = args.out or h.RESULTS_DIR / f"{OP}_{h.device_slug(dev)}.csv"
    common = {
        "quick": int(args.quick),
        "threads": args.threads,
        "device": dev,
        "torch_version": torch.__version__,
        "git_sha": h.git_sha(),
    }
    print(
        f"{OP} | {dev} | torch {torch.__version__} | git {common['git_sha']} | "
        f"{args.threads} thread(s) | loadavg {h.loadavg()} | rows to {out}",
        flush=True,
    )
    rows = []
    csv_file, writer = h._open_csv(out, CSV_COLUMNS)
    try:
        for task in args.tasks:
            base = task_config(task, args.quick)
            train_set, test_set = datasets(base, task, args.quick)
            for seed in args.seeds:
                config = copy.deepcopy(base)
                for key in ("search", "retrain"):
                    config[key]["seed"] = seed
                print(f"{task} seed {seed}", flush=True)
                archs, search_seconds = architectures(config, train_set, seed)
                for variant, arch in archs.items():
                    result = retrain_and_eval(config, arch, train_set, test_set)
                    row = {
                        "task": task,
                        "seed": seed,
                        "variant": variant,
                        "macs": result["macs"],
                        "params": result["params"],
                        "metric": result["metric"],
                        "value": result["value"],
                        "retrain_seconds": round(result["retrain_seconds"], 2),
                        "search_seconds": round(search_seconds, 2) if variant == "searched" else "",
                        "alive_per_block": alive_per_block(arch),
                        **common,
                        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(
                            timespec="seconds"
                        ),
                    }
                    writer.writerow(row)
                    csv_file.flush()
                    rows.append(row)
                    print(
                        f"  {variant:9s} {row['metric']} {row['value']:.4f}  "
                        f"{row['macs'] / 1e6:.3f} M MACs  {row['params']} params  "
                        f"{row['retrain_seconds']:.0f} s  alive {row['alive_per_block']}",
                        flush=True,
                    )
    finally:
        csv_file.close()
    print("\n" + summary(rows) + f"\nloadavg at end: {h.loadavg()}", flush=True)
    return rows


if __name__ == "__main__":
    main()
