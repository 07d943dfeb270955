"""pytest-benchmark view of bench_search_value: one ``--quick`` run (both tasks, one seed).

A smoke test of every code path (search, equal-MACs uniform and random archs, retraining, BN
recalibration, evaluation, CSV): the numbers of a 6-step search and 3-step retraining mean
nothing, so it checks what must hold at any budget: three variants per task, MACs equal to the
searched arch's within 1%, metrics in [0, 1], the uniform arch keeping one fraction everywhere,
and the CSV holding the rows it printed.
"""

import csv

import bench_search_value as bench

import hrnas


def test_search_value_quick(benchmark, tmp_path):
    out = tmp_path / "search_value.csv"
    argv = ["--quick", "--tasks", "seg", "cls", "--seeds", "0", "--out", str(out)]
    rows = benchmark.pedantic(bench.main, args=(argv,), rounds=1, iterations=1)
    assert [(r["task"], r["variant"]) for r in rows] == [
        (t, v) for t in ("seg", "cls") for v in bench.VARIANTS
    ]
    for task in ("seg", "cls"):
        by = {r["variant"]: r for r in rows if r["task"] == task}
        target = by["searched"]["macs"]
        for variant in ("uniform", "random"):
            assert abs(by[variant]["macs"] - target) <= bench.MACS_TOLERANCE * target
        assert by["uniform"]["alive_per_block"] != by["random"]["alive_per_block"]
        assert {r["metric"] for r in by.values()} == {"mIoU" if task == "seg" else "top1"}
        assert all(0.0 <= r["value"] <= 1.0 and r["params"] > 0 for r in by.values())
    with open(out, newline="") as f:
        written = list(csv.DictReader(f))
    assert [(r["task"], r["variant"], int(r["macs"])) for r in written] == [
        (r["task"], r["variant"], r["macs"]) for r in rows
    ]


def uniform_spread(net) -> float:
    """max - min over unit groups of kept / size, times the smallest group size."""
    kept = [float(u.mask.sum()) / u.size for u in net.search_units()]
    return (max(kept) - min(kept)) * min(u.size for u in net.search_units())


def check_uniform(ratio: float) -> None:
    net = hrnas.build_supernet("hrnas-cls-tiny", num_classes=10, transformers=False)
    target = ratio * net.macs()
    arch = bench.uniform_arch(net, target)
    assert abs(net.macs() - target) <= bench.MACS_TOLERANCE * target
    assert hrnas.build_from_arch(arch).macs() == net.macs()
    # one fraction f everywhere: every group keeps round(f * size), so kept / size differ by
    # at most one unit of the smallest group
    assert uniform_spread(net) <= 1.0


def test_uniform_arch(benchmark):
    benchmark.pedantic(check_uniform, args=(0.37,), rounds=1, iterations=1)
