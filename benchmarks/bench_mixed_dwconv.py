"""Benchmark of the mixed-kernel depthwise conv + BatchNorm + ReLU6 (HR-NAS's searching block
hidden layer), training-mode BN (batch statistics, running-statistics update), and the inference
forward.

Shape: batch 8, 56x56, fp32 by default, NCHW and channels_last, 1 and 2 threads:

* C=96 as 32 channels each of k=3/5/7; C=96 all k=3; C=96 all k=7; the mixed case at stride 2;
* the mixed case with 50%, 25% and 10% of the channels alive, the same fraction of every
  kernel-size group (seeded choice), and with uneven alive counts per group (13/5/9 of 32),
  the kind a search leaves: counts that are not multiples of 8 take the channels_last path's
  padded tile layout. Alive channels are passed compactly, as the shrinking
  supernet does: ``x`` holds only the A alive channels and ``channel_index`` lists them; the
  parameters and running statistics stay full size;
* eval (running statistics) of the mixed and the all-k=3 case: the inference forward under
  ``torch.no_grad`` (mode ``forward`` only), what a searched or ``fuse_depthwise``d model runs
  when deployed.

Providers (baseline ``eager``):

* ``eager``: ``reference.mixed_dwconv_bn_act`` (what ``impl='reference'`` runs, minus the public
  function's argument checks): per kernel-size group ``F.conv2d(groups=A_g)``, one
  ``F.batch_norm`` over the concatenated groups, ``F.relu6``, the HR-NAS authors' composition;
* ``eager+compile``: ``torch.compile(reference.mixed_dwconv_bn_act, dynamic=False)``, forward and
  backward, compiled once per case and warmed up in ``setup``; ``fullgraph=True`` when every
  channel is alive, otherwise one graph break where the reference turns the alive index into
  per-group counts (``.tolist()``), after which the counts are compile-time constants. A compile
  failure skips the provider with its reason. The ``backward`` mode replays one graph, which a
  compiled backward that donates saved buffers refuses, so that mode uses a second compile with
  ``torch._functorch.config.donated_buffer=False``;
* ``native``, ``triton``: ``api.fused_forward(..., counts=..., impl=...)``, the call
  ``MixedDepthwiseConvBNAct.forward`` makes with its cached alive index (no host sync, no
  argument checks); skipped when ``available_impls()`` says they cannot run; ``triton`` is
  measured on CUDA only (on CPU it runs only under ``TRITON_INTERPRET=1``, whose timings mean
  nothing).

Modes: ``forward`` (the training forward, recording the graph) and ``full`` (forward + backward)
by default; ``--modes backward`` adds the backward alone (see _harness.py).

Compulsory bytes, for GB/s: forward reads x and writes y; backward reads grad_y and x (the
weight gradient needs both) and writes grad_x; full is both. Parameters are negligible.

Run ``python benchmarks/bench_mixed_dwconv.py --help``; see benchmarks/README.md.
"""

from __future__ import annotations

import contextlib
import sys

import _harness as h
import torch

from hrnas_kernels.mixed_dwconv_bn_act import api, reference

OP = "mixed_dwconv_bn_act"
ACTIVATION = "relu6"
MOMENTUM, EPS = 0.1, 1e-5
_MIXED = dict(N=8, C=96, H=56, W=56, kernel_sizes=(3, 5, 7), stride=1, alive=1.0, train=True)
CASES = [
    _MIXED,
    dict(_MIXED, kernel_sizes=(3,)),
    dict(_MIXED, kernel_sizes=(7,)),
    dict(_MIXED, stride=2),
    dict(_MIXED, alive=0.5),
    dict(_MIXED, alive=0.25),
    dict(_MIXED, alive=0.1),
    dict(_MIXED, alive=(13, 5, 9)),
    dict(_MIXED, train=False),
    dict(_MIXED, kernel_sizes=(3,), train=False),
]
# Smoke runs: the masked mixed case (gathered parameters, compact channels, the compiled
# reference's graph break) at a quarter of the pixels and a quarter of the channels. One case
# only: a cold torch.compile per case and layout (about 20 s on a 2-core machine) dominates.
QUICK_CASES = [dict(CASES[5], N=2, C=24, H=28, W=28)]
PROVIDERS = ("eager", "eager+compile", "native", "triton")
BASELINE = "eager"
MODES = ("forward", "full")
THREADS = (1, 2)
MEMORY_FORMATS = ("nchw", "channels_last")
DTYPE = torch.float32

_compiled = h.CompileCache()


def _replayable_reference(*args, **kwargs):
    """``reference.mixed_dwconv_bn_act`` under its own code object, so its compiled graph
    (without donated buffers, see ``setup``) has its own dynamo cache entry."""
    return reference.mixed_dwconv_bn_act(*args, **kwargs)


def group_sizes(case: dict) -> list[int]:
    """C split over the kernel sizes as ``MixedDepthwiseConvBNAct`` does (first groups get the
    remainder)."""
    base, extra = divmod(case["C"], len(case["kernel_sizes"]))
    return [base + (g < extra) for g in range(len(case["kernel_sizes"]))]


def alive_index(case: dict) -> tuple[torch.Tensor | None, list[int]]:
    """The alive channels (sorted int64, None when all are alive) and the per-group counts:
    ``alive`` is a fraction (``round(alive * C_g)`` channels of every group, at least one) or a
    tuple of per-group counts; the channels are chosen with a fixed seed."""
    sizes = group_sizes(case)
    alive = case["alive"]
    if not isinstance(alive, tuple) and alive >= 1.0:
        return None, sizes
    wanted = alive if isinstance(alive, tuple) else [max(1, round(alive * n)) for n in sizes]
    gen = torch.Generator().manual_seed(0)
    picks, counts, offset = [], [], 0
    for size, count in zip(sizes, wanted, strict=True):
        picks.append(torch.randperm(size, generator=gen)[:count].sort().values + offset)
        counts.append(count)
        offset += size
    return torch.cat(picks), counts


def label(case: dict) -> str:
    ks = "/".join(str(k) for k in case["kernel_sizes"])
    _, counts = alive_index(case)
    alive = case["alive"]
    share = "/".join(map(str, alive)) if isinstance(alive, tuple) else f"{round(100 * alive)}%"
    return (
        f"N{case['N']} C{case['C']} k{ks} {case['H']}x{case['W']} s{case['stride']} "
        f"alive {share} (A={sum(counts)})" + ("" if case["train"] else " eval")
    )


def compulsory_bytes(case: dict, mode: str, dtype: torch.dtype) -> int:
    _, counts = alive_index(case)
    s = case["stride"]
    plane_in = case["N"] * sum(counts) * case["H"] * case["W"] * dtype.itemsize
    plane_out = (
        case["N"]
        * sum(counts)
        * ((case["H"] - 1) // s + 1)
        * ((case["W"] - 1) // s + 1)
        * dtype.itemsize
    )
    forward, backward = plane_in + plane_out, plane_out + 2 * plane_in
    return {"forward": forward, "backward": backward, "full": forward + backward}[mode]


def setup(case, provider, mode, device, dtype, memory_format):
    reason = h.provider_unavailable(provider, device)
    if reason:
        return reason
    if not case["train"] and mode != "forward":
        return "eval cases time the inference forward only"
    gen = torch.Generator().manual_seed(0)
    index, counts = alive_index(case)
    n, c, hh, ww, s = case["N"], case["C"], case["H"], case["W"], case["stride"]
    x = (
        torch.randn(n, sum(counts), hh, ww, generator=gen, dtype=dtype)
        .to(device=device, memory_format=memory_format)
        .requires_grad_()
    )
    weights = [
        (torch.randn(size, 1, k, k, generator=gen, dtype=dtype) / k).to(device).requires_grad_()
        for size, k in zip(group_sizes(case), case["kernel_sizes"])
    ]
    gamma = torch.ones(c, dtype=dtype, device=device, requires_grad=True)
    beta = torch.zeros(c, dtype=dtype, device=device, requires_grad=True)
    running_mean = torch.zeros(c, dtype=dtype, device=device)
    running_var = torch.ones(c, dtype=dtype, device=device)
    index = None if index is None else index.to(device)
    inputs = [x, *weights, gamma, beta]
    kwargs = dict(
        stride=s,
        training=case["train"],
        momentum=MOMENTUM,
        eps=EPS,
        activation=ACTIVATION,
        channel_index=index,
    )
    args = (x, weights, gamma, beta, running_mean, running_var)
    context = contextlib.nullcontext
    if provider == "eager":

        def run():
            return reference.mixed_dwconv_bn_act(*args, **kwargs)
    elif provider == "eager+compile":
        # The backward mode replays one graph (retain_graph=True), which a compiled backward that
        # donates saved buffers refuses; that mode gets its own compile without buffer donation.
        replayable = mode == "backward"
        if replayable:
            context = h.no_donated_buffers
        key = (tuple(sorted(case.items())), device, dtype, memory_format, torch.get_num_threads())
        compiled = _compiled.get(
            key,
            _replayable_reference if replayable else reference.mixed_dwconv_bn_act,
            fullgraph=index is None,
        )

        def run():
            return compiled(*args, **kwargs)
    else:

        def run():
            return api.fused_forward(*args, **kwargs, counts=counts, impl=provider)

    if case["train"]:
        forward = run
    else:

        def forward():
            with torch.no_grad():
                return run()

    if provider == "eager+compile":
        try:
            with context():
                h.autograd_call(forward, inputs, "forward" if mode == "forward" else "full")()
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
