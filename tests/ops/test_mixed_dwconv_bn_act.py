"""mixed_dwconv_bn_act: every implementation against the float64 reference (forward, every
gradient, running statistics) over kernel-size mixes, strides, odd and tiny sizes, layouts,
train/eval and channel masks; exact zeros for dead channels; gradcheck, opcheck, torch.compile,
thread-count determinism; the ``MixedDepthwiseConvBNAct`` module, ``fuse_depthwise`` on a
MobileNetV2-like model, and bad input."""

import contextlib
import copy
from collections import OrderedDict
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hrnas_kernels import mixed_dwconv_bn_act
from hrnas_kernels._layout import output_memory_format
from hrnas_kernels._testing import TOLERANCES, assert_close_to_reference, randn, runnable, upcast
from hrnas_kernels.mixed_dwconv_bn_act import (
    MixedDepthwiseConvBNAct,
    api,
    fuse_depthwise,
    ops,
    reference,
)


@pytest.fixture
def impl_device(impl_device, request):
    """The shared (impl, device) pairs, less those this op has no kernel for yet. Triton on CPU
    runs in Triton's interpreter (about 0.2 ms per tensor operation, whatever its size), within
    CI's budget only for the tests and cases below; every test runs in full on a GPU."""
    if impl_device not in api.SUPPORTED:
        pytest.skip(f"mixed_dwconv_bn_act has no {impl_device[0]} kernel for {impl_device[1]} yet")
    if impl_device == ("triton", "cpu"):
        params = getattr(request.node, "callspec", None)
        params = params.params if params else {}
        if request.function.__name__ not in INTERPRETER_TESTS or (
            params.get("case", INTERPRETER_CASES[0]) not in INTERPRETER_CASES
            or params.get("mask_kind") == "all"  # the same kernel call as "none-given"
        ):
            pytest.skip("too large for the Triton interpreter's CI budget (runs on a GPU)")
    return impl_device


FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
# The public function runs narrow NCHW calls of the native CPU kernels through their
# channels_last path (api.NCHW_AS_CHANNELS_LAST_MAX_WIDTH); these tests' images are all narrow,
# so they turn that off to keep the NCHW kernels under test, and test_narrow_nchw_* below check
# the routing itself with the shipped widths.
ROUTED_WIDTHS = (api.NCHW_AS_CHANNELS_LAST_MAX_WIDTH, api.NCHW_AS_CHANNELS_LAST_MAX_WIDTH_NO_GRAPH)


def _route_narrow_nchw(monkeypatch, widths):
    monkeypatch.setattr(api, "NCHW_AS_CHANNELS_LAST_MAX_WIDTH", widths[0])
    monkeypatch.setattr(api, "NCHW_AS_CHANNELS_LAST_MAX_WIDTH_NO_GRAPH", widths[1])


@pytest.fixture(autouse=True)
def _nchw_kernels(monkeypatch):
    _route_narrow_nchw(monkeypatch, (0, 0))


@dataclass(frozen=True)
class Case:
    n: int
    sizes: tuple  # channels per kernel-size group
    ks: tuple  # kernel size per group
    h: int
    w: int
    stride: int

    @property
    def c(self):
        return sum(self.sizes)

    def __str__(self):
        ks = "/".join(map(str, self.ks))
        return f"N{self.n}C{'+'.join(map(str, self.sizes))}k{ks}_{self.h}x{self.w}s{self.stride}"


# The CPU kernel vectorizes 16 lanes along W (NCHW) or along the channels of a group (NHWC), and
# compiles k = 3/5/7 with both strides as constants. Cases: group sizes above, below and not a
# multiple of 16, Wo with and without a vector tail, images smaller than the kernel, 1x1 images,
# single kernel sizes, runtime kernel sizes 1 and 9, and group sizes that are multiples of 8 (the
# channels_last kernels' dense layout, no padding lanes) with stride 2 over odd and even sizes.
# The conv takes output rows (NCHW) or pixels (NHWC) 8, then 4 at a time, then one by one: the
# first and third cases take each step.
CASES = [
    Case(2, (5, 6, 7), (3, 5, 7), 9, 21, 1),
    Case(2, (19, 2, 17), (3, 5, 7), 7, 37, 2),
    Case(3, (21,), (3,), 13, 33, 1),
    Case(2, (13,), (7,), 5, 3, 2),
    Case(3, (4, 5), (3, 5), 1, 1, 1),
    Case(2, (6, 3, 5), (1, 9, 5), 2, 17, 2),
    Case(2, (3, 2, 4), (3, 5, 7), 5, 6, 2),
    Case(2, (4, 3), (3, 5), 7, 9, 1),
    Case(2, (16, 8), (3, 7), 9, 10, 2),
]
# The cases the Triton interpreter runs: mixed 3/5/7 with stride 2 and images smaller than the
# kernel, two groups with stride 1, and 1x1 images.
INTERPRETER_CASES = [CASES[6], CASES[7], CASES[4]]
MASKS = ["none-given", "all", "random", "group-dead", "all-dead"]


INTERPRETER_TESTS = {
    "test_matches_reference",
    "test_non_contiguous_inputs",
    "test_nan_and_inf_propagate_like_eager",
    "test_running_stats_follow_batch_norm_over_steps",
    "test_gradcheck_float64",
    "test_opcheck",
    "test_forward_without_tape",
    "test_compile_fullgraph_dynamic",
    "test_module_matches_reference_and_caches_alive_index",
}


@contextlib.contextmanager
def _one_thread():
    """For the float64 eager PyTorch runs: ATen's float64 grouped conv loops over the groups
    with a parallel region each, and on a busy 2-core machine every barrier can wait a
    scheduler time slice (seconds per test). Thread count does not change their results."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _dtypes(impl, device):
    if device == "cuda":
        return [torch.float32, torch.float16, torch.bfloat16]
    if impl == "triton":  # the interpreter's budget: float64 is covered by gradcheck
        return [torch.float32]
    return [torch.float32, torch.float64]


def _alive_mask(case, kind, seed=0):
    """Bool [C] of alive channels, or None for ``channel_index=None``."""
    c = case.c
    if kind == "none-given":
        return None
    if kind == "all":
        return torch.ones(c, dtype=torch.bool)
    if kind == "all-dead":
        return torch.zeros(c, dtype=torch.bool)
    mask = torch.rand(c, generator=torch.Generator().manual_seed(seed)) < 0.5
    mask[0] = mask[-1] = True  # random: first and last channel alive, about half the rest
    if kind == "group-dead":
        dead = 1 if len(case.sizes) > 1 else 0
        start = sum(case.sizes[:dead])
        mask[start : start + case.sizes[dead]] = False
        if len(case.sizes) == 1:  # one group: kill its first half instead of everything
            mask[case.sizes[0] // 2 :] = True
    return mask


def _params(case, dtype, device, seed=10):
    """Depthwise weights ~ N(0, 1/k^2) (a conv output of about unit variance), gamma of either
    sign and up to a few units, beta up to a few units so ReLU6 clamps at both ends, and running
    statistics that differ from the batch's (eval mode uses them)."""

    def make(t):
        return t.to(device=device, dtype=dtype)

    ws = [
        make(randn((c, 1, k, k), dtype=torch.float64, seed=seed + g) / k).requires_grad_()
        for g, (c, k) in enumerate(zip(case.sizes, case.ks))
    ]
    gamma = make(1.5 * randn((case.c,), dtype=torch.float64, seed=seed + 20)).requires_grad_()
    beta = make(2.0 * randn((case.c,), dtype=torch.float64, seed=seed + 21)).requires_grad_()
    rm = make(0.3 * randn((case.c,), dtype=torch.float64, seed=seed + 22))
    rv = make(
        0.5
        + torch.rand(
            case.c, generator=torch.Generator().manual_seed(seed + 23), dtype=torch.float64
        )
    )
    return ws, gamma, beta, rm, rv


def _call(x, ws, gamma, beta, rm, rv, case, index, training, impl, grad_seed=99):
    """Forward, then the gradient of every input (None from the reference, which skips dead
    groups, becomes zeros) for a seeded random grad_y; running statistics are updated in place."""
    out = mixed_dwconv_bn_act(
        x,
        ws,
        gamma,
        beta,
        rm,
        rv,
        stride=case.stride,
        training=training,
        channel_index=index,
        impl=impl,
    )
    gy = randn(out.shape, dtype=out.dtype, device=out.device, seed=grad_seed)
    inputs = [x, *ws, gamma, beta]
    # the reference's all-dead output ([N, 0, Ho, Wo]) is a fresh tensor outside any graph
    grads = (
        torch.autograd.grad(out, inputs, gy, allow_unused=True)
        if out.requires_grad
        else [None] * len(inputs)
    )
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]
    return out, grads


def _assert_reduced_grad_close(actual, expected64, dtype, eager=None, what="grad"):
    """A per-channel parameter's gradient (depthwise weight, gamma, beta) is a sum over the
    N * Ho * Wo output pixels (through BN's batch statistics in training, a second such sum).
    Its fp32 rounding error is set by the partial sums, which are at the scale of the tensor's
    largest entries, not of the entry itself (small entries come from cancellation). So on top of
    the elementwise default the absolute tolerance grows with max|ref| of the tensor: atol +
    rtol * max|ref|, i.e. the default rtol measured against the tensor's scale. Observed on these
    cases (<= 600 pixels): at most 0.35 * rtol * max|ref| in fp32."""
    if dtype in (torch.float16, torch.bfloat16):
        assert_close_to_reference(actual, expected64, dtype, eager, what=what)
        return
    atol, rtol = TOLERANCES[dtype]
    scale = float(expected64.abs().max()) if expected64.numel() else 0.0
    torch.testing.assert_close(
        actual.detach().to("cpu", torch.float64),
        expected64.detach(),
        atol=atol + rtol * scale,
        rtol=rtol,
        msg=lambda m: f"{what} ({dtype}): {m}",
    )


def _assert_fp32_close(out, grads, rm, rv, ref, ref_grads, rm64, rv64):
    """An fp32 run (output, gradients of x then the parameters, running statistics) against the
    float64 reference's."""
    assert_close_to_reference(out, ref, torch.float32)
    assert_close_to_reference(grads[0], ref_grads[0], torch.float32, what="grad x")
    for g, r in zip(grads[1:], ref_grads[1:]):
        _assert_reduced_grad_close(g, r, torch.float32)
    assert_close_to_reference(rm, rm64, torch.float32, what="running_mean")
    assert_close_to_reference(rv, rv64, torch.float32, what="running_var")


def _group_rows(case, mask):
    """Split a bool [C] into one [C_g] per kernel-size group."""
    return list(mask.split(list(case.sizes)))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(impl_device, case, mask_kind, fmt, training):
    impl, device = impl_device
    mask = _alive_mask(case, mask_kind)
    index = None if mask is None else torch.nonzero(mask).flatten()
    alive = case.c if index is None else index.numel()
    for dtype in _dtypes(impl, device):
        ws, gamma, beta, rm, rv = _params(case, dtype, device)
        x = randn(
            (case.n, alive, case.h, case.w),
            dtype=dtype,
            device=device,
            seed=1,
            memory_format=FORMATS[fmt],
        ).requires_grad_()
        idx = None if index is None else index.to(device)
        rm_k, rv_k = rm.clone(), rv.clone()
        out, grads = _call(x, ws, gamma, beta, rm_k, rv_k, case, idx, training, impl)

        x64, *ws64 = upcast([x, *ws])
        g64, b64, rm64, rv64 = upcast([gamma, beta, rm, rv])
        with _one_thread():
            ref, ref_grads = _call(
                x64, ws64, g64, b64, rm64, rv64, case, index, training, "reference"
            )
        eager, eager_grads, eager_rm, eager_rv = None, [None] * len(grads), None, None
        if dtype in (torch.float16, torch.bfloat16):  # the 2x-eager rule's yardstick
            eager_rm, eager_rv = rm.clone(), rv.clone()
            eager, eager_grads = _call(
                x, ws, gamma, beta, eager_rm, eager_rv, case, idx, training, "reference"
            )

        assert out.dtype == dtype and out.device.type == device
        assert out.is_contiguous(memory_format=output_memory_format(x))
        assert_close_to_reference(out, ref, dtype, eager)
        assert_close_to_reference(grads[0], ref_grads[0], dtype, eager_grads[0], what="grad x")
        names = [f"grad weights[{g}]" for g in range(len(ws))] + ["grad bn_weight", "grad bn_bias"]
        for name, g, r, e in zip(names, grads[1:], ref_grads[1:], eager_grads[1:]):
            _assert_reduced_grad_close(g, r, dtype, e, what=name)
        # running statistics: updated like F.batch_norm (alive entries) in training, else kept
        assert_close_to_reference(rm_k, rm64, dtype, eager_rm, what="running_mean")
        assert_close_to_reference(rv_k, rv64, dtype, eager_rv, what="running_var")

        # dead channels: untouched running statistics and exactly zero parameter gradients
        if mask is not None:
            dead = ~mask.to(device)
            torch.testing.assert_close(rm_k[dead], rm[dead], rtol=0, atol=0)
            torch.testing.assert_close(rv_k[dead], rv[dead], rtol=0, atol=0)
            for g, rows in zip(grads[1 : 1 + len(ws)], _group_rows(case, dead)):
                assert torch.count_nonzero(g[rows]) == 0
            for g in grads[-2:]:
                assert torch.count_nonzero(g[dead]) == 0
        if not training:
            assert torch.equal(rm_k, rm) and torch.equal(rv_k, rv)


def test_non_contiguous_inputs(impl_device):
    """Strided views (x sliced along W, weights and gamma from larger tensors, x neither NCHW nor
    channels_last) give the reference's results; the output is NCHW."""
    impl, device = impl_device
    case = CASES[0]
    big = randn((case.n, case.c, case.h, 2 * case.w), device=device, seed=1)
    odd = randn((case.h, case.n, case.w, case.c), device=device, seed=2).permute(1, 3, 0, 2)
    ws, gamma, beta, rm, rv = _params(case, torch.float32, device)
    ws = [torch.cat([w.detach(), w.detach()], 1)[:, 1:].requires_grad_() for w in ws]
    gamma = torch.stack([gamma.detach(), beta.detach()], 1)[:, 0].requires_grad_()
    assert not gamma.is_contiguous() and not ws[0].is_contiguous()
    for x in (big[:, :, :, ::2], odd):
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
        x = x.detach().requires_grad_()
        out, grads = _call(x, ws, gamma, beta, rm.clone(), rv.clone(), case, None, True, impl)
        assert out.is_contiguous()
        with _one_thread():
            ref, ref_grads = _call(
                *upcast([x]),
                upcast(ws),
                *upcast([gamma, beta, rm, rv]),
                case,
                None,
                True,
                "reference",
            )
        assert_close_to_reference(out, ref, torch.float32)
        assert_close_to_reference(grads[0], ref_grads[0], torch.float32, what="grad x")
        for g, r in zip(grads[1:], ref_grads[1:]):
            _assert_reduced_grad_close(g, r, torch.float32)


class _OpCalls:
    """Records the memory format of x in every forward op call of the native family."""

    def __init__(self, monkeypatch):
        self.formats = []
        fwd, bwd = api._OPS["native"]

        def spy(x, *args):
            cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            self.formats.append("channels_last" if cl else "nchw")
            return fwd(x, *args)

        monkeypatch.setitem(api._OPS, "native", (spy, bwd))


@pytest.mark.parametrize(
    "w,stride,grad,routed",
    [
        (28, 1, True, True),  # output width 28: at the limit for a call that records the graph
        (29, 1, True, False),
        (55, 2, True, True),  # stride 2: output width 28
        (7, 1, False, True),  # no graph: only width 7 and below
        (8, 1, False, False),
        (13, 2, False, True),
    ],
)
def test_narrow_nchw_runs_channels_last(monkeypatch, w, stride, grad, routed):
    """Native CPU calls on NCHW x with a narrow output run the channels_last kernels on a copy
    (x stays NCHW for the caller, the output is NCHW); channels_last x and wide outputs do not."""
    if runnable("native", "cpu"):
        pytest.skip(runnable("native", "cpu"))
    _route_narrow_nchw(monkeypatch, ROUTED_WIDTHS)
    calls = _OpCalls(monkeypatch)
    layer = MixedDepthwiseConvBNAct(6, (3, 5), stride=stride, impl="native")
    for fmt in FORMATS.values():
        x = randn((2, 6, 5, w), seed=1, memory_format=fmt).requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            y = layer(x)
        assert y.is_contiguous(memory_format=fmt)
    assert calls.formats == ["channels_last" if routed else "nchw", "channels_last"]


def _routed_layer(monkeypatch):
    """(op-call recorder, a native layer, an NCHW x that requires grad) whose call is routed."""
    if runnable("native", "cpu"):
        pytest.skip(runnable("native", "cpu"))
    _route_narrow_nchw(monkeypatch, ROUTED_WIDTHS)
    calls = _OpCalls(monkeypatch)
    layer = MixedDepthwiseConvBNAct(6, (3, 5), impl="native")
    return calls, layer, randn((2, 6, 5, 7), seed=1).requires_grad_()


def test_narrow_nchw_gradient_goes_back_nchw(monkeypatch):
    """The gradient a routed call passes to the op before it is NCHW, as its x was: a
    channels_last one made that op's backward run on mixed layouts (several times slower)."""
    calls, layer, x = _routed_layer(monkeypatch)
    before = x.relu()
    seen = []
    before.register_hook(lambda g: seen.append(g))
    layer(before).square().sum().backward()
    assert calls.formats == ["channels_last"]
    (grad,) = seen
    assert grad.is_contiguous()


def test_narrow_nchw_saves_no_channels_last_copy_of_x(monkeypatch):
    """A routed call keeps the caller's NCHW x for backward, not its channels_last copy (the
    copy is made again there): a second x per layer cost hrnas-cls 23% more activation memory."""
    calls, layer, x = _routed_layer(monkeypatch)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert calls.formats == ["channels_last"]
    assert any(t is x for t in saved)
    images = [t for t in saved if t.dim() == 4 and t.shape[0] == 2]
    assert len(images) == 3  # x, y, the tape; only the tape is channels_last
    assert sum(not t.is_contiguous() for t in images) == 1
    y.sum().backward()  # values: test_narrow_nchw_matches_reference
    assert x.grad.is_contiguous()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("masked", [False, True], ids=["all-alive", "masked"])
def test_narrow_nchw_matches_reference(monkeypatch, training, masked):
    """Routed through channels_last, a narrow NCHW call gives the reference's output, every
    gradient (dead channels' exactly zero) and running statistics, in float64."""
    if runnable("native", "cpu"):
        pytest.skip(runnable("native", "cpu"))
    _route_narrow_nchw(monkeypatch, ROUTED_WIDTHS)
    calls = _OpCalls(monkeypatch)
    case = Case(3, (5, 4, 3), (3, 5, 7), 9, 11, 2)
    ws, gamma, beta, rm, rv = _params(case, torch.float64, "cpu")
    index = torch.tensor([0, 2, 3, 5, 6, 8, 11]) if masked else None
    alive = case.c if index is None else index.numel()
    x = randn((case.n, alive, case.h, case.w), dtype=torch.float64, seed=1).requires_grad_()
    results = []
    for impl in ("native", "reference"):
        stats = [rm.clone(), rv.clone()]
        out, grads = _call(x, ws, gamma, beta, *stats, case, index, training, impl)
        results.append((out, grads, stats))
    (out, grads, stats), (ref, ref_grads, ref_stats) = results
    assert calls.formats == ["channels_last"] and out.is_contiguous()
    tol = dict(atol=TOLERANCES[torch.float64][0], rtol=TOLERANCES[torch.float64][1])
    torch.testing.assert_close([out, *grads, *stats], [ref, *ref_grads, *ref_stats], **tol)
    if masked:
        dead = torch.ones(case.c, dtype=torch.bool)
        dead[index] = False
        assert not grads[-2][dead].any() and not grads[-1][dead].any()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_nan_and_inf_propagate_like_eager(impl_device, fmt, training):
    """A NaN pixel poisons its neighbourhood (eval) or its channel's batch statistics (train),
    an inf saturates ReLU6, in the same places as eager PyTorch; finite values still agree."""
    impl, device = impl_device
    case = CASES[1]
    ws, gamma, beta, rm, rv = _params(case, torch.float32, device)
    x = randn((case.n, case.c, case.h, case.w), device=device, seed=1, memory_format=FORMATS[fmt])
    with torch.no_grad():
        x[0, 3, 2, 5] = float("nan")
        x[1, 30, 6, 36] = float("inf")
        x[1, 20, 0, 0] = -float("inf")
        out = mixed_dwconv_bn_act(
            x,
            ws,
            gamma,
            beta,
            rm.clone(),
            rv.clone(),
            stride=case.stride,
            training=training,
            impl=impl,
        )
        ref = mixed_dwconv_bn_act(
            x.double(),
            [w.double() for w in ws],
            gamma.double(),
            beta.double(),
            rm.double(),
            rv.double(),
            stride=case.stride,
            training=training,
            impl="reference",
        )
    assert out.isnan().any()
    assert torch.equal(out.isnan().cpu(), ref.isnan())
    assert_close_to_reference(out, ref, torch.float32)


@pytest.mark.parametrize("activation", ["relu6", "relu"])
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_activation_mask_at_its_boundaries(impl_device, fmt, activation):
    """Channels with gamma = 0 put every BN output exactly on beta; betas of 0 and 6 sit on the
    activation's kinks, where eager PyTorch passes no gradient, 3 inside and -1 / 7 outside.
    The CPU backward recomputes y for its mask from the tape: it must find the same kinks, so
    grad beta is exactly zero on the kinks and the sum of grad_y inside, as in eager."""
    impl, device = impl_device
    case = Case(2, (8, 5), (3, 5), 7, 9, 1)
    ws, gamma, beta, rm, rv = _params(case, torch.float64, device)
    kinks = torch.tensor([0.0, 6.0, 3.0, -1.0, 7.0], dtype=torch.float64, device=device)
    with torch.no_grad():
        gamma[: case.c - 3] = 0.0
        beta[: case.c - 3] = kinks.repeat(case.c)[: case.c - 3]
    x = randn((case.n, case.c, case.h, case.w), dtype=torch.float64, device=device, seed=1)
    x = x.to(memory_format=FORMATS[fmt]).requires_grad_()
    gy = randn((case.n, case.c, case.h, case.w), dtype=torch.float64, device=device, seed=2)
    results = []
    for which in (impl, "reference"):
        out = mixed_dwconv_bn_act(
            x, ws, gamma, beta, rm.clone(), rv.clone(), activation=activation, impl=which
        )
        results.append([out, *torch.autograd.grad(out, [x, *ws, gamma, beta], gy)])
    for name, a, r in zip(["output", "grad x", "grad w3", "grad w5", "grad gamma", "grad beta"],
                          *results):  # fmt: skip
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9, msg=name)
    grad_beta, flat = results[0][-1], beta.detach()[: case.c - 3]
    inside = (flat > 0) & (flat < 6) if activation == "relu6" else flat > 0
    assert torch.equal(grad_beta[: case.c - 3][~inside], torch.zeros_like(flat[~inside]))
    sums = gy.sum((0, 2, 3))[: case.c - 3]
    torch.testing.assert_close(grad_beta[: case.c - 3][inside], sums[inside])


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_running_stats_follow_batch_norm_over_steps(impl_device, fmt):
    """Several training steps with different momenta (and masks changing between steps) give the
    running statistics F.batch_norm would, per alive channel."""
    impl, device = impl_device
    case = CASES[0]
    ws, gamma, beta, rm, rv = _params(case, torch.float32, device)
    rm64, rv64 = rm.double().cpu(), rv.double().cpu()
    for step, (momentum, kind) in enumerate(
        [(0.1, "all"), (0.5, "random"), (1.0, "group-dead"), (0.0, "random")]
    ):
        mask = _alive_mask(case, kind, seed=step)
        index = torch.nonzero(mask).flatten()
        x = randn(
            (case.n, index.numel(), case.h, case.w),
            device=device,
            seed=step,
            memory_format=FORMATS[fmt],
        )
        with torch.no_grad():
            mixed_dwconv_bn_act(
                x,
                ws,
                gamma,
                beta,
                rm,
                rv,
                stride=case.stride,
                momentum=momentum,
                channel_index=index.to(device),
                impl=impl,
            )
            with _one_thread():
                mixed_dwconv_bn_act(
                    x.double().cpu(),
                    [w.double().cpu() for w in ws],
                    gamma.double().cpu(),
                    beta.double().cpu(),
                    rm64,
                    rv64,
                    stride=case.stride,
                    momentum=momentum,
                    channel_index=index,
                    impl="reference",
                )
        assert_close_to_reference(rm, rm64, torch.float32, what=f"running_mean after step {step}")
        assert_close_to_reference(rv, rv64, torch.float32, what=f"running_var after step {step}")


@pytest.mark.triton
@pytest.mark.parametrize("fmt,stride", [("nchw", 1), ("nhwc", 2)])
def test_triton_reductions_across_blocks(fmt, stride, monkeypatch):
    """Tiles much smaller than the problem, as on a GPU: several position blocks per channel
    (the last one partial), several channel tiles per group, reduction loops over several chunks:
    the cross-block statistics merge and the weight-gradient partial sums against the reference
    (the other interpreter cases fit in one tile)."""
    why = runnable("triton", "cpu")
    if why:
        pytest.skip(why)
    from hrnas_kernels.mixed_dwconv_bn_act import triton as kernels

    monkeypatch.setattr(kernels, "_TILES", {False: (2, 16), True: (4, 8)})
    for name, value in (("_BLOCK_R", 2), ("_CHUNK", 2), ("_BLOCK_W", 16)):
        monkeypatch.setattr(kernels, name, value)
    case = Case(2, (5, 2, 3), (3, 5, 1), 5, 6, stride)
    ws, gamma, beta, rm, rv = _params(case, torch.float32, "cpu")
    x = randn((case.n, case.c, case.h, case.w), seed=1, memory_format=FORMATS[fmt]).requires_grad_()
    rm_k, rv_k = rm.clone(), rv.clone()
    out, grads = _call(x, ws, gamma, beta, rm_k, rv_k, case, None, True, "triton")
    rm64, rv64 = upcast([rm, rv])
    with _one_thread():
        ref, ref_grads = _call(
            *upcast([x]), upcast(ws), *upcast([gamma, beta]), rm64, rv64, case, None, True,
            "reference",
        )  # fmt: skip
    _assert_fp32_close(out, grads, rm_k, rv_k, ref, ref_grads, rm64, rv64)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_triton_half_precision_ops(dtype, fmt):
    """The GPU dtypes through the Triton op pair on CPU tensors (the interpreter; the public API
    offers them on CUDA only): output and every gradient within twice the error of eager
    PyTorch in the same dtype, against float64."""
    why = runnable("triton", "cpu")
    if why:
        pytest.skip(why)
    case = Case(2, (3, 2, 4), (3, 5, 7), 5, 6, 1)
    ws, gamma, beta, _, _ = _params(case, dtype, "cpu")
    x = randn((2, case.c, 5, 6), dtype=dtype, seed=1, memory_format=FORMATS[fmt])
    gy = randn((2, case.c, 5, 6), dtype=dtype, seed=2)
    ws, gamma, beta = [w.detach() for w in ws], gamma.detach(), beta.detach()
    y, conv, mean, var = ops.fwd_triton(x, ws, gamma, beta, None, None, 1, True, 1e-5, "relu6")
    gx, gw, ggamma, gbeta = ops.bwd_triton(
        gy, y, x, conv, ws, gamma, beta, mean, var, 1, True, 1e-5, "relu6"
    )
    inputs = [x.requires_grad_(), *[w.requires_grad_() for w in ws]]
    inputs += [gamma.requires_grad_(), beta.requires_grad_()]
    results = []
    for ts in (upcast(inputs), inputs):  # float64, then eager in the same dtype
        out = reference.mixed_dwconv_bn_act(ts[0], ts[1:-2], ts[-2], ts[-1], None, None)
        results.append([out, *torch.autograd.grad(out, ts, gy.to(out.dtype))])
    names = (
        ["output", "grad x"]
        + [f"grad weights[{g}]" for g in range(3)]
        + ["grad gamma", "grad beta"]
    )
    for name, a, r, e in zip(names, [y, gx, *gw, ggamma, gbeta], *results):
        assert_close_to_reference(a, r, dtype, e, what=name)


@pytest.mark.parametrize(
    "training,stride,activation", [(True, 1, "relu6"), (False, 2, "relu"), (True, 2, None)]
)
def test_gradcheck_float64(impl_device, training, stride, activation):
    impl, device = impl_device
    if impl == "triton" and device == "cuda":
        pytest.skip("the Triton kernels have no float64 on CUDA")
    case = Case(2, (3, 2), (3, 5), 5, 4, stride)
    ws, gamma, beta, rm, rv = _params(case, torch.float64, device, seed=3)
    index = torch.tensor([0, 2, 3, 4], device=device)  # channel 1 of the k=3 group is dead
    x = randn((2, 4, 5, 4), dtype=torch.float64, device=device, seed=2).requires_grad_()
    # training: no running statistics (gradcheck calls the op many times; batch statistics are
    # used either way); eval: the fixed running statistics
    stats = (None, None) if training else (rm, rv)

    def f(x, gamma, beta, *ws):
        return mixed_dwconv_bn_act(
            x,
            list(ws),
            gamma,
            beta,
            *stats,
            stride=stride,
            training=training,
            activation=activation,
            channel_index=index,
            impl=impl,
        )

    # fast_mode (a random projection of the Jacobian) keeps the Triton interpreter runs short;
    # one thread: hundreds of tiny calls, each paying its parallel region's barriers otherwise
    # (the thread count does not change results, see the determinism test)
    with _one_thread():
        assert torch.autograd.gradcheck(
            f, (x, gamma, beta, *ws), eps=1e-6, atol=1e-6, fast_mode=impl == "triton"
        )


def _op_inputs(device, fmt, use_batch_stats):
    """Compact-channel op arguments: groups k=3 (5 channels), k=5 (none alive), k=7 (3)."""
    x = randn((2, 8, 7, 6), device=device, seed=1, memory_format=FORMATS[fmt])
    ws = [randn((a, 1, k, k), device=device, seed=2 + k) / k for a, k in [(5, 3), (0, 5), (3, 7)]]
    gamma, beta = randn((8,), device=device, seed=3), randn((8,), device=device, seed=4)
    rm, rv = (
        (None, None)
        if use_batch_stats
        else (randn((8,), device=device, seed=5), 1 + torch.rand(8, device=device))
    )
    return x, ws, gamma, beta, rm, rv


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_opcheck(impl_device, fmt):
    impl, device = impl_device
    fwd, bwd = (ops.fwd, ops.bwd) if impl == "native" else (ops.fwd_triton, ops.bwd_triton)
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    for use_batch_stats, stride, act in [(True, 1, "relu6"), (False, 2, "none")]:
        x, ws, gamma, beta, rm, rv = _op_inputs(device, fmt, use_batch_stats)
        args = (x, ws, gamma, beta, rm, rv, stride, use_batch_stats, 1e-5, act)
        torch.library.opcheck(fwd, args, test_utils=utils)
        torch.library.opcheck(fwd, (*args, False), test_utils=utils)  # save_tape=False
        y, conv, mean, var = fwd(*args)
        gy = randn(y.shape, device=device, seed=9, memory_format=FORMATS[fmt])
        torch.library.opcheck(
            bwd,
            (gy, y, x, conv, ws, gamma, beta, mean, var, stride, use_batch_stats, 1e-5, act),
            test_utils=utils,
        )


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_forward_without_tape(impl_device, fmt, dtype):
    """save_tape=False (the inference call) gives an empty tape and, bit for bit, the output and
    statistics of a call that keeps it: running statistics (no tape is written at all) and batch
    statistics, strides 1 and 2, a channel count with and without padding lanes, an empty group."""
    impl, device = impl_device
    fwd = ops.fwd if impl == "native" else ops.fwd_triton
    for groups in [[(8, 3), (0, 5), (16, 7)], [(5, 3), (3, 5), (2, 7)]]:
        c = sum(a for a, _ in groups)
        x = randn((3, c, 9, 11), dtype=dtype, device=device, seed=1, memory_format=FORMATS[fmt])
        ws = [randn((a, 1, k, k), dtype=dtype, device=device, seed=k) / k for a, k in groups]
        gamma = randn((c,), dtype=dtype, device=device, seed=3)
        beta = randn((c,), dtype=dtype, device=device, seed=4)
        rm = randn((c,), dtype=dtype, device=device, seed=5)
        rv = 1 + torch.rand(c, dtype=dtype, device=device)
        for use_batch_stats, stride in [(False, 1), (False, 2), (True, 1), (True, 2)]:
            stats = (None, None) if use_batch_stats else (rm, rv)
            args = (x, ws, gamma, beta, *stats, stride, use_batch_stats, 1e-5, "relu6")
            y, conv, mean, var = fwd(*args)
            y2, conv2, mean2, var2 = fwd(*args, False)
            assert conv.shape == y.shape and conv2.shape == (0,)
            assert y2.is_contiguous(memory_format=FORMATS[fmt])
            for a, b in [(y, y2), (mean, mean2), (var, var2)]:
                assert torch.equal(a, b), (groups, use_batch_stats, stride)


def test_compile_fullgraph_dynamic(impl_device):
    """The public function traces without graph breaks, forward and backward (training BN with
    running-statistics update), and one dynamic compile serves two input shapes."""
    impl, device = impl_device
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def f(x, w3, w5, gamma, beta, rm, rv):
        return mixed_dwconv_bn_act(x, [w3, w5], gamma, beta, rm, rv, stride=2, impl=impl)

    compiled = torch.compile(f, backend=counter, fullgraph=True, dynamic=True)
    case = Case(0, (6, 5), (3, 5), 0, 0, 2)
    ws, gamma, beta, rm, rv = _params(case, torch.float32, device)
    # Sizes chosen with no accidental equalities (with each other, the channel counts or the
    # kernel sizes), which duck sizing would turn into guards.
    frames = []
    for n, h, w in [(4, 9, 13), (7, 14, 17)]:
        x = randn((n, 11, h, w), device=device, seed=n).requires_grad_()
        rm_c, rv_c = rm.clone(), rv.clone()
        out = compiled(x, *ws, gamma, beta, rm_c, rv_c)
        inputs = [x, *ws, gamma, beta]
        grads = torch.autograd.grad(out.square().sum(), inputs)
        rm_e, rv_e = rm.clone(), rv.clone()
        ref = f(x, *ws, gamma, beta, rm_e, rv_e)
        ref_grads = torch.autograd.grad(ref.square().sum(), inputs)
        torch.testing.assert_close(out, ref)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r)
        torch.testing.assert_close(rm_c, rm_e)
        torch.testing.assert_close(rv_c, rv_e)
        frames.append(counter.frame_count)
    # The first call may trace twice: dynamo restarts its analysis once to specialize the float
    # momentum/eps it first traced symbolically. The second shape must not compile again.
    assert frames[0] >= 1 and frames[1] == frames[0]


def test_backward_is_deterministic_and_thread_count_invariant():
    """Each task owns whole channels and reduces them in a fixed order: bitwise the same output,
    gradients and running statistics with 1 and 2 threads."""
    if runnable("native", "cpu"):
        pytest.skip(runnable("native", "cpu"))
    case = Case(4, (19, 13, 8), (3, 5, 7), 20, 23, 1)
    threads = torch.get_num_threads()
    results = []
    try:
        for fmt in FORMATS.values():
            for stride in (1, 2):
                for t in (1, 2, 1):
                    torch.set_num_threads(t)
                    ws, gamma, beta, rm, rv = _params(case, torch.float32, "cpu")
                    x = randn(
                        (case.n, case.c, case.h, case.w), seed=1, memory_format=fmt
                    ).requires_grad_()
                    out, grads = _call(
                        x,
                        ws,
                        gamma,
                        beta,
                        rm,
                        rv,
                        Case(4, case.sizes, case.ks, 20, 23, stride),
                        None,
                        True,
                        "native",
                    )
                    results.append(((fmt, stride), [out, *grads, rm, rv]))
    finally:
        torch.set_num_threads(threads)
    for key in {k for k, _ in results}:
        same = [r for k, r in results if k == key]
        for other in same[1:]:
            assert all(torch.equal(a, b) for a, b in zip(other, same[0])), key


# The channels_last CPU kernel splits each image's output rows into tasks (two when Ho >= 32)
# worked in bands of 8 rows: in the forward, a band whose tap rows all lie inside the image reads
# a dense tensor directly (its edge pixels apart), the others an input tile that slides down,
# keeping the halo rows; groups are
# padded to 8 lanes (dense when every group size is a multiple of 8, then it reads and writes the
# tensors in place) and run as 16- or 8-lane blocks. A row's outputs go 8 (AVX-512) or 4 at a
# time, then 4, then one by one. Tall cases cross task and band edges, and their widths take
# every step of a row.
TALL_CASES = [
    Case(2, (16, 8, 24), (3, 5, 7), 35, 13, 1),  # dense; bands 8+8+2 and 8+8+1; Wo 8+4+1
    Case(2, (8, 16), (5, 3), 37, 11, 2),  # dense, stride 2: Ho 19 (bands 8+8+3), Wo 6
    Case(2, (12, 5, 9), (3, 5, 7), 67, 27, 2),  # padded lanes; stride 2, Ho 34, Wo 8+4+2
    Case(1, (8, 3), (9, 1), 40, 6, 1),  # runtime kernel sizes, 8-lane blocks
    # dense: the middle bands read the tensor directly, 8-pixel steps between the edges
    Case(2, (16, 8, 24), (3, 5, 7), 29, 30, 1),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", TALL_CASES, ids=str)
def test_channels_last_tall_images_match_reference_and_thread_counts(case, training):
    if runnable("native", "cpu"):
        pytest.skip(runnable("native", "cpu"))
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            ws, gamma, beta, rm, rv = _params(case, torch.float32, "cpu")
            x = randn(
                (case.n, case.c, case.h, case.w), seed=1, memory_format=torch.channels_last
            ).requires_grad_()
            out, grads = _call(x, ws, gamma, beta, rm, rv, case, None, training, "native")
            results.append([out, *grads, rm, rv])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))
    ws, gamma, beta, rm, rv = _params(case, torch.float32, "cpu")
    x = randn((case.n, case.c, case.h, case.w), seed=1).requires_grad_()
    x64, *ws64 = upcast([x, *ws])
    g64, b64, rm64, rv64 = upcast([gamma, beta, rm, rv])
    with _one_thread():
        ref, ref_grads = _call(x64, ws64, g64, b64, rm64, rv64, case, None, training, "reference")
    out, *grads, rm_k, rv_k = results[0]
    assert out.is_contiguous(memory_format=torch.channels_last)
    _assert_fp32_close(out, grads, rm_k, rv_k, ref, ref_grads, rm64, rv64)


@pytest.mark.parametrize("stride", [1, 2])
def test_channels_last_padded_groups_keep_channels_apart(stride):
    """Alive counts of 3, 1 and 2 per group (each padded to 8 lanes, moved in 8-lane vectors
    whose spare lanes carry the neighbouring channels) on rows wide enough for the vector path,
    with one alive channel all NaN: every other channel's output and gradients match the
    reference, and NaN stays in that channel's output, its gamma/beta and weight gradients."""
    if runnable("native", "cpu"):
        pytest.skip(runnable("native", "cpu"))
    case = Case(2, (8, 4, 4), (3, 5, 7), 9, 37, stride)
    ws, gamma, beta, _, _ = _params(case, torch.float64, "cpu", seed=4)
    index = torch.tensor([0, 3, 6, 9, 12, 14])  # 3 of the k=3 group, 1 of k=5, 2 of k=7
    x = randn((2, 6, 9, 37), dtype=torch.float64, seed=2, memory_format=torch.channels_last)
    with torch.no_grad():
        x[:, 4] = float("nan")  # the first k=7 channel
    gy = randn((2, 6, (9 - 1) // stride + 1, (37 - 1) // stride + 1), dtype=torch.float64, seed=3)
    results = []
    for impl in ("native", "reference"):
        leaves = [t.detach().clone().requires_grad_() for t in (x, gamma, beta, *ws)]
        out = mixed_dwconv_bn_act(
            leaves[0],
            leaves[3:],
            leaves[1],
            leaves[2],
            None,
            None,
            stride=stride,
            channel_index=index,
            impl=impl,
        )
        results.append((out, *torch.autograd.grad(out, leaves, gy)))
    for actual, expected in zip(*results):
        torch.testing.assert_close(actual, expected, equal_nan=True)
    out, gx = results[0][0], results[0][1]
    assert out[:, 4].isnan().all() and not out[:, [0, 1, 2, 3, 5]].isnan().any()
    assert not gx[:, [0, 1, 2, 3, 5]].isnan().any()


@pytest.mark.parametrize("dense", [False, True], ids=["padded", "dense"])
@pytest.mark.parametrize("stride", [1, 2])
def test_gradcheck_float64_channels_last_across_bands(stride, dense):
    """float64 gradcheck of the channels_last CPU kernel on an image tall enough for two tasks
    of several bands (the sliding tiles' kept halo rows): with a dead channel (groups padded to
    8 lanes), and with 8-channel groups all alive (dense: tensors read and written in place)."""
    if runnable("native", "cpu"):
        pytest.skip(runnable("native", "cpu"))
    case = Case(1, (8, 8) if dense else (3, 2), (3, 5), 33 * stride, 3, stride)
    ws, gamma, beta, _, _ = _params(case, torch.float64, "cpu", seed=3)
    # padded: channel 1 of the k=3 group is dead
    index = None if dense else torch.tensor([0, 2, 3, 4])
    alive = case.c if dense else 4
    x = randn((1, alive, case.h, 3), dtype=torch.float64, seed=2, memory_format=torch.channels_last)

    def f(x, gamma, beta, *ws):
        return mixed_dwconv_bn_act(
            x, list(ws), gamma, beta, None, None, stride=stride, channel_index=index, impl="native"
        )

    with _one_thread():
        assert torch.autograd.gradcheck(f, (x.requires_grad_(), gamma, beta, *ws), eps=1e-6)


# ---------------------------------------------------------------------------------------------
# MixedDepthwiseConvBNAct


def _module(case, impl, device, dtype=torch.float32, **kw):
    m = MixedDepthwiseConvBNAct(
        list(case.sizes), case.ks, stride=case.stride, impl=impl, device=device, dtype=dtype, **kw
    )
    ws, gamma, beta, rm, rv = _params(case, dtype, device)
    with torch.no_grad():
        for p, w in zip(m.weights, ws):
            p.copy_(w)
        m.weight.copy_(gamma)
        m.bias.copy_(beta)
        m.running_mean.copy_(rm)
        m.running_var.copy_(rv)
    return m


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("mask_kind", ["random", "group-dead", "all-dead"])
def test_module_dead_channels_are_exact_zeros(impl_device, mask_kind, fmt):
    """Full-C input: dead output channels, and the gradients of x, of the dead weight rows and
    of the dead gamma/beta entries are exactly zero; dead running statistics are untouched. The
    compact (alive-only) input gives bitwise the alive channels of the full-C output."""
    impl, device = impl_device
    case = CASES[1]
    mask = _alive_mask(case, mask_kind).to(device)
    dead = ~mask
    for training in (True, False):
        m = _module(case, impl, device).train(training)
        m.set_channel_mask(mask)
        stats0 = m.running_mean.clone(), m.running_var.clone()
        x = randn(
            (case.n, case.c, case.h, case.w), device=device, seed=1, memory_format=FORMATS[fmt]
        ).requires_grad_()
        out = m(x)
        assert out.shape == (case.n, case.c, 4, 19)
        if fmt == "nhwc":
            assert out.is_contiguous(memory_format=torch.channels_last)
        params = [*m.weights, m.weight, m.bias]
        gy = randn(out.shape, device=device, seed=5)
        grads = torch.autograd.grad(out, [x, *params], gy)
        zero = dict(rtol=0, atol=0)
        torch.testing.assert_close(out[:, dead], torch.zeros_like(out[:, dead]), **zero)
        torch.testing.assert_close(grads[0][:, dead], torch.zeros_like(x[:, dead]), **zero)
        for g, rows in zip(grads[1 : 1 + len(case.sizes)], _group_rows(case, dead)):
            torch.testing.assert_close(g[rows], torch.zeros_like(g[rows]), **zero)
        for g in grads[-2:]:
            torch.testing.assert_close(g[dead], torch.zeros_like(g[dead]), **zero)
        torch.testing.assert_close(m.running_mean[dead], stats0[0][dead], **zero)
        torch.testing.assert_close(m.running_var[dead], stats0[1][dead], **zero)
        assert int(m.num_batches_tracked) == int(training)

        # compact input: the same kernel on the same data, so bitwise the alive channels
        m2 = _module(case, impl, device).train(training)
        m2.set_channel_mask(mask)
        xc = x.detach()[:, mask].contiguous(memory_format=FORMATS[fmt]).requires_grad_()
        outc = m2(xc)
        assert outc.shape == (case.n, int(mask.sum()), 4, 19)
        assert torch.equal(outc, out[:, mask])
        gradsc = torch.autograd.grad(outc, [xc, *m2.weights, m2.weight, m2.bias], gy[:, mask])
        assert torch.equal(gradsc[0], grads[0][:, mask])
        assert all(torch.equal(a, b) for a, b in zip(gradsc[1:], grads[1:]))
        assert torch.equal(m2.running_mean, m.running_mean)
        assert torch.equal(m2.running_var, m.running_var)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_inference_call_matches_the_autograd_call(impl_device, training, fmt):
    """With nothing to differentiate the forward op runs without the autograd function: the same
    output and running-statistics update as a call that records a graph (a searched mask
    included), and no graph."""
    impl, device = impl_device
    case = CASES[1]
    mask = _alive_mask(case, "random").to(device)
    x = randn((case.n, case.c, case.h, case.w), device=device, seed=1, memory_format=FORMATS[fmt])
    results = []
    for grad in (True, False):
        m = _module(case, impl, device).train(training)
        m.set_channel_mask(mask)
        with torch.set_grad_enabled(grad):
            y = m(x)
        assert y.requires_grad == grad
        results.append((y.detach(), *(t.clone() for t in m.buffers())))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_module_matches_reference_and_caches_alive_index(impl_device, monkeypatch):
    impl, device = impl_device
    case = CASES[0]
    m = _module(case, impl, device)
    ref = _module(case, "reference", "cpu", dtype=torch.float64)
    calls = []
    nonzero = torch.nonzero
    x = randn((case.n, case.c, case.h, case.w), device=device, seed=3)

    def check(what):
        with monkeypatch.context() as patch:  # count the alive-index computations of m
            patch.setattr(torch, "nonzero", lambda *a, **k: calls.append(1) or nonzero(*a, **k))
            out = m(x)
        with _one_thread():
            expected = ref(x.double().cpu())
        assert_close_to_reference(out, expected, torch.float32, what=what)
        assert_close_to_reference(m.running_var, ref.running_var, torch.float32, what=what)

    check("all alive")
    check("all alive, again")
    assert len(calls) == 1  # computed once, reused while the mask is unchanged
    mask = _alive_mask(case, "random", seed=4)
    m.set_channel_mask(mask)
    ref.set_channel_mask(mask)
    check("set_channel_mask")
    m.channel_mask[1] = False  # in-place edits bump the mask's version
    ref.channel_mask[1] = False
    check("in-place mask edit")
    m.channel_mask = torch.zeros(case.c, dtype=torch.bool, device=device)  # a new buffer
    ref.channel_mask = torch.zeros(case.c, dtype=torch.bool)
    check("replaced mask")
    m.load_state_dict(ref.state_dict())  # a checkpoint's mask is copied in place
    check("loaded state_dict")
    assert len(calls) == 5
    check("unchanged")
    assert len(calls) == 5
    m.eval()
    ref.eval()
    check("eval")


def test_module_batch_norm_semantics():
    """from_modules(convs, bns) reproduces cat(act(bn_g(conv_g(x_g)))) step by step in training
    (momentum=None: cumulative average over num_batches_tracked) and in eval; float64."""
    torch.manual_seed(0)
    convs = [
        nn.Conv2d(c, c, k, 2, k // 2, groups=c, bias=False).double()
        for c, k in [(5, 3), (4, 5), (3, 7)]
    ]
    bns = [nn.BatchNorm2d(c, momentum=None).double() for c in (5, 4, 3)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(-2, 2)
            bn.bias.uniform_(-2, 6)
    m = MixedDepthwiseConvBNAct.from_modules(convs, bns, nn.ReLU6())
    assert m.momentum is None and m.group_channels == (5, 4, 3) and m.stride == 2

    def eager(x):
        xs = x.split([5, 4, 3], 1)
        return torch.cat([F.relu6(bn(conv(xg))) for conv, bn, xg in zip(convs, bns, xs)], 1)

    tol = TOLERANCES[torch.float64]
    for step in range(3):
        x = randn((2, 12, 9, 8), dtype=torch.float64, seed=step).requires_grad_()
        out, ref = m(x), eager(x)
        torch.testing.assert_close(out, ref, atol=tol[0], rtol=tol[1])
        g = randn(out.shape, dtype=torch.float64, seed=10 + step)
        torch.testing.assert_close(
            torch.autograd.grad(out, x, g), torch.autograd.grad(ref, x, g), atol=tol[0], rtol=tol[1]
        )
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(
            getattr(m, name), torch.cat([getattr(bn, name) for bn in bns]), atol=tol[0], rtol=tol[1]
        )
    assert int(m.num_batches_tracked) == 3
    m.eval()
    for bn in bns:
        bn.eval()
    x = randn((2, 12, 9, 8), dtype=torch.float64, seed=7)
    torch.testing.assert_close(m(x), eager(x), atol=tol[0], rtol=tol[1])
    assert int(m.num_batches_tracked) == 3


def test_module_construction_and_init():
    m = MixedDepthwiseConvBNAct(10, (3, 5, 7), stride=2, activation=None)
    assert m.group_channels == (4, 3, 3) and m.channels == 10
    assert [tuple(w.shape) for w in m.weights] == [(4, 1, 3, 3), (3, 1, 5, 5), (3, 1, 7, 7)]
    assert set(m.state_dict()) == {
        "weights.0",
        "weights.1",
        "weights.2",
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
        "channel_mask",
    }
    assert m.channel_mask.dtype == torch.bool and bool(m.channel_mask.all())
    assert torch.equal(m.weight, torch.ones(10)) and torch.equal(m.bias, torch.zeros(10))
    assert torch.equal(m.running_var, torch.ones(10)) and int(m.num_batches_tracked) == 0
    for text in (
        "channels=[4, 3, 3]",
        "kernel_sizes=[3, 5, 7]",
        "stride=2",
        "activation=None",
        "impl='auto'",
    ):
        assert text in repr(m)
    # the depthwise weights are initialized exactly as nn.Conv2d's
    torch.manual_seed(1)
    m = MixedDepthwiseConvBNAct([6], [5])
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 6, 5, padding=2, groups=6, bias=False)
    assert torch.equal(m.weights[0], conv.weight)
    m64 = MixedDepthwiseConvBNAct([2, 7], (3, 3), dtype=torch.float64)
    assert m64.weight.dtype == m64.weights[1].dtype == torch.float64
    # parameters and buffers move with .to(); the mask cache follows the new buffer
    m = MixedDepthwiseConvBNAct(8, (3, 5))
    m.set_channel_mask([True] * 4 + [False] * 4)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    assert m.double()(x).shape == (2, 8, 5, 5)


def test_module_empty_batch_and_all_dead():
    """An empty batch behaves like nn.BatchNorm2d (empty output, counted batch, statistics kept);
    an all-dead mask gives zeros with a graph, so backward still runs."""
    if runnable("native", "cpu"):
        pytest.skip(runnable("native", "cpu"))
    m = MixedDepthwiseConvBNAct(6, (3, 5))
    x = torch.zeros(0, 6, 4, 4, requires_grad=True)
    out = m(x)
    assert out.shape == (0, 6, 4, 4) and int(m.num_batches_tracked) == 1
    assert torch.equal(m.running_mean, torch.zeros(6)) and torch.equal(m.running_var, torch.ones(6))
    (gx,) = torch.autograd.grad(out.sum(), x)
    assert gx.shape == x.shape
    m.set_channel_mask(torch.zeros(6, dtype=torch.bool))
    x = torch.randn(2, 6, 4, 4, requires_grad=True)
    out = m(x)
    assert torch.equal(out, torch.zeros(2, 6, 4, 4))
    grads = torch.autograd.grad(out.sum(), [x, *m.parameters()])
    assert all(torch.count_nonzero(g) == 0 for g in grads)
    assert m(torch.zeros(2, 0, 4, 4)).shape == (2, 0, 4, 4)


def test_module_compiles_and_follows_mask_changes(impl_device):
    """torch.compile(module): the alive-index lookup runs eagerly (one graph break), the rest is
    compiled; a new mask recompiles instead of reusing stale counts. Full-C and compact input."""
    impl, device = impl_device
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    case = CASES[0]
    m, eager = _module(case, impl, device), _module(case, impl, device)
    compiled = torch.compile(m, backend=CompileCounterWithBackend("aot_eager"))
    x = randn((case.n, case.c, case.h, case.w), device=device, seed=4)
    for kind, compact in [("random", False), ("random", True), ("group-dead", False)]:
        mask = _alive_mask(case, kind).to(device)
        m.set_channel_mask(mask)
        eager.set_channel_mask(mask)
        for inp in [x[:, mask] if compact else x]:
            inp = inp.detach().requires_grad_()
            out, ref = compiled(inp), eager(inp)
            torch.testing.assert_close(out, ref)
            torch.testing.assert_close(
                torch.autograd.grad(out.sum(), [inp, m.weight]),
                torch.autograd.grad(ref.sum(), [inp, eager.weight]),
            )
    torch.testing.assert_close(m.running_var, eager.running_var)
    assert int(m.num_batches_tracked) == int(eager.num_batches_tracked) == 3


# ---------------------------------------------------------------------------------------------
# fuse_depthwise


class _ConvBNAct(nn.Sequential):
    """torchvision's Conv2dNormActivation: a Sequential subclass."""

    def __init__(self, cin, cout, k=3, stride=1, groups=1, act=nn.ReLU6):
        layers = [
            nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act is not None:
            layers.append(act(inplace=True))
        super().__init__(*layers)


class _InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand, k=3):
        super().__init__()
        hidden = cin * expand
        layers = [_ConvBNAct(cin, hidden, 1)] if expand != 1 else []
        layers += [
            _ConvBNAct(hidden, hidden, k, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


def _mobilenet():
    """MobileNetV2-shaped: depthwise ConvBNReLU6 runs with k 3/5/7 and stride 1/2, one without
    activation, one with Identity, one with named children and ReLU, and runs that must stay
    (dense stem, depthwise conv with bias, with dilation, BN without affine)."""
    dw = dict(groups=16, bias=False)
    return nn.Sequential(
        _ConvBNAct(3, 16, 3, 2),  # dense: stays
        _InvertedResidual(16, 8, 1, 1),
        _InvertedResidual(8, 12, 2, 4, k=5),
        _InvertedResidual(12, 12, 1, 3, k=7),
        nn.Conv2d(12, 16, 1, bias=False),
        nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, **dw), nn.BatchNorm2d(16)),  # no activation
        nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1, **dw), nn.BatchNorm2d(16, momentum=None), nn.Identity()
        ),
        nn.Sequential(
            OrderedDict(
                dw=nn.Conv2d(16, 16, 5, 2, padding=2, **dw),
                bn=nn.BatchNorm2d(16, eps=1e-3),
                act=nn.ReLU(),
            )
        ),
        nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=True),
        nn.BatchNorm2d(16),
        nn.ReLU6(),
        nn.Conv2d(16, 16, 3, padding=2, dilation=2, **dw),
        nn.BatchNorm2d(16),
        nn.ReLU6(),
        nn.Conv2d(16, 16, 3, padding=1, **dw),
        nn.BatchNorm2d(16, affine=False),
        nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def _randomize_bn(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d) and bn.affine:
                bn.weight.uniform_(0.5, 2)
                bn.bias.uniform_(-1, 3)
                bn.running_mean.normal_(0, 0.3)
                bn.running_var.uniform_(0.5, 2)
                bn.num_batches_tracked.fill_(3)


def _key_map(fused):
    """The documented state_dict mapping, old key -> new key, from the fused module locations."""
    mapping = {}
    for name, seq in fused.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for i, child in enumerate(names):
            if isinstance(seq._modules[child], MixedDepthwiseConvBNAct):
                at = f"{name}.{child}" if name else child
                bn = f"{name}.{names[i + 1]}" if name else names[i + 1]
                mapping[f"{at}.weight"] = f"{at}.weights.0"
                for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                    mapping[f"{bn}.{key}"] = f"{at}.{key}"
    return mapping


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_fuse_depthwise_mobilenet(fmt):
    if runnable("native", "cpu"):
        pytest.skip(runnable("native", "cpu"))
    with _one_thread():  # float64 eager convs; see _one_thread
        _check_fuse_depthwise_mobilenet(fmt)


def _check_fuse_depthwise_mobilenet(fmt):
    torch.manual_seed(0)
    model = _mobilenet().double().to(memory_format=FORMATS[fmt])
    _randomize_bn(model)
    original = copy.deepcopy(model)
    assert fuse_depthwise(model, impl="native") == 6
    fused_modules = [m for m in model.modules() if isinstance(m, MixedDepthwiseConvBNAct)]
    assert [
        (m.kernel_sizes[0], m.stride, m.activation, m.eps, m.momentum) for m in fused_modules
    ] == [
        (3, 1, "relu6", 1e-5, 0.1),
        (5, 2, "relu6", 1e-5, 0.1),
        (7, 1, "relu6", 1e-5, 0.1),
        (3, 1, None, 1e-5, 0.1),
        (3, 1, None, 1e-5, None),
        (5, 2, "relu", 1e-3, 0.1),
    ]
    assert type(model[2].conv[1][1]) is nn.Identity and type(model[2].conv[1][2]) is nn.Identity
    assert type(model[8]) is nn.Conv2d and type(model[11]) is nn.Conv2d  # bias / dilation stay

    # state_dict: the documented key mapping, values copied exactly
    mapping = _key_map(model)
    old, new = original.state_dict(), model.state_dict()
    masks = {k for k in new if k.endswith(".channel_mask")}
    assert len(masks) == 6 and all(bool(new[k].all()) for k in masks)
    assert set(new) - masks == {mapping.get(k, k) for k in old}
    for k, v in old.items():
        assert torch.equal(new[mapping.get(k, k)], v), k
    reloaded = copy.deepcopy(model)
    reloaded.load_state_dict(
        {**{mapping.get(k, k): v for k, v in old.items()}, **{k: new[k] for k in masks}}
    )  # strict: the mapping is complete
    # an unfused checkpoint has no channel masks: it loads strictly, keeping the current masks
    some = next(m for m in reloaded.modules() if isinstance(m, MixedDepthwiseConvBNAct))
    some.channel_mask[0] = False
    reloaded.load_state_dict({mapping.get(k, k): v for k, v in old.items()})
    assert not bool(some.channel_mask[0]) and bool(some.channel_mask[1:].all())

    tol = dict(atol=TOLERANCES[torch.float64][0], rtol=TOLERANCES[torch.float64][1])
    for step in range(2):  # training: outputs, parameter gradients, running statistics
        x = randn((2, 3, 32, 29), dtype=torch.float64, seed=step, memory_format=FORMATS[fmt])
        out, ref = model(x), original(x)
        torch.testing.assert_close(out, ref, **tol)
        params = dict(model.named_parameters())
        old_params = dict(original.named_parameters())
        grads = torch.autograd.grad(out.square().sum(), list(params.values()))
        ref_grads = dict(
            zip(old_params, torch.autograd.grad(ref.square().sum(), list(old_params.values())))
        )
        inverse = {v: k for k, v in mapping.items()}
        for name, g in zip(params, grads):
            torch.testing.assert_close(
                g,
                ref_grads[inverse.get(name, name)],
                **tol,
                msg=lambda m, name=name: f"grad {name}: {m}",
            )
    new, old = model.state_dict(), original.state_dict()
    for k, v in old.items():
        torch.testing.assert_close(new[mapping.get(k, k)], v, **tol)
    model.eval()
    original.eval()
    x = randn((3, 3, 17, 18), dtype=torch.float64, seed=5, memory_format=FORMATS[fmt])
    torch.testing.assert_close(model(x), original(x), **tol)
    assert fuse_depthwise(model) == 0  # idempotent


def test_fuse_depthwise_under_autocast():
    """CPU autocast to bfloat16 hands the fused module bfloat16 activations: it computes in its
    parameters' float32 and the model's output stays within twice the unfused model's own
    autocast error (against float32 without autocast), in train and eval."""
    if runnable("native", "cpu"):
        pytest.skip(runnable("native", "cpu"))
    torch.manual_seed(0)
    original = _mobilenet()
    _randomize_bn(original)
    for training in (True, False):
        original.train(training)
        model = copy.deepcopy(original)
        exact = copy.deepcopy(original)
        assert fuse_depthwise(model) == 6
        x = randn((2, 3, 24, 23), seed=3)
        with torch.no_grad():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out, ref = model(x), copy.deepcopy(original)(x)
            expected = exact(x)
        assert out.dtype == ref.dtype
        bound = 2 * float((ref.float() - expected).abs().max()) + 1e-3
        assert float((out.float() - expected).abs().max()) <= bound


def test_fuse_depthwise_leaves_other_layers_alone():
    def dw(**kw):
        args = dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4, bias=False)
        args.update(kw)
        return nn.Conv2d(**args)

    class MyBN(nn.BatchNorm2d):
        pass

    runs = [
        [dw(bias=True), nn.BatchNorm2d(4)],
        [dw(kernel_size=4, padding=2), nn.BatchNorm2d(4)],
        [dw(kernel_size=(3, 5), padding=(1, 2)), nn.BatchNorm2d(4)],
        [dw(padding=0), nn.BatchNorm2d(4)],
        [dw(stride=3), nn.BatchNorm2d(4)],
        [dw(stride=(1, 2)), nn.BatchNorm2d(4)],
        [dw(dilation=2, padding=2), nn.BatchNorm2d(4)],
        [dw(padding_mode="reflect"), nn.BatchNorm2d(4)],
        [dw(out_channels=8), nn.BatchNorm2d(8)],
        [dw(groups=2), nn.BatchNorm2d(4)],
        [dw(), nn.BatchNorm2d(4, affine=False)],
        [dw(), nn.BatchNorm2d(4, track_running_stats=False)],
        [dw(), MyBN(4)],
        [dw(), nn.ReLU(), nn.BatchNorm2d(4)],
    ]
    model = nn.Sequential(
        *[nn.Sequential(*r) for r in runs], nn.ModuleList([dw(), nn.BatchNorm2d(4)])
    )
    before = copy.deepcopy(model)
    assert fuse_depthwise(model) == 0
    assert str(model) == str(before)
    # 'same' padding is k // 2 for an odd kernel: that one qualifies
    assert fuse_depthwise(nn.Sequential(dw(padding="same"), nn.BatchNorm2d(4))) == 1


# ---------------------------------------------------------------------------------------------
# Bad input: errors that name the problem, before any kernel runs.


def _args(c=(3, 2), ks=(3, 5), n=2, h=5, w=5):
    x = torch.zeros(n, sum(c), h, w)
    ws = [torch.zeros(ci, 1, k, k) for ci, k in zip(c, ks)]
    return [x, ws, torch.ones(sum(c)), torch.zeros(sum(c)), torch.zeros(sum(c)), torch.ones(sum(c))]


def _with(i, value, args=None):
    args = args or _args()
    args[i] = value
    return args


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        (_with(0, torch.zeros(5, 5, 5)), {}, ValueError, r"4-d \[N, C, H, W\]"),
        (_with(0, torch.zeros(2, 5, 5, 5, dtype=torch.int64)), {}, TypeError, "floating dtype"),
        (
            _with(0, torch.zeros(2, 6, 5, 5)),
            {},
            ValueError,
            "x has 6 channels, the weights define 5",
        ),
        (_with(1, torch.zeros(5, 1, 3, 3)), {}, TypeError, "non-empty list"),
        (_with(1, []), {}, TypeError, "non-empty list"),
        (
            _with(1, [torch.zeros(3, 2, 3, 3), torch.zeros(2, 1, 5, 5)]),
            {},
            ValueError,
            r"weights\[0\] must have shape \[C_k, 1, k, k\]",
        ),
        (
            _with(1, [torch.zeros(3, 1, 3, 3), torch.zeros(2, 1, 5, 3)]),
            {},
            ValueError,
            r"weights\[1\] must have shape",
        ),
        (
            _with(1, [torch.zeros(3, 1, 3), torch.zeros(2, 1, 5, 5)]),
            {},
            ValueError,
            r"weights\[0\] must have shape",
        ),
        (
            _with(1, [torch.zeros(3, 1, 4, 4), torch.zeros(2, 1, 5, 5)]),
            {},
            ValueError,
            "even kernel size 4",
        ),
        (
            _with(1, [torch.zeros(3, 1, 3, 3, dtype=torch.float64), torch.zeros(2, 1, 5, 5)]),
            {},
            TypeError,
            r"weights\[0\] is torch.float64",
        ),
        (_with(2, torch.ones(4)), {}, ValueError, r"bn_weight must have shape \[5\]"),
        (_with(3, torch.ones(5, 1)), {}, ValueError, r"bn_bias must have shape \[5\]"),
        (_with(4, torch.ones(6)), {}, ValueError, r"running_mean must have shape \[5\]"),
        (_with(5, None), {}, ValueError, "both running_mean and running_var"),
        (_args(), {"stride": 3}, ValueError, "stride must be 1 or 2"),
        (_args(), {"activation": "gelu"}, ValueError, "activation must be one of"),
        (_args(), {"momentum": 1.5}, ValueError, "momentum must be in"),
        (_args(), {"eps": 0.0}, ValueError, "eps must be positive"),
        (_args(), {"impl": "cuda"}, ValueError, "impl must be one of"),
        (_args(h=1, w=1, n=1), {}, ValueError, "more than 1 value per channel"),
        (_args(h=2, w=2, n=1), {"stride": 2}, ValueError, "more than 1 value per channel"),
        (
            _with(0, torch.zeros(2, 3, 5, 5)),
            {"channel_index": torch.tensor([0, 1, 5])},
            ValueError,
            r"must lie in \[0, 5\)",
        ),
        (
            _with(0, torch.zeros(2, 2, 5, 5)),
            {"channel_index": torch.tensor([-1, 2])},
            ValueError,
            "must lie in",
        ),
        (
            _with(0, torch.zeros(2, 3, 5, 5)),
            {"channel_index": torch.tensor([0, 3, 2])},
            ValueError,
            "strictly increasing",
        ),
        (
            _with(0, torch.zeros(2, 3, 5, 5)),
            {"channel_index": torch.tensor([0, 2, 2])},
            ValueError,
            "strictly increasing",
        ),
        (
            _with(0, torch.zeros(2, 3, 5, 5)),
            {"channel_index": torch.tensor([0, 2])},
            ValueError,
            "x has 3 channels but channel_index lists 2",
        ),
        (
            _with(0, torch.zeros(2, 2, 5, 5)),
            {"channel_index": torch.tensor([0, 2], dtype=torch.int32)},
            TypeError,
            "1-d int64",
        ),
        (
            _with(0, torch.zeros(2, 2, 5, 5)),
            {"channel_index": torch.tensor([[0, 2]])},
            TypeError,
            "1-d int64",
        ),
    ],
)
def test_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        mixed_dwconv_bn_act(*args, **kwargs)


def test_module_bad_input():
    m = MixedDepthwiseConvBNAct([3, 2], (3, 5))
    m.set_channel_mask([True, False, True, True, False])
    for x, exc, match in [
        (
            torch.zeros(2, 4, 5, 5),
            ValueError,
            "x has 4 channels; expected all 5 channels or the 3 alive",
        ),
        (torch.zeros(5, 5, 5), ValueError, r"4-d \[N, C, H, W\]"),
        (
            torch.zeros(2, 5, 5, 5, dtype=torch.float64),
            TypeError,
            "module's parameters are torch.float32",
        ),
        (torch.zeros(1, 5, 1, 1), ValueError, "more than 1 value per channel"),
    ]:
        with pytest.raises(exc, match=match):
            m(x)
    assert int(m.num_batches_tracked) == 0  # a refused call counts no batch
    with pytest.raises(ValueError, match=r"bool tensor of shape \[5\]"):
        m.set_channel_mask(torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"bool tensor of shape \[5\]"):
        m.set_channel_mask(torch.ones(5))
    m.channel_mask = torch.ones(5)
    with pytest.raises(ValueError, match="channel_mask must be a bool tensor"):
        m(torch.zeros(2, 5, 5, 5))
    for kwargs, match in [
        (dict(channels=6, kernel_sizes=(3, 4)), "positive odd ints"),
        (dict(channels=6, kernel_sizes=()), "positive odd ints"),
        (dict(channels=2, kernel_sizes=(3, 5, 7)), "fewer than the 3 kernel sizes"),
        (dict(channels=[2, 3], kernel_sizes=(3, 5, 7)), "one positive int per kernel size"),
        (dict(channels=[2, 0], kernel_sizes=(3, 5)), "one positive int per kernel size"),
        (dict(channels=4, kernel_sizes=(3,), stride=3), "stride must be 1 or 2"),
        (dict(channels=4, kernel_sizes=(3,), activation="gelu"), "activation must be one of"),
        (dict(channels=4, kernel_sizes=(3,), momentum=2.0), "momentum must be in"),
        (dict(channels=4, kernel_sizes=(3,), eps=0), "eps must be positive"),
    ]:
        with pytest.raises(ValueError, match=match):
            MixedDepthwiseConvBNAct(**kwargs)
    with pytest.raises(ValueError, match="impl must be one of"):
        MixedDepthwiseConvBNAct(4, (3,), impl="gpu")
    m = MixedDepthwiseConvBNAct(4, (3,))
    m.impl = "gpu"
    with pytest.raises(ValueError, match="impl must be one of"):
        m(torch.zeros(2, 4, 3, 3))
    assert int(m.num_batches_tracked) == 0


def test_from_modules_bad_input():
    def dw(c, k, stride=1, **kw):
        return nn.Conv2d(c, c, k, stride, k // 2, groups=c, bias=False, **kw)

    cases = [
        (([dw(4, 3)], []), "need one BatchNorm2d per conv"),
        (([nn.Conv2d(4, 4, 3, padding=1, bias=False)], [nn.BatchNorm2d(4)]), "is not depthwise"),
        (([dw(4, 3), nn.Linear(2, 2)], [nn.BatchNorm2d(4)] * 2), r"convs\[1\] is a Linear"),
        (([dw(4, 3)], [nn.BatchNorm2d(5)]), r"bns\[0\] has 5 features"),
        (([dw(4, 3)], [nn.BatchNorm2d(4, affine=False)]), "affine=True"),
        (([dw(4, 3), dw(4, 5, 2)], [nn.BatchNorm2d(4)] * 2), "different strides"),
        (
            ([dw(4, 3), dw(4, 5)], [nn.BatchNorm2d(4), nn.BatchNorm2d(4, eps=1e-3)]),
            "different eps/momentum",
        ),
    ]
    for (convs, bns), match in cases:
        with pytest.raises(ValueError, match=match):
            MixedDepthwiseConvBNAct.from_modules(convs, bns)
    with pytest.raises(ValueError, match="nn.ReLU, nn.ReLU6 or nn.Identity"):
        MixedDepthwiseConvBNAct.from_modules([dw(4, 3)], [nn.BatchNorm2d(4)], nn.GELU())


def test_explicit_impl_that_cannot_run_raises_with_reason():
    args = _args()
    if runnable("triton", "cpu"):
        with pytest.raises(RuntimeError, match="impl='triton' cannot run"):
            mixed_dwconv_bn_act(*args, impl="triton")
    meta = (
        [t.to("meta") for t in args[:1]]
        + [[w.to("meta") for w in args[1]]]
        + [t.to("meta") for t in args[2:]]
    )
    with pytest.raises(RuntimeError, match="impl='auto' found no fused implementation"):
        mixed_dwconv_bn_act(*meta)
    if not runnable("native", "cpu"):
        with pytest.raises(RuntimeError, match="impl='native' cannot run.*float16 is not"):
            mixed_dwconv_bn_act(
                *[t.half() for t in args[:1]],
                [w.half() for w in args[1]],
                *[t.half() for t in args[2:]],
                impl="native",
            )


def test_native_op_checks_its_arguments():
    """Direct callers of the private op get TORCH_CHECK errors that name the op."""
    if runnable("native", "cpu"):
        pytest.skip(runnable("native", "cpu"))
    x, ws, gamma, beta, rm, rv = _op_inputs("cpu", "nchw", True)
    with pytest.raises(RuntimeError, match="mixed_dwconv_bn_act: unknown activation 'gelu'"):
        ops.fwd(x, ws, gamma, beta, None, None, 1, True, 1e-5, "gelu")
    with pytest.raises(
        RuntimeError, match="mixed_dwconv_bn_act: x has 8 channels, the weight groups hold 5"
    ):
        ops.fwd(x, ws[:2], gamma, beta, None, None, 1, True, 1e-5, "none")
    with pytest.raises(RuntimeError, match=r"mixed_dwconv_bn_act: weights\[0\] must be"):
        ops.fwd(
            x,
            [torch.zeros(5, 1, 4, 4), ws[1], ws[2]],
            gamma,
            beta,
            None,
            None,
            1,
            True,
            1e-5,
            "none",
        )
    with pytest.raises(RuntimeError, match="mixed_dwconv_bn_act: running statistics are required"):
        ops.fwd(x, ws, gamma, beta, None, None, 1, False, 1e-5, "none")
    with pytest.raises(RuntimeError, match="mixed_dwconv_bn_act: stride must be 1 or 2"):
        ops.fwd(x, ws, gamma, beta, None, None, 3, True, 1e-5, "none")
