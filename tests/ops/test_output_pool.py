"""The pool the CPU kernels take outputs of at least 128 KiB from (csrc/common/output_pool.h).

A reused block still holds its last tensor's values, so every kernel must write every element it
returns or saves: each op runs forward+backward once, every reachable tensor of at least 128 KiB
(output, saved tensors, input gradients) is filled with NaN and freed, and the second run, which
gets those blocks back, must match the first bit for bit.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import hrnas_kernels
from hrnas_kernels._testing import runnable, seeded
from hrnas_kernels.nn import DynamicTokenTransformer
from hrnas_kernels.token_transformer import ops as token_ops

_NATIVE = runnable("native", "cpu")
pytestmark = pytest.mark.skipif(bool(_NATIVE), reason=str(_NATIVE))

MIB = 1 << 20
POOLED = 128 << 10  # kMinPooledBytes


def _dwconv(fmt):
    gen = seeded(0)
    x = torch.randn(2, 40, 64, 70, generator=gen).to(memory_format=fmt).requires_grad_()
    weights = [
        (torch.randn(c, 1, k, k, generator=gen) / k).requires_grad_()
        for c, k in ((13, 3), (11, 5), (16, 7))
    ]
    gamma = torch.rand(40, generator=gen).requires_grad_()
    beta = torch.randn(40, generator=gen).requires_grad_()

    def run():
        return _with_saved(
            hrnas_kernels.mixed_dwconv_bn_act(x, weights, gamma, beta, None, None, impl="native")
        )

    return run, [x, *weights, gamma, beta]


def _multires(fmt):
    gen = seeded(1)
    xs = [
        torch.randn(2, 24, h, w, generator=gen).to(memory_format=fmt).requires_grad_()
        for h, w in ((80, 72), (40, 36), (27, 19))
    ]

    def run():
        return _with_saved(hrnas_kernels.multires_fusion(xs, impl="native"))

    return run, xs


def _token(fmt):
    torch.manual_seed(2)
    module = DynamicTokenTransformer(18, num_tokens=16, impl="native")
    x = torch.randn(4, 18, 64, 64).to(memory_format=fmt).requires_grad_()

    def run():
        # the op rather than the module: its C++ autograd node saves the tape it returns
        m = module
        y, tape, *_ = token_ops.fwd(
            x.contiguous(),
            m.coords,
            m.input_proj.weight.flatten(1),
            m.input_norm.weight,
            m.input_norm.bias,
            None,
            None,
            m.encoder.weights(),
            m.query_embed.weight,
            m.decoder.weights(),
            m.reverse_proj.weight.flatten(1),
            m.reverse_norm.weight,
            m.reverse_norm.bias,
            None,
            None,
            1,
            [64, 64],
            True,
            1e-5,
        )
        return y, [tape]

    return run, [x, *module.parameters()]


def _with_saved(out):
    """The output and the tensors its (Python) autograd function saved (none without one)."""
    return out, [] if out.grad_fn is None else list(out.grad_fn.saved_tensors)


def _fwd_bwd(run, inputs):
    out, saved = run()
    grads = torch.autograd.grad(out, inputs, torch.cos(torch.arange(out.numel()).view_as(out)))
    return out, saved, grads


def _big_results(tensors, inputs):
    """The tensors of at least 128 KiB (pooled) that are not (views of) the inputs or parameters."""
    owned = {t.untyped_storage().data_ptr() for t in inputs}
    return [
        t
        for t in tensors
        if t.numel() * t.element_size() >= POOLED and t.untyped_storage().data_ptr() not in owned
    ]


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("make", [_dwconv, _multires, _token], ids=["dwconv", "multires", "token"])
def test_reused_blocks_are_fully_overwritten(make, fmt):
    run, inputs = make(fmt)
    out, saved, grads = _fwd_bwd(run, inputs)
    expected = [out.detach().clone(), *(g.clone() for g in grads)]
    poisoned = _big_results([out, *saved, *grads], inputs)
    assert poisoned, "the case must be large enough to use the pool"
    with torch.no_grad():
        for t in poisoned:
            t.fill_(math.nan)
    del out, saved, grads, poisoned
    before = hrnas_kernels.cpu_output_pool_info()
    out, _, grads = _fwd_bwd(run, inputs)
    after = hrnas_kernels.cpu_output_pool_info()
    assert after["hits"] > before["hits"]
    for actual, wanted in zip([out.detach(), *grads], expected, strict=True):
        torch.testing.assert_close(actual, wanted, rtol=0, atol=0)


def test_live_outputs_never_share_a_block_and_blocks_come_back():
    run, inputs = _dwconv(torch.contiguous_format)
    hrnas_kernels.release_cpu_output_pool()
    with torch.no_grad():
        (first, _), (second, _) = run(), run()
    assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    pointer, nbytes = first.untyped_storage().data_ptr(), first.untyped_storage().nbytes()
    del first
    info = hrnas_kernels.cpu_output_pool_info()
    assert info["idle_blocks"] >= 1 and info["idle_bytes"] >= nbytes
    with torch.no_grad():
        third, _ = run()
    assert third.untyped_storage().data_ptr() == pointer  # the most recently freed block
    torch.testing.assert_close(third, second, rtol=0, atol=0)


def test_pooled_outputs_behave_like_tensors():
    run, _ = _multires(torch.contiguous_format)
    with torch.no_grad():
        out, _ = run()
    copy = out.clone()
    out.resize_(out.numel() * 2)  # the storage grows through the pool's allocator
    torch.testing.assert_close(out[: copy.numel()].view_as(copy), copy, rtol=0, atol=0)
    out.resize_(3).zero_()
    assert out.tolist() == [0.0, 0.0, 0.0]


def test_release_frees_idle_blocks():
    run, _ = _multires(torch.contiguous_format)
    with torch.no_grad():
        run()
    assert hrnas_kernels.cpu_output_pool_info()["idle_blocks"] >= 1
    info = hrnas_kernels.release_cpu_output_pool()
    assert info["idle_bytes"] == 0 and info["idle_blocks"] == 0


_LIMIT_SCRIPT = """
import torch, hrnas_kernels
x = [torch.randn(1, 16, 128, 128 + i) for i in range(6)]  # six different 1+ MiB outputs
for t in x:
    hrnas_kernels.multires_fusion([t], impl="native")  # freed at once
info = hrnas_kernels.cpu_output_pool_info()
print(info["limit_bytes"], info["idle_bytes"], info["idle_blocks"], info["hits"])
"""


@pytest.mark.parametrize(
    ("limit_mb", "idle_blocks"),
    [("0", 0), ("3", 2)],  # off; room for two of the ~1.05 MiB blocks, the oldest evicted
)
def test_limit_from_the_environment(limit_mb, idle_blocks):
    env = dict(os.environ, HRNAS_CPU_POOL_MB=limit_mb)
    result = subprocess.run(
        [sys.executable, "-c", _LIMIT_SCRIPT], env=env, capture_output=True, text=True, check=True
    )
    limit, idle, blocks, hits = map(int, result.stdout.split())
    assert limit == int(limit_mb) * MIB
    assert idle <= limit and blocks == idle_blocks and hits == 0
