"""The pool the C++ CPU kernels take their large outputs from (csrc/common/output_pool.h).

A training loop allocates the same outputs every step; freshly mapped memory costs a page fault
and a zeroed page per 4 KiB on first touch, so blocks of at least 128 KiB freed by their tensors
are kept idle and handed out again for a request of the same size. The idle blocks are bounded by
the environment variable ``HRNAS_CPU_POOL_MB`` (read once, when the first output is allocated;
default 256, 0 turns the pool off); the oldest idle blocks are freed first.
"""

from __future__ import annotations

import torch

torch.library.define("hrnas_kernels::cpu_output_pool", "(bool release) -> int[]")

_FIELDS = ("idle_bytes", "idle_blocks", "hits", "misses", "limit_bytes")


def _query(release: bool) -> dict[str, int]:
    from . import _impl

    reasons = _impl.native_reasons("cpu")
    if reasons:
        raise RuntimeError(f"the C++ extension is not available: {'; '.join(reasons)}")
    return dict(zip(_FIELDS, torch.ops.hrnas_kernels.cpu_output_pool(release), strict=True))


def cpu_output_pool_info() -> dict[str, int]:
    """The pool's state: idle bytes and blocks, allocations served from it (hits) and not
    (misses, counting only requests of at least 128 KiB), and its limit in bytes."""
    return _query(False)


def release_cpu_output_pool() -> dict[str, int]:
    """Frees every idle block (memory held by live tensors is untouched) and returns the state
    afterwards."""
    return _query(True)
