"""Shared fixtures: the (impl, device) pairs a kernel test runs on.

CPU-native runs everywhere the extension is built; Triton runs on CPU only under
TRITON_INTERPRET=1 (marked ``triton``); CUDA pairs are marked ``gpu`` (``pytest -m gpu``).
"""

import pytest
import torch

from hrnas_kernels._testing import runnable

IMPL_DEVICES = [
    pytest.param(("native", "cpu"), id="native-cpu"),
    pytest.param(("triton", "cpu"), id="triton-cpu", marks=pytest.mark.triton),
    pytest.param(("native", "cuda"), id="native-cuda", marks=pytest.mark.gpu),
    pytest.param(("triton", "cuda"), id="triton-cuda", marks=[pytest.mark.gpu, pytest.mark.triton]),
]


@pytest.fixture(params=IMPL_DEVICES)
def impl_device(request):
    impl, device = request.param
    why = runnable(impl, device)
    if why:
        pytest.skip(why)
    return impl, device


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
