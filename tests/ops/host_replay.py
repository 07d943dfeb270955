"""Builds the host replays of the CUDA kernels (``*_cuda_host.cpp`` next to this file), which run
an op's CUDA launch plan thread by thread on CPU tensors and register ops with the real ops'
schemas under the namespace the build names."""

import os
from pathlib import Path

import torch
from torch.utils import cpp_extension

CSRC = Path(__file__).resolve().parents[2] / "csrc"


def build(driver, build_dir, namespace, include_first=(), opt="-O1"):
    """Compiles ``driver`` (g++ through torch's extension loader) and returns its op namespace.
    ``include_first``: directories searched before csrc/, for a changed copy of a header.
    HRNAS_REPLAY_SANITIZE=address builds it with AddressSanitizer (every read and write of the
    kernels bounds-checked); python must then start with the runtime preloaded:
    LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so.6)"
    ASAN_OPTIONS=detect_leaks=0 (libstdc++ too, or exceptions thrown inside torch abort)."""
    sanitize = os.environ.get("HRNAS_REPLAY_SANITIZE")
    flags = [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer"] if sanitize else []
    cpp_extension.load(
        name=namespace,
        sources=[str(driver)],
        extra_include_paths=[*map(str, include_first), str(CSRC)],
        extra_cflags=[opt, "-std=c++20", f"-DHRNAS_REPLAY_NS={namespace}", *flags],
        extra_ldflags=flags[:1],
        build_directory=str(build_dir),
        is_python_module=False,
    )
    return getattr(torch.ops, namespace)
