"""Two gloo processes on CPU against one process on the same global batch (float64).

Two ranks each take half of every batch (``shards`` = 2) and DDP averages their gradients; one
process with ``shards=2`` computes the same two halves with their own BN statistics and
accumulates. The losses agree to rounding, the masks of both ranks are identical to each other
and to the one-process masks. One block is dead from the start, so DDP runs with parameters
that get no gradient (ignored, not searched for every step); see ``hrnas.distributed``."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from hrnas.distributed import (
    Dist,
    check_identical,
    free_local_port,
    init_from_env,
    shutdown,
    unused_parameters,
)
from hrnas.search import search
from hrnas.train import as_input

from . import _tiny


def _kill_first_block(net) -> str:
    name, block = net.blocks()[0]
    block.dw.set_channel_mask(torch.zeros_like(block.dw.channel_mask))
    return name


def _run(dist: Dist | None):
    net = _tiny.supernet()
    _kill_first_block(net)
    result = search(net, _tiny.dataset(), _tiny.config(shards=2, steps=4), dist=dist)
    masks = [u.mask.clone() for u in net.search_units()]
    return result.history, masks, {k: v.detach().clone() for k, v in net.named_parameters()}


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    d = init_from_env()
    try:
        result = _run(d)
        try:  # the cross-rank check on a value that differs between the ranks
            check_identical(d, torch.tensor([1.0, float(rank), 2.0]), "probe")
        except RuntimeError as e:
            result = (*result, str(e))
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        shutdown(d)


def test_two_gloo_ranks_match_one_process(tmp_path):
    mp.spawn(_worker, args=(free_local_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    history, masks, params = _run(None)
    for *_, error in ranks:
        assert error == "probe differ across ranks in 1 of 3 entries"
    for h, m, p, _ in ranks:
        assert [r["alive"] for r in h] == [r["alive"] for r in history]
        assert [r["macs"] for r in h] == [r["macs"] for r in history]
        for a, b in zip(h, history):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-10)
        for a, b in zip(m, masks):
            assert torch.equal(a, b)
        for name, value in p.items():
            torch.testing.assert_close(value, params[name], rtol=1e-9, atol=1e-12)
    for a, b in zip(ranks[0][1], ranks[1][1]):
        assert torch.equal(a, b)
    assert history[0]["alive"] > history[-1]["alive"]  # the controller did cut units


def test_dead_block_parameters_are_exactly_those_without_gradient():
    net = _tiny.supernet()
    name = _kill_first_block(net)
    half = net.blocks()[1][1].dw
    half.set_channel_mask(torch.arange(half.channels) % 2 == 0)
    x = as_input(_tiny.dataset().batch([0, 1])["image"]).double()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    unused = unused_parameters(net, x)
    assert unused and all(n.startswith(name + ".") for n in unused)
    for k, v in net.state_dict().items():  # the probe changed no buffer
        assert torch.equal(v, before[k]), k
    net(x).sum().backward()
    assert {n for n, p in net.named_parameters() if p.grad is None} == unused
    # a masked channel of a living block stays in the graph with an exactly zero gradient
    dead = ~half.channel_mask
    assert half.weight.grad is not None and torch.all(half.weight.grad[dead] == 0)
    assert torch.all(half.weight.grad[~dead] != 0)
