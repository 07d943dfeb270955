"""token_transformer's Triton kernels on CPU under TRITON_INTERPRET=1 (marked ``triton``: a chosen
subset of the op suite, the interpreter being ~1 s per call) and the CUDA-only checks (marked
``gpu``) of the Triton and the native CUDA kernels: float16/bfloat16 against the float64
reference, the forward launch count, and (native) bitwise repeatable gradients. On a GPU the
whole op suite (tests/ops/test_token_transformer.py) also runs the triton-cuda and native-cuda
pairs (float32 parity, float64 gradcheck, opcheck, torch.compile); the native CUDA kernels' code
is checked without a GPU by test_token_transformer_cuda_host.py."""

import pytest
import torch

from hrnas_kernels._testing import assert_close_to_reference, randn, runnable
from hrnas_kernels.token_transformer import ops

from .test_token_transformer import (
    CASES,
    OPCHECK_CASES,
    _functional_args,
    _grads,
    _mask,
    _module,
    check_op_on_an_empty_batch,
    check_op_rejects_a_bad_token_index,
)
from .test_token_transformer import test_matches_reference as _matches_reference
from .test_token_transformer import test_op_gathers_alive_tokens as _op_gathers_alive_tokens
from .test_token_transformer import test_opcheck as _opcheck

TRITON_CPU = pytest.param(("triton", "cpu"), id="triton-cpu", marks=pytest.mark.triton)
TRITON_CUDA = pytest.param(
    ("triton", "cuda"), id="triton-cuda", marks=[pytest.mark.gpu, pytest.mark.triton]
)


@pytest.fixture(params=[TRITON_CPU, TRITON_CUDA])
def triton_device(request):
    impl, device = request.param
    why = runnable(impl, device)
    if why:
        pytest.skip(why)
    return impl, device


# (case, mask, training): every CASES entry once, every mask kind, both modes.
PARITY = [
    (CASES[0], "random", True),
    (CASES[1], "all", False),  # 64 tokens, H and W below the grid, eval
    (CASES[2], "single", True),  # 2 heads, C_out != C
    (CASES[3], "all", True),  # downsample, one token
    (CASES[4], "random", False),  # no decoder, 4x4 grid
    (CASES[4], "none", True),  # no token alive
]


@pytest.mark.parametrize("case,mask,training", PARITY, ids=str)
def test_matches_reference(triton_device, case, mask, training):
    """float32 output, every gradient, running statistics and exact zero gradients of dead
    tokens against the float64 reference (the op suite's check, on a subset)."""
    _matches_reference(triton_device, case, mask, training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_float64(triton_device, training):
    """Fast-mode gradcheck (random directional derivatives) of the module's output in x and in
    all parameters at once (one flat leaf: the interpreter pays ~1 s per evaluation), 2 heads,
    a 2x2 grid, 3 tokens with one dead."""
    impl, device = triton_device
    case = (2, 2, 3, 3, 4, 3, 2, 2, False, True)
    m = _module(case, impl, device=device, seed=1)
    m.set_token_mask(torch.tensor([True, False, True]))
    m.train(training)
    names, params = zip(*m.named_parameters())
    x = randn((2, 2, 3, 4), dtype=torch.float64, device=device, seed=2).requires_grad_()
    flat = torch.cat([p.detach().flatten() for p in params]).requires_grad_()

    def f(x, flat):
        values = flat.split([p.numel() for p in params])
        state = {n: v.view_as(p) for n, v, p in zip(names, values, params)}
        return torch.func.functional_call(m, state, (x,))

    # rtol far below the default 1e-3: some paths contribute ~1e-4 of a gradient at this size
    assert torch.autograd.gradcheck(f, (x, flat), eps=1e-6, atol=1e-7, rtol=1e-6, fast_mode=True)


@pytest.mark.parametrize("use_batch_stats,decoder,masked", OPCHECK_CASES)
def test_opcheck(triton_device, use_batch_stats, decoder, masked):
    _opcheck(triton_device, use_batch_stats, decoder, masked)


@pytest.mark.parametrize("use_batch_stats", [True, False], ids=["batch_stats", "running_stats"])
def test_op_gathers_alive_tokens(triton_device, use_batch_stats):
    """The Triton forward reads the alive tokens through the index and the backward gathers them
    and scatters their gradients: as the native op pair, bitwise what the pair gives on
    pre-gathered parameters (the op suite's check)."""
    _op_gathers_alive_tokens(triton_device, use_batch_stats)


@pytest.mark.triton
@pytest.mark.parametrize("check", [check_op_rejects_a_bad_token_index, check_op_on_an_empty_batch])
def test_op_edge_cases_on_cpu(check):
    """The native op suite's bad-index and empty-batch checks, on the Triton forward."""
    why = runnable("triton", "cpu")
    if why:
        pytest.skip(why)
    check(ops.fwd_triton)


def test_tape_layout_matches_tape_size():
    """The Triton tape has exactly the size the fake kernels announce (ops.tape_size)."""
    pytest.importorskip("triton")
    from hrnas_kernels.token_transformer.triton import _tape_layout

    for args in [(3, 5, 7, 64, 2, 2, 4), (1, 1, 0, 4, 1, 1, 2), (2, 18, 64, 64, 1, 2, 18)]:
        n = args[0]
        assert _tape_layout(*args)["total"] == n * ops.tape_size(*args[1:])


# -- CUDA only -------------------------------------------------------------------------------------


# the CUDA kernels of each family (the Triton one needs triton)
CUDA_IMPLS = [pytest.param("triton", marks=pytest.mark.triton), "native"]


def _cuda_impl(impl):
    why = runnable(impl, "cuda")
    if why:
        pytest.skip(why)
    return impl


@pytest.mark.gpu
@pytest.mark.parametrize("impl", CUDA_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_low_precision_matches_reference(impl, dtype, training):
    """float16/bfloat16: output and input gradient within twice eager PyTorch's own error in
    the same dtype (both against the float64 reference)."""
    _cuda_impl(impl)
    case = CASES[2]
    n, c, _, h, w, tokens = case[:6]
    alive = _mask(tokens, "random")
    mods = {
        "ref": _module(case, "reference"),
        "eager": _module(case, "reference", dtype, "cuda"),
        "fused": _module(case, impl, dtype, "cuda"),
    }
    x64 = randn((n, c, h, w), dtype=torch.float64, seed=7)
    gy = randn((n, case[2], h, w), dtype=torch.float64, seed=8)
    results = {}
    for name, m in mods.items():
        m.set_token_mask(alive)
        m.train(training)
        x = x64.to(m.coords.device, m.coords.dtype).requires_grad_()
        y = m(x)
        results[name] = (y, _grads(m, x, y, gy.to(y.device, y.dtype))["x"])
    for i, what in enumerate(("output", "grad x")):
        assert_close_to_reference(
            results["fused"][i], results["ref"][i], dtype, results["eager"][i], what=what
        )


@pytest.mark.gpu
@pytest.mark.parametrize(
    "impl,masked",
    [
        pytest.param("triton", False, marks=pytest.mark.triton),
        pytest.param("triton", True, marks=pytest.mark.triton),
        ("native", False),
        ("native", True),
    ],
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_launches(impl, masked, training):
    """The forward op of the whole block (N=8, C=36, 28x28, 64 tokens) is at most 4 kernels, also
    with half the tokens alive (both families' programs read them through the index)."""
    _cuda_impl(impl)
    fwd = ops.fwd_triton if impl == "triton" else ops.fwd
    case = (8, 36, None, 28, 28, 64, 8, 1, False, True)
    m = _module(case, impl, torch.float32, "cuda")
    a = [t.detach() if isinstance(t, torch.Tensor) else t for t in _functional_args(m)]
    if training:
        a[4] = a[5] = a[12] = a[13] = None
    x = randn((8, 36, 28, 28), device="cuda", seed=1)
    args = [x, *a[:6], [t.detach() for t in a[6]], a[7], [t.detach() for t in a[8]], *a[9:]]
    index = torch.arange(0, 64, 2, device="cuda") if masked else None
    args += [1, [28, 28], True, 1e-5, True, index]
    fwd(*args)  # compile first
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fwd(*args)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = [e for e in kernels if "memcpy" not in e.name.lower()]
    assert 1 <= len(kernels) <= 4, [e.name for e in kernels]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_native_cuda_is_repeatable(dtype):
    """Two runs of the native CUDA forward and backward give bitwise equal results: every sum
    over samples is a per-sample partial reduced in sample order, without atomics."""
    _cuda_impl("native")
    case = (5, 4, None, 13, 11, 64, 8, 2, False, True)
    m = _module(case, "native", dtype, "cuda")
    x = randn((5, 4, 13, 11), dtype=dtype, device="cuda", seed=3)
    gy = randn((5, 4, 13, 11), dtype=dtype, device="cuda", seed=4)
    runs = []
    for _ in range(2):
        m.zero_grad()
        xi = x.clone().requires_grad_()
        y = m(xi)
        runs.append([y.detach(), *_grads(m, xi, y, gy).values()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_kernels_compile_for_sm90():
    """The three kernels lower through Triton's NVIDIA backend and ptxas for an H100 (sm_90) at
    the largest tile (64 tokens, an 8x8 grid), masked and not, training and eval, without a GPU:
    the interpreter does not check what only compilation rejects (it accepted a non-constexpr
    global this way)."""
    pytest.importorskip("triton")
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hrnas_kernels.token_transformer import triton as kernels

    def arg_type(name):
        if name.endswith("_at") or name.startswith("off_"):
            return "i64"  # tape offsets
        if name in ("scale", "eps"):
            return "fp32"
        if name == "index_ptr":
            return "*i64"
        if name.endswith("_ptr") or name[:2] in ("e_", "d_"):
            return "*fp32"
        return "i32"

    common = {"BL": 64, "BD": 64, "BC": 16, "ACC": tl.float32}
    detokenize = {"RESIDUAL": True, "BCO": 4, "BD": 64, "BLOCK": 256, "ACC": tl.float32}
    for fn, consts, warps in [
        (kernels._tokenize_kernel, {**common, "INDEXED": True}, 4),
        (
            kernels._layers_kernel,
            {**common, "USE_BATCH": True, "DECODER": True, "INDEXED": False},
            8,
        ),
        (
            kernels._layers_kernel,
            {**common, "USE_BATCH": False, "DECODER": True, "INDEXED": True},
            8,
        ),
        (kernels._detokenize_kernel, {**detokenize, "USE_BATCH": True}, 4),
        (kernels._detokenize_kernel, {**detokenize, "USE_BATCH": False}, 4),
    ]:
        names = fn.arg_names
        signature = {a: "constexpr" if a in consts else arg_type(a) for a in names}
        source = ASTSource(
            fn=fn,
            signature=signature,
            constexprs={(names.index(k),): v for k, v in consts.items()},
        )
        compiled = triton.compile(
            source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}
        )
        assert compiled.asm["cubin"], fn.__name__
