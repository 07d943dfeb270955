"""The budget controller: cuts to a MACs target within 2%, least important units first,
threshold deaths with patience and a floor; BN recalibration equals the plain batch average."""

import pytest
import torch
from torch import nn

import hrnas
from hrnas.search import BudgetController, recalibrate_bn


def _net(seed=0):
    torch.manual_seed(seed)
    net = hrnas.build_supernet("hrnas-seg-tiny", num_classes=3, transformers=False)
    with torch.no_grad():
        for u in net.search_units():
            u.gamma.uniform_(0.01, 1.0)
    return net


@pytest.mark.parametrize("ratio", [0.8, 0.5, 0.3])
def test_cut_to_target_within_two_percent(ratio):
    net = _net()
    size = net.space.input_size
    ctrl = BudgetController(net, net.search_units(size), size)
    assert ctrl.alive_macs() == pytest.approx(net.macs(size))
    assert ctrl.full_macs == pytest.approx(net.macs(size))
    target = ctrl.min_macs + ratio * (ctrl.full_macs - ctrl.min_macs)
    cut = ctrl.cut_to(target)
    assert cut > 0
    macs = net.macs(size)
    assert ctrl.alive_macs() == pytest.approx(macs)
    assert abs(macs - target) / target < 0.02
    gamma = torch.cat([u.gamma.detach().abs() for u in net.search_units()])
    mask = torch.cat([u.mask for u in net.search_units()])
    assert gamma[~mask].max() <= gamma[mask].min()  # the least important went first
    assert ctrl.cut_to(target * 1.5) == 0  # already under: nothing more dies


def test_cut_below_floor_raises():
    net = _net()
    ctrl = BudgetController(net, net.search_units(net.space.input_size))
    with pytest.raises(ValueError, match="floor"):
        ctrl.cut_to(ctrl.min_macs * 0.5)


def test_kill_below_patience_and_floor():
    net = _net()
    units = net.search_units(net.space.input_size)
    ctrl = BudgetController(net, units)
    with torch.no_grad():
        units[0].gamma.fill_(1e-5)
        units[1].gamma.fill_(1e-5)
    assert ctrl.kill_below(1e-3, patience=2) == 0  # one check is not enough
    n = units[0].size + units[1].size
    assert ctrl.kill_below(1e-3, patience=2) == n
    assert not units[0].mask.any() and not units[1].mask.any()
    with torch.no_grad():
        units[2].gamma.fill_(1e-5)
    floor = ctrl.alive_macs() - 2.5 * units[2].cost
    assert ctrl.kill_below(1e-3, patience=1, floor=floor) == 2
    assert ctrl.alive_macs() >= floor


def test_recalibrate_bn_is_the_batch_average():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, momentum=0.1))
    net.eval()
    xs = [torch.randn(4, 2, 5, 5) * (i + 1) for i in range(3)]
    assert recalibrate_bn(net, xs) == 3
    assert not net.training and net[1].momentum == 0.1
    with torch.no_grad():
        ys = [net[0](x) for x in xs]
    mean = torch.stack([y.mean((0, 2, 3)) for y in ys]).mean(0)
    var = torch.stack([y.transpose(0, 1).reshape(3, -1).var(1) for y in ys]).mean(0)
    torch.testing.assert_close(net[1].running_mean, mean)
    torch.testing.assert_close(net[1].running_var, var)
    with pytest.raises(ValueError):
        recalibrate_bn(net, [])
