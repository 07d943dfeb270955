"""The CUDA kernels of multires_fusion replayed on the host (issue #2), without a GPU.

``multires_fusion_cuda_host.cpp`` (next to this file) is compiled with g++ against the kernels'
device header and runs the .cu's own launch plan (device::forward / backward: checks,
allocation, vector widths, planes per thread, grids, launch order) on CPU tensors: every thread
index of each launch's grid, each running the kernel's grid-stride loop over the kernels' own
per-thread bodies, with the output and the input gradients NaN-filled first (an element no thread
writes shows up) and every vector access checked for the alignment the GPU needs. Its ops have
the real ops' schemas, so they stand in for the native op pair behind the public function's
autograd and are checked against ``reference.py``: output and every input gradient in float64
(1e-12 relative), float32 (1e-5) and float16/bfloat16 (the rule of the other kernels, against the
float64 reference and eager's own error). Run with the threads of every launch last to first,
the results must be bit-identical (no thread reads another's write within a launch). A build
with deliberate index bugs must fail. Not covered: what only a GPU decides (the code nvcc
generates, the __ldg/__stwb intrinsics, fp16/bf16 device arithmetic, grids past the
2^31 - 1 block cap, timing); the kernels use no shared memory, barriers or warp primitives.
"""

from pathlib import Path

import pytest
import torch

from hrnas_kernels import multires_fusion
from hrnas_kernels._layout import output_memory_format
from hrnas_kernels._testing import assert_close_to_reference, randn, runnable, upcast
from hrnas_kernels.multires_fusion import api
from tests.ops import host_replay
from tests.ops.host_replay import CSRC

DRIVER = Path(__file__).with_name("multires_fusion_cuda_host.cpp")
DEVICE_HEADER = CSRC / "multires_fusion" / "multires_fusion_device.h"
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}

pytestmark = pytest.mark.skipif(
    bool(runnable("native", "cpu")), reason="the public API's native path needs hrnas_kernels._C"
)

# (N, C, output size, input sizes). Identity-size inputs (also two of them: the second one's
# gradient is a copy of the first's), upsampling by 2 and 4 and by non-integer ratios (7 -> 12,
# 5 -> 9, 2 -> 29: a candidate window wider than the kernel's 12-column cache), downsampling
# (18 -> 9, 17 -> 9, 2 -> 1), 1-pixel inputs and outputs, H or W = 1, no identity input (the
# activation mask is then applied inside the gather), N = 1 and 3, C = 17 (no vector width fits
# channels-last), C = 8 and W = 16 (the widest packs of every dtype) and odd widths.
CASES = [
    (1, 3, (1, 1), [(1, 1)]),
    (3, 5, (12, 12), [(12, 12), (6, 6), (3, 3), (7, 7)]),
    (2, 3, (9, 9), [(5, 5), (18, 17)]),
    (3, 17, (5, 8), [(1, 1), (5, 8), (1, 8), (5, 1)]),
    (1, 2, (1, 7), [(1, 7), (2, 3)]),
    (2, 8, (16, 16), [(16, 16), (16, 16), (8, 8)]),
    (3, 6, (10, 14), [(5, 7), (3, 4), (20, 28)]),
    (1, 4, (3, 29), [(3, 29), (1, 2), (2, 1)]),
]
MODE_ACT = [("bilinear", "relu"), ("bilinear", None), ("nearest", "relu"), ("nearest", None)]
# Error allowed relative to a tensor's scale 1 + max|reference|: in float64 only the summation
# order of the gather differs from the reference; float32 adds its rounding.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}


def _case_id(case):
    n, c, size, ins = case
    return f"N{n}C{c}-{size[0]}x{size[1]}<-" + ",".join(f"{h}x{w}" for h, w in ins)


@pytest.fixture(scope="module")
def replay(tmp_path_factory):
    return host_replay.build(
        DRIVER, tmp_path_factory.mktemp("multires_cuda_host"), "hrnas_multires_cuda_host"
    )


@pytest.fixture
def as_native(replay, monkeypatch):
    """The replay as the public API's native op pair (validation and autograd are the API's)."""
    monkeypatch.setitem(api._OPS, "native", (replay.fwd, replay.bwd))
    return replay


def _inputs(case, dtype, fmt, seed=0):
    n, c, _, in_sizes = case
    return [
        randn((n, c, h, w), dtype=dtype, seed=seed + j, memory_format=FORMATS[fmt]).requires_grad_()
        for j, (h, w) in enumerate(in_sizes)
    ]


def _fwd_bwd(xs, impl, size, mode, act, grad=None):
    out = multires_fusion(xs, size, mode, act, impl=impl)
    if grad is None:
        grad = randn(out.shape, dtype=out.dtype, seed=100)
    return out, torch.autograd.grad(out, xs, grad.to(out.dtype))


def _assert_close(actual, expected, what):
    """``actual`` against the float64 ``expected`` at TOLERANCE of actual's dtype (NaN where
    expected has NaN)."""
    tol = TOLERANCE[actual.dtype]
    expected = expected.detach()
    finite = expected[expected.isfinite()]
    scale = 1.0 + float(finite.abs().max()) if finite.numel() else 1.0
    torch.testing.assert_close(
        actual.detach().double(),
        expected,
        rtol=tol,
        atol=tol * scale,
        equal_nan=True,
        msg=lambda m: f"{what} ({actual.dtype}): {m}",
    )


def _check(case, mode, act, fmt, dtype, grad=None, edit=None):
    """Output and every input gradient of the replay (as impl native) against the reference.
    ``edit(xs)`` changes the inputs (in place, under no_grad) before both run."""
    xs = _inputs(case, dtype, fmt)
    if edit is not None:
        with torch.no_grad():
            edit(xs)
    size = case[2]
    out, grads = _fwd_bwd(xs, "native", size, mode, act, grad)
    assert out.dtype == dtype and out.is_contiguous(memory_format=output_memory_format(xs[0]))
    ref, ref_grads = _fwd_bwd(upcast(xs), "reference", size, mode, act, grad)
    if dtype in TOLERANCE:
        _assert_close(out, ref, "out")
        for j, (g, r) in enumerate(zip(grads, ref_grads)):
            _assert_close(g, r, f"grad of inputs[{j}]")
        return
    eager, eager_grads = _fwd_bwd(xs, "reference", size, mode, act, grad)
    assert_close_to_reference(out, ref, dtype, eager, what="out")
    for j, (g, r, e) in enumerate(zip(grads, ref_grads, eager_grads)):
        assert_close_to_reference(g, r, dtype, e, what=f"grad of inputs[{j}]")


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("mode,act", MODE_ACT, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_replay_matches_reference(as_native, case, mode, act, fmt):
    for dtype in (torch.float64, torch.float32):
        _check(case, mode, act, fmt, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("case", [CASES[1], CASES[5], CASES[6]], ids=_case_id)
def test_replay_half_precision(as_native, case, fmt, dtype):
    """The fp16/bf16 instantiations (float accumulation; host arithmetic of c10::Half /
    BFloat16, not the GPU's)."""
    _check(case, "bilinear", "relu", fmt, dtype)


# Many planes: P > 1 planes per thread (the plan picks it once the grid has 2^17 threads of
# work), with a partial last plane group (3 * 87 = 261 planes, 3 images).
LARGE = [
    (3, 87, (64, 64), [(64, 64), (32, 32), (16, 16)]),
    (3, 88, (64, 64), [(64, 64), (56, 56), (32, 32)]),
]


@pytest.mark.parametrize("fmt,case", [("nchw", LARGE[0]), ("nhwc", LARGE[1])], ids=str)
def test_replay_several_planes_per_thread(as_native, case, fmt):
    """Forward and gather with several planes per thread (checked in the launch log)."""
    for dtype in (torch.float64, torch.float32):
        _check(case, "bilinear", "relu", fmt, dtype)
        xs = [x.detach() for x in _inputs(case, dtype, fmt)]
        out = as_native.fwd(xs, list(case[2]), "bilinear", "relu")
        assert max(as_native.launches()[2::4]) > 1, "the forward ran one plane per thread"
        as_native.bwd(
            torch.ones_like(out), out, [d for x in xs for d in x.shape[2:]], "bilinear", "relu"
        )
        assert max(as_native.launches()[2::4]) > 1, "the gather ran one plane per thread"


def test_cases_reach_every_vector_width(as_native):
    """The cases above reach every pack width each dtype has (1 to 16 bytes) in both layouts,
    forward and gather, so every kernel instance the .cu launches for them is replayed."""
    seen = set()
    for case in CASES:
        for fmt in FORMATS:
            for dtype in (torch.float64, torch.float32, torch.float16):
                xs = [x.detach() for x in _inputs(case, dtype, fmt)]
                out = as_native.fwd(xs, list(case[2]), "bilinear", "relu")
                seen.update(_kinds(as_native.launches(), fmt, dtype))
                sizes = [d for x in xs for d in x.shape[2:]]
                as_native.bwd(torch.ones_like(out), out, sizes, "bilinear", "relu")
                seen.update(_kinds(as_native.launches(), fmt, dtype))
    for dtype, widths in (
        (torch.float64, (1, 2)),
        (torch.float32, (1, 2, 4)),
        (torch.float16, (1, 2, 4, 8)),
    ):
        for fmt in FORMATS:
            assert {("fwd", fmt, dtype, v) for v in widths} <= seen
            assert {("mask", fmt, dtype, v) for v in widths} <= seen
        assert {("gather", "nhwc", dtype, v) for v in widths} <= seen


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_replay_narrows_packs_for_a_misaligned_input(as_native, fmt):
    """An identity-size input one element past an aligned address (a dense view at storage
    offset 1) must make the plan pick 1-element packs for the forward (it alone reads inputs):
    the replay checks every vector access for the alignment the GPU needs, so a wider pack
    would fail."""
    n, c, (h, w), _ = CASES[5]
    xs = _inputs(CASES[5], torch.float32, fmt)
    base = randn((n * c * h * w + 1,), seed=9)[1:]
    shifted = base.view(n, c, h, w) if fmt == "nchw" else base.view(n, h, w, c).permute(0, 3, 1, 2)
    assert shifted.is_contiguous(memory_format=FORMATS[fmt])
    xs[1] = shifted.requires_grad_()
    out, grads = _fwd_bwd(xs, "native", (h, w), "bilinear", "relu")
    as_native.fwd([x.detach() for x in xs], [h, w], "bilinear", "relu")
    assert as_native.launches()[1] == 1, "the forward packed a misaligned input"
    ref, ref_grads = _fwd_bwd(upcast(xs), "reference", (h, w), "bilinear", "relu")
    _assert_close(out, ref, "out")
    for j, (g, r) in enumerate(zip(grads, ref_grads)):
        _assert_close(g, r, f"grad of inputs[{j}]")


def _kinds(log, fmt, dtype):
    names = ("fwd", "mask", "gather")
    return {(names[log[i]], fmt, dtype, log[i + 1]) for i in range(0, len(log), 4)}


def _poke_nan(xs):
    xs[0][0, 1, 0, 0] = float("nan")
    xs[-1][-1, 0, -1, -1] = float("nan")


# Non-finite values: cases whose resampled inputs change both axes. Where an input keeps one
# axis of the output (CASES[3]: 5x1 and 1x8 -> 5x8), the kernels' bilinear taps along that axis
# are (o, o + 1) with weights (1, 0), as in the native CPU kernel and ATen's CUDA
# upsample_bilinear2d, so a NaN/inf at o + 1 also reaches o (0 * NaN), forward and backward;
# ATen's CPU kernel (the reference here) takes both taps at o on such an axis. Not asserted.
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[6]], ids=_case_id)
def test_replay_nan_inputs_propagate_like_reference(as_native, case, fmt):
    """NaN inputs give NaN exactly where the reference has it, output and gradients."""
    _check(case, "bilinear", "relu", fmt, torch.float64, edit=_poke_nan)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[6]], ids=_case_id)
def test_replay_nonfinite_gradient_propagates_like_reference(as_native, case, fmt):
    """An inf/NaN upstream gradient reaches the same input gradients as in the reference (the
    gather adds the forward's zero-weight terms as 0 * inf = NaN, as eager does)."""
    n, c, (h, w), _ = case
    grad = randn((n, c, h, w), dtype=torch.float64, seed=7, memory_format=FORMATS[fmt])
    grad[0, 0, -1, -1] = float("inf")
    grad[-1, -1, 0, w // 2] = float("nan")
    for mode in ("bilinear", "nearest"):
        _check(case, mode, None, fmt, torch.float64, grad=grad)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_replay_does_not_depend_on_thread_order(replay, case, fmt):
    """With every launch's threads run last to first instead of first to last, forward and
    backward give the same bits (float32): no thread reads what another writes in a launch."""
    xs = [x.detach() for x in _inputs(case, torch.float32, fmt)]
    sizes = [d for x in xs for d in x.shape[2:]]
    results = []
    for fwd, bwd in ((replay.fwd, replay.bwd), (replay.fwd_reversed, replay.bwd_reversed)):
        out = fwd(xs, list(case[2]), "bilinear", "relu")
        grad = randn(out.shape, seed=6, memory_format=FORMATS[fmt])
        results.append([out, *bwd(grad, out, sizes, "bilinear", "relu")])
    for forward_order, reverse_order in zip(*results):
        assert torch.equal(forward_order, reverse_order)


def test_replay_rejects_bad_arguments(replay):
    """The plan's checks run before any launch (the same as the CPU kernel's)."""
    x = torch.zeros(1, 2, 3, 3)
    with pytest.raises(RuntimeError, match="expected 1 to 8 inputs"):
        replay.fwd([x] * 9, [3, 3], "bilinear", "relu")
    with pytest.raises(RuntimeError, match="unknown mode"):
        replay.fwd([x], [3, 3], "bicubic", "relu")
    with pytest.raises(RuntimeError, match="input_sizes must be positive"):
        replay.bwd(x, x, [3, 0], "bilinear", "relu")


# Deliberate bugs, built into one altered copy of the device header (a header line, its altered
# form, a case and layout that expose the bug, the first check that must fail there). Each case
# exposes only its own bug first: the forward bug lives in the channels-last forward, the gather
# bug (a candidate window that drops the last output index reading an input index) only in
# backward, which an NCHW case reaches with a correct forward. All stay in bounds.
MUTATIONS = [
    # channels-last bilinear forward: the lower-right tap read from the upper row
    (
        "const int64_t o10 = (r1 * Wj + q0) * C + c0, o11 = (r1 * Wj + q1) * C + c0;",
        "const int64_t o10 = (r1 * Wj + q0) * C + c0, o11 = (r0 * Wj + q1) * C + c0;",
        CASES[1],
        "nhwc",
        "out",
    ),
    # the gather's candidate window misses its last output index
    (
        "const int64_t h = static_cast<int64_t>(ceil(b));",
        "const int64_t h = static_cast<int64_t>(ceil(b)) - 2;",
        CASES[2],
        "nchw",
        "grad of inputs",
    ),
    # grids rounded down: a launch with fewer than kThreads threads of work gets no block, and
    # the output keeps the NaN the replay fills it with (larger launches still cover their work
    # through the grid-stride loop, so the two cases above are unaffected)
    (
        "return std::min<int64_t>((work + kThreads - 1) / kThreads, kMaxBlocks);",
        "return std::min<int64_t>(work / kThreads, kMaxBlocks);",
        CASES[0],
        "nchw",
        "out",
    ),
]


def test_replay_catches_deliberate_bugs(tmp_path, monkeypatch):
    """The check can fail: a copy of the device header with MUTATIONS applied, built as a
    second replay (-O0: it runs two small cases), disagrees with the reference where each bug
    is (test_replay_matches_reference runs the same cases on the unaltered replay)."""
    text = DEVICE_HEADER.read_text()
    for line, changed, *_ in MUTATIONS:
        assert text.count(line) == 1
        text = text.replace(line, changed)
    include = tmp_path / "include" / "multires_fusion"
    include.mkdir(parents=True)
    (include / DEVICE_HEADER.name).write_text(text)
    (tmp_path / "build").mkdir()
    broken = host_replay.build(
        DRIVER, tmp_path / "build", "hrnas_multires_cuda_host_mutant", [include.parent], "-O0"
    )
    monkeypatch.setitem(api._OPS, "native", (broken.fwd, broken.bwd))
    for _, _, case, fmt, check in MUTATIONS:
        with pytest.raises(AssertionError, match=f"^{check}"):
            _check(case, "bilinear", None, fmt, torch.float64)
