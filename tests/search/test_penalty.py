"""Penalty normalisation, the token penalty and the rho schedule against hand-computed values;
the sparsity term against a direct sum, with dead units contributing nothing."""

import pytest
import torch
from torch import nn

import hrnas
from hrnas.search import RhoSchedule, SparsityPenalty, normaliser, token_penalty
from hrnas.supernet.supernet import SearchUnit


def test_normaliser_hand_values():
    # Z = (3 * 2 + 1 * 10) / (3 + 1) = 4: penalties 0.5 and 2.5, unit-weighted mean 1.
    z = normaliser([2.0, 10.0], [3, 1])
    assert z == 4.0
    assert (3 * 2.0 / z + 1 * 10.0 / z) / 4 == 1.0


@pytest.mark.parametrize("costs,sizes", [([], []), ([1.0], [1, 2]), ([1.0], [0]), ([0.0], [3])])
def test_normaliser_bad_input(costs, sizes):
    with pytest.raises(ValueError):
        normaliser(costs, sizes)


def test_token_penalty_hand_value():
    # F = 1e6, n0 = 64, c = 10, Z = 2:
    # ((1e6 - 2 * 64^2 * 64) / 64 + 2 * (10^2 - 9^2) * 64) / 2 = (7433 + 2432) / 2 = 4932.5
    assert token_penalty(1e6, 64, 10, 2.0) == 4932.5


def test_rho_schedule_hand_values():
    rho = RhoSchedule(1.0, free_steps=2, warmup_steps=6)
    assert [rho(t) for t in range(8)] == [0.0, 0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert RhoSchedule(0.3)(0) == 0.3  # no warm-up: constant from the start
    for bad in [(-1.0, 0, 0), (1.0, 3, 2), (1.0, -1, 2)]:
        with pytest.raises(ValueError):
            RhoSchedule(*bad)


def _tiny_net():
    torch.manual_seed(0)
    return hrnas.build_supernet("hrnas-seg-tiny", num_classes=3, transformers=False)


def test_sparsity_penalty_matches_direct_sum_and_skips_dead_units():
    net = _tiny_net()
    units = net.search_units()
    with torch.no_grad():
        for u in units:
            u.gamma.uniform_(-1, 1)
    units[0].set_mask(torch.arange(units[0].size) % 2 == 0)
    units[3].set_mask(torch.zeros(units[3].size, dtype=torch.bool))
    pen = SparsityPenalty(units)
    z = sum(u.cost * u.size for u in units) / sum(u.size for u in units)
    assert pen.z == pytest.approx(z, rel=1e-12)
    expected = sum(u.cost / z * float(u.gamma.detach().abs()[u.mask].sum()) for u in units)
    value = pen()
    assert value.item() == pytest.approx(expected, rel=1e-5)
    value.backward()
    grad = units[0].weight.grad
    dead0 = units[0].start + torch.nonzero(~units[0].mask).flatten()
    assert torch.all(grad[dead0] == 0)
    grad3 = units[3].weight.grad
    assert torch.all(grad3[units[3].start : units[3].stop] == 0)
    alive0 = units[0].start + torch.nonzero(units[0].mask).flatten()
    assert torch.all(grad[alive0].abs() > 0)


class _Tokens(nn.Module):
    """Stands in for a transformer's token BN: a weight and a token mask."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(-1, 1, n))
        self.register_buffer("channel_mask", torch.ones(n, dtype=torch.bool))


def test_token_penalty_follows_alive_count():
    n0, macs = 8, 40_000.0
    module = _Tokens(n0)
    tokens = SearchUnit("t", "tokens", None, module.weight, module.channel_mask, 0, n0, macs / n0)
    other = _Tokens(4)
    chans = SearchUnit("c", "channels", 3, other.weight, other.channel_mask, 0, 4, 900.0)
    pen = SparsityPenalty([tokens, chans])
    z = (macs + 4 * 900.0) / (n0 + 4)
    for alive in (8, 5):
        mask = torch.arange(n0) < alive
        tokens.set_mask(mask)
        per_token = token_penalty(macs, n0, alive, z)
        expected = per_token * float(module.weight.detach().abs()[mask].sum()) + 900.0 / z * float(
            chans.gamma.detach().abs().sum()
        )
        assert pen().item() == pytest.approx(expected, rel=1e-6)
