"""Helpers the test suites of every op share: which (impl, device) pairs can run, per-dtype
tolerances, and comparison against the float64 reference.

Shipped in the package so users can check our kernels on their own machines
(``python -m pytest --pyargs`` is not required: these are plain functions).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _impl
from ._layout import output_memory_format

# (atol, rtol) of an implementation's output against the float64 reference, cast to the dtype.
# fp32/fp64 are torch.testing's defaults; fp16/bf16 are starting points, and low-precision results
# must also pass the "at most twice the error of eager PyTorch in the same dtype" rule
# (flash-attention's test rule), see assert_close_to_reference.
TOLERANCES = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-5, 1.3e-6),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1.6e-2),
}


def runnable(impl: str, device: str) -> str | None:
    """None if ``impl`` can run on ``device`` in this process, else the reason (for pytest.skip)."""
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    reasons = _impl._impl_reasons(impl, device)
    return "; ".join(reasons) if reasons else None


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(
    shape: Sequence[int],
    *,
    dtype=torch.float32,
    device="cpu",
    seed=0,
    memory_format=torch.contiguous_format,
) -> torch.Tensor:
    """Seeded normal tensor, drawn on CPU in float64 so every dtype and device sees the same
    values."""
    x = torch.randn(tuple(shape), generator=seeded(seed), dtype=torch.float64)
    return x.to(dtype=dtype, device=device).contiguous(memory_format=memory_format)


def upcast(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """float64 CPU copies that require grad, keeping each tensor's memory format."""
    out = []
    for t in tensors:
        fmt = output_memory_format(t)
        out.append(
            t.detach()
            .to("cpu", torch.float64)
            .contiguous(memory_format=fmt)
            .requires_grad_(t.requires_grad)
        )
    return out


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    diff = actual.detach().to("cpu", torch.float64) - expected.detach().to("cpu", torch.float64)
    return float(diff.abs().nan_to_num(nan=float("inf")).max()) if diff.numel() else 0.0


def assert_close_to_reference(
    actual: torch.Tensor,
    expected64: torch.Tensor,
    dtype: torch.dtype,
    eager_same_dtype: torch.Tensor | None = None,
    what: str = "output",
):
    """Compare ``actual`` (any dtype/device) with the float64 reference result.

    Within TOLERANCES[dtype]; for fp16/bf16, when ``eager_same_dtype`` (eager PyTorch run in the
    same low precision) is given, the error may also be up to twice eager's own error.
    NaNs must sit in the same places.
    """
    assert actual.shape == expected64.shape, (
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    )
    atol, rtol = TOLERANCES[dtype]
    a = actual.detach().to("cpu", torch.float64)
    e = expected64.detach().to("cpu", torch.float64)
    if eager_same_dtype is not None and dtype in (torch.float16, torch.bfloat16):
        bound = 2 * max_error(eager_same_dtype, e) + atol
        err = max_error(a, e)
        assert err <= bound, (
            f"{what}: max error {err:.3g} exceeds 2x eager's ({bound:.3g}) in {dtype}"
        )
        return
    torch.testing.assert_close(
        a,
        e.to(dtype).to(torch.float64),
        atol=atol,
        rtol=rtol,
        equal_nan=True,
        msg=lambda m: f"{what} ({dtype}): {m}",
    )
