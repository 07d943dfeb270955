"""Benchmark of multi-resolution fusion, ``relu(sum_j resize(x_j, 56x56))``, the HRNet fuse step.

Shape: HRNet branch width C=32 at batch 8, output 56x56, inputs at 56, 28 and 14 (the fuse into
the highest-resolution branch), bilinear and nearest, NCHW and channels_last, fp32 by default.

Providers (baseline ``eager``):

* ``eager``: ``reference.multires_fusion``, the eager PyTorch oracle (what ``impl='reference'``
  runs, minus the public function's argument checks);
* ``eager+compile``: ``torch.compile(reference.multires_fusion, fullgraph=True, dynamic=False)``,
  forward and backward, compiled once per case and warmed up in ``setup``; a compile failure
  skips the provider with its reason. The ``backward`` mode replays one graph, which a compiled
  backward that donates saved buffers to its outputs refuses, so that mode alone uses a second
  compile with ``torch._functorch.config.donated_buffer=False``;
* ``native``, ``triton``: ``hrnas_kernels.multires_fusion(impl=...)``, skipped when
  ``available_impls()`` says they cannot run; ``triton`` is measured on CUDA only (on CPU it runs
  only under ``TRITON_INTERPRET=1``, whose timings mean nothing).

Compulsory bytes, for GB/s and frac_peak: forward reads every input and writes the output;
backward reads grad_out and out (the ReLU mask) and writes every input's gradient; full is both.

Run ``python benchmarks/bench_multires_fusion.py --help``; see benchmarks/README.md.
"""

from __future__ import annotations

import contextlib
import sys

import _harness as h
import torch

import hrnas_kernels
from hrnas_kernels.multires_fusion import reference

OP = "multires_fusion"
ACTIVATION = "relu"
CASES = [
    dict(N=8, C=32, out=56, sizes=(56, 28, 14), interp=interp) for interp in ("bilinear", "nearest")
]
QUICK_CASES = [dict(case, N=2, C=16) for case in CASES]
PROVIDERS = ("eager", "eager+compile", "native", "triton")
BASELINE = "eager"
THREADS = (1, 2)
MEMORY_FORMATS = ("nchw", "channels_last")
DTYPE = torch.float32

_compiled = h.CompileCache()


def _replayable_reference(inputs, size, mode, activation):
    """``reference.multires_fusion`` under its own code object, so its compiled graph (without
    donated buffers, see ``setup``) has its own dynamo cache entry."""
    return reference.multires_fusion(inputs, size, mode, activation)


def label(case: dict) -> str:
    sizes = "/".join(str(s) for s in case["sizes"])
    return f"N{case['N']} C{case['C']} {case['out']}x{case['out']} <- {sizes} {case['interp']}"


def compulsory_bytes(case: dict, mode: str, dtype: torch.dtype) -> int:
    plane = case["N"] * case["C"] * dtype.itemsize
    inputs = sum(s * s for s in case["sizes"]) * plane
    out = case["out"] ** 2 * plane
    forward, backward = inputs + out, 2 * out + inputs
    return {"forward": forward, "backward": backward, "full": forward + backward}[mode]


def setup(case, provider, mode, device, dtype, memory_format):
    reason = h.provider_unavailable(provider, device)
    if reason:
        return reason
    gen = torch.Generator().manual_seed(0)
    inputs = [
        torch.randn(case["N"], case["C"], s, s, generator=gen, dtype=dtype)
        .to(device=device, memory_format=memory_format)
        .requires_grad_()
        for s in case["sizes"]
    ]
    size, interp = (case["out"], case["out"]), case["interp"]
    context = contextlib.nullcontext
    if provider == "eager":

        def forward():
            return reference.multires_fusion(inputs, size, interp, ACTIVATION)
    elif provider == "eager+compile":
        # The backward mode replays one graph (retain_graph=True), which a compiled backward that
        # donates saved buffers refuses; that mode gets its own compile without buffer donation.
        replayable = mode == "backward"
        if replayable:
            context = h.no_donated_buffers
        key = (tuple(sorted(case.items())), device, dtype, memory_format, torch.get_num_threads())
        compiled = _compiled.get(
            key, _replayable_reference if replayable else reference.multires_fusion
        )

        def forward():
            return compiled(inputs, size, interp, ACTIVATION)

        try:
            with context():
                h.autograd_call(forward, inputs, "forward" if mode == "forward" else "full")()
        except Exception as error:  # any compiler failure: skip with its reason
            return f"torch.compile failed: {type(error).__name__}: {error}"
    else:

        def forward():
            return hrnas_kernels.multires_fusion(
                inputs, size, mode=interp, activation=ACTIVATION, impl=provider
            )

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
        args=h.parse_args(__doc__, argv),
        threads=THREADS,
        memory_formats=MEMORY_FORMATS,
    )


if __name__ == "__main__":
    sys.exit(main())
