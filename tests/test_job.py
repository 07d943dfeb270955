"""The job's memory format: ``memory_format: channels_last`` (the default) runs the whole
supernet and the retrained network in channels_last, with the same values as nchw."""

import pytest
import torch
import torch.nn.functional as F

from hrnas import job
from hrnas.config import load_config
from hrnas.export import export_arch
from hrnas.train import as_input, make_optimizer
from tests.nas.conftest import _one_thread  # noqa: F401  (autouse: one thread per test)

SMALL = ["data.train_count=8", "data.test_count=4", "data.options={size: 32}"]


def _not_channels_last(net, x):
    """The modules whose 4-d output (more than one channel and pixel, where the two layouts
    differ) is not channels_last, in one forward of ``net`` on ``x``."""
    found = []

    def hook(module, _inputs, out):
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if (
                isinstance(t, torch.Tensor)
                and t.dim() == 4
                and t.shape[1] > 1
                and t.shape[2] * t.shape[3] > 1
                and not t.is_contiguous(memory_format=torch.channels_last)
            ):
                found.append(f"{type(module).__name__} {tuple(t.shape)}")

    handles = [m.register_forward_hook(hook) for m in net.modules()]
    try:
        net(x)
    finally:
        for h in handles:
            h.remove()
    return found


def _step_grads(net, x, target):
    net.zero_grad(set_to_none=True)
    out = net(x)
    loss = F.cross_entropy(F.interpolate(out, target.shape[-2:], mode="bilinear"), target)
    loss.backward()
    return out, {n: p.grad for n, p in net.named_parameters() if p.grad is not None}


def test_default_is_channels_last():
    assert load_config()["memory_format"] == "channels_last"


@pytest.mark.parametrize("alive", [1.0, 0.4])
def test_channels_last_supernet_matches_nchw(alive):
    nets = {}
    for fmt in ("channels_last", "nchw"):
        config = load_config(None, [*SMALL, f"memory_format={fmt}"])
        train_set, _ = job.datasets(config)
        torch.manual_seed(0)
        # float64: the comparison tests the layout, not float32 rounding through 20 BN layers
        nets[fmt] = job.supernet(config, train_set).double().train()
        gen = torch.Generator().manual_seed(1)
        for unit in nets[fmt].search_units():
            unit.set_mask(torch.rand(unit.size, generator=gen) < alive)
    batch = train_set.batch(range(4))
    x, target = as_input(batch["image"]).double(), batch["mask"]
    out, grads = _step_grads(nets["channels_last"], x, target)
    ref_out, ref_grads = _step_grads(nets["nchw"], x, target)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert ref_out.is_contiguous()
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-10)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-8, atol=1e-10, msg=name)
    for name, buf in nets["channels_last"].named_buffers():  # running statistics, masks
        torch.testing.assert_close(buf, dict(nets["nchw"].named_buffers())[name], msg=name)
    assert _not_channels_last(nets["channels_last"], x) == []


def test_retrained_network_is_channels_last():
    config = load_config(None, [*SMALL, "retrain.steps=1", "retrain.batch_size=4"])
    train_set, _ = job.datasets(config)
    arch = export_arch(job.supernet(config, train_set))
    net, _ = job.retrain(config, arch, train_set)
    x = as_input(train_set.batch(range(2))["image"])
    assert _not_channels_last(net.train(), x) == []


@pytest.mark.parametrize("grad_layout", ["param", "contiguous"])
def test_optimizer_is_fused_adamw_with_the_authors_settings(grad_layout):
    """The fused AdamW takes the steps the per-parameter loop takes (float64, 5 steps), with
    weight decay on conv/linear weights only, also from gradients whose strides are not their
    channels_last parameters' (the fused kernel alone misreads those)."""
    config = load_config(None, SMALL)
    train_set, _ = job.datasets(config)
    torch.manual_seed(0)
    net = job.supernet(config, train_set).double()
    loop_net = job.supernet(config, train_set).double()
    loop_net.load_state_dict(net.state_dict())
    opt = make_optimizer(net, lr=0.01, weight_decay=0.1)
    assert opt.defaults["fused"] and opt.defaults["eps"] == 1e-3
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0]
    assert all(p.dim() > 1 for p in opt.param_groups[0]["params"])
    loop = torch.optim.AdamW(
        [
            {"params": [p for p in loop_net.parameters() if p.dim() > 1], "weight_decay": 0.1},
            {"params": [p for p in loop_net.parameters() if p.dim() <= 1], "weight_decay": 0},
        ],
        lr=0.01,
        eps=1e-3,
        foreach=False,
    )
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        for p, q in zip(net.parameters(), loop_net.parameters()):
            grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if grad_layout == "param":  # as autograd's accumulated gradients are
                grad = torch.empty_like(p).copy_(grad)
            p.grad, q.grad = grad, grad.clone()
        opt.step()
        loop.step()
    for (name, p), q in zip(net.named_parameters(), loop_net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15, msg=name)
