"""The EMA of the weights: the update rule, ``copy_to``, its state, and ``train(ema=...)``
ending with the averaged weights."""

import pytest
import torch
from torch import nn

from hrnas.ema import EMA
from hrnas.train import train

from . import _tiny


def test_update_rule_copy_and_state():
    net = nn.Linear(3, 2).double()
    w0 = net.weight.detach().clone()
    ema = EMA(net, 0.9)
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update()
    # s1 = 0.9 w0 + 0.1 (w0 + 1), s2 = 0.9 s1 + 0.1 (w0 + 2)
    expected = 0.9 * (0.9 * w0 + 0.1 * (w0 + 1)) + 0.1 * (w0 + 2)
    torch.testing.assert_close(ema.shadow[0], expected, rtol=0, atol=1e-15)
    other = EMA(nn.Linear(3, 2).double(), 0.5)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.9 and torch.equal(other.shadow[0], ema.shadow[0])
    ema.copy_to()
    assert torch.equal(net.weight, ema.shadow[0])
    with pytest.raises(ValueError, match="ema state has 2 tensors"):
        EMA(nn.Linear(3, 2, bias=False), 0.5).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match=r"decay must be in \(0, 1\)"):
        EMA(net, 1.0)


def test_train_with_ema_ends_with_the_average():
    """Decay 0.5 over two steps: the net ends with 0.25 w0 + 0.25 w1 + 0.5 w2 of its own
    trajectory (w_t the raw weights after step t)."""
    net = _tiny.supernet()
    seen = [[p.detach().clone() for p in net.parameters()]]

    def keep(step, loss):
        seen.append([p.detach().clone() for p in net.parameters()])

    train(
        net,
        _tiny.dataset(),
        steps=2,
        batch_size=4,
        lr=1e-2,
        weight_decay=0.0,
        seed=0,
        ema=0.5,
        on_step=keep,
    )
    w0, w1, w2 = seen
    for p, a, b, c in zip(net.parameters(), w0, w1, w2):
        torch.testing.assert_close(p.detach(), 0.25 * a + 0.25 * b + 0.5 * c)
    assert any(not torch.equal(p, c) for p, c in zip(net.parameters(), w2))
