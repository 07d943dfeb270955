"""Latency tables: a measured table round-trips through JSON and is checked; the controller and
the search reach a latency target within 2% of the table's prediction; latency penalties are
normalised as the MACs ones (cost / unit-weighted mean)."""

import json

import pytest
import torch

import hrnas
from hrnas.data import FashionSegmentation
from hrnas.latency import (
    FORMAT,
    VERSION,
    _block_inputs,
    _layout,
    check_table,
    load_table,
    measure_table,
    predict_ms,
    save_table,
    unit_costs,
)
from hrnas.search import BudgetController, SearchConfig, SparsityPenalty, search

SIZE = (32, 32)


def _net(seed=0):
    torch.manual_seed(seed)
    return hrnas.build_supernet(
        "hrnas-seg-tiny", num_classes=11, transformers=False, input_size=SIZE
    )


def _synthetic_table(net, base=2.0):
    """A hand-made table: a unit of kernel k costs k * 1e-3 ms, one block's more (uneven)."""
    units = net.search_units(SIZE)
    rows = [
        {
            "name": u.name,
            "kind": u.kind,
            "kernel_size": u.kernel_size,
            "size": u.size,
            "ms_per_unit": u.kernel_size * 1e-3 * (5.0 if u.name == "head.transform" else 1.0),
        }
        for u in units
    ]
    return {"format": FORMAT, "version": VERSION, "input_size": list(SIZE), "base_ms": base}, rows


@pytest.fixture(scope="module")
def measured():
    net = _net()
    threads = torch.get_num_threads()  # module scope: set up before the per-test fixture
    torch.set_num_threads(1)
    try:
        return net, measure_table(net, SIZE, batch=1, repeats=1, samples=4)
    finally:
        torch.set_num_threads(threads)


def test_blocks_are_timed_in_the_networks_layout():
    """A channels_last network's blocks get channels_last inputs inside it, so the table times
    them alone on such inputs; an NCHW network's on NCHW ones."""
    net = _net()
    found, _ = net.block_input_sizes(SIZE)
    for fmt in (torch.contiguous_format, torch.channels_last):
        net.to(memory_format=fmt)
        assert _layout(net) == fmt
        gen = torch.Generator().manual_seed(0)
        for _, block in net.blocks():
            inputs = _block_inputs(block, found[block], 1, gen, _layout(net))
            for x in inputs if isinstance(inputs, list) else [inputs]:
                assert x.is_contiguous(memory_format=fmt)


def test_measured_table_round_trips(measured, tmp_path):
    net, table = measured
    units = net.search_units(SIZE)
    assert all(bool(u.mask.all()) for u in units)  # masks left as found
    assert [(r["name"], r["kernel_size"], r["size"]) for r in table["units"]] == [
        (u.name, u.kernel_size, u.size) for u in units
    ]
    assert all(r["ms_per_unit"] >= 0 for r in table["units"])
    assert table["threads"] == 1 and table["clock"] == "thread"
    assert [f["keep"] for f in table["fit"]] == [0.75, 0.5, 0.25]
    path = tmp_path / "table.json"
    save_table(table, path)
    assert load_table(path) == json.loads(json.dumps(table))
    costs, base = unit_costs(load_table(path), units, SIZE)
    assert base == table["base_ms"] and len(costs) == len(units)
    full = base + sum(c * u.size for c, u in zip(costs, units))
    assert predict_ms(table, units, SIZE) == pytest.approx(full)
    assert table["full_ms"] == pytest.approx(full)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda t: t.update(format="other"), "format"),
        (lambda t: t.update(version=99), "version"),
        (lambda t: t.pop("base_ms"), "base_ms"),
        (lambda t: t["units"][0].pop("size"), "lacks"),
        (lambda t: t["units"][1].update(ms_per_unit=-1.0), "bad size or cost"),
    ],
)
def test_bad_tables_are_refused(measured, change, message):
    table = json.loads(json.dumps(measured[1]))
    change(table)
    with pytest.raises(ValueError, match=message):
        check_table(table)


def test_table_of_another_size_or_space_is_refused(measured):
    net, table = measured
    with pytest.raises(ValueError, match="measured at"):
        unit_costs(table, net.search_units((64, 64)), (64, 64))
    other = hrnas.build_supernet("hrnas-seg-small", num_classes=11, transformers=False)
    with pytest.raises(ValueError, match="no entry"):
        unit_costs(table, other.search_units(SIZE), SIZE)
    with pytest.raises(FileNotFoundError, match="bench-latency"):
        load_table("/nonexistent/table.json")


@pytest.mark.parametrize("ratio", [0.7, 0.4])
def test_controller_hits_latency_target(ratio):
    net = _net()
    with torch.no_grad():
        for u in net.search_units():
            u.gamma.uniform_(0.01, 1.0)
    head, rows = _synthetic_table(net)
    table = {**head, "units": rows}
    units = net.search_units(SIZE)
    costs, base = unit_costs(table, units, SIZE)
    ctrl = BudgetController(net, units, SIZE, costs, base)
    assert ctrl.full_macs == pytest.approx(predict_ms(table, units, SIZE))
    assert ctrl.min_macs == base
    target = base + ratio * (ctrl.full_macs - base)
    assert ctrl.cut_to(target) > 0
    predicted = predict_ms(table, units, SIZE)
    assert ctrl.alive_macs() == pytest.approx(predicted)
    assert abs(predicted - target) / target < 0.02
    with pytest.raises(ValueError, match="both"):
        BudgetController(net, units, SIZE, costs)


def test_latency_penalties_normalised_as_macs():
    net = _net()
    units = net.search_units(SIZE)
    costs = [0.5 * (i + 1) for i in range(len(units))]
    penalty = SparsityPenalty(units, costs)
    sizes = [u.size for u in units]
    z = sum(c * n for c, n in zip(costs, sizes)) / sum(sizes)
    assert penalty.z == pytest.approx(z)
    assert [penalty.unit_penalty(i) for i in range(len(units))] == pytest.approx(
        [c / z for c in costs]
    )
    mean = sum(penalty.unit_penalty(i) * n for i, n in enumerate(sizes)) / sum(sizes)
    assert mean == pytest.approx(1.0)
    gamma = torch.cat([u.gamma.detach().abs() for u in units])
    weights = torch.cat([torch.full((n,), c / z) for c, n in zip(costs, sizes)])
    assert float(penalty().detach()) == pytest.approx(float((gamma * weights).sum()), rel=1e-5)
    with pytest.raises(ValueError, match="one cost per unit group"):
        SparsityPenalty(units, costs[:-1])


def test_search_reaches_latency_target(tmp_path):
    net = _net()
    head, rows = _synthetic_table(net)
    path = tmp_path / "table.json"
    save_table({**head, "units": rows}, path)
    data = FashionSegmentation("train", count=8, size=32)
    full = predict_ms(load_table(path), net.search_units(SIZE), SIZE)
    target = 0.5 * (full + head["base_ms"])
    config = SearchConfig(
        steps=3,
        batch_size=4,
        interval=1,
        rho_warmup_steps=0,
        target_ratio=None,
        cost="latency",
        latency_table=str(path),
        target_latency=target,
    )
    result = search(net, data, config)
    predicted = predict_ms(load_table(path), net.search_units(SIZE), SIZE)
    assert result.target_macs == target and result.final_macs == pytest.approx(predicted)
    assert abs(predicted - target) / target < 0.02
    assert [r["macs"] for r in result.history][-1] == pytest.approx(predicted)


@pytest.mark.parametrize(
    "config,message",
    [
        ({"cost": "speed"}, "cost must be"),
        ({"cost": "latency"}, "needs latency_table"),
        ({"target_latency": 3.0}, "needs cost 'latency'"),
        ({"cost": "latency", "latency_table": "t.json", "target_macs": 1e6}, "takes target"),
        ({"target_latency": 1.0, "target_ratio": 0.5, "cost": "latency"}, "give one of"),
    ],
)
def test_bad_latency_search_configs(config, message):
    with pytest.raises(ValueError, match=message):
        SearchConfig(**config)
