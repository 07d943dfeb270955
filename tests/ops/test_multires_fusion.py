"""multires_fusion: every implementation against the float64 reference, forward and backward,
plus gradcheck, opcheck, torch.compile, layouts, edge shapes and bad input."""

import pytest
import torch
import torch.nn.functional as F

import hrnas_kernels
from hrnas_kernels import multires_fusion
from hrnas_kernels._testing import TOLERANCES, assert_close_to_reference, randn, runnable, upcast
from hrnas_kernels.multires_fusion import MultiResolutionFusion, ops

# (output size, [input sizes]): 1-pixel maps, odd sizes, ratios 1/2/4, non-integer ratios,
# downsampling, 1 and 8 inputs.
CASES = [
    ((1, 1), [(1, 1)]),
    ((1, 1), [(1, 1), (3, 5)]),
    ((7, 5), [(1, 1), (7, 5)]),
    ((13, 11), [(13, 11), (7, 6), (3, 2), (20, 30)]),
    ((16, 16), [(16, 16), (8, 8), (4, 4)]),
    ((10, 10), [(10, 10), (3, 7)]),
    ((9, 10), [(9, 10), (1, 3), (2, 2), (5, 5), (9, 10), (18, 20), (4, 13), (11, 9)]),
    # Rows of 32+ elements take the CPU kernel's vector row maps (windows that slide, several
    # chunks per row); a 1-pixel input's transposed taps span the whole row (scalar fallback).
    ((5, 70), [(5, 70), (3, 35), (2, 17), (5, 33), (1, 1), (9, 140), (4, 105)]),
    # Upsampling by 20 along W: each input column's transposed taps span 40 output columns, more
    # than any vector window, so the row map takes its scalar form for every input column.
    ((3, 80), [(3, 80), (2, 4)]),
    # No input at the output size: channels_last sums up to three resampled inputs in one pass
    # (compiled per count), more in an accumulator row.
    ((6, 9), [(3, 5), (12, 4), (2, 2)]),
    ((6, 9), [(3, 5), (12, 4), (2, 2), (6, 3)]),
]
MODE_ACT = [("bilinear", "relu"), ("bilinear", "relu6"), ("bilinear", None), ("nearest", "relu")]
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def _inputs(
    in_sizes, n=2, c=3, dtype=torch.float32, device="cpu", fmt=torch.contiguous_format, seed=0
):
    return [
        randn(
            (n, c, h, w), dtype=dtype, device=device, seed=seed + j, memory_format=fmt
        ).requires_grad_()
        for j, (h, w) in enumerate(in_sizes)
    ]


def _fwd_bwd(xs, impl, size, mode, act, seed=100):
    out = multires_fusion(xs, size, mode, act, impl=impl)
    g = randn(out.shape, dtype=out.dtype, device=out.device, seed=seed)
    grads = torch.autograd.grad(out, xs, g)
    return out, grads


def _dtypes(device):
    if device == "cuda":
        return [torch.float32, torch.float16, torch.bfloat16]
    return [torch.float32, torch.float64]


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("mode,act", MODE_ACT, ids=lambda v: str(v))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}<-{len(c[1])}")
def test_matches_reference(impl_device, case, mode, act, fmt):
    impl, device = impl_device
    size, in_sizes = case
    c = 17 if fmt == "nhwc" else 3  # a C that is not a multiple of any vector width
    for dtype in _dtypes(device):
        xs = _inputs(in_sizes, c=c, dtype=dtype, device=device, fmt=FORMATS[fmt])
        out, grads = _fwd_bwd(xs, impl, size, mode, act)
        xs64 = upcast(xs)
        ref, ref_grads = _fwd_bwd(xs64, "reference", size, mode, act)
        eager, eager_grads = (None, [None] * len(xs))
        if dtype in (torch.float16, torch.bfloat16):
            eager, eager_grads = _fwd_bwd(xs, "reference", size, mode, act)
        assert out.dtype == dtype and out.device.type == device
        assert out.is_contiguous(memory_format=FORMATS[fmt]) or out.is_contiguous()
        assert_close_to_reference(out, ref, dtype, eager)
        for j, (gx, gr, ge) in enumerate(zip(grads, ref_grads, eager_grads)):
            assert_close_to_reference(gx, gr, dtype, ge, what=f"grad of inputs[{j}]")


def test_native_fp32_follows_interpolate_exactly():
    """Same source pixels and weights as F.interpolate: fp32 results agree to a few ulps."""
    if runnable("native", "cpu"):
        pytest.skip(runnable("native", "cpu"))
    x = randn((2, 5, 7, 9))
    for mode in ("bilinear", "nearest"):
        for size in [(14, 18), (13, 11), (3, 4), (28, 36)]:
            ours = multires_fusion([x], size, mode, None, impl="native")
            eager = F.interpolate(
                x, size=size, mode=mode, align_corners=False if mode == "bilinear" else None
            )
            tol = 0 if mode == "nearest" else 2e-6
            torch.testing.assert_close(ours, eager, atol=tol, rtol=0)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("mode,act", MODE_ACT, ids=lambda v: str(v))
def test_gradcheck_float64(impl_device, mode, act, fmt):
    impl, device = impl_device
    xs = [
        randn(
            (1, 2, h, w), dtype=torch.float64, device=device, seed=j, memory_format=FORMATS[fmt]
        ).requires_grad_()
        for j, (h, w) in enumerate([(5, 4), (2, 3), (7, 9)])
    ]
    if act is not None:  # keep pre-activations away from the kinks 0 and 6
        with torch.no_grad():
            for x in xs:
                x.add_(0.5 * torch.sign(x))
    # fast_mode (a random projection of the Jacobian) keeps the Triton interpreter runs short
    assert torch.autograd.gradcheck(
        lambda *t: multires_fusion(list(t), (5, 4), mode, act, impl=impl),
        xs,
        eps=1e-6,
        atol=1e-7,
        fast_mode=impl == "triton",
    )


def _op_args(device, fmt):
    xs = [
        randn((2, 3, h, w), device=device, seed=j, memory_format=FORMATS[fmt])
        for j, (h, w) in enumerate([(6, 5), (3, 3), (12, 9)])
    ]
    return xs


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_opcheck(impl_device, fmt):
    impl, device = impl_device
    fwd, bwd = (ops.fwd, ops.bwd) if impl == "native" else (ops.fwd_triton, ops.bwd_triton)
    xs = _op_args(device, fmt)
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    for mode, act in [("bilinear", "relu"), ("nearest", "none")]:
        torch.library.opcheck(fwd, (xs, [6, 5], mode, act), test_utils=utils)
        out = fwd(xs, [6, 5], mode, act)
        g = randn(out.shape, device=device, seed=9, memory_format=FORMATS[fmt])
        torch.library.opcheck(bwd, (g, out, [6, 5, 3, 3, 12, 9], mode, act), test_utils=utils)


def test_compile_fullgraph_dynamic(impl_device):
    """The public function traces without graph breaks, forward and backward, and one dynamic
    compile serves two input shapes."""
    impl, device = impl_device
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def fuse(a, b, c):
        return multires_fusion([a, b, c], None, "bilinear", "relu", impl=impl)

    compiled = torch.compile(fuse, backend=counter, fullgraph=True, dynamic=True)
    # Sizes chosen with no accidental equalities, which duck sizing would turn into guards.
    for n, h in [(3, 8), (4, 12)]:
        xs = [
            randn((n, 5, h // s, h // s), device=device, seed=s).requires_grad_() for s in (1, 2, 4)
        ]
        out = compiled(*xs)
        grads = torch.autograd.grad(out.sum(), xs)
        ref = fuse(*xs)
        ref_grads = torch.autograd.grad(ref.sum(), xs)
        torch.testing.assert_close(out, ref)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r)
    assert counter.frame_count == 1


@pytest.mark.slow
def test_compile_inductor_native():
    if runnable("native", "cpu"):
        pytest.skip(runnable("native", "cpu"))
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b: multires_fusion([a, b], None, impl="native"), fullgraph=True)
    a, b = randn((2, 4, 8, 8)).requires_grad_(), randn((2, 4, 4, 4), seed=1).requires_grad_()
    out = fn(a, b)
    ref = multires_fusion([a, b], None, impl="reference")
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(
        torch.autograd.grad(out.sum(), [a, b]), torch.autograd.grad(ref.sum(), [a, b])
    )


def test_identity_input_is_used_as_is(impl_device):
    impl, device = impl_device
    x = randn((2, 3, 5, 4), device=device).requires_grad_()
    out = multires_fusion([x], None, "bilinear", None, impl=impl)
    assert out.data_ptr() != x.data_ptr()
    torch.testing.assert_close(out, x, atol=0, rtol=0)
    (g,) = torch.autograd.grad(out, [x], torch.ones_like(out))
    torch.testing.assert_close(g, torch.ones_like(x), atol=0, rtol=0)


def test_mixed_memory_formats_and_non_contiguous(impl_device):
    """Output follows inputs[0]'s format; other inputs may be in any layout, even strided views."""
    impl, device = impl_device
    a = randn((2, 6, 9, 7), device=device, memory_format=torch.channels_last).requires_grad_()
    big = randn((2, 6, 10, 16), device=device, seed=1).requires_grad_()
    b = big[:, :, ::2, ::3]  # non-contiguous view, 5 x 6
    c = (
        randn((2, 5, 6, 6), device=device, seed=2).requires_grad_().permute(0, 3, 2, 1)
    )  # [2, 6, 6, 5]
    xs = [a, b, c]
    out, grads = _fwd_bwd(xs, impl, None, "bilinear", "relu")
    assert out.is_contiguous(memory_format=torch.channels_last)
    ref, ref_grads = _fwd_bwd(upcast(xs), "reference", (9, 7), "bilinear", "relu")
    assert_close_to_reference(out, ref, torch.float32)
    for g, r in zip(grads, ref_grads):
        assert_close_to_reference(g, r, torch.float32)


@pytest.mark.parametrize("shape", [(0, 3), (2, 0)], ids=["empty-batch", "no-channels"])
def test_empty(impl_device, shape):
    impl, device = impl_device
    n, c = shape
    xs = [torch.zeros(n, c, h, w, device=device, requires_grad=True) for h, w in [(4, 4), (2, 2)]]
    out = multires_fusion(xs, None, impl=impl)
    assert out.shape == (n, c, 4, 4)
    grads = torch.autograd.grad(out, xs, torch.zeros_like(out))
    assert [tuple(g.shape) for g in grads] == [(n, c, 4, 4), (n, c, 2, 2)]


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_inference_call_matches_the_autograd_call(impl_device, fmt):
    """With nothing to differentiate the op runs without the autograd function: the same
    output as a call that records a graph, and no graph."""
    impl, device = impl_device
    xs = _inputs([(7, 5), (3, 4), (9, 11)], device=device, fmt=fmt)
    with_graph = multires_fusion(xs, (6, 8), impl=impl)
    assert with_graph.grad_fn is not None
    with torch.no_grad():
        no_grad = multires_fusion(xs, (6, 8), impl=impl)
    detached = multires_fusion([x.detach() for x in xs], (6, 8), impl=impl)
    for out in (no_grad, detached):
        assert out.grad_fn is None and not out.requires_grad
        assert torch.equal(out, with_graph.detach())


@pytest.mark.parametrize(
    "sizes",
    [[(6, 6), (3, 3)], [(6, 6), (3, 6), (6, 4)]],
    ids=["both-axes", "one-axis-kept"],  # an axis of equal sizes reads one pixel, as ATen
)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_nan_propagates_like_eager(impl_device, sizes, fmt):
    impl, device = impl_device
    xs = _inputs(sizes, device=device, fmt=fmt)
    with torch.no_grad():
        for x in xs[1:]:
            x[0, 1, 1, 2] = float("nan")
        xs[0][1, 2, 0, 0] = float("nan")
    out, grads = _fwd_bwd(xs, impl, None, "bilinear", "relu")
    ref, ref_grads = _fwd_bwd(upcast(xs), "reference", (6, 6), "bilinear", "relu")
    assert torch.equal(out.isnan().cpu(), ref.isnan())
    assert out.isnan().any()
    assert_close_to_reference(out, ref, torch.float32)
    for g, r in zip(grads, ref_grads):
        assert_close_to_reference(g, r, torch.float32)


@pytest.mark.parametrize("c", [3, 16, 67], ids=lambda c: f"C{c}")
def test_channels_last_backward_channel_counts(c):
    """The channels_last backward gathers a pixel's channels in blocks of four vectors, then
    single vectors, the last one overlapping its predecessor; C < 16 takes scalars."""
    if runnable("native", "cpu"):
        pytest.skip(runnable("native", "cpu"))
    xs = _inputs([(6, 7), (3, 4), (2, 2)], c=c, fmt=torch.channels_last)
    out, grads = _fwd_bwd(xs, "native", None, "bilinear", "relu")
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    ref, ref_grads = _fwd_bwd(upcast(xs), "reference", (6, 7), "bilinear", "relu")
    assert_close_to_reference(out, ref, torch.float32)
    for j, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_close_to_reference(g, r, torch.float32, what=f"grad of inputs[{j}]")


def test_backward_is_deterministic_and_thread_count_invariant():
    if runnable("native", "cpu"):
        pytest.skip(runnable("native", "cpu"))
    threads = torch.get_num_threads()
    results = []
    try:
        for fmt in FORMATS.values():
            for t in (1, 2, 1):
                torch.set_num_threads(t)
                xs = _inputs([(20, 18), (10, 9), (5, 4), (40, 36)], c=5, fmt=fmt)
                out, grads = _fwd_bwd(xs, "native", None, "bilinear", "relu6")
                results.append((fmt, out, grads))
    finally:
        torch.set_num_threads(threads)
    for fmt in FORMATS.values():
        same = [r for r in results if r[0] == fmt]
        for _, out, grads in same[1:]:
            assert torch.equal(out, same[0][1])
            assert all(torch.equal(g, h) for g, h in zip(grads, same[0][2]))


def test_module_matches_function(impl_device):
    impl, device = impl_device
    xs = _inputs([(8, 8), (4, 4)], device=device)
    m = MultiResolutionFusion(size=(8, 8), mode="nearest", activation="relu6", impl=impl)
    torch.testing.assert_close(
        m(xs),
        multires_fusion(xs, (8, 8), "nearest", "relu6", impl="reference"),
        atol=TOLERANCES[torch.float32][0],
        rtol=TOLERANCES[torch.float32][1],
    )
    assert "nearest" in repr(m) and list(m.parameters()) == []
    assert hrnas_kernels.nn.MultiResolutionFusion is MultiResolutionFusion


def test_size_int_and_default():
    xs = _inputs([(4, 6), (2, 3)])
    assert multires_fusion(xs, impl="reference").shape == (2, 3, 4, 6)
    assert multires_fusion(xs, 5, impl="reference").shape == (2, 3, 5, 5)


# ---------------------------------------------------------------------------------------------
# Bad input: ValueError / TypeError that names the problem, before any kernel runs.


def _x(*shape, **kw):
    return torch.zeros(*shape, **kw)


@pytest.mark.parametrize(
    "inputs,kwargs,exc,match",
    [
        ([], {}, ValueError, "1 to 8 inputs"),
        ([_x(1, 2, 3, 3)] * 9, {}, ValueError, "1 to 8 inputs"),
        (_x(1, 2, 3, 3), {}, TypeError, "list or tuple"),
        ("abc", {}, TypeError, "list or tuple"),
        ([_x(1, 2, 3, 3), 5], {}, TypeError, r"inputs\[1\] is a int"),
        ([_x(2, 3, 3)], {}, ValueError, r"4-d \[N, C, H, W\]"),
        ([_x(1, 2, 3, 3, dtype=torch.int64)], {}, TypeError, "floating dtype"),
        ([_x(1, 2, 3, 3), _x(1, 2, 3, 3, dtype=torch.float64)], {}, TypeError, "share one dtype"),
        ([_x(1, 2, 3, 3), _x(1, 2, 3, 3, device="meta")], {}, ValueError, "one device"),
        ([_x(1, 2, 3, 3), _x(2, 2, 3, 3)], {}, ValueError, "N and C must match"),
        ([_x(1, 2, 3, 3), _x(1, 4, 3, 3)], {}, ValueError, "N and C must match"),
        ([_x(1, 2, 3, 3), _x(1, 2, 0, 3)], {}, ValueError, "empty spatial size"),
        ([_x(1, 2, 3, 3)], {"size": (0, 4)}, ValueError, "size must be positive"),
        ([_x(1, 2, 3, 3)], {"size": -1}, ValueError, "size must be positive"),
        ([_x(1, 2, 3, 3)], {"size": (2, 2, 2)}, TypeError, "pair of ints"),
        ([_x(1, 2, 3, 3)], {"size": 2.5}, TypeError, "pair of ints"),
        ([_x(1, 2, 3, 3)], {"mode": "bicubic"}, ValueError, "mode must be one of"),
        ([_x(1, 2, 3, 3)], {"activation": "gelu"}, ValueError, "activation must be one of"),
        ([_x(1, 2, 3, 3)], {"impl": "cuda"}, ValueError, "impl must be one of"),
    ],
)
def test_bad_input(inputs, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        multires_fusion(inputs, **kwargs)


def test_explicit_impl_that_cannot_run_raises_with_reason():
    x = [_x(1, 2, 3, 3)]
    if runnable("triton", "cpu"):
        with pytest.raises(RuntimeError, match="impl='triton' cannot run"):
            multires_fusion(x, impl="triton")
    with pytest.raises(RuntimeError, match="impl='auto' found no fused implementation"):
        multires_fusion([_x(1, 2, 3, 3, device="meta")])


def test_native_op_checks_its_arguments():
    """Direct callers of the private op get TORCH_CHECK errors that name the op."""
    if runnable("native", "cpu"):
        pytest.skip(runnable("native", "cpu"))
    with pytest.raises(RuntimeError, match="multires_fusion: unknown mode"):
        ops.fwd([_x(1, 2, 3, 3)], [3, 3], "cubic", "none")
    with pytest.raises(RuntimeError, match="multires_fusion: size must be positive"):
        ops.fwd([_x(1, 2, 3, 3)], [0, 3], "bilinear", "none")
    with pytest.raises(RuntimeError, match="multires_fusion: inputs\\[1\\] has N, C"):
        ops.fwd([_x(1, 2, 3, 3), _x(1, 3, 3, 3)], [3, 3], "bilinear", "none")
    with pytest.raises(RuntimeError, match="multires_fusion: grad_out has shape"):
        ops.bwd(_x(1, 2, 3, 4), _x(1, 2, 3, 3), [3, 3], "bilinear", "none")
