"""BatchNorm's running-statistics update after a training forward of the searched ops
(``mixed_dwconv_bn_act``, ``token_transformer``), as ``F.batch_norm`` does it: for the running
mean and variance, ``r = lerp(r, stat, momentum)``, the batch variance unbiased by
``n / (n - 1)``; with an index of alive units only their entries (the others keep theirs: the
statistics came from the alive units alone).

One op call, ``hrnas_kernels::batch_norm_running_update``: on the CPU a C++ loop
(csrc/common/running_stats.cpp) updates in place (buffers and statistics of one dtype); on other
devices, and without the C++ extension, the composite below does it with ATen calls, in the
statistics' dtype (float32 for reduced-precision buffers), rounded once into the buffers.
"""

import torch

torch.library.define(
    "hrnas_kernels::batch_norm_running_update",
    "(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var, Tensor? index, "
    "float momentum, SymInt count) -> ()",
)


def _composite(running_mean, running_var, mean, var, index, momentum, count):
    unbiased = var * (count / max(count - 1, 1))
    for running, stat in ((running_mean, mean), (running_var, unbiased)):
        alive = running if index is None else running.index_select(0, index)
        updated = torch.lerp(alive.to(stat.dtype), stat, momentum).to(running.dtype)
        if index is None:
            running.copy_(updated)
        else:
            running.index_copy_(0, index, updated)


torch.library.impl(
    "hrnas_kernels::batch_norm_running_update", "CompositeExplicitAutograd", _composite
)


@torch.library.register_fake("hrnas_kernels::batch_norm_running_update")
def _fake(running_mean, running_var, mean, var, index, momentum, count):
    return None


def update(running_mean, running_var, mean, var, index, momentum: float, count: int) -> None:
    """Update ``running_mean``/``running_var`` (full size) in place from the batch ``mean`` and
    biased ``var`` of ``count`` values per unit, at the entries ``index`` lists (None: all).
    Buffers of another dtype than the statistics (float16/bfloat16 buffers, float32 statistics)
    take the composite: the CPU kernel wants one dtype."""
    if running_mean.dtype != mean.dtype:
        _composite(running_mean, running_var, mean, var, index, float(momentum), count)
        return
    torch.ops.hrnas_kernels.batch_norm_running_update.default(
        running_mean, running_var, mean, var, index, float(momentum), count
    )
