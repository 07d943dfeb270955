"""token_transformer / DynamicTokenTransformer: the reference against an independent build of the
authors' Transformer from torch.nn layers (state_dict keys, outputs, token masks as "a transformer
with only the alive tokens"), every fused implementation against the float64 reference (forward,
every gradient, running statistics) over channel counts, sizes smaller than the grid, token counts,
masks, downsampling, decoder on/off, train/eval; exact zero gradients for dead tokens; gradcheck,
opcheck, torch.compile; dropout; bad input."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hrnas_kernels import token_transformer
from hrnas_kernels._testing import assert_close_to_reference, randn, runnable
from hrnas_kernels.nn import DynamicTokenTransformer
from hrnas_kernels.token_transformer import api, grid_coordinates, ops

# the CPU impls that exist in this build
CPU_IMPLS = ["reference"] + [
    name for name in ("native",) if (name, "cpu") in api.SUPPORTED and not runnable(name, "cpu")
]


@pytest.fixture
def impl_device(impl_device):
    """The shared (impl, device) pairs, less those this op has no kernel for yet."""
    if impl_device not in api.SUPPORTED:
        pytest.skip(f"token_transformer has no {impl_device[0]} kernel for {impl_device[1]} yet")
    if impl_device == ("triton", "cpu"):
        pytest.skip(
            "the Triton interpreter takes ~1 s per call: test_token_transformer_gpu.py runs "
            "a subset of this suite on the Triton kernels on CPU"
        )
    return impl_device


# -- an independent model of the authors' Transformer, from torch.nn layers ---------------------


class _AuthorsLayer(nn.Module):
    def __init__(self, d, heads, name):
        super().__init__()
        self.name = name
        setattr(self, name, nn.MultiheadAttention(d, heads, dropout=0.0, bias=False))
        self.linear1 = nn.Linear(d, d, bias=False)
        self.linear2 = nn.Linear(d, d, bias=False)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)

    def forward(self, query, memory):
        a = getattr(self, self.name)(query, memory, memory, need_weights=False)[0]
        t = self.norm1(memory + a)
        return self.norm2(t + self.linear2(torch.relu(self.linear1(t))))


class _AuthorsTransformer(nn.Module):
    """HRNAS_SPEC.md section 2 with nn.MultiheadAttention and nn.Conv2d, dropout 0."""

    def __init__(self, n, c, c_out=None, grid=8, heads=1, downsampling=False, decoder=True):
        super().__init__()
        c_out = c if c_out is None else c_out
        d = grid * grid
        self.grid, self.downsampling, self.c, self.c_out = grid, downsampling, c, c_out
        self.input_proj = nn.Conv2d(c + 2, n, 1, bias=False)
        self.input_norm = nn.BatchNorm2d(n)
        self.encoder = _AuthorsLayer(d, heads, "self_attn")
        self.use_decoder = decoder
        if decoder:
            self.query_embed = nn.Embedding(n, d)
            self.decoder = _AuthorsLayer(d, heads, "multihead_attn")
        self.reverse_proj = nn.Conv2d(n, c_out, 1, bias=False)
        self.reverse_norm = nn.BatchNorm2d(c_out)

    def forward(self, x):
        b, _, h, w = x.shape
        g = self.grid
        f = F.interpolate(x, (g, g), mode="bilinear", align_corners=False)
        # the authors' get_points_single, in torch: x then y, population std
        ys, xs = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
        p = torch.stack([xs, ys]).to(x.dtype)
        p = (p - p.mean((1, 2), keepdim=True)) / p.std((1, 2), keepdim=True, correction=0)
        f = torch.cat([f, p.unsqueeze(0).repeat(b, 1, 1, 1)], 1)
        f = self.input_norm(self.input_proj(f)).flatten(2).permute(1, 0, 2)
        m = self.encoder(f, f)
        if self.use_decoder:
            m = self.decoder(self.query_embed.weight.unsqueeze(1).repeat(1, b, 1), m)
        f = m.reshape(-1, b, g, g).permute(1, 0, 2, 3)
        f = self.reverse_norm(self.reverse_proj(f))
        size = (h // 2, w // 2) if self.downsampling else (h, w)
        f = F.interpolate(f, size, mode="bilinear", align_corners=False)
        return f if self.downsampling or self.c != self.c_out else f + x


def _randomize(module, seed=0):
    """Non-trivial values for every parameter and running statistic."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            r = torch.rand(t.shape, generator=g, dtype=torch.float64).to(t.dtype)
            if name.endswith("running_var"):
                t.copy_(0.5 + r)
            elif name.endswith(("norm.weight", "norm1.weight", "norm2.weight")):
                t.copy_(0.5 + r)
            else:
                t.copy_((r - 0.5) * 0.6)


def _alive_copy(authors, alive):
    """The authors' Transformer built with only the tokens in ``alive`` (their weights sliced)."""
    c, c_out, grid = authors.c, authors.c_out, authors.grid
    small = _AuthorsTransformer(
        len(alive),
        c,
        c_out,
        grid,
        authors.encoder.self_attn.num_heads,
        authors.downsampling,
        authors.use_decoder,
    ).double()
    sd = {}
    for k, v in authors.state_dict().items():
        if k.startswith(("input_proj", "query_embed")) or (
            k.startswith("input_norm") and v.dim() == 1
        ):
            v = v[alive]
        elif k.startswith("reverse_proj"):
            v = v[:, alive]
        sd[k] = v
    small.load_state_dict(sd)
    return small


# -- the reference and the module against the authors' layout ------------------------------------


def test_default_dtype_module_runs():
    """Built without a dtype, every parameter and buffer (coordinates included) is float32."""
    m = DynamicTokenTransformer(3, num_tokens=4, grid=4, impl=CPU_IMPLS[-1])
    assert m.coords.dtype == torch.float32
    assert m(torch.zeros(2, 3, 5, 5)).dtype == torch.float32


def test_grid_coordinates_match_authors():
    """get_points_single((3, 3)) standardises 0, 1, 2 to -1.2247, 0, 1.2247, x (columns) first."""
    p = grid_coordinates(3, dtype=torch.float64)
    s = 1.5**0.5
    assert torch.allclose(p[0], torch.tensor([[-s, 0, s]] * 3, dtype=torch.float64))
    assert torch.allclose(p[1], p[0].t())


@pytest.mark.parametrize("decoder", [True, False])
def test_state_dict_matches_authors(decoder):
    ours = DynamicTokenTransformer(6, 10, num_tokens=7, grid=4, use_decoder=decoder)
    theirs = _AuthorsTransformer(7, 6, 10, grid=4, decoder=decoder)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    assert {k: tuple(v.shape) for k, v in a.items()} == {k: tuple(v.shape) for k, v in b.items()}
    ours.load_state_dict(theirs.state_dict())  # strict


AUTHORS_CASES = [
    # (N, C, C_out, H, W, tokens, grid, heads, downsample, decoder)
    (2, 5, None, 9, 11, 7, 4, 1, False, True),
    (3, 4, 6, 3, 5, 5, 4, 2, False, True),  # smaller than the grid, channels change
    (2, 3, None, 10, 7, 6, 3, 1, True, False),  # grid 3, downsample, no decoder
]


@pytest.mark.parametrize("case", AUTHORS_CASES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_reference_matches_authors(case, training):
    n, c, c_out, h, w, tokens, grid, heads, down, dec = case
    theirs = _AuthorsTransformer(tokens, c, c_out, grid, heads, down, dec).double()
    _randomize(theirs)
    ours = DynamicTokenTransformer(
        c, c_out, tokens, grid, heads, down, use_decoder=dec, impl="reference"
    ).double()
    ours.load_state_dict(theirs.state_dict())
    ours.train(training)
    theirs.train(training)
    x = randn((n, c, h, w), dtype=torch.float64, seed=1)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict())


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_reference_mask_is_the_alive_transformer(training):
    """A masked module equals the authors' Transformer built with only the alive tokens, in the
    output, the gradients of the alive parameters and the running statistics."""
    theirs = _AuthorsTransformer(9, 5, 5, grid=4).double()
    _randomize(theirs)
    alive = [0, 3, 4, 8]
    small = _alive_copy(theirs, alive)
    ours = DynamicTokenTransformer(5, num_tokens=9, grid=4, impl="reference").double()
    ours.load_state_dict(theirs.state_dict())
    ours.set_token_mask([i in alive for i in range(9)])
    ours.train(training)
    small.train(training)
    x = randn((3, 5, 6, 7), dtype=torch.float64, seed=2)
    y, y_small = ours(x), small(x)
    torch.testing.assert_close(y, y_small)
    g = randn(y.shape, dtype=torch.float64, seed=3)
    y.backward(g)
    y_small.backward(g)
    idx = torch.tensor(alive)
    torch.testing.assert_close(ours.input_proj.weight.grad[idx], small.input_proj.weight.grad)
    torch.testing.assert_close(ours.query_embed.weight.grad[idx], small.query_embed.weight.grad)
    torch.testing.assert_close(
        ours.reverse_proj.weight.grad[:, idx], small.reverse_proj.weight.grad
    )
    torch.testing.assert_close(ours.encoder.linear1.weight.grad, small.encoder.linear1.weight.grad)
    torch.testing.assert_close(ours.input_norm.running_mean[idx], small.input_norm.running_mean)
    dead = torch.tensor([i for i in range(9) if i not in alive])
    assert not ours.input_proj.weight.grad[dead].any()
    assert not ours.input_norm.weight.grad[dead].any()
    assert not ours.query_embed.weight.grad[dead].any()
    assert not ours.reverse_proj.weight.grad[:, dead].any()
    assert torch.equal(ours.input_norm.running_mean[dead], theirs.input_norm.running_mean[dead])


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("residual", [True, False])
def test_no_token_alive_is_a_zero_token_transformer(impl, residual):
    """With every token dead: resize(reverse_norm(0)) (+ x); in training that is the bias."""
    m = DynamicTokenTransformer(4, 4 if residual else 3, num_tokens=5, grid=4, impl=impl).double()
    _randomize(m)
    m.set_token_mask(torch.zeros(5, dtype=torch.bool))
    x = randn((2, 4, 5, 6), dtype=torch.float64, seed=4).requires_grad_()
    y = m(x)
    expected = m.reverse_norm.bias.detach().view(1, -1, 1, 1).expand_as(y)
    torch.testing.assert_close(y - x if residual else y, expected, rtol=0, atol=1e-12)
    y.sum().backward()
    for name in ("input_proj", "input_norm", "query_embed"):
        for p in getattr(m, name).parameters():
            assert p.grad is None or not p.grad.any(), name
    assert p.grad is None or not m.reverse_proj.weight.grad.any()
    m.eval()
    torch.testing.assert_close(
        m(x) - x if residual else m(x),
        F.batch_norm(
            torch.zeros(1, y.shape[1], 1, 1, dtype=torch.float64),
            m.reverse_norm.running_mean,
            m.reverse_norm.running_var,
            m.reverse_norm.weight,
            m.reverse_norm.bias,
            False,
            0.0,
            m.eps,
        )
        .expand_as(y)
        .detach(),
    )


def test_dropout_in_training():
    """Dropout > 0 draws a mask in training (auto runs the reference), none in eval; an explicit
    fused impl refuses it clearly."""
    m = DynamicTokenTransformer(3, num_tokens=6, grid=4, dropout=0.5).double()
    x = randn((2, 3, 8, 8), dtype=torch.float64, seed=5)
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(2)
    b = m(x)
    assert not torch.allclose(a, b)
    a.sum().backward()
    assert m.encoder.linear1.weight.grad.abs().sum() > 0
    m.eval()
    m.impl = CPU_IMPLS[-1]
    torch.testing.assert_close(m(x), m(x))
    m.train()
    m.impl = "native"
    with pytest.raises(RuntimeError, match="impl='native' cannot run this call"):
        m(x)


# -- every fused implementation against the float64 reference ------------------------------------

# (N, C, C_out, H, W, tokens, grid, heads, downsample, decoder): sizes above and below the 8x8
# grid (H or W < grid: the resize upsamples), token counts 1/7/64, channel changes, 2 heads,
# downsampling with odd sizes, no decoder, a 4x4 grid.
CASES = [
    (2, 6, None, 9, 11, 7, 8, 1, False, True),
    (3, 4, None, 5, 3, 64, 8, 1, False, True),
    (2, 5, 8, 16, 12, 7, 8, 2, False, True),
    (2, 3, None, 11, 7, 1, 8, 1, True, True),
    (2, 4, 3, 6, 6, 7, 4, 1, False, False),
]
MASKS = ["all", "random", "single", "none"]
# every case once, each with a mask of its own
CASE_MASKS = [(case, MASKS[i % len(MASKS)]) for i, case in enumerate(CASES)]


def _mask(tokens, kind):
    if kind == "all":
        return torch.ones(tokens, dtype=torch.bool)
    if kind == "none":
        return torch.zeros(tokens, dtype=torch.bool)
    if kind == "single":
        return torch.arange(tokens) == tokens // 2
    return torch.rand(tokens, generator=torch.Generator().manual_seed(tokens)) < 0.5


def _module(case, impl, dtype=torch.float64, device="cpu", seed=0):
    _, c, c_out, _, _, tokens, grid, heads, down, dec = case
    m = DynamicTokenTransformer(c, c_out, tokens, grid, heads, down, use_decoder=dec, impl=impl)
    _randomize(m, seed)
    return m.to(device=device, dtype=dtype)


def _grads(m, x, y, gy):
    y.backward(gy)
    return {"x": x.grad, **{n: p.grad for n, p in m.named_parameters()}}


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_reference(impl_device, case, mask, training):
    impl, device = impl_device
    dtype = torch.float32
    n, c, _, h, w, tokens = case[:6]
    alive = _mask(tokens, mask)
    ref = _module(case, "reference")
    m = _module(case, impl, dtype, device)
    for mod in (ref, m):
        mod.set_token_mask(alive)
        mod.train(training)
    x64 = randn((n, c, h, w), dtype=torch.float64, seed=7).requires_grad_()
    x = x64.detach().to(device, dtype).requires_grad_()
    y64, y = ref(x64), m(x)
    assert_close_to_reference(y, y64, dtype)
    gy = randn(y.shape, dtype=torch.float64, seed=8)
    g64 = _grads(ref, x64, y64, gy)
    g = _grads(m, x, y, gy.to(device, dtype))
    for name, expected in g64.items():
        actual = g[name]
        if expected is None:  # unused by the reference (no token alive): zero, or none at all
            assert actual is None or not actual.any(), name
            continue
        # gradients sum over many terms: relative to their scale
        scale = max(float(expected.abs().max()), 1.0)
        torch.testing.assert_close(
            actual.double().cpu(), expected, atol=2e-5 * scale, rtol=1e-4, msg=name
        )
    for name, buf in ref.named_buffers():
        if buf.is_floating_point() and name != "coords":
            assert_close_to_reference(dict(m.named_buffers())[name], buf, dtype, what=name)
    dead = ~alive
    for name, index_dim in [
        ("input_proj.weight", 0),
        ("input_norm.weight", 0),
        ("input_norm.bias", 0),
        ("reverse_proj.weight", 1),
    ] + ([("query_embed.weight", 0)] if case[-1] else []):
        gd = g[name].cpu().index_select(index_dim, torch.nonzero(dead).flatten())
        assert not gd.any(), f"{name}: dead tokens got a gradient"
    before = _module(case, impl).input_norm
    assert torch.equal(m.input_norm.running_mean[dead].double(), before.running_mean[dead])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_native_shrink_over_twice_the_grid_float64(training):
    """H and W over twice the grid: the shrink to the grid reads only the source rows and columns
    its taps name and its backward scatters onto them alone (every other input value gets only
    the residual's gradient). float64 in both, so the comparison is tight; at float32 the
    reverse_proj gradient of a training BN cancels to below test_matches_reference's floor."""
    if runnable("native", "cpu"):
        pytest.skip(runnable("native", "cpu"))
    case = (2, 3, None, 29, 23, 5, 8, 1, False, True)
    alive = _mask(5, "random")
    ref, m = _module(case, "reference"), _module(case, "native")
    for mod in (ref, m):
        mod.set_token_mask(alive)
        mod.train(training)
    x64 = randn((2, 3, 29, 23), dtype=torch.float64, seed=7)
    xr, xn = x64.clone().requires_grad_(), x64.clone().requires_grad_()
    yr, yn = ref(xr), m(xn)
    torch.testing.assert_close(yn, yr, atol=1e-10, rtol=1e-9)
    gy = randn(yr.shape, dtype=torch.float64, seed=8)
    gr, gn = _grads(ref, xr, yr, gy), _grads(m, xn, yn, gy)
    for name, expected in gr.items():
        if expected is None:
            continue
        torch.testing.assert_close(gn[name], expected, atol=1e-10, rtol=1e-9, msg=name)


def _functional_args(m):
    """The positional arguments of token_transformer for module ``m`` (x excluded)."""
    dec = m.decoder.weights() if m.use_decoder else None
    return [
        m.coords,
        m.input_proj.weight.flatten(1),
        m.input_norm.weight,
        m.input_norm.bias,
        m.input_norm.running_mean,
        m.input_norm.running_var,
        m.encoder.weights(),
        m.query_embed.weight if m.use_decoder else None,
        dec,
        m.reverse_proj.weight.flatten(1),
        m.reverse_norm.weight,
        m.reverse_norm.bias,
        m.reverse_norm.running_mean,
        m.reverse_norm.running_var,
    ]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("heads,decoder", [(1, True), (2, False)])
def test_gradcheck_float64(impl_device, training, heads, decoder):
    """Every input of the public function, tiny sizes (2x2 grid, 3 tokens, one dead)."""
    impl, device = impl_device
    case = (2, 2, 3, 3, 4, 3, 2, heads, False, decoder)
    m = _module(case, impl, device=device, seed=1)
    args = _functional_args(m)
    x = randn((2, 2, 3, 4), dtype=torch.float64, device=device, seed=2).requires_grad_()
    index = torch.tensor([0, 2], device=device)
    leaves = [x] + [p.detach().clone().requires_grad_() for p in m.parameters()]
    names = [n for n, _ in m.named_parameters()]
    running = [t.clone() for t in (args[4], args[5], args[12], args[13])]

    def f(x, *params):
        p = dict(zip(names, params))
        enc = [p[f"encoder.{k}"] for k in _LAYER_KEYS["self_attn"]]
        dec = [p[f"decoder.{k}"] for k in _LAYER_KEYS["multihead_attn"]] if decoder else None
        return token_transformer(
            x,
            m.coords,
            p["input_proj.weight"].flatten(1),
            p["input_norm.weight"],
            p["input_norm.bias"],
            *(running[:2] if not training else (None, None)),
            enc,
            p["query_embed.weight"] if decoder else None,
            dec,
            p["reverse_proj.weight"].flatten(1),
            p["reverse_norm.weight"],
            p["reverse_norm.bias"],
            *(running[2:] if not training else (None, None)),
            token_index=index,
            num_heads=heads,
            training=training,
            impl=impl,
        )

    # one thread: hundreds of tiny calls, each paying its parallel regions' barriers otherwise
    # (the thread count does not change results, see test_thread_count_invariant)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6)
    finally:
        torch.set_num_threads(threads)


_LAYER_KEYS = {
    name: [
        f"{name}.in_proj_weight",
        f"{name}.out_proj.weight",
        "linear1.weight",
        "linear2.weight",
        "norm1.weight",
        "norm1.bias",
        "norm2.weight",
        "norm2.bias",
    ]
    for name in ("self_attn", "multihead_attn")
}


def _op_args(device, use_batch_stats, decoder, tokens=5):
    """Compact-token op arguments for a module with 2 heads, 4x4 grid, 3 -> 3 channels."""
    case = (2, 3, None, 6, 5, tokens, 4, 2, False, decoder)
    m = _module(case, "native", torch.float32, device, seed=3)
    a = (
        [t.detach() for t in _functional_args(m)[:6]]
        + [
            [t.detach() for t in m.encoder.weights()],
            m.query_embed.weight.detach() if decoder else None,
            [t.detach() for t in m.decoder.weights()] if decoder else [],
        ]
        + [t.detach() for t in _functional_args(m)[9:]]
    )
    if use_batch_stats:
        a[4] = a[5] = a[12] = a[13] = None
    x = randn((2, 3, 6, 5), device=device, seed=4)
    return [x] + a + [2, [6, 5], True, 1e-5]


# (use_batch_stats, decoder, masked): masked passes token_index [0, 2, 3] of the 5 tokens
OPCHECK_CASES = [
    (True, True, False),
    (False, False, False),
    (True, True, True),
    (False, True, True),
]


@pytest.mark.parametrize("use_batch_stats,decoder,masked", OPCHECK_CASES)
def test_opcheck(impl_device, use_batch_stats, decoder, masked):
    impl, device = impl_device
    fwd, bwd = (ops.fwd, ops.bwd) if impl == "native" else (ops.fwd_triton, ops.bwd_triton)
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    args = _op_args(device, use_batch_stats, decoder)
    index = torch.tensor([0, 2, 3], device=device) if masked else None
    fwd_args = [*args, True, index]
    torch.library.opcheck(fwd, fwd_args, test_utils=utils)
    y, tape, mean_in, var_in, mean_out, var_out = fwd(*fwd_args)
    gy = randn(y.shape, device=device, seed=9)
    bwd_args = [gy, tape, *args[1:5], var_in, *args[7:12], var_out]
    bwd_args += [2, [6, 5], True, use_batch_stats, 1e-5, index]
    torch.library.opcheck(bwd, bwd_args, test_utils=utils)


@pytest.mark.parametrize("use_batch_stats,decoder,masked", OPCHECK_CASES)
def test_opcheck_native_autograd(use_batch_stats, decoder, masked):
    """The native forward op is its own autograd node (C++): opcheck with inputs that need
    gradients checks that registration, and through AOT the gradients of its backward."""
    args = _op_args("cpu", use_batch_stats, decoder)
    for i in (0, 2, 3, 4, 8, 10, 11, 12):
        if args[i] is not None:
            args[i].requires_grad_()
    for layer in (args[7], args[9]):
        for t in layer:
            t.requires_grad_()
    index = torch.tensor([0, 2, 3]) if masked else None
    torch.library.opcheck(ops.fwd, [*args, True, index])


def test_native_backward_refuses_higher_order_gradients():
    """The backward op has no derivative: create_graph=True raises instead of giving gradients
    without their second-order terms (impl='reference' differentiates twice)."""
    x = randn((2, 6, 9, 11), dtype=torch.float64, seed=1).requires_grad_()
    m = _module(CASES[0], "native")
    with pytest.raises(RuntimeError, match="higher-order gradients"):
        torch.autograd.grad(m(x).square().sum(), x, create_graph=True)
    m.impl = "reference"
    (g,) = torch.autograd.grad(m(x).square().sum(), x, create_graph=True)
    assert g.requires_grad


@pytest.mark.parametrize("use_batch_stats", [True, False], ids=["batch_stats", "running_stats"])
def test_op_gathers_alive_tokens(impl_device, use_batch_stats):
    """With a token_index the op pair gives bitwise what it gives on the alive tokens'
    parameters gathered beforehand (output, tape, statistics), and the backward's per-token
    gradients are those compact ones at the alive entries and exactly zero at the dead."""
    impl, device = impl_device
    fwd, bwd = (ops.fwd, ops.bwd) if impl == "native" else (ops.fwd_triton, ops.bwd_triton)
    args = _op_args(device, use_batch_stats, decoder=True)
    index = torch.tensor([1, 3, 4], device=device)
    compact = list(args)
    for i in (2, 3, 4, 5, 6, 8):  # w_in, bn_in_w, bn_in_b, rm_in, rv_in, query: rows
        if compact[i] is not None:
            compact[i] = compact[i].index_select(0, index)
    compact[10] = compact[10].index_select(1, index)  # w_out: columns
    masked, expected = fwd(*args, True, index), fwd(*compact)
    for a, e in zip(masked, expected):
        assert torch.equal(a, e)
    y, tape, _, var_in, _, var_out = expected
    gy = randn(y.shape, device=device, seed=9)
    rest = [2, [6, 5], True, use_batch_stats, 1e-5]
    g_masked = bwd(gy, tape, *args[1:5], var_in, *args[7:12], var_out, *rest, index)
    g_compact = bwd(gy, tape, *compact[1:5], var_in, *compact[7:12], var_out, *rest)
    dead = torch.tensor([0, 2], device=device)
    # the per-token gradients: (position in the result, its parameter's in args, token dim)
    for i, p, dim in ((1, 2, 0), (2, 3, 0), (3, 4, 0), (5, 8, 0), (7, 10, 1)):
        assert g_masked[i].shape == args[p].shape
        assert torch.equal(g_masked[i].index_select(dim, index), g_compact[i])
        assert not g_masked[i].index_select(dim, dead).any()
    for i in (0, 8, 9):
        assert torch.equal(g_masked[i], g_compact[i])
    for i in (4, 6):
        assert all(torch.equal(a, e) for a, e in zip(g_masked[i], g_compact[i]))


def check_op_rejects_a_bad_token_index(fwd):
    """Direct callers of the forward op get clear errors for a token_index the public function
    would have refused (it checks sortedness and range before the op)."""
    args = _op_args("cpu", use_batch_stats=True, decoder=False)
    for index, message in (
        (torch.tensor([0.0, 1.0]), "token_index must be a 1-d int64 tensor"),
        (torch.tensor([[0, 1]]), "token_index must be a 1-d int64 tensor"),
        (torch.arange(6), "token_index lists 6 tokens of 5"),
        (torch.tensor([0, 7]), r"token_index holds 7, outside the tokens \[0, 5\)"),
        (torch.tensor([-1]), r"token_index holds -1, outside the tokens \[0, 5\)"),
        (torch.tensor([0, 3, 2]), "strictly increasing .* got 3 then 2"),
        (torch.tensor([1, 1]), "strictly increasing .* got 1 then 1"),
    ):
        with pytest.raises(RuntimeError, match=message):
            fwd(*args, True, index)


def check_op_on_an_empty_batch(fwd):
    """The forward op on no sample (the public function refuses one): in eval an empty output
    and the running statistics (the alive tokens' ones for BN_in); batch statistics refused."""
    index = torch.tensor([1, 3, 4])
    args = _op_args("cpu", use_batch_stats=False, decoder=True)
    args[0] = args[0][:0]
    y, tape, *stats = fwd(*args, True, index)
    assert y.shape == (0, 3, 6, 5) and tape.shape == (0,)
    rm_in, rv_in, rm_out, rv_out = args[5], args[6], args[13], args[14]
    expected = [rm_in.index_select(0, index), rv_in.index_select(0, index), rm_out, rv_out]
    for got, want in zip(stats, expected):
        assert torch.equal(got, want)
    args = _op_args("cpu", use_batch_stats=True, decoder=True)
    args[0] = args[0][:0]
    with pytest.raises(RuntimeError, match="batch statistics of an empty batch are undefined"):
        fwd(*args, True, index)


def test_op_rejects_a_bad_token_index():
    check_op_rejects_a_bad_token_index(ops.fwd)


def test_op_on_an_empty_batch():
    check_op_on_an_empty_batch(ops.fwd)


@pytest.mark.parametrize("use_batch_stats,decoder", [(True, True), (False, False)])
def test_forward_without_tape(impl_device, use_batch_stats, decoder):
    """Inference asks for no tape: the forward returns an empty one and the output and statistics
    it gives with one (the CPU kernel keeps each sample's intermediates in scratch instead)."""
    impl, device = impl_device
    fwd = ops.fwd if impl == "native" else ops.fwd_triton
    args = _op_args(device, use_batch_stats, decoder)
    with_tape, without = fwd(*args), fwd(*args, False)
    assert with_tape[1].numel() > 0 and without[1].shape == (0,)
    torch.testing.assert_close([with_tape[0], *with_tape[2:]], [without[0], *without[2:]])
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(fwd, [*args, False], test_utils=utils)


def test_compile_fullgraph_dynamic(impl_device):
    """The public function traces without graph breaks, forward and backward (training BN with
    the running-statistics update), and one dynamic compile serves two input shapes."""
    impl, device = impl_device
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    m = _module((0, 5, None, 0, 0, 7, 8, 1, False, True), impl, torch.float32, device)

    def f(x, *args):
        return token_transformer(
            x, *args[:6], list(args[6:14]), args[14], list(args[15:23]), *args[23:], impl=impl
        )

    compiled = torch.compile(f, backend=counter, fullgraph=True, dynamic=True)
    frames = []
    for n, h, w in [(3, 9, 13), (4, 14, 17)]:
        results = []
        for fn in (compiled, f):
            a = _functional_args(m)
            a[4], a[5], a[12], a[13] = (t.detach().clone() for t in (a[4], a[5], a[12], a[13]))
            flat = a[:6] + a[6] + [a[7]] + a[8] + a[9:]
            x = randn((n, 5, h, w), device=device, seed=n).requires_grad_()
            out = fn(x, *flat)
            grads = torch.autograd.grad(out.square().sum(), [x, *m.parameters()])
            results.append((out, grads, a[4], a[13]))
        torch.testing.assert_close(results[0], results[1])
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames[1] == frames[0]


def test_module_compiles_and_follows_mask_changes(impl_device):
    """torch.compile(module): the alive-index lookup runs eagerly (one graph break); a new mask
    gives the new transformer, not a stale one."""
    impl, device = impl_device
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    case = CASES[0]
    m, eager = (
        _module(case, impl, torch.float32, device),
        _module(case, impl, torch.float32, device),
    )
    compiled = torch.compile(m, backend=CompileCounterWithBackend("aot_eager"))
    x = randn(case[:2] + case[3:5], device=device, seed=4)
    for kind in ("random", "single", "all"):
        m.set_token_mask(_mask(case[5], kind))
        eager.set_token_mask(_mask(case[5], kind))
        out, ref = compiled(x), eager(x)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(
            torch.autograd.grad(out.sum(), [m.input_proj.weight]),
            torch.autograd.grad(ref.sum(), [eager.input_proj.weight]),
        )
    torch.testing.assert_close(m.input_norm.running_var, eager.input_norm.running_var)


def test_thread_count_invariant():
    """Reductions run inside one task in a fixed order: the same results with 1 and 2 threads."""
    if runnable("native", "cpu"):
        pytest.skip(runnable("native", "cpu"))
    case = (4, 6, None, 12, 10, 16, 8, 1, False, True)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            m = _module(case, "native", torch.float32)
            x = randn((4, 6, 12, 10), seed=1).requires_grad_()
            y = m(x)
            results.append((y, *torch.autograd.grad(y.square().sum(), [x, *m.parameters()])))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "case,mask", [((4, 6, None, 12, 10, 16, 8, 2, False, True), "random")] + CASE_MASKS, ids=str
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_inference_call_matches_the_autograd_call(impl_device, case, mask, training):
    """With nothing to differentiate the forward op runs without the autograd function (and the
    CPU kernel's eval forward then takes each sample from x to its output in one task): the same
    output and running-statistics update, bit for bit, as a call that records a graph, which
    test_matches_reference holds to the reference."""
    impl, device = impl_device
    n, c, _, h, w, tokens = case[:6]
    x = randn((n, c, h, w), seed=1, device=device)
    results = []
    for grad in (True, False):
        m = _module(case, impl, torch.float32, device).train(training)
        m.set_token_mask(_mask(tokens, mask))
        with torch.set_grad_enabled(grad):
            y = m(x)
        assert y.requires_grad == grad
        results.append((y.detach(), *(t.clone() for t in m.buffers())))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# -- bad input -----------------------------------------------------------------------------------


def _call(**change):
    """token_transformer on a valid small reference problem, with ``change`` applied."""
    m = _module((2, 3, None, 6, 5, 4, 4, 2, False, True), "reference", torch.float32)
    names = [
        "coords",
        "input_proj_weight",
        "input_norm_weight",
        "input_norm_bias",
        "input_running_mean",
        "input_running_var",
        "encoder",
        "query_embed",
        "decoder",
        "reverse_proj_weight",
        "reverse_norm_weight",
        "reverse_norm_bias",
        "reverse_running_mean",
        "reverse_running_var",
    ]
    kwargs = dict(zip(names, _functional_args(m)))
    kwargs["x"] = randn((2, 3, 6, 5))
    kwargs["num_heads"] = 2
    kwargs["impl"] = "reference"
    kwargs.update(change)
    with torch.no_grad():
        return token_transformer(**kwargs)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(x=torch.zeros(2, 3, 6)), ValueError, "x must be a 4-d"),
        (dict(x=torch.zeros(2, 3, 6, 5, dtype=torch.int64)), TypeError, "floating dtype"),
        (
            dict(x=torch.zeros(2, 4, 6, 5)),
            ValueError,
            r"input_proj_weight must have shape \[4, 6\]",
        ),
        (dict(x=torch.zeros(2, 3, 6, 5, dtype=torch.float64)), TypeError, "coords is"),
        (dict(x=torch.zeros(2, 3, 1, 5), downsample=True), ValueError, "2x2 with downsample"),
        (dict(coords=torch.zeros(2, 4, 3)), ValueError, "coords must be a square grid"),
        (dict(num_heads=3), ValueError, "num_heads must be a positive divisor"),
        (dict(input_running_var=None), ValueError, "all four running statistics"),
        (dict(query_embed=None), ValueError, "both query_embed and decoder"),
        (dict(encoder=[]), ValueError, "encoder must hold 8 tensors"),
        (dict(encoder=torch.zeros(3)), TypeError, "encoder must be a list"),
        (dict(reverse_norm_bias=torch.zeros(5)), ValueError, r"reverse_norm_bias must have shape"),
        (dict(token_index=torch.tensor([0.0])), TypeError, "token_index must be a 1-d int64"),
        (dict(token_index=torch.tensor([0, 4])), ValueError, r"token_index must lie in \[0, 4\)"),
        (dict(token_index=torch.tensor([2, 1])), ValueError, "strictly increasing"),
        (
            dict(input_proj_weight=torch.zeros(4, 5, 1, 2)),
            ValueError,
            r"input_proj_weight must be \[num_tokens, C \+ 2\] or \[num_tokens, C \+ 2, 1, 1\]",
        ),
        (
            dict(reverse_proj_weight=torch.zeros(3, 5, 1, 1)),
            ValueError,
            r"reverse_proj_weight must have shape \[3, 4, 1, 1\]",
        ),
        (dict(momentum=2.0), ValueError, "momentum must be in"),
        (dict(eps=0.0), ValueError, "eps must be positive"),
        (dict(dropout=1.0), ValueError, r"dropout must be in \[0, 1\)"),
        (dict(x=torch.zeros(0, 3, 6, 5)), ValueError, "at least one sample"),
        (dict(impl="fast"), ValueError, "impl must be one of"),
        (dict(impl="triton"), RuntimeError, "impl='triton' cannot run this call"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_input(change, error, match):
    with pytest.raises(error, match=match):
        _call(**change)


def test_unsupported_dtype_is_refused():
    """float16 on CPU: no fused kernel; auto and native say so instead of failing inside."""
    m = _module((2, 3, None, 6, 5, 4, 4, 2, False, True), "native", torch.float16)
    for impl in ("native", "auto"):
        m.impl = impl
        with pytest.raises(RuntimeError, match="dtype torch.float16 is not supported"):
            m(randn((2, 3, 6, 5), dtype=torch.float16))


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
def test_conv_shaped_projection_weights(impl, masked):
    """The 1x1 projections' weights passed conv-shaped ([rows, cols, 1, 1], as the module holds
    them) give the output and gradients of the flattened call, the gradients in that shape;
    the native op refuses other 4-d shapes."""
    m = _module(CASES[2], impl)
    x = randn((2, 5, 16, 12), dtype=torch.float64, seed=6)
    index = torch.tensor([0, 3, 4]) if masked else None
    results = []
    for conv_shaped in (False, True):
        weights = (m.input_proj.weight, m.reverse_proj.weight)
        leaves = [t.detach().clone().requires_grad_() for t in (x, *weights)]
        args = _functional_args(m)
        args[1], args[9] = (w if conv_shaped else w.flatten(1) for w in leaves[1:])
        y = token_transformer(leaves[0], *args, token_index=index, num_heads=2, impl=impl)
        grads = torch.autograd.grad(y.square().sum(), leaves)
        assert [g.shape for g in grads] == [t.shape for t in leaves]
        results.append((y, *(g.flatten(1) if g.dim() == 4 else g for g in grads)))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)
    if impl == "native":
        op_args = _op_args("cpu", use_batch_stats=True, decoder=False)
        op_args[2] = op_args[2][:, :, None, None].expand(-1, -1, 1, 2)
        with pytest.raises(RuntimeError, match=r"input_proj_weight must be \[rows, cols\] or"):
            ops.fwd(*op_args)


@pytest.mark.parametrize("use_batch_stats,decoder,masked", OPCHECK_CASES[:2])
def test_opcheck_native_conv_shaped_weights(use_batch_stats, decoder, masked):
    """opcheck of the native forward with conv-shaped projection weights that need gradients."""
    args = _op_args("cpu", use_batch_stats, decoder)
    args[2], args[10] = args[2][:, :, None, None], args[10][:, :, None, None]
    for i in (0, 2, 10):
        args[i].requires_grad_()
    torch.library.opcheck(ops.fwd, [*args, True, torch.tensor([0, 2, 3]) if masked else None])


def test_module_follows_pruned_and_replaced_weights():
    """The forward reads parameters through the modules' dicts; a pruned weight (computed by a
    hook, not in ``_parameters``) and a replaced Parameter are still the ones used: the result
    is that of a module holding those values as plain parameters."""
    from torch.nn.utils import prune

    case = CASES[0]
    m, plain = _module(case, "native"), _module(case, "native")
    prune.l1_unstructured(m.encoder.linear1, "weight", amount=0.5)
    m.decoder.norm2.weight = nn.Parameter(m.decoder.norm2.weight.detach() * 2)
    with torch.no_grad():
        plain.encoder.linear1.weight.copy_(m.encoder.linear1.weight)
        plain.decoder.norm2.weight.mul_(2)
    assert not m.encoder.linear1.weight.ne(0).all()
    x = randn((2, 6, 9, 11), dtype=torch.float64, seed=5)
    torch.testing.assert_close(m(x), plain(x))


def test_module_bad_arguments():
    for kwargs, match in [
        (dict(in_channels=0), "in_channels must be an int >= 1"),
        (dict(in_channels=3, grid=1), "grid must be an int >= 2"),
        (dict(in_channels=3, num_tokens=0), "num_tokens must be an int >= 1"),
        (dict(in_channels=3, num_heads=3), "does not divide"),
        (dict(in_channels=3, dropout=-0.1), "dropout must be in"),
        (dict(in_channels=3, impl="cuda"), "impl must be one of"),
    ]:
        with pytest.raises(ValueError, match=match):
            DynamicTokenTransformer(**kwargs)
    m = DynamicTokenTransformer(3, num_tokens=4, grid=4, impl="reference")
    with pytest.raises(ValueError, match=r"token mask must be a bool tensor of shape \[4\]"):
        m.set_token_mask([1, 0, 1, 1])
    with pytest.raises(ValueError, match="x has 4 channels, the module expects 3"):
        m(torch.zeros(2, 4, 5, 5))
    with pytest.raises(TypeError, match="the module's parameters are torch.float32"):
        m(torch.zeros(2, 3, 5, 5, dtype=torch.float64))
    m.token_mask = torch.ones(3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"token_mask must be a bool tensor of shape \[4\]"):
        m(torch.zeros(2, 3, 5, 5))


def test_triton_family_shares_the_schema():
    """The _triton ops keep the native schema, so both families stay in step."""
    for native, triton in ((ops.fwd, ops.fwd_triton), (ops.bwd, ops.bwd_triton)):
        assert str(native._schema).replace("(", "_triton(", 1) == str(triton._schema)
