"""Host check of token_transformer's CUDA kernels, without a GPU.

The CTA programs of csrc/token_transformer/token_transformer_device.h are the CUDA kernels' code
(the .cu only spreads each phase over the threads and puts __syncthreads between phases).
tests/ops/token_transformer_host_driver.cpp runs them on CPU tensors through the same host
sequence as the .cu (token_transformer_run.h: checks, allocation, tape and workspace layouts,
launch order), CTA by CTA, each phase's bodies held until the sync that closes it and then run
last-first (and also in order: the results must be bitwise equal). Here that driver stands in
for the native op pair behind the public function's autograd, in float64, and every result is
compared with the float64 reference: output, BN statistics (through the running averages),
and every gradient, to 1e-11 relative (an index slip moves results by far more: see
test_tolerance_catches_a_wrong_index)."""

import warnings
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension as cpp_extension

from hrnas_kernels._testing import randn
from hrnas_kernels.nn import DynamicTokenTransformer
from hrnas_kernels.token_transformer import api, reference

from .test_token_transformer import _functional_args, _randomize

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-11  # float64: the kernels and the reference differ only by summation order


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    """The driver, compiled once per session (about a minute on 2 cores)."""
    return cpp_extension.load(
        "hrnas_token_transformer_host_check",
        [str(ROOT / "tests" / "ops" / "token_transformer_host_driver.cpp")],
        extra_include_paths=[str(ROOT / "csrc")],
        extra_cflags=["-O1"],
        build_directory=str(tmp_path_factory.mktemp("token_transformer_host")),
    )


# (N, C, C_out, H, W, tokens, alive, grid, heads, downsample, decoder); alive: a count of alive
# tokens (spread over the token range) or None for all.
CASES = [
    (3, 3, None, 5, 3, 9, 7, 8, 1, False, True),  # H, W below the grid, residual
    (2, 5, 4, 19, 13, 64, None, 8, 2, False, True),  # 64 tokens, above the grid, no residual
    (2, 3, None, 11, 7, 4, 1, 4, 2, True, False),  # one token, downsample, no decoder
    (1, 5, None, 9, 10, 7, None, 2, 2, False, False),  # one sample, 2x2 grid, residual
    (2, 3, 5, 6, 6, 5, 0, 4, 1, False, True),  # no token alive
]


def _module(case, seed=0):
    _, c, c_out, _, _, tokens, _, grid, heads, down, dec = case
    m = DynamicTokenTransformer(c, c_out, tokens, grid, heads, down, use_decoder=dec)
    _randomize(m, seed)
    return m.double()


def _index(case):
    tokens, alive = case[5], case[6]
    if alive is None:
        return None
    return torch.linspace(0, tokens - 1, alive).round().long().unique()[:alive]


def _run(impl, case, training, x, gy):
    """Output, running statistics and every gradient of the functional op, through the native
    op's autograd (with whatever kernels its CPU key holds) or the reference."""
    m = _module(case)
    x = x.clone().requires_grad_()
    params = dict(m.named_parameters())
    args = [x, *_functional_args(m)]
    kw = dict(
        token_index=_index(case),
        num_heads=case[8],
        downsample=case[9],
        training=training,
        momentum=0.1,
        eps=1e-5,
        dropout=0.0,
    )
    if impl == "reference":
        y = reference.token_transformer(*args, **kw)
    else:
        y = api.fused_forward(*args, **kw, impl="native")
    y.backward(gy)
    out = {"y": y.detach(), "x": x.grad}
    out.update({n: p.grad for n, p in params.items()})
    out.update({n: b for n, b in m.named_buffers() if b.is_floating_point() and n != "coords"})
    return out


def _max_error(actual, expected):
    """The largest error over all results, each relative to its own scale (at least 1)."""
    worst = 0.0
    for name, e in expected.items():
        a = actual[name]
        if e is None:  # the reference does not use it (no token alive): zero or none
            assert a is None or not a.any(), name
            continue
        scale = max(float(e.abs().max()) if e.numel() else 0.0, 1.0)
        worst = max(worst, float((a - e).abs().max()) / scale if e.numel() else 0.0)
    return worst


@pytest.fixture
def host_native(driver):
    """The driver as the native op pair's CPU kernels, in its strict (deferred, last-first)
    order: the op's C++ autograd node runs it as it runs the CUDA kernels on a GPU. The
    override is undone when the library object goes."""

    # the dispatcher leaves out trailing arguments that equal their defaults
    def fwd(*args):
        return driver.fwd(*args, *(True, None)[len(args) - 19 :])  # save_tape, token_index

    def bwd(*args):
        return driver.bwd(*args, *(None,)[len(args) - 18 :])  # token_index

    lib = torch.library.Library("hrnas_kernels", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning that a registered kernel is overridden
        lib.impl("token_transformer_fwd", fwd, "CPU")
        lib.impl("token_transformer_bwd", bwd, "CPU")
    driver.set_order(True)
    yield
    lib._destroy()


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cuda_programs_match_reference(host_native, case, training):
    n, c, c_out, h, w = case[:5]
    out_c = c_out or c
    ho, wo = (h // 2, w // 2) if case[9] else (h, w)
    x = randn((n, c, h, w), dtype=torch.float64, seed=7)
    gy = randn((n, out_c, ho, wo), dtype=torch.float64, seed=8)
    expected = _run("reference", case, training, x, gy)
    actual = _run("native", case, training, x, gy)
    assert _max_error(actual, expected) < TOL


@pytest.mark.parametrize("case", [CASES[1], CASES[2]], ids=str)
def test_phases_are_independent_of_body_order(host_native, driver, case):
    """Bodies in order and deferred to the closing sync, last first, give bitwise equal results:
    no body reads what another body of its phase writes, and no sync is missing between
    dependent phases (the two ways the GPU's thread order could change a result)."""
    n, c, c_out, h, w = case[:5]
    ho, wo = (h // 2, w // 2) if case[9] else (h, w)
    x = randn((n, c, h, w), dtype=torch.float64, seed=7)
    gy = randn((n, c_out or c, ho, wo), dtype=torch.float64, seed=8)
    runs = []
    for deferred in (False, True):
        driver.set_order(deferred)
        runs.append(_run("native", case, True, x, gy))
    for name, value in runs[0].items():
        assert value is None or torch.equal(value, runs[1][name]), name


def test_tolerance_catches_a_wrong_index(driver):
    """The comparison can fail: a tape with two neighbouring attention probabilities swapped
    (what a kernel writing p[i, j] to p[i, j + 1] leaves) moves the gradients by many times TOL,
    while the true tape gives them within TOL."""
    case = CASES[1]
    m = _module(case)
    n, c, _, h, w = case[:5]
    x = randn((n, c, h, w), dtype=torch.float64, seed=7)
    a = [t.detach() if isinstance(t, torch.Tensor) else t for t in _functional_args(m)]
    enc, dec = [t.detach() for t in a[6]], [t.detach() for t in a[8]]
    coords, w_in, bn_in_w, bn_in_b, query, w_out, bn_out_w, bn_out_b = (
        a[0],
        a[1],
        a[2],
        a[3],
        a[7],
        a[9],
        a[10],
        a[11],
    )
    fwd_args = [x, coords, w_in, bn_in_w, bn_in_b, None, None, enc, query, dec, w_out, bn_out_w]
    fwd_args += [bn_out_b, None, None, case[8], [h, w], False, 1e-5, True, None]
    y, tape, _, var_in, _, var_out = driver.fwd(*fwd_args)
    gy = randn(y.shape, dtype=torch.float64, seed=8)

    def grads(tape):
        g = driver.bwd(
            gy,
            tape,
            coords,
            w_in,
            bn_in_w,
            bn_in_b,
            var_in,
            enc,
            query,
            dec,
            w_out,
            bn_out_w,
            var_out,
            case[8],
            [h, w],
            False,
            True,
            1e-5,
            None,
        )
        return torch.cat([t.flatten() for t in (g[0], g[1], *g[4], g[5], *g[6], g[7])])

    # the encoder's probabilities follow f, uhat and Q, K, V, O, t1hat, h, t2hat of layer 0
    tokens, d = 64, 64
    p_at = n * (c * d + tokens * d + 7 * tokens * d)
    wrong = tape.clone()
    wrong[p_at], wrong[p_at + 1] = tape[p_at + 1], tape[p_at]
    good, bad = grads(tape), grads(wrong)
    reference_grads = grads(tape.clone())
    scale = max(float(good.abs().max()), 1.0)
    assert float((good - reference_grads).abs().max()) == 0.0  # deterministic
    assert float((bad - good).abs().max()) / scale > 1e3 * TOL
