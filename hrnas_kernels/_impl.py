"""Which implementations of the fused ops can run here, and how ``impl=`` is resolved.

Every public op takes ``impl="auto" | "native" | "triton" | "reference"``:

* ``native``: the C++ kernels in ``hrnas_kernels._C`` (CPU always when built; CUDA when the
  extension was built against a CUDA torch).
* ``triton``: Triton kernels, on CUDA tensors (and on CPU tensors under ``TRITON_INTERPRET=1``,
  which is how they are tested without a GPU).
* ``reference``: readable eager PyTorch, the oracle. Never chosen by ``auto``.

``auto`` takes the first implementation in ``AUTO_PREFERENCE[device]`` that can run the call.
An implementation named explicitly that cannot run raises with its reasons; nothing falls back
silently (the xformers ``not_supported_reasons`` idea).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Callable, Iterable

import torch

IMPLS = ("native", "triton", "reference")
IMPL_CHOICES = ("auto",) + IMPLS

# Order set by the benchmarks (benchmarks/results): on CPU only the C++ kernels are fast; on CUDA
# the native kernels come first until GPU runs say otherwise.
AUTO_PREFERENCE = {"cpu": ("native",), "cuda": ("native", "triton")}

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_TRITON_FOUND = importlib.util.find_spec("triton") is not None

_native_module = None
_native_error = "hrnas_kernels._C has not been loaded"


CPU_ISAS = ("base", "avx2", "avx512")


def _set_native(module, error: str | None) -> None:
    """Record the outcome of loading ``hrnas_kernels._C`` (called once by the package init)."""
    global _native_module, _native_error
    _native_module, _native_error = module, error
    wanted = os.environ.get("HRNAS_CPU_ISA")
    if module is not None and wanted and wanted != module.cpu_isa:
        why = (
            f"not one of {CPU_ISAS}"
            if wanted not in CPU_ISAS
            else "more than this machine (or this build) supports"
        )
        warnings.warn(
            f"HRNAS_CPU_ISA={wanted!r} is {why}; the CPU kernels run at {module.cpu_isa!r}",
            stacklevel=3,
        )


def cpu_isa() -> str | None:
    """The instruction-set level the C++ CPU kernels run at: ``"avx512"`` (x86-64-v4),
    ``"avx2"`` (x86-64-v3) or ``"base"``; None when the extension is not built.

    The extension holds a copy of the kernels per level, each with vectors one register wide, and
    registers the highest level the machine supports when it is loaded; the environment variable
    ``HRNAS_CPU_ISA`` (set before import) picks a lower one, for comparisons and tests.
    """
    return None if _native_module is None else _native_module.cpu_isa


def native_reasons(device_type: str) -> list[str]:
    if _native_module is None:
        return [
            f"the C++ extension hrnas_kernels._C is not available ({_native_error}); build it with "
            "`pip install --no-build-isolation -e .`"
        ]
    if device_type == "cuda" and not getattr(_native_module, "with_cuda", 0):
        return [
            "hrnas_kernels._C was built without CUDA (torch.version.cuda was unset at build time)"
        ]
    if device_type not in ("cpu", "cuda"):
        return [f"no native kernel for device type '{device_type}'"]
    return []


def triton_reasons(device_type: str) -> list[str]:
    if not _TRITON_FOUND:
        return ["triton is not installed (pip install 'hrnas[triton]')"]
    if device_type == "cuda":
        return []
    if device_type == "cpu":
        if TRITON_INTERPRET:
            return []
        return ["Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set before import)"]
    return [f"no Triton kernel for device type '{device_type}'"]


def _impl_reasons(impl: str, device_type: str) -> list[str]:
    if impl == "native":
        return native_reasons(device_type)
    if impl == "triton":
        return triton_reasons(device_type)
    return []


def available_impls() -> dict[str, dict[str, str | None]]:
    """For each implementation and device type: ``None`` if it can run there, else why not.

    Per-call limits (dtype, shapes) come on top of this; an op names them when it refuses a call.
    """
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    table: dict[str, dict[str, str | None]] = {}
    for impl in IMPLS:
        table[impl] = {}
        for dev in devices:
            reasons = _impl_reasons(impl, dev)
            table[impl][dev] = "; ".join(reasons) if reasons else None
    return table


def resolve(
    op: str,
    impl: str,
    device: torch.device,
    call_reasons: Callable[[str], Iterable[str]],
) -> str:
    """Pick the implementation for one call.

    ``call_reasons(impl)`` lists what in this particular call the implementation cannot handle
    (dtype, sizes, options); build/install reasons are added here.
    """
    if impl not in IMPL_CHOICES:
        raise ValueError(f"{op}: impl must be one of {IMPL_CHOICES}, got {impl!r}")

    def reasons(name: str) -> list[str]:
        return _impl_reasons(name, device.type) + list(call_reasons(name))

    if impl != "auto":
        why = reasons(impl)
        if why:
            raise RuntimeError(f"{op}: impl={impl!r} cannot run this call: " + "; ".join(why))
        return impl
    tried = []
    for name in AUTO_PREFERENCE.get(device.type, ()):
        why = reasons(name)
        if not why:
            return name
        tried.append(f"{name}: " + "; ".join(why))
    raise RuntimeError(
        f"{op}: impl='auto' found no fused implementation for this call on {device.type} "
        f"({' | '.join(tried) or 'none is built for this device type'}); "
        "pass impl='reference' to run the eager PyTorch version"
    )
