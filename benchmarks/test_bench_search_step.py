"""pytest-benchmark view of bench_search_step: the same step, cases, providers and layouts.

``HRNAS_BENCH_QUICK=1`` (the default) runs the ``-tiny`` spaces at 64x64 (a smoke test);
``0`` the full cases (``hrnas-seg`` at 2x3x256x512, ``hrnas-cls`` at 8x3x224x224).
"""

import re

import _harness as h
import bench_search_step as bench
import pytest
import torch

QUICK = h.env_flag("HRNAS_BENCH_QUICK", True)
CASES = bench.QUICK_CASES if QUICK else bench.CASES


def _case_id(case: dict) -> str:
    return re.sub(r"[^\w/.%=]+", "-", bench.label(case)).strip("-")


@pytest.mark.parametrize("memory_format", h.MEMORY_FORMATS)
@pytest.mark.parametrize("provider", bench.PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_search_step(benchmark, bench_device, bench_threads, case, provider, memory_format):
    fmt = h.MEMORY_FORMATS[memory_format]
    step = bench.SearchStep(case, provider, bench_device, torch.float32, fmt)
    h.run_pytest_benchmark(benchmark, h.Prepared(step), bench_device, QUICK)
