"""``DynamicTokenTransformer``: HR-NAS's lightweight transformer as an ``nn.Module`` with a token
mask (math: ``reference``'s module docstring; HRNAS_SPEC.md section 2).

Its ``state_dict`` has exactly the keys and shapes of the authors' ``Transformer``
(HRNAS_SPEC.md section 2.1: ``input_proj.weight [L, C + 2, 1, 1]``, ``input_norm.*``,
``encoder.self_attn.in_proj_weight [3d, d]``, ``encoder.self_attn.out_proj.weight``,
``encoder.linear{1,2}.weight``, ``encoder.norm{1,2}.*``, ``query_embed.weight [L, d]``,
``decoder.multihead_attn.*``, ``decoder.linear{1,2}.weight``, ``decoder.norm{1,2}.*``,
``reverse_proj.weight [C_out, L, 1, 1]``, ``reverse_norm.*``), so the authors' weights load
unchanged. The submodules only hold parameters; ``forward`` calls the fused op.

The bool buffer ``token_mask [L]`` and the coordinate channels are *non-persistent* buffers
(they follow ``.to()`` but stay out of the state_dict, which must match the authors'): a search
that kills tokens saves its masks itself (or derives them from ``input_norm.weight``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import init

from .. import _impl
from . import api, reference

_OP = "DynamicTokenTransformer"


class _Attention(nn.Module):
    """The parameters of ``nn.MultiheadAttention(d, heads, bias=False)``, under its names."""

    def __init__(self, dim, factory):
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim, **factory))
        self.out_proj = nn.Linear(dim, dim, bias=False, **factory)


class _Layer(nn.Module):
    """The parameters of one of the authors' encoder/decoder layers (attention under
    ``attention_name``, ``linear1``/``linear2`` without bias, ``norm1``/``norm2``)."""

    def __init__(self, dim, attention_name, factory):
        super().__init__()
        self.attention_name = attention_name
        setattr(self, attention_name, _Attention(dim, factory))
        self.linear1 = nn.Linear(dim, dim, bias=False, **factory)
        self.linear2 = nn.Linear(dim, dim, bias=False, **factory)
        self.norm1 = nn.LayerNorm(dim, eps=reference.LAYER_NORM_EPS, **factory)
        self.norm2 = nn.LayerNorm(dim, eps=reference.LAYER_NORM_EPS, **factory)

    def weights(self) -> list[torch.Tensor]:
        """The 8 tensors in ``reference.LAYER_WEIGHTS`` order (read through the dicts:
        attribute access made this 11 us a call, paid twice per forward)."""
        mods = self._modules
        attn = mods[self.attention_name]
        norm1, norm2 = mods["norm1"], mods["norm2"]
        return [
            _param(attn, "in_proj_weight"),
            _param(attn._modules["out_proj"], "weight"),
            _param(mods["linear1"], "weight"),
            _param(mods["linear2"], "weight"),
            _param(norm1, "weight"),
            _param(norm1, "bias"),
            _param(norm2, "weight"),
            _param(norm2, "bias"),
        ]


def _param(module: nn.Module, name: str) -> torch.Tensor:
    """``module.<name>`` for a parameter, from its ``_parameters`` dict when it is there (the
    hot path: ``nn.Module.__getattr__`` costs ~0.7 us a read), else through attribute access
    (a pruned or parametrized weight is computed there)."""
    t = module._parameters.get(name)
    return getattr(module, name) if t is None else t


def _positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{_OP}: {name} must be an int >= {minimum}, got {value!r}")


class DynamicTokenTransformer(nn.Module):
    """HR-NAS's lightweight transformer with a searchable number of tokens.

    ``forward(x)``: ``x [N, in_channels, H, W]`` -> ``[N, out_channels, H, W]`` (``H // 2, W // 2``
    with ``downsample``), ``+ x`` when the output shape equals x's.

    Args:
        in_channels: C. out_channels: C_out (default C).
        num_tokens: L, the searchable tokens. grid: tokens are ``grid x grid`` maps, d = grid².
        num_heads: attention heads (a divisor of d). downsample: half-size output, no residual.
        dropout: the authors' layers use 0.1; training only; fused impls need 0 (``auto`` then
            takes the reference). use_decoder: add the decoder layer with learned queries.
        momentum, eps: of both BatchNorms (``momentum=None``: cumulative average).
        impl: ``"auto"``, ``"native"``, ``"triton"`` or ``"reference"``, resolved per call.

    ``token_mask`` (bool ``[L]``) says which tokens are alive; the result equals a transformer
    built with only the alive tokens, dead ones cost nothing and get exactly zero gradient. With
    no token alive the block is a zero-token transformer: ``resize(reverse_norm(0))`` (+ x), i.e.
    ``reverse_norm.bias`` in training (remove the block to drop it entirely).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        num_tokens: int = 64,
        grid: int = 8,
        num_heads: int = 1,
        downsample: bool = False,
        dropout: float = 0.0,
        use_decoder: bool = True,
        momentum: float | None = 0.1,
        eps: float = 1e-5,
        impl: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        _positive_int("in_channels", in_channels)
        _positive_int("out_channels", out_channels)
        _positive_int("num_tokens", num_tokens)
        _positive_int("grid", grid, 2)
        dim = grid * grid
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"{_OP}: num_heads must be a positive int, got {num_heads!r}")
        if dim % num_heads:
            raise ValueError(f"{_OP}: num_heads={num_heads} does not divide d = grid² = {dim}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"{_OP}: dropout must be in [0, 1), got {dropout!r}")
        if momentum is not None and not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"{_OP}: momentum must be in [0, 1] or None, got {momentum!r}")
        if not float(eps) > 0.0:
            raise ValueError(f"{_OP}: eps must be positive, got {eps!r}")
        if impl not in _impl.IMPL_CHOICES:
            raise ValueError(f"{_OP}: impl must be one of {_impl.IMPL_CHOICES}, got {impl!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_tokens, self.grid, self.num_heads = num_tokens, grid, num_heads
        self.downsample, self.dropout, self.use_decoder = (
            bool(downsample),
            float(dropout),
            use_decoder,
        )
        self.momentum, self.eps, self.impl = momentum, eps, impl

        self.input_proj = nn.Conv2d(in_channels + 2, num_tokens, 1, bias=False, **factory)
        self.input_norm = nn.BatchNorm2d(num_tokens, eps=eps, momentum=momentum, **factory)
        self.encoder = _Layer(dim, "self_attn", factory)
        if use_decoder:
            self.query_embed = nn.Embedding(num_tokens, dim, **factory)
            self.decoder = _Layer(dim, "multihead_attn", factory)
        self.reverse_proj = nn.Conv2d(num_tokens, out_channels, 1, bias=False, **factory)
        self.reverse_norm = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, **factory)
        self.register_buffer(
            "token_mask",
            torch.ones(num_tokens, dtype=torch.bool, device=device),
            persistent=False,
        )
        # Built once here (the authors rebuild it in numpy and copy it over on every call).
        self.register_buffer(
            "coords", reference.grid_coordinates(grid, **factory), persistent=False
        )
        self._alive_cache = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The authors' init: xavier-uniform for every matrix, the layers' defaults otherwise."""
        for m in (self.input_norm, self.reverse_norm, self.encoder.norm1, self.encoder.norm2):
            m.reset_parameters()
        if self.use_decoder:
            self.decoder.norm1.reset_parameters()
            self.decoder.norm2.reset_parameters()
        for p in self.parameters():
            if p.dim() > 1:
                init.xavier_uniform_(p)

    def set_token_mask(self, mask) -> None:
        """Set which tokens are alive: a bool ``[num_tokens]`` (or anything ``torch.as_tensor``
        turns into one); copied into the ``token_mask`` buffer."""
        mask = torch.as_tensor(mask, device=self.token_mask.device)
        if mask.dtype != torch.bool or mask.shape != (self.num_tokens,):
            raise ValueError(
                f"{_OP}: token mask must be a bool tensor of shape [{self.num_tokens}], "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        with torch.no_grad():
            self.token_mask.copy_(mask)

    @property
    def alive_tokens(self) -> int:
        """How many tokens are alive (a host sync when the mask changed)."""
        index = self._alive()
        return self.num_tokens if index is None else index.numel()

    @torch.compiler.disable
    def _alive(self):
        """The alive-token index (None when all are alive), cached per mask tensor and version:
        the one host sync happens when the mask changes. Runs eagerly under torch.compile (the
        mask's version is no traceable value; the index is an ordinary graph input)."""
        mask = self.token_mask
        cache = self._alive_cache
        if cache is not None and cache[0] is mask and cache[1] == mask._version:
            return cache[2]
        if (
            not isinstance(mask, torch.Tensor)
            or mask.dtype != torch.bool
            or mask.shape != (self.num_tokens,)
        ):
            raise ValueError(
                f"{_OP}: token_mask must be a bool tensor of shape [{self.num_tokens}], got "
                f"{getattr(mask, 'dtype', type(mask))} {tuple(getattr(mask, 'shape', ()))}"
            )
        index = torch.nonzero(mask).flatten()
        result = None if index.numel() == self.num_tokens else index
        self._alive_cache = (mask, mask._version, result)
        return result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Submodules, parameters and buffers are read from the modules' dicts (what attribute
        # access finds too): the ~40 reads through nn.Module.__getattr__ were ~25 us a call, a
        # tenth of a training forward at 25% alive tokens.
        mods, buffers = self._modules, self._buffers
        input_norm, reverse_norm = mods["input_norm"], mods["reverse_norm"]
        w_in = _param(mods["input_proj"], "weight")
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{_OP}: x must be a 4-d [N, C, H, W] tensor, got {got}")
        if x.dtype != w_in.dtype or x.device != w_in.device:
            raise TypeError(
                f"{_OP}: x is {x.dtype} on {x.device}, the module's parameters are "
                f"{w_in.dtype} on {w_in.device}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{_OP}: x has {x.shape[1]} channels, the module expects {self.in_channels}"
            )
        factor = 0.0
        if self.training:
            # nn.BatchNorm2d's bookkeeping for both norms; momentum=None averages cumulatively
            tracked = input_norm._buffers["num_batches_tracked"]
            tracked.add_(1)
            reverse_norm._buffers["num_batches_tracked"].add_(1)
            factor = 1.0 / float(tracked) if self.momentum is None else self.momentum
        if self.training and x.shape[0] == 0:
            raise ValueError(f"{_OP}: batch statistics need at least one sample, got N = 0")
        if self.downsample and (x.shape[2] < 2 or x.shape[3] < 2):
            raise ValueError(f"{_OP}: downsample needs x of at least 2x2, got {tuple(x.shape)}")
        impl = api.resolve_impl(self.impl, x, dropout=self.dropout, training=self.training)
        stats_in, stats_out = input_norm._buffers, reverse_norm._buffers
        use_decoder = self.use_decoder
        return api.fused_forward(
            x,
            buffers["coords"],
            w_in,  # conv-shaped: the op takes it so
            _param(input_norm, "weight"),
            _param(input_norm, "bias"),
            stats_in["running_mean"],
            stats_in["running_var"],
            mods["encoder"].weights(),
            _param(mods["query_embed"], "weight") if use_decoder else None,
            mods["decoder"].weights() if use_decoder else None,
            _param(mods["reverse_proj"], "weight"),
            _param(reverse_norm, "weight"),
            _param(reverse_norm, "bias"),
            stats_out["running_mean"],
            stats_out["running_var"],
            token_index=self._alive(),
            num_heads=self.num_heads,
            downsample=self.downsample,
            training=self.training,
            momentum=factor,
            eps=self.eps,
            dropout=self.dropout,
            impl=impl,
        )

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"num_tokens={self.num_tokens}, grid={self.grid}, num_heads={self.num_heads}, "
            f"downsample={self.downsample}, dropout={self.dropout}, "
            f"use_decoder={self.use_decoder}, impl={self.impl!r}"
        )
