"""Search throughput (images/s) of one process against N processes (DDP, gloo on CPU, one
thread each) on the same global batch.

Each configuration spawns its ranks (``torch.multiprocessing``, a free local port), builds the
``hrnas-seg-tiny`` supernet on the embedded segmentation canvases and runs ``hrnas.search``
(the real loop: forward, penalty, backward, DDP all-reduce, optimizer, controller checks with
the cross-rank mask check) with no budget and threshold 0, so no unit dies and every step costs
the same. Rank 0 times every step after ``--warmup``; throughput = global batch / step time,
reported at the median step and at the fastest one. Rows go to
``benchmarks/results/distributed_<cpu>.csv``.

Run ``python benchmarks/bench_distributed.py [--world 1 2] [--batch 16] [--steps 14]
[--size 64]``; ``--quick`` is a short smoke run (4 timed steps at 32x32).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import _harness as h
import torch
import torch.multiprocessing as mp

import hrnas
from hrnas.data import FashionSegmentation
from hrnas.distributed import free_local_port, init_from_env, shutdown
from hrnas.search import SearchConfig, search

COLUMNS = (
    "op",
    "space",
    "image",
    "global_batch",
    "world",
    "threads_per_rank",
    "backend",
    "timed_steps",
    "median_step_ms",
    "images_per_s_median",
    "images_per_s_best",
    "speedup_vs_1",
    "device",
    "torch_version",
    "git_sha",
    "loadavg",
    "timestamp",
)


def _rank(rank: int, world: int, port: int, args, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    d = init_from_env()
    try:
        torch.manual_seed(0)
        net = hrnas.build_supernet(
            "hrnas-seg-tiny",
            num_classes=11,
            transformers=False,
            impl="auto",
            input_size=(args.size, args.size),
        )
        data = FashionSegmentation("train", count=4 * args.batch, size=args.size)
        config = SearchConfig(
            steps=args.warmup + args.steps, batch_size=args.batch, threshold=0.0, shards=world
        )
        stamps = []
        search(net, data, config, lambda step, record: stamps.append(time.perf_counter()), dist=d)
        if d.main:
            steps = [b - a for a, b in zip(stamps[args.warmup - 1 :], stamps[args.warmup :])]
            torch.save(steps, out)
    finally:
        shutdown(d)


def measure(world: int, args) -> list[float]:
    """Step times (s) of rank 0 over the timed steps of a ``world``-process search."""
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/steps.pt"
        mp.spawn(_rank, args=(world, free_local_port(), args, out), nprocs=world, join=True)
        return torch.load(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, nargs="+", default=[1, 2], help="process counts")
    p.add_argument("--batch", type=int, default=16, help="global batch (split over ranks)")
    p.add_argument("--size", type=int, default=64, help="image side")
    p.add_argument("--steps", type=int, default=12, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 steps at 32x32, batch 8")
    p.add_argument("--out", type=Path, help="CSV (default benchmarks/results/distributed_*.csv)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.size, args.batch = 4, 32, 8
    device = h.device_name("cpu")
    out = (
        args.out
        or h.REPO_ROOT / "benchmarks" / "results" / f"distributed_{h.device_slug(device)}.csv"
    )
    rows, base = [], None
    for world in args.world:
        steps = measure(world, args)
        median = statistics.median(steps)
        rate = args.batch / median
        base = rate if world == 1 else base
        rows.append(
            {
                "op": "search_ddp",
                "space": "hrnas-seg-tiny",
                "image": f"1x{args.size}x{args.size}",
                "global_batch": args.batch,
                "world": world,
                "threads_per_rank": 1,
                "backend": "gloo",
                "timed_steps": len(steps),
                "median_step_ms": f"{median * 1e3:.1f}",
                "images_per_s_median": f"{rate:.2f}",
                "images_per_s_best": f"{args.batch / min(steps):.2f}",
                "speedup_vs_1": f"{rate / base:.3f}" if base else "",
                "device": device,
                "torch_version": torch.__version__,
                "git_sha": h.git_sha(),
                "loadavg": h.loadavg(),
                "timestamp": datetime.now().isoformat(timespec="seconds"),
            }
        )
        print(
            f"world {world}: {rate:.1f} images/s at the median step ({median * 1e3:.1f} ms), "
            f"best {args.batch / min(steps):.1f}; load {h.loadavg()}",
            file=sys.stderr,
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    new = not out.exists() or out.stat().st_size == 0
    with open(out, "a", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
