"""Benchmark of the dynamic-token lightweight transformer (HR-NAS's transformer on the identity
path of a block): the whole block, from x to ``resize(BN(W_out dec(enc(BN(W_in [resize(x), P])))))
+ x``.

Shapes: N=8 at the HR-NAS branch widths and resolutions (C=18 at 56x56, C=36 at 28x28, C=72 at
14x14), 64 tokens on the 8x8 grid (d = 64), 1 head, decoder on, fp32, 1 and 2 threads:

* training (batch statistics, running-statistics update) with 100%, 50% and 25% of the tokens
  alive (a seeded choice; dead tokens are skipped, as ``DynamicTokenTransformer`` does with its
  cached alive index): modes ``forward`` and ``full`` (forward + backward);
* eval (running statistics) with every token alive: the inference forward (under
  ``torch.no_grad``), mode ``forward`` only.

Providers (baseline ``eager``):

* ``eager``: ``reference.token_transformer``, the eager PyTorch oracle written after the authors'
  code (what ``impl='reference'`` runs, minus the public function's argument checks);
* ``eager+compile``: ``torch.compile(reference.token_transformer, fullgraph=True,
  dynamic=False)``, forward and backward, compiled once per case and warmed up in ``setup``; a
  compile failure skips the provider with its reason; the ``backward`` mode uses a compile
  without buffer donation (see _harness.py);
* ``native``, ``triton``: ``api.fused_forward(..., impl=...)``, the call the module makes;
  skipped when they cannot run (Triton: on CUDA only; the interpreter timings mean nothing).

Compulsory bytes, for GB/s: forward reads x (twice when residual: resize and the add) and writes
the output; backward reads grad_out (twice when residual) and writes grad_x.

Run ``python benchmarks/bench_token_transformer.py --help``; see benchmarks/README.md.
"""

from __future__ import annotations

import contextlib
import sys

import _harness as h
import torch

from hrnas_kernels.token_transformer import DynamicTokenTransformer, api, reference

OP = "token_transformer"
_SHAPES = [dict(C=18, H=56), dict(C=36, H=28), dict(C=72, H=14)]
CASES = [
    dict(N=8, L=64, alive=alive, train=True, **shape)
    for shape in _SHAPES
    for alive in (1.0, 0.5, 0.25)
] + [dict(N=8, L=64, alive=1.0, train=False, **shape) for shape in _SHAPES]
# Smoke runs: one masked training case, small; a cold torch.compile per case dominates.
QUICK_CASES = [dict(N=2, L=16, alive=0.5, train=True, C=8, H=12)]
PROVIDERS = ("eager", "eager+compile", "native", "triton")
BASELINE = "eager"
MODES = ("forward", "full")
THREADS = (1, 2)
MEMORY_FORMATS = ("nchw",)
DTYPE = torch.float32

_compiled = h.CompileCache()


def _replayable_reference(*args, **kwargs):
    """``reference.token_transformer`` under its own code object, so its compiled graph (without
    donated buffers, see ``setup``) has its own dynamo cache entry."""
    return reference.token_transformer(*args, **kwargs)


def alive_index(case: dict) -> torch.Tensor | None:
    """Sorted alive tokens, ``round(alive * L)`` of them (seeded), or None when all are alive."""
    if case["alive"] >= 1.0:
        return None
    count = max(1, round(case["alive"] * case["L"]))
    gen = torch.Generator().manual_seed(0)
    return torch.randperm(case["L"], generator=gen)[:count].sort().values


def label(case: dict) -> str:
    mode = "train" if case["train"] else "eval"
    return (
        f"N{case['N']} C{case['C']} {case['H']}x{case['H']} L{case['L']} "
        f"alive {round(100 * case['alive'])}% {mode}"
    )


def compulsory_bytes(case: dict, mode: str, dtype: torch.dtype) -> int:
    plane = case["N"] * case["C"] * case["H"] * case["H"] * dtype.itemsize
    forward, backward = 3 * plane, 3 * plane
    return {"forward": forward, "backward": backward, "full": forward + backward}[mode]


def setup(case, provider, mode, device, dtype, memory_format):
    reason = h.provider_unavailable(provider, device)
    if reason:
        return reason
    if not case["train"] and mode != "forward":
        return "eval cases time the inference forward only"
    torch.manual_seed(0)
    m = DynamicTokenTransformer(case["C"], num_tokens=case["L"]).to(device=device, dtype=dtype)
    m.train(case["train"])
    gen = torch.Generator().manual_seed(0)
    n, c, s = case["N"], case["C"], case["H"]
    x = torch.randn(n, c, s, s, generator=gen, dtype=dtype).to(device).requires_grad_()
    index = alive_index(case)
    index = None if index is None else index.to(device)
    params = list(m.parameters())
    inputs = [x, *params]
    args = (
        x,
        m.coords,
        m.input_proj.weight,  # conv-shaped, as the module passes it
        m.input_norm.weight,
        m.input_norm.bias,
        m.input_norm.running_mean,
        m.input_norm.running_var,
        m.encoder.weights(),
        m.query_embed.weight,
        m.decoder.weights(),
        m.reverse_proj.weight,
        m.reverse_norm.weight,
        m.reverse_norm.bias,
        m.reverse_norm.running_mean,
        m.reverse_norm.running_var,
    )
    kwargs = dict(
        token_index=index,
        num_heads=1,
        downsample=False,
        training=case["train"],
        momentum=0.1,
        eps=1e-5,
        dropout=0.0,
    )
    context = contextlib.nullcontext
    if provider == "eager":
        run = reference.token_transformer
    elif provider == "eager+compile":
        replayable = mode == "backward"
        if replayable:
            context = h.no_donated_buffers
        key = (tuple(sorted(case.items())), device, dtype, torch.get_num_threads())
        run = _compiled.get(
            key, _replayable_reference if replayable else reference.token_transformer
        )
    else:

        def run(*a, **k):
            return api.fused_forward(*a, **k, impl=provider)

    if case["train"]:

        def forward():
            return run(*args, **kwargs)
    else:

        def forward():
            with torch.no_grad():
                return run(*args, **kwargs)

    if provider == "eager+compile":
        try:
            with context():
                warm = "forward" if mode == "forward" or not case["train"] else "full"
                h.autograd_call(forward, inputs, warm)()
        except Exception as error:  # any compiler failure: skip with its reason
            return f"torch.compile failed: {type(error).__name__}: {error}"
    with context():
        fn = h.autograd_call(forward, inputs, mode)
    return h.Prepared(fn=fn, nbytes=compulsory_bytes(case, mode, dtype), context=context)


def main(argv=None) -> int:
    return h.run(
        op=OP,
        cases=CASES,
        quick_cases=QUICK_CASES,
        providers=PROVIDERS,
        baseline=BASELINE,
        setup=setup,
        label=label,
        args=h.parse_args(__doc__, argv, modes=MODES),
        threads=THREADS,
        memory_formats=MEMORY_FORMATS,
        interleave=h.all_but("alive"),  # 25% / 100% alive from the same minutes
    )


if __name__ == "__main__":
    sys.exit(main())
