"""Build hrnas_kernels._C: C++ CPU kernels always, CUDA kernels when torch is a CUDA build.

Environment switches:
  HRNAS_BUILD_NATIVE=0        skip the extension (the reference and Triton paths still work)
  HRNAS_BUILD_CUDA=auto|0|1   auto: build CUDA when torch.version.cuda and CUDA_HOME are set
                              (not when a GPU is visible: build hosts often have none)
  HRNAS_DEBUG=1               -O0 -g
  TORCH_CUDA_ARCH_LIST, MAX_JOBS are honoured by torch's BuildExtension.
Install with `pip install --no-build-isolation -e .` so the installed torch is used.
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name, default):
    return os.environ.get(name, default).strip().lower()


def _extensions():
    if _flag("HRNAS_BUILD_NATIVE", "1") in ("0", "false", "no", "off"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    debug = _flag("HRNAS_DEBUG", "0") in ("1", "true", "yes", "on")
    want_cuda = _flag("HRNAS_BUILD_CUDA", "auto")
    cuda_possible = bool(torch.version.cuda) and CUDA_HOME is not None
    if want_cuda in ("1", "true", "yes", "on") and not cuda_possible:
        sys.exit("HRNAS_BUILD_CUDA=1 but torch is not a CUDA build or CUDA_HOME is not set")
    with_cuda = cuda_possible and want_cuda not in ("0", "false", "no", "off")

    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -fopenmp at compile *and* link time: at::parallel_for is serial without it.
    # C++20 explicitly: torch made it the default only after 2.11, whose headers need it.
    cxx = opt + [
        "-std=c++20",
        "-fopenmp",
        "-Wall",
        "-Wno-unknown-pragmas",
        "-Wno-psabi",  # double vectors wider than a register: always inlined, no ABI crosses
        "-DPy_LIMITED_API=0x030A0000",
    ]
    macros = [("HRNAS_WITH_CUDA", "1" if with_cuda else "0")]
    kwargs = dict(
        name="hrnas_kernels._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
        define_macros=macros,
        py_limited_api=True,
    )
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
        nvcc = opt + ["-std=c++20", "-lineinfo", "--expt-relaxed-constexpr"]
        ext = CUDAExtension(
            sources=sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs
        )
    else:
        ext = CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
