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

from hrnas_kernels._testing import randn, runnable
from hrnas_kernels.nn import DynamicTokenTransformer
from hrnas_kernels.token_transformer import api, grid_coordinates


@pytest.fixture
def impl_device(impl_device):
    """The shared (impl, device) pairs, less those this op has no kernel for yet."""
    if impl_device not in api.SUPPORTED:
        pytest.skip(f"token_transformer has no {impl_device[0]} kernel for {impl_device[1]} yet")
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


# the CPU impls that exist in this build
CPU_IMPLS = ["reference"] + [
    name for name in ("native",) if (name, "cpu") in api.SUPPORTED and not runnable(name, "cpu")
]


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
