"""Benchmark of one HR-NAS search training step of the masked supernet, fused ops vs reference.

One step: ``zero_grad``, forward, task loss, the resource-aware L1 penalty
``rho * sum_units penalty_u * |gamma_u|`` over alive units (``penalty = cost / Z``, ``Z`` the
unit-weighted mean cost, HRNAS_SPEC.md section 3.2), backward, optimizer step (SGD with
momentum, foreach). Cases:

* ``hrnas-seg`` with transformers (44, 64 tokens each), batch 2 at 3x256x512, cross-entropy on
  logits upsampled to the label size (as the authors' segmentation loss);
* ``hrnas-cls`` with transformers, batch 8 at 3x224x224, cross-entropy;

each at 100%, 50% and 25% alive units (the same fraction of every channel group and of every
transformer's tokens, a seeded choice), with the supernet's weights NCHW and channels_last (the
``hrnas`` default, ``memory_format`` in the run config: every conv output follows the weights,
so the whole network runs in that layout; the input stays NCHW). Providers (baseline
``reference``): the same supernet with ``impl="reference"`` (plain PyTorch ops: per-kernel-size
depthwise convs, ``F.batch_norm``, ``F.interpolate`` sums, the eager transformer) and with
``impl="auto"`` (the fused kernels).

Peak memory: on CUDA ``max_memory_allocated`` over a step; on CPU the largest total size of the
tensors autograd keeps for backward during one forward (the activation memory of the step,
storages counted once), which is what the alive fraction changes.

Run ``python benchmarks/bench_search_step.py [--threads 1 2] [--spaces hrnas-seg]
[--memory-format nchw|channels_last] [--quick]``;
``--quick`` (or ``HRNAS_BENCH_QUICK=1`` under pytest) uses the ``-tiny`` spaces at 64x64 inputs.
"""

from __future__ import annotations

import sys

import _harness as h
import torch
import torch.nn.functional as F

import hrnas

OP = "search_step"
RHO = 1.4e-4  # the authors' Cityscapes rho (cls: 1.8e-4); its value does not change the cost
PROVIDERS = ["reference", "auto"]
BASELINE = "reference"
MODES = ("full",)
ALIVE = (1.0, 0.5, 0.25)
SEG = dict(space="hrnas-seg", N=2, H=256, W=512)
CLS = dict(space="hrnas-cls", N=8, H=224, W=224)
CASES = [dict(base, alive=a) for base in (SEG, CLS) for a in ALIVE]
QUICK_CASES = [
    dict(c, space=c["space"] + "-tiny", N=2, H=64, W=64) for c in CASES if c["alive"] != 0.5
]


def label(case: dict) -> str:
    return (
        f"{case['space']} {case['N']}x3x{case['H']}x{case['W']} alive={round(case['alive'] * 100)}%"
    )


def _keep_fraction(net, alive: float, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for unit in net.search_units():
        keep = torch.zeros(unit.size, dtype=torch.bool)
        keep[torch.randperm(unit.size, generator=gen)[: max(1, round(alive * unit.size))]] = True
        unit.set_mask(keep)


class SearchStep:
    """The step of the module docstring on a supernet built for ``case`` with ``impl``."""

    def __init__(
        self,
        case: dict,
        impl: str,
        device: str,
        dtype: torch.dtype,
        memory_format: torch.memory_format = torch.contiguous_format,
    ):
        torch.manual_seed(0)
        classes = 19 if "seg" in case["space"] else 1000
        self.net = hrnas.build_supernet(case["space"], num_classes=classes, impl=impl)
        self.net.to(device=device, dtype=dtype, memory_format=memory_format).train()
        _keep_fraction(self.net, case["alive"])
        self.units = self.net.search_units()
        cost = torch.tensor([u.cost for u in self.units], dtype=torch.float64)
        sizes = torch.tensor([u.size for u in self.units], dtype=torch.float64)
        z = (cost * sizes).sum() / sizes.sum()
        self.penalty = torch.cat(
            [torch.full((u.size,), float(c / z)) for u, c in zip(self.units, cost)]
        ).to(device=device, dtype=dtype)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=1e-3, momentum=0.9)
        gen = torch.Generator().manual_seed(1)
        n, hgt, wid = case["N"], case["H"], case["W"]
        self.x = torch.randn(n, 3, hgt, wid, generator=gen).to(device=device, dtype=dtype)
        shape = (n, hgt, wid) if "seg" in case["space"] else (n,)
        self.target = torch.randint(0, classes, shape, generator=gen).to(device)

    def loss(self) -> torch.Tensor:
        out = self.net(self.x)
        if out.dim() == 4:
            out = F.interpolate(out, self.x.shape[-2:], mode="bilinear", align_corners=False)
        gamma = torch.cat([u.gamma for u in self.units])
        alive = torch.cat([u.mask for u in self.units])
        l1 = (self.penalty * gamma.abs() * alive).sum()
        return F.cross_entropy(out, self.target) + RHO * l1

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss().backward()
        self.optimizer.step()

    def activation_mb(self) -> float:
        """MB autograd saves for backward in one forward (each storage once)."""
        seen = {}

        def pack(t):
            if t.device.type != "meta" and t.numel():
                storage = t.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
            # Detached: a saved output packed as itself refers to its own grad_fn, a cycle
            # between the graph and the tensor that outlived `del loss` (2-3 GB per call for
            # hrnas-cls, so a full run died of memory). Still held: no storage is counted twice.
            return t.detach()

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self.loss()
        del loss
        return sum(seen.values()) / 2**20


def _space_flag(parser) -> None:
    parser.add_argument(
        "--spaces",
        nargs="+",
        choices=[SEG["space"], CLS["space"]],
        help="subset of the spaces to step (default: both)",
    )


def main(argv=None) -> int:
    args = h.parse_args(__doc__, argv, extra=_space_flag)
    device = args.device
    cases = [
        c
        for c in (QUICK_CASES if args.quick else CASES)
        if not args.spaces or c["space"].removesuffix("-tiny") in args.spaces
    ]
    providers = [p for p in PROVIDERS if not args.providers or p in args.providers]
    min_run_time = args.min_run_time or (h.QUICK_MIN_RUN_TIME if args.quick else 1.0)
    threads = args.threads or ([torch.get_num_threads()] if device == "cuda" else [1, 2])
    formats = h.selected_formats(args, ["nchw", "channels_last"])
    dev_name, sha = h.device_name(device), h.git_sha()
    out_path = args.out or h.RESULTS_DIR / f"{OP}_{h.device_slug(dev_name)}.csv"
    print(
        f"{OP} | {dev_name} ({device}) | torch {torch.__version__} | git {sha}\n"
        f"loadavg at start: {h.loadavg()} | min_run_time {min_run_time:g} s\n"
        "cells: p50 ms of one step (p20-p80), speedup vs reference, step time relative to the "
        "same provider at 100% alive, peak memory MB\n",
        flush=True,
    )
    csv_file, writer = h._open_csv(out_path)
    prev = torch.get_num_threads()
    try:
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            for dtype_name, fmt in ((d, f) for d in args.dtype for f in formats):
                dtype = getattr(torch, dtype_name)
                print(f"== {dtype_name}, {fmt}, {n_threads} thread{'s' * (n_threads != 1)}")
                full = {}
                base = {}
                for case in cases:
                    for provider in providers:
                        step = SearchStep(case, provider, device, dtype, h.MEMORY_FORMATS[fmt])
                        result = h.measure(h.Prepared(step), device, n_threads, min_run_time)
                        peak = result.peak if device == "cuda" else step.activation_mb()
                        key = (case["space"], provider)
                        if case["alive"] == 1.0:
                            full[key] = result.p50
                        if provider == BASELINE:
                            base[label(case)] = result.p50
                        speedup = base.get(label(case), float("nan")) / result.p50
                        rel = result.p50 / full[key] if key in full else float("nan")
                        print(
                            f"{label(case):42s} {provider:9s} {result.p50:9.1f} ms "
                            f"({result.p20:.1f}-{result.p80:.1f})  x{speedup:5.2f} vs ref  "
                            f"{rel:5.2f} of 100%  {peak:8.1f} MB",
                            flush=True,
                        )
                        writer.writerow(
                            {
                                "op": OP,
                                "provider": provider,
                                "mode": "full",
                                "shape": label(case),
                                "dtype": dtype_name,
                                "memory_format": fmt,
                                "threads": n_threads,
                                "device": dev_name,
                                "torch_version": torch.__version__,
                                "git_sha": sha,
                                "p20_ms": f"{result.p20:.4f}",
                                "p50_ms": f"{result.p50:.4f}",
                                "p80_ms": f"{result.p80:.4f}",
                                "peak_mem_mb": f"{peak:.1f}",
                                "speedup_vs": f"{speedup:.3f}",
                                "baseline": BASELINE,
                                "gbps": "",
                                "frac_peak": "",
                                "timestamp": h.datetime.datetime.now().isoformat(
                                    timespec="seconds"
                                ),
                            }
                        )
                        csv_file.flush()
                        del step
    finally:
        csv_file.close()
        torch.set_num_threads(prev)
    print(f"loadavg at end: {h.loadavg()} | rows appended to {out_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
