"""BatchNorm's running-statistics update shared by the searched ops
(``hrnas_kernels::batch_norm_running_update``): the CPU kernel against the composite (the one
other devices run) and against ``F.batch_norm``'s own update, with and without an index of alive
units, strided buffers, the version counter, opcheck, and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hrnas_kernels import _running_stats
from hrnas_kernels._testing import runnable, seeded

_NATIVE = runnable("native", "cpu")
pytestmark = pytest.mark.skipif(bool(_NATIVE), reason=str(_NATIVE))

OP = torch.ops.hrnas_kernels.batch_norm_running_update


def _case(dtype, size=11, index=None):
    gen = seeded(3)
    count = size if index is None else index.numel()
    running = (
        torch.randn(size, generator=gen, dtype=dtype),
        torch.rand(size, generator=gen, dtype=dtype) + 0.5,
    )
    stats = (
        torch.randn(count, generator=gen, dtype=dtype),
        torch.rand(count, generator=gen, dtype=dtype),
    )
    return running, stats


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.1, 0.5, 0.9, 0.0, 1.0])
@pytest.mark.parametrize(
    "index", [None, [0, 3, 4, 10], [7], []], ids=["all", "some", "one", "none"]
)
def test_cpu_kernel_matches_the_composite(dtype, momentum, index):
    index = None if index is None else torch.tensor(index, dtype=torch.int64)
    (rm, rv), (mean, var) = _case(dtype, index=index)
    ours = [rm.clone(), rv.clone()]
    theirs = [rm.clone(), rv.clone()]
    OP(*ours, mean, var, index, momentum, 5)
    _running_stats._composite(*theirs, mean, var, index, momentum, 5)
    for a, b in zip(ours, theirs):  # equal bits where ATen's lerp fuses its multiply-adds
        torch.testing.assert_close(a, b)
    if index is not None:  # the other entries keep theirs
        dead = torch.ones(rm.numel(), dtype=torch.bool)
        dead[index] = False
        assert torch.equal(ours[0][dead], rm[dead]) and torch.equal(ours[1][dead], rv[dead])


def test_update_matches_batch_norm():
    """``update`` on the statistics of a batch equals F.batch_norm's own running update."""
    gen = seeded(5)
    x = torch.randn(4, 6, 3, 5, generator=gen, dtype=torch.float64)
    rm, rv = (
        torch.randn(6, generator=gen, dtype=torch.float64),
        torch.rand(6, dtype=torch.float64) + 1,
    )
    expected_m, expected_v = rm.clone(), rv.clone()
    F.batch_norm(x, expected_m, expected_v, training=True, momentum=0.3)
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    _running_stats.update(rm, rv, mean, var, None, 0.3, 4 * 3 * 5)
    torch.testing.assert_close(rm, expected_m)
    torch.testing.assert_close(rv, expected_v)


def test_strided_buffers_and_statistics():
    base = torch.zeros(2, 11)
    rm, rv = base[0, ::2], base[1, ::2]  # 6 entries, stride 2
    mean, var = torch.arange(12.0)[::4], torch.arange(12.0)[1::4]  # 3 entries, stride 4
    index = torch.tensor([5, 0, 2])
    OP(rm, rv, mean, var, index, 0.5, 1)
    assert rm.tolist() == [2.0, 0.0, 4.0, 0.0, 0.0, 0.0]
    assert rv.tolist() == [2.5, 0.0, 4.5, 0.0, 0.0, 0.5]
    assert base[:, 1::2].abs().sum() == 0  # the gaps untouched


def test_bumps_the_version_counter():
    (rm, rv), (mean, var) = _case(torch.float32)
    versions = rm._version, rv._version
    OP(rm, rv, mean, var, None, 0.1, 1)
    assert (rm._version, rv._version) == (versions[0] + 1, versions[1] + 1)


@pytest.mark.parametrize("index", [None, [1, 2, 5]], ids=["all", "some"])
def test_opcheck(index):
    index = None if index is None else torch.tensor(index)
    (rm, rv), (mean, var) = _case(torch.float32, index=index)
    torch.library.opcheck(OP, (rm, rv, mean, var, index, 0.1, 3))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(mean=torch.zeros(4)), "mean and var must be 1-d of 11"),
        (lambda a: a.update(rv=torch.zeros(10)), "running_mean and running_var must be 1-d"),
        (lambda a: a.update(var=torch.zeros(11, dtype=torch.float64)), "var has dtype"),
        (
            lambda a: a.update(index=torch.tensor([0.0]), mean=torch.zeros(1), var=torch.zeros(1)),
            "index must be a 1-d int64",
        ),
        (
            lambda a: a.update(index=torch.tensor([11]), mean=torch.zeros(1), var=torch.zeros(1)),
            "outside",
        ),
        (
            lambda a: a.update(index=torch.tensor([-1]), mean=torch.zeros(1), var=torch.zeros(1)),
            "outside",
        ),
    ],
)
def test_bad_input_raises_a_clear_error(change, message):
    (rm, rv), (mean, var) = _case(torch.float32)
    args = dict(rm=rm, rv=rv, mean=mean, var=var, index=None)
    change(args)
    with pytest.raises(RuntimeError, match=message):
        OP(args["rm"], args["rv"], args["mean"], args["var"], args["index"], 0.1, 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_buffers_take_the_composite(dtype):
    """float16/bfloat16 buffers with float32 statistics (the GPU kernels' case, and the CUDA
    host replay's on the CPU): ``update`` lerps in float32 and rounds once; the CPU kernel itself
    refuses the mix with a clear error."""
    index = torch.tensor([1, 4, 6])
    (rm, rv), (mean, var) = _case(torch.float32, index=index)
    ours = [rm.to(dtype), rv.to(dtype)]
    expected = [ours[0].clone(), ours[1].clone()]
    for r, stat in ((expected[0], mean), (expected[1], var * (7 / 6))):
        r[index] = torch.lerp(r[index].float(), stat, 0.1).to(dtype)
    _running_stats.update(*ours, mean, var, index, 0.1, 7)
    assert torch.equal(ours[0], expected[0]) and torch.equal(ours[1], expected[1])
    with pytest.raises(RuntimeError, match="mean has dtype"):
        OP(*ours, mean, var, index, 0.1, 7)
