"""Masked supernet semantics: live masks, exact zero gradients, unit costs, impl parity."""

import pytest
import torch

import hrnas

TINY = ["hrnas-cls-tiny", "hrnas-seg-tiny", "hrnas-seg-ade-tiny", "hrnas-kpt-tiny"]


def _net(name="hrnas-seg-tiny", impl="auto", **kw):
    return hrnas.build_supernet(name, num_classes=5, transformers=False, impl=impl, **kw)


def _random_masks(net, p=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for unit in net.search_units():
        unit.set_mask(torch.rand(unit.size, generator=gen) < p)


def _loss(net, x):
    out = net(x)
    return (out * torch.linspace(-1, 1, out.numel()).view_as(out).to(out)).sum()


@pytest.mark.parametrize("name", TINY)
def test_forward_shapes(name):
    net = _net(name)
    out = net(torch.randn(2, 3, 64, 48))
    if name.startswith("hrnas-cls"):
        assert out.shape == (2, 5)
    else:
        assert out.shape == (2, 5, 16, 12)


def test_dead_units_get_exactly_zero_gradient_and_keep_their_statistics():
    net = _net().double()
    _random_masks(net, 0.4)
    units = net.search_units()
    units[0].set_mask(torch.zeros(units[0].size, dtype=torch.bool))  # a group fully dead
    stats = {
        name: (b.expand_bn.running_mean.clone(), b.dw.running_var.clone())
        for name, b in net.blocks()
    }
    _loss(net, torch.randn(2, 3, 32, 32, dtype=torch.float64)).backward()
    checked = 0
    for name, block in net.blocks():
        dead = ~block.mask
        if not dead.any():
            continue
        alive_any = bool(block.mask.any())
        assert (
            torch.equal(block.expand.weight.grad[dead], torch.zeros_like(block.expand.weight[dead]))
            if alive_any
            else block.expand.weight.grad is None
        )
        if not alive_any:
            continue
        for g in (
            block.expand_bn.weight.grad,
            block.expand_bn.bias.grad,
            block.dw.weight.grad,
            block.dw.bias.grad,
        ):
            assert torch.count_nonzero(g[dead]) == 0
        assert torch.count_nonzero(block.project.weight.grad[:, dead]) == 0
        per = block.hidden // 3
        for g, w in enumerate(block.dw.weights):
            assert torch.count_nonzero(w.grad[dead[g * per : (g + 1) * per]]) == 0
        mean, var = stats[name]
        assert torch.equal(block.expand_bn.running_mean[dead], mean[dead])
        assert torch.equal(block.dw.running_var[dead], var[dead])
        assert not torch.equal(block.expand_bn.running_mean[~dead], mean[~dead])
        # alive units do learn
        assert torch.count_nonzero(block.dw.weight.grad[~dead]) > 0
        checked += 1
    assert checked > 10


def test_toggling_a_mask_back_restores_the_output():
    net = _net().double().eval()
    _random_masks(net, 0.7)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    before = net(x)
    unit = net.search_units()[5]
    saved = unit.mask.clone()
    unit.set_mask(torch.zeros(unit.size, dtype=torch.bool))
    changed = net(x)
    unit.set_mask(saved)
    assert not torch.equal(changed, before)
    assert torch.equal(net(x), before)


def test_a_block_with_nothing_alive_is_its_shortcut():
    net = _net().eval()
    name, block = net.blocks()[3]
    block.mask.zero_()
    x = torch.randn(1, block.in_channels[0], 8, 8)
    expected = x if block.residual else block.shortcut(x)
    assert torch.equal(block(x), expected)


def test_unit_cost_is_the_marginal_macs_and_params_count_alive_only():
    net = _net()
    size = (64, 64)
    units = net.search_units(size)
    total, params = net.macs(size), net.num_parameters()
    assert params == sum(p.numel() for p in net.parameters())
    for unit in (units[0], units[17], units[-1]):
        alive = unit.mask.clone()
        alive[0] = False
        unit.set_mask(alive)
        assert total - net.macs(size) == unit.cost
        assert params - net.num_parameters() > unit.kernel_size**2
        alive[0] = True
        unit.set_mask(alive)
    # costs grow with the kernel size within a block, and equal the authors' formula
    a, b, c = units[:3]
    assert a.cost < b.cost < c.cost
    blk = net.blocks()[0][1]
    assert c.cost == blk.in_channels[0] * 16 * 16 + (49 + blk.out_channels) * 16 * 16


def test_search_units_expose_live_gamma_and_mask_views():
    net = _net()
    unit = net.search_units()[4]
    assert unit.gamma.shape == (unit.size,) and unit.mask.dtype == torch.bool
    with torch.no_grad():
        unit.weight[unit.start] = 3.0
    assert unit.gamma[0] == 3.0
    (unit.gamma.abs().sum()).backward()
    assert unit.weight.grad[unit.start : unit.stop].eq(1).all()
    with pytest.raises(ValueError, match="bool tensor"):
        unit.set_mask(torch.ones(unit.size + 1, dtype=torch.bool))


@pytest.mark.parametrize("name", ["hrnas-seg-tiny", "hrnas-cls-tiny"])
def test_native_and_reference_supernets_agree_forward_and_backward(name):
    torch.manual_seed(0)
    net = _net(name).double()
    _random_masks(net, 0.5, seed=1)
    ref = _net(name, impl="reference").double()
    ref.load_state_dict(net.state_dict())
    # small: the reference depthwise conv is slow in float64 on gathered channel slices
    x = torch.randn(2, 3, 24, 24, dtype=torch.float64)
    for model in (net, ref):
        torch.manual_seed(2)  # the same dropout mask in the cls head
        _loss(model, x).backward()
    grads = [q.grad.abs().max() for q in ref.parameters() if q.grad is not None]
    floor = 1e-14 * float(max(grads))  # for gradients that are zero up to rounding
    for (n, p), q in zip(net.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            scale = float(q.grad.abs().max())  # BN over few pixels: judge against the scale
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-10 * scale + floor, msg=n)
    for (n, b), c in zip(net.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-9, atol=1e-12, msg=n)


def test_set_impl_switches_every_op():
    net = _net()
    net.set_impl("reference")
    assert {m.impl for m in net.modules() if hasattr(m, "impl")} == {"reference"}


def test_token_units_dead_tokens_and_marginal_cost():
    net = hrnas.build_supernet("hrnas-seg-tiny", num_classes=3, transformers="downsampling")
    net = net.double()
    tokens = [u for u in net.search_units() if u.kind == "tokens"]
    assert len(tokens) == sum(b.transformer is not None for _, b in net.blocks()) > 10
    unit = tokens[2]
    alive = torch.rand(unit.size) < 0.5
    unit.set_mask(alive)
    tokens[0].set_mask(torch.zeros(tokens[0].size, dtype=torch.bool))  # a transformer left out
    size = (32, 32)
    before = net.macs(size)
    cost = [u for u in net.search_units(size) if u.name == unit.name][0].cost
    alive[torch.nonzero(alive)[0]] = False
    unit.set_mask(alive)
    assert before - net.macs(size) == cost  # linear part + marginal attention term
    _loss(net, torch.randn(2, 3, 32, 32, dtype=torch.float64)).backward()
    dead = ~unit.mask
    t = dict(net.blocks())[unit.name.removesuffix(".transformer")].transformer
    for grad in (t.input_norm.weight.grad, t.input_proj.weight.grad, t.query_embed.weight.grad):
        assert torch.count_nonzero(grad[dead]) == 0 and torch.count_nonzero(grad[~dead]) > 0
    assert torch.count_nonzero(t.reverse_proj.weight.grad[:, dead]) == 0
    first = dict(net.blocks())[tokens[0].name.removesuffix(".transformer")].transformer
    assert all(p.grad is None for p in first.parameters())
