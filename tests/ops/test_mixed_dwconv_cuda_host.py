"""The CUDA kernels of mixed_dwconv_bn_act replayed on the host (issue #3), without a GPU.

``mixed_dwconv_cuda_host.cpp`` (next to this file) is compiled with g++ against the kernels'
device header and runs the .cu's own launch plan (device::forward / backward) on CPU tensors:
every kernel in launch order, on the grid, CTA shape and group tables the .cu launches, each CTA
thread by thread and phase by phase between barriers, the shared-memory tree reductions in the
kernel's order, with uninitialised memory emulated as NaN. Its ops have the real ops' schemas, so
they are slotted into the public API's autograd and running-statistics path as an ``impl`` and
checked against ``reference.py``: output, running statistics, batch statistics and the conv
tape, every gradient, dead channels, in float64, float32, float16 and bfloat16 (host arithmetic
of c10::Half / BFloat16, not the GPU's). Run again with CTAs and threads last to first, the
results must be bit-identical (no thread reads another's write within a phase). A build with
deliberate bugs must fail. Not covered: what only a GPU decides (launch limits, shared-memory
sizes, the device code nvcc generates, timing); the kernels use no warp-level primitives.
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hrnas_kernels._layout import output_memory_format
from hrnas_kernels._testing import assert_close_to_reference, randn, upcast
from hrnas_kernels.mixed_dwconv_bn_act import api, reference
from tests.ops import host_replay
from tests.ops.host_replay import CSRC
from tests.ops.test_mixed_dwconv_bn_act import (
    FORMATS,
    Case,
    _alive_mask,
    _group_rows,
    _one_thread,
    _params,
)

DRIVER = Path(__file__).with_name("mixed_dwconv_cuda_host.cpp")
DEVICE_HEADER = CSRC / "mixed_dwconv_bn_act" / "mixed_dwconv_bn_act_device.h"
IMPL = "cuda_host"

# Tiles: NCHW CTAs are one channel x 1024 positions, channels-last CTAs 32 channels x 128
# positions; at most 8 kernel-size groups share a launch. Cases: group sizes below, above and
# not a multiple of 32 (partial channel tiles), several position blocks with a partial last one
# in both layouts (NCHW: 2 * 25 * 23 = 1150 positions), 1x1 images, images smaller than the
# kernel, a runtime kernel size (9), single kernel sizes, and ten groups (two group tables).
CASES = [
    Case(2, (5, 11, 37), (3, 5, 7), 9, 7, 1),
    Case(2, (5, 11, 37), (3, 5, 7), 9, 7, 2),
    Case(3, (7,), (5,), 1, 1, 1),
    Case(2, (6, 3), (7, 3), 3, 2, 2),
    Case(2, (3, 4), (9, 3), 5, 6, 1),
    Case(2, (3,), (3,), 25, 23, 1),
    Case(1, (3,) * 10, (3, 5, 7, 3, 5, 7, 3, 5, 7, 9), 6, 5, 2),
]
MASKS = ["none-given", "random", "group-dead"]


@pytest.fixture(scope="module")
def replay(tmp_path_factory):
    return host_replay.build(DRIVER, tmp_path_factory.mktemp("cuda_host"), "hrnas_cuda_host")


@pytest.fixture
def as_impl(replay, monkeypatch):
    """The replay as the public API's ``impl="cuda_host"`` (autograd, channel gathering and the
    running-statistics update are the API's own code)."""
    monkeypatch.setitem(api._OPS, IMPL, (replay.fwd, replay.bwd))
    return replay


def _run(x, ws, gamma, beta, rm, rv, case, index, training, impl, activation="relu6"):
    """Output, the gradients of x, weights, gamma and beta for a seeded grad_y (the reference's
    unused ones as zeros), running statistics updated in place (momentum 0.5)."""
    counts = reference.group_counts(index, [w.shape[0] for w in ws])
    out = api.fused_forward(
        x,
        ws,
        gamma,
        beta,
        rm,
        rv,
        stride=case.stride,
        training=training,
        momentum=0.5,
        eps=1e-5,
        activation=activation,
        channel_index=index,
        counts=counts,
        impl=impl,
    )
    gy = randn(out.shape, dtype=out.dtype, seed=99)
    inputs = [x, *ws, gamma, beta]
    grads = torch.autograd.grad(out, inputs, gy, allow_unused=True)
    return out, [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]


# Error allowed, relative to a tensor's scale 1 + max|reference|: in float64 only the summation
# order differs from the reference; float32 adds the rounding of the stored conv tape and of
# float sums over up to 1150 positions (in BatchNorm's backward, through both batch statistics),
# and 1x1 images normalise three values, where the tape's rounding is magnified most.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-5}


def _assert_close(actual, expected, what):
    """``actual`` against the float64 ``expected`` at TOLERANCE of actual's dtype."""
    tol = TOLERANCE[actual.dtype]
    expected = expected.detach()
    scale = 1.0 + float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.detach().double(),
        expected,
        rtol=tol,
        atol=tol * scale,
        msg=lambda m: f"{what} ({actual.dtype}): {m}",
    )


def _check_case(case, mask_kind, fmt, training, dtype, activation="relu6"):
    mask = _alive_mask(case, mask_kind)
    index = None if mask is None else torch.nonzero(mask).flatten()
    alive = case.c if index is None else index.numel()
    ws, gamma, beta, rm, rv = _params(case, dtype, "cpu")
    x = randn(
        (case.n, alive, case.h, case.w), dtype=dtype, seed=1, memory_format=FORMATS[fmt]
    ).requires_grad_()
    rm_k, rv_k = rm.clone(), rv.clone()
    out, grads = _run(x, ws, gamma, beta, rm_k, rv_k, case, index, training, IMPL, activation)

    x64, *ws64 = upcast([x, *ws])
    g64, b64, rm64, rv64 = upcast([gamma, beta, rm, rv])
    with _one_thread():
        ref, ref_grads = _run(
            x64, ws64, g64, b64, rm64, rv64, case, index, training, "reference", activation
        )
    assert out.is_contiguous(memory_format=output_memory_format(x))
    names = ["y", "running_mean", "running_var", "grad x"]
    names += [f"grad weights[{g}]" for g in range(len(ws))] + ["grad gamma", "grad beta"]
    results, expected = [out, rm_k, rv_k, *grads], [ref, rm64, rv64, *ref_grads]
    if dtype in TOLERANCE:
        for name, r, e in zip(names, results, expected):
            _assert_close(r, e, name)
    else:  # fp16/bf16: the rule of the other kernels, at most twice eager's own error
        rm_e, rv_e = rm.clone(), rv.clone()
        eager, eager_grads = _run(
            x, ws, gamma, beta, rm_e, rv_e, case, index, training, "reference", activation
        )
        for name, r, e, ea in zip(names, results, expected, [eager, rm_e, rv_e, *eager_grads]):
            assert_close_to_reference(r, e, dtype, ea, what=name)
    if mask is not None:  # dead channels: running statistics kept, gradients exactly zero
        dead = ~mask
        assert torch.equal(rm_k[dead], rm[dead]) and torch.equal(rv_k[dead], rv[dead])
        for g, rows in zip(grads[1 : 1 + len(ws)], _group_rows(case, dead)):
            assert torch.count_nonzero(g[rows]) == 0
        for g in grads[-2:]:
            assert torch.count_nonzero(g[dead]) == 0
    if not training:
        assert torch.equal(rm_k, rm) and torch.equal(rv_k, rv)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_replay_matches_reference(as_impl, case, mask_kind, fmt, training):
    for dtype in (torch.float64, torch.float32):
        _check_case(case, mask_kind, fmt, training, dtype)


@pytest.mark.parametrize("activation", [None, "relu"], ids=str)
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_replay_other_activations(as_impl, activation, fmt):
    _check_case(CASES[0], "random", fmt, True, torch.float64, activation)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[5]], ids=str)
def test_replay_half_precision(as_impl, case, fmt, dtype):
    """The fp16/bf16 instantiations (float accumulation and statistics) in training mode."""
    _check_case(case, "random", fmt, True, dtype)


def _conv_reference(x, ws, stride):
    convs, start = [], 0
    for w in ws:
        if w.shape[0]:
            part = x[:, start : start + w.shape[0]]
            convs.append(F.conv2d(part, w, stride=stride, padding=w.shape[-1] // 2, groups=len(w)))
            start += w.shape[0]
    return torch.cat(convs, 1)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_replay_tape_and_batch_statistics(replay, case, fmt):
    """The raw forward op: the conv tape, the batch mean and biased variance (float64), and an
    empty weight group (all of its channels dead) between live ones."""
    ws, gamma, beta, _, _ = _params(case, torch.float64, "cpu")
    ws = [w.detach() for w in ws]
    if len(ws) > 1:
        ws[1] = ws[1][:0]
    c = sum(w.shape[0] for w in ws)
    x = randn((case.n, c, case.h, case.w), dtype=torch.float64, seed=3, memory_format=FORMATS[fmt])
    gamma, beta = gamma.detach()[:c], beta.detach()[:c]
    y, conv, mean, var = replay.fwd(x, ws, gamma, beta, None, None, case.stride, True, 1e-5, "none")
    conv_ref = _conv_reference(x, ws, case.stride)
    _assert_close(conv, conv_ref, "conv tape")
    _assert_close(mean, conv_ref.mean((0, 2, 3)), "batch mean")
    _assert_close(var, conv_ref.var((0, 2, 3), unbiased=False), "batch variance")
    bn = (conv_ref - mean[:, None, None]) * torch.rsqrt(var[:, None, None] + 1e-5)
    _assert_close(y, bn * gamma[:, None, None] + beta[:, None, None], "y")


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("case", CASES[:3], ids=str)
def test_replay_without_tape(replay, case, fmt):
    """save_tape=False: an empty tape, and bit for bit the output and statistics of the call
    that keeps one (running statistics: the conv launch then stores no tape; batch statistics)."""
    ws, *per_channel = _params(case, torch.float32, "cpu")
    ws = [w.detach() for w in ws]
    gamma, beta, rm, rv = (t.detach() for t in per_channel)
    x = randn((case.n, case.c, case.h, case.w), seed=3, memory_format=FORMATS[fmt])
    for use_batch_stats in (False, True):
        stats = (None, None) if use_batch_stats else (rm, rv)
        args = (x, ws, gamma, beta, *stats, case.stride, use_batch_stats, 1e-5, "relu6")
        y, conv, mean, var = replay.fwd(*args)
        y2, conv2, mean2, var2 = replay.fwd(*args, False)
        assert conv.shape == y.shape and conv2.shape == (0,)
        for a, b in [(y, y2), (mean, mean2), (var, var2)]:
            assert torch.equal(a, b)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_replay_does_not_depend_on_thread_order(replay, case, fmt, training):
    """No thread reads what another writes within the same phase, and no CTA what another
    writes within the same launch: with the CTAs of every grid and the threads of every phase
    run last to first instead of first to last, forward and backward give the same bits
    (float32, where any change of summation order would show)."""
    ws, gamma, beta, rm, rv = _params(case, torch.float32, "cpu")
    ws, gamma, beta = [w.detach() for w in ws], gamma.detach(), beta.detach()
    x = randn((case.n, case.c, case.h, case.w), seed=5, memory_format=FORMATS[fmt])
    stats = (None, None) if training else (rm, rv)
    results = []
    for fwd, bwd in ((replay.fwd, replay.bwd), (replay.fwd_reversed, replay.bwd_reversed)):
        y, conv, mean, var = fwd(x, ws, gamma, beta, *stats, case.stride, training, 1e-5, "relu6")
        gy = randn(y.shape, seed=6, memory_format=FORMATS[fmt])
        gx, gw, ggamma, gbeta = bwd(
            gy, y, x, conv, ws, gamma, beta, mean, var, case.stride, training, 1e-5, "relu6"
        )
        results.append([y, conv, mean, var, gx, *gw, ggamma, gbeta])
    for forward_order, reverse_order in zip(*results):
        assert torch.equal(forward_order, reverse_order)


# Deliberate bugs, built into one altered copy of the device header (a header line, its altered
# form, a case that exposes the bug, the first check that must fail there). Each case exposes
# only its own bug first: the block count matters only with several position blocks, which
# CASES[0] lacks, and the tap order only in backward, which runs after the checked y. Both stay
# in bounds: an out-of-bounds write would crash the process instead of failing a check.
MUTATIONS = [
    # grad x gathers with the transposed kernel (right for symmetric kernels only)
    (
        "acc += static_cast<A>(wt[ta * k + tb]) * d[",
        "acc += static_cast<A>(wt[tb * k + ta]) * d[",
        CASES[0],
        "grad x",
    ),
    # every position block counted as full when the block partials are merged (the last of
    # 1150 NCHW positions holds 126, not 1024)
    (
        "const int64_t n = total - b * per_block < per_block ? total - b * per_block : per_block;",
        "const int64_t n = per_block;",
        CASES[5],
        "y",
    ),
]


def test_replay_catches_deliberate_bugs(tmp_path, monkeypatch):
    """The check can fail: a copy of the device header with MUTATIONS applied, built as a
    second replay, disagrees with the reference in training mode, in the check each bug breaks."""
    text = DEVICE_HEADER.read_text()
    for line, changed, _, _ in MUTATIONS:
        assert text.count(line) == 1
        text = text.replace(line, changed)
    include = tmp_path / "include" / "mixed_dwconv_bn_act"
    include.mkdir(parents=True)
    (include / DEVICE_HEADER.name).write_text(text)
    (tmp_path / "build").mkdir()
    broken = host_replay.build(
        DRIVER, tmp_path / "build", "hrnas_cuda_host_mutant", [include.parent]
    )
    monkeypatch.setitem(api._OPS, IMPL, (broken.fwd, broken.bwd))
    for _, _, case, check in MUTATIONS:
        with pytest.raises(AssertionError, match=f"^{check} "):
            _check_case(case, "none-given", "nchw", True, torch.float64)
