"""A few search steps on a tiny space: identical masks and losses with ``impl="reference"`` and
``impl="auto"`` in float64; the budget is met within 2%; bad configs are refused."""

import pytest
import torch

import hrnas
from hrnas.data import FashionSegmentation
from hrnas.search import SearchConfig, search


@pytest.fixture(scope="module")
def canvases():
    return FashionSegmentation("train", count=16, size=32)


def _run(impl, data, **config):
    torch.manual_seed(0)
    net = hrnas.build_supernet(
        "hrnas-seg-tiny", num_classes=11, transformers=False, impl=impl, input_size=(32, 32)
    ).double()
    cfg = SearchConfig(
        steps=4, batch_size=4, interval=1, patience=1, rho=0.05, rho_warmup_steps=0, **config
    )
    result = search(net, data, cfg)
    return net, result


def test_reference_and_auto_agree_in_float64(canvases):
    ref, r_ref = _run("reference", canvases, target_ratio=0.5, threshold=0.05)
    auto, r_auto = _run("auto", canvases, target_ratio=0.5, threshold=0.05)
    for a, b in zip(r_ref.history, r_auto.history):
        assert a["macs"] == b["macs"] and a["alive"] == b["alive"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-9, abs=1e-12)
    for ua, ub in zip(ref.search_units(), auto.search_units()):
        assert torch.equal(ua.mask, ub.mask)
    assert r_ref.final_macs == pytest.approx(ref.macs((32, 32)))
    assert abs(r_ref.final_macs - r_ref.target_macs) / r_ref.target_macs < 0.02
    assert r_ref.history[0]["alive"] > r_ref.alive_units  # units died along the way


def test_explicit_macs_target(canvases):
    net, result = _run("auto", canvases, target_macs=1.5e6)
    assert abs(net.macs((32, 32)) - 1.5e6) / 1.5e6 < 0.02


def test_target_under_floor_raises(canvases):
    with pytest.raises(ValueError, match="floor"):
        _run("auto", canvases, target_macs=10.0)


@pytest.mark.parametrize(
    "bad",
    [
        {"steps": 0},
        {"lr": -1.0},
        {"target_ratio": 1.5},
        {"target_ratio": 0.5, "target_macs": 1e6},
        {"budget_ramp": 0.0},
    ],
)
def test_bad_search_config(bad):
    with pytest.raises(ValueError, match="search config"):
        SearchConfig(**bad)
