"""Export: arch JSON, compact networks, equality with the masked supernet, torch.export."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import hrnas

# every registered space at a small, non-square input so the float64 runs stay quick
SIZES = {name: (48, 40) if name.endswith("-tiny") else (32, 40) for name in hrnas.list_spaces()}


def _masked(name, p, seed, transformers=False):
    net = hrnas.build_supernet(name, num_classes=4, transformers=transformers).double()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, *SIZES[name], dtype=torch.float64, generator=gen)
    net.train()
    with torch.no_grad():
        net(x)  # running statistics away from their initial values
    for unit in net.search_units():
        unit.set_mask(torch.rand(unit.size, generator=gen) < p)
    # some blocks lose everything (they become their shortcut), one a whole kernel size, one
    # transformer all its tokens (it is left out)
    channels = [u for u in net.search_units() if u.kind == "channels"]
    tokens = [u for u in net.search_units() if u.kind == "tokens"]
    for unit in [channels[i] for i in (0, 6, 7, 8, 21, 22, 23)] + tokens[1:2]:
        unit.set_mask(torch.zeros(unit.size, dtype=torch.bool))
    return net.eval(), x


# every space with transformers on residual blocks, the tiny ones also without and with the
# downsampling option
CASES = [(name, True) for name in hrnas.list_spaces()] + [
    (name, t)
    for name in hrnas.list_spaces()
    if name.endswith("-tiny")
    for t in (False, "downsampling")
]


@pytest.mark.parametrize("name, transformers", CASES)
def test_exported_subnet_equals_masked_supernet(name, transformers):
    net, x = _masked(name, 0.3, seed=len(name), transformers=transformers)
    compact = hrnas.export_subnet(net)
    assert not any(isinstance(m, hrnas.Supernet) for m in compact.modules())
    with torch.no_grad():
        expected, got = net(x), compact(x)
    assert (expected - got).abs().max() <= 1e-9
    assert compact.num_parameters() == net.num_parameters()
    assert compact.macs(SIZES[name]) == net.macs(SIZES[name])
    assert any(not b.hidden for _, b in compact.blocks())


@pytest.mark.parametrize("name", ["hrnas-seg-tiny", "hrnas-cls-tiny", "hrnas-kpt"])
def test_analytic_macs_match_the_flop_counter(name):
    net, x = _masked(name, 0.5, seed=3, transformers="downsampling")
    compact = hrnas.export_subnet(net)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        compact(x[:1])
    assert counter.get_total_flops() == 2 * net.macs(SIZES[name])  # 2 FLOPs per MAC


def test_arch_round_trips_through_json():
    net, _ = _masked("hrnas-seg-tiny", 0.4, seed=5)
    arch = hrnas.export_arch(net)
    text = json.dumps(arch)
    assert arch["format"] == "hrnas-arch" and arch["version"] == 1
    model = hrnas.build_from_arch(json.loads(text))
    assert hrnas.export_arch(model) == arch
    assert model.num_parameters() == net.num_parameters()
    entry = arch["blocks"][0]
    kept = [c for _, c in net.blocks()[0][1].alive_per_kernel() if c]
    assert entry["channels"] == kept and entry["tokens"] == 0  # no transformers here
    assert all(isinstance(m, torch.nn.Conv2d) for m in model.blocks()[1][1].dw)


def test_dense_arch_lists_every_kernel_size():
    net = hrnas.build_supernet("hrnas-cls", transformers=False)
    arch = hrnas.export_arch(net)
    assert len(arch["blocks"]) == 67
    first = arch["blocks"][0]
    assert first == {
        "name": "features.0.paths.0_0",
        "in_channels": 24,
        "out_channels": 24,
        "stride": 1,
        "kernel_sizes": [3, 5, 7],
        "channels": [96, 96, 96],
        "tokens": 0,
    }


def _arch():
    return hrnas.export_arch(hrnas.build_supernet("hrnas-seg-tiny", transformers=False))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda a: a.update(version=2), "version"),
        (lambda a: a.update(format="other"), "format"),
        (lambda a: a.pop("blocks"), "missing"),
        (lambda a: a["blocks"][0].update(out_channels=5), "the space builds"),
        (lambda a: a["blocks"][0].update(kernel_sizes=[3, 9], channels=[1, 1]), "kernel sizes"),
        (lambda a: a["blocks"][0].update(channels=[10**4, 1, 1]), "at most"),
        (lambda a: a["blocks"][1].update(channels=[0, 1, 1]), "positive channel"),
        (lambda a: a["blocks"].pop(), "no entry"),
        (lambda a: a["blocks"].append(dict(a["blocks"][0], name="extra.block")), "not in space"),
        (lambda a: a["blocks"][0].pop("tokens"), "exactly the keys"),
        (lambda a: a["space"].update(task="dance"), "task"),
        (lambda a: a["blocks"][0].update(tokens=65), "transformer tokens"),
        (lambda a: a["blocks"][0].update(tokens=3), "no transformer"),
    ],
)
def test_bad_arch_raises(edit, message):
    arch = _arch()
    edit(arch)
    with pytest.raises(ValueError, match=message):
        hrnas.build_from_arch(arch)


def test_arch_keeps_alive_tokens():
    net, _ = _masked("hrnas-cls-tiny", 0.5, seed=4, transformers=True)
    arch = hrnas.export_arch(net)
    tokens = {b["name"]: b["tokens"] for b in arch["blocks"]}
    for name, block in net.blocks():
        expected = int(block.transformer.token_mask.sum()) if block.transformer else 0
        assert tokens[name] == expected
    assert hrnas.export_arch(hrnas.build_from_arch(json.loads(json.dumps(arch)))) == arch


def test_compact_network_exports_and_compiles():
    net, _ = _masked("hrnas-seg-tiny", 0.5, seed=7, transformers=True)
    compact = hrnas.export_subnet(net).eval()  # float64: traced graphs may reorder float sums
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    expected = compact(x)
    program = torch.export.export(compact, (x,))
    torch.testing.assert_close(program.module()(x), expected, rtol=0, atol=1e-9)
    compiled = torch.compile(compact, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), expected, rtol=0, atol=1e-9)
