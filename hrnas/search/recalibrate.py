"""BatchNorm recalibration before evaluation (the authors' ``bn_calibration``).

Weights that moved during the search leave running statistics averaged over stale activations.
Recalibration resets every BatchNorm's statistics and re-estimates them as the plain average
over ``batches`` forward passes in training mode (no gradient): at pass ``i`` (1-based) each
BN's momentum is ``1 / i``, so ``running = mean_i(batch stats)`` exactly, the cumulative moving
average of ``momentum=None``. This works for ``nn.BatchNorm2d``, the masked BNs of the
supernet blocks and the fused depthwise op alike, since all of them read ``.momentum``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


def _batch_norms(net: nn.Module) -> list[nn.Module]:
    return [
        m
        for m in net.modules()
        if hasattr(m, "running_mean") and hasattr(m, "momentum") and m.running_mean is not None
    ]


@torch.no_grad()
def recalibrate_bn(net: nn.Module, inputs: Iterable[torch.Tensor], forward: Callable = None) -> int:
    """Re-estimate every BN's running statistics of ``net`` from ``inputs`` (an iterable of
    input batches; ``forward(net, x)`` runs one, default ``net(x)``). Returns the number of
    batches used; ``net`` keeps its train/eval mode and its BN momenta."""
    bns = _batch_norms(net)
    saved = [m.momentum for m in bns]
    was_training = net.training
    for m in bns:
        m.running_mean.zero_()
        m.running_var.fill_(1.0)
        m.num_batches_tracked.zero_()
    net.train()
    count = 0
    try:
        for x in inputs:
            count += 1
            for m in bns:
                m.momentum = 1.0 / count
            (forward or (lambda n, b: n(b)))(net, x)
    finally:
        for m, momentum in zip(bns, saved):
            m.momentum = momentum
        net.train(was_training)
    if count == 0:
        raise ValueError("recalibrate_bn needs at least one batch")
    return count
