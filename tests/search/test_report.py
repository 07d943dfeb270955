"""The run folder's report: plot data from a hand-made history, valid non-empty PNGs, the
architecture layout of the multi-branch network, and TensorBoard events with every tag."""

import json
from dataclasses import dataclass

import matplotlib.image
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import hrnas
from hrnas.report import (
    SearchReport,
    alive_matrix,
    alive_snapshot,
    arch_layout,
    curves,
    plot_arch,
    plot_channels,
    plot_search,
    plot_tokens,
)

PNG = b"\x89PNG\r\n\x1a\n"

HISTORY = [
    {"step": 1, "loss": 2.0, "task": 1.9, "rho": 0.0, "macs": 10e6, "alive": 100},
    {"step": 2, "loss": 1.5, "task": 1.3, "rho": 5e-4, "macs": 8e6, "alive": 80},
    {"step": 3, "loss": 1.2, "task": 1.0, "rho": 1e-3, "macs": 5e6, "alive": 50},
]
SNAPSHOTS = [
    {"step": 2, "channels": {"a": (8, 8), "b": (6, 12)}, "tokens": {}},
    {"step": 3, "channels": {"a": (2, 8), "b": (0, 12)}, "tokens": {"b": (16, 64)}},
]


@dataclass
class Unit:
    """A ``SearchUnit`` stand-in: name, kind, mask."""

    name: str
    kind: str
    mask: torch.Tensor

    @property
    def size(self):
        return self.mask.numel()


def _is_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG, path
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 50 and image.shape[1] > 50


def test_curves_of_a_hand_made_history():
    c = curves(HISTORY)
    assert c["step"].tolist() == [1, 2, 3]
    assert c["cost"].tolist() == [10e6, 8e6, 5e6]
    assert c["task"].tolist() == [1.9, 1.3, 1.0] and c["alive"].tolist() == [100, 80, 50]
    with pytest.raises(ValueError, match="empty"):
        curves([])
    with pytest.raises(ValueError, match="'task'"):
        curves([{"step": 1, "loss": 1.0, "rho": 0.0, "macs": 1.0, "alive": 1}])


def test_alive_snapshot_sums_kernel_groups():
    units = [
        Unit("b0", "channels", torch.tensor([True, False, True])),
        Unit("b0", "channels", torch.tensor([False, False, True])),
        Unit("b1", "channels", torch.tensor([True, True])),
        Unit("b1.transformer", "tokens", torch.tensor([True] * 5 + [False] * 3)),
    ]
    snap = alive_snapshot(units)
    assert snap == {"channels": {"b0": (3, 6), "b1": (2, 2)}, "tokens": {"b1": (5, 8)}}


def test_alive_matrix_fractions():
    names, steps, frac = alive_matrix(SNAPSHOTS, "channels")
    assert names == ["a", "b"] and steps.tolist() == [2, 3]
    np.testing.assert_allclose(frac, [[1.0, 0.25], [0.5, 0.0]])
    names, steps, frac = alive_matrix(SNAPSHOTS, "tokens")
    assert names == ["b"]
    np.testing.assert_allclose(frac, [[0.0, 0.25]])  # absent at step 2: no token counted
    with pytest.raises(ValueError, match="kind"):
        alive_matrix(SNAPSHOTS, "heads")


def _entry(name, inp, oup, stride, kernels=(3, 5), channels=(4, 2), tokens=0):
    return {
        "name": name,
        "in_channels": inp,
        "out_channels": oup,
        "stride": stride,
        "kernel_sizes": list(kernels),
        "channels": list(channels),
        "tokens": tokens,
    }


def test_arch_layout_of_a_hand_made_arch():
    arch = {
        "blocks": [
            _entry("features.0.paths.0_0", 6, 6, 1),
            _entry("features.1.branches.0.0", 6, 6, 1, (3,), (5,)),
            _entry("features.2.paths.0_0", 6, 6, 1),
            _entry("features.2.new.1", 6, 10, 2),
            _entry("features.3.branches.0.0", 6, 6, 1),
            _entry("features.3.branches.1.0", 10, 10, 1, (), ()),
            _entry("features.3.branches.1.1", 10, 10, 1, (7,), (3,), tokens=9),
            _entry("features.4.paths.0_0", 6, 6, 1),
            _entry("features.4.paths.0_1", 10, 6, 1, (5,), (1,)),
            _entry("head.transform", [6, 10], 12, 1),
        ]
    }
    boxes = {(b["col"], b["row"]): b for b in arch_layout(arch)}
    # stage 0: fuse col 0, one block col 1; stage 1: fuse col 2, two blocks cols 3-4;
    # stage 2: fuse col 5; head col 6
    assert sorted(boxes) == [(0, 0), (1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (4, 1), (5, 0), (6, 0)]
    assert boxes[(0, 0)]["kind"] == "fuse" and "0>0 k3:4 k5:2" in boxes[(0, 0)]["label"]
    assert boxes[(1, 0)]["label"] == "k3:5"
    assert boxes[(2, 1)]["label"] == "new\nk3:4 k5:2" and boxes[(2, 1)]["sources"] == [0]
    assert boxes[(3, 1)]["label"] == "shortcut"
    assert boxes[(4, 1)]["label"] == "k7:3 t:9"
    fused = boxes[(5, 0)]
    assert fused["sources"] == [0, 1] and "1>0 k5:1" in fused["label"]
    head = boxes[(6, 0)]
    assert head["kind"] == "head" and head["sources"] == [0, 1]
    with pytest.raises(ValueError, match="topology"):
        arch_layout({"blocks": [_entry("stem.0", 3, 6, 2)]})
    with pytest.raises(ValueError, match="blocks"):
        arch_layout({})


def test_arch_layout_of_every_block_of_a_real_space():
    net = hrnas.build_supernet("hrnas-cls-tiny", num_classes=10, transformers=False)
    arch = hrnas.export_arch(net)
    boxes = arch_layout(arch)
    fuse_paths = sum(b["label"].count(">") for b in boxes if b["kind"] == "fuse")
    others = sum(1 for b in boxes if b["kind"] != "fuse")
    assert fuse_paths + others == len(arch["blocks"])  # every block drawn once
    assert len({(b["col"], b["row"]) for b in boxes}) == len(boxes)  # no two boxes overlap


def test_plots_are_valid_pngs(tmp_path):
    net = hrnas.build_supernet("hrnas-seg-tiny", num_classes=3, transformers=False)
    for path in (
        plot_search(HISTORY, tmp_path / "search.png", target=5e6, title="t"),
        plot_search(HISTORY, tmp_path / "lat.png", target=4e6, cost="latency"),
        plot_channels(SNAPSHOTS, tmp_path / "channels.png"),
        plot_tokens(SNAPSHOTS, tmp_path / "tokens.png"),
        plot_arch(hrnas.export_arch(net), tmp_path / "arch.png"),
    ):
        _is_png(path)
    no_tokens = [{**s, "tokens": {}} for s in SNAPSHOTS]
    assert plot_tokens(no_tokens, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_search_report_writes_events_and_plots(tmp_path):
    torch.manual_seed(0)
    net = hrnas.build_supernet("hrnas-seg-tiny", num_classes=3, transformers=False)
    units = net.search_units()
    report = SearchReport(tmp_path, units, interval=2, steps=3)
    for step, record in enumerate(HISTORY):
        if step == 1:
            units[0].set_mask(torch.zeros(units[0].size, dtype=torch.bool))
        report.on_step(step, record)
    assert [s["step"] for s in report.snapshots] == [2, 3]  # check steps only
    first = units[0].name
    assert report.snapshots[0]["channels"][first][0] == 2 * units[0].size
    paths = report.finish(hrnas.export_arch(net), {"mIoU": 0.25}, target=5e6)
    assert [p.name for p in paths] == ["search.png", "channels.png", "arch.png"]
    for p in paths:
        _is_png(p)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("loss", "task_loss", "rho", "macs", "alive_units"):
        assert f"search/{tag}" in tags
    assert f"channels/{first}" in tags and "final/mIoU" in tags
    assert [e.value for e in events.Scalars("search/macs")] == [10e6, 8e6, 5e6]
    assert [e.step for e in events.Scalars(f"channels/{first}")] == [2, 3]
    with pytest.raises(ValueError, match="cost"):
        SearchReport(tmp_path, units, 2, 3, cost="joules")


def test_search_report_continues_a_resumed_run(tmp_path):
    """Killed after step 3 (alive.json then holds the checks at 2 and 4 of a 5-step run with
    interval 2), resumed from a checkpoint of step 2: the report keeps the check of step 2 and
    writes 4 again; TensorBoard events after step 2 are purged and written again."""
    units = [Unit("a", "channels", torch.ones(8, dtype=torch.bool))]
    history = [dict(HISTORY[i % 3], step=i + 1) for i in range(5)]
    first = SearchReport(tmp_path, units, interval=2, steps=5)
    for step in range(4):
        first.on_step(step, history[step])
    first.writer.close()
    units[0].mask[:3] = False
    again = SearchReport(tmp_path, units, interval=2, steps=5, resumed=history[:2])
    assert [s["step"] for s in again.snapshots] == [2]
    for step in range(2, 5):
        again.on_step(step, history[step])
    again.writer.close()
    assert [s["step"] for s in again.snapshots] == [2, 4, 5]
    assert [s["channels"]["a"][0] for s in again.snapshots] == [8, 5, 5]
    saved = json.loads((tmp_path / "alive.json").read_text())
    assert [s["step"] for s in saved] == [2, 4, 5] and again.history == history
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("search/loss")] == [1, 2, 3, 4, 5]


def test_tokens_of_a_transformer_supernet(tmp_path):
    net = hrnas.build_supernet("hrnas-seg-tiny", num_classes=3, transformers=True)
    units = net.search_units()
    tokens = [u for u in units if u.kind == "tokens"]
    first = alive_snapshot(units)
    tokens[0].set_mask(torch.arange(tokens[0].size) < 10)
    second = alive_snapshot(units)
    name = tokens[0].name.removesuffix(".transformer")
    assert first["tokens"][name] == (tokens[0].size, tokens[0].size)
    assert second["tokens"][name] == (10, tokens[0].size)
    assert len(second["tokens"]) == len(tokens)
    snaps = [{"step": 1, **first}, {"step": 2, **second}]
    _is_png(plot_tokens(snaps, tmp_path / "tokens.png"))
