"""pytest-benchmark view of bench_fuse_depthwise: the same cases, providers, modes and setup.

Run with ``pytest benchmarks --benchmark-only`` (see conftest.py for the environment variables).
"""

import _harness as h
import bench_fuse_depthwise as bench
import pytest

QUICK = h.env_flag("HRNAS_BENCH_QUICK", True)
CASES = bench.QUICK_CASES if QUICK else bench.CASES


@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("provider", bench.PROVIDERS)
@pytest.mark.parametrize("memory_format", bench.MEMORY_FORMATS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: bench.label(case).replace(" ", "-"))
def test_fuse_depthwise_mobilenet_v2(
    benchmark, bench_device, bench_threads, case, memory_format, provider, mode
):
    h.run_pytest_case(
        benchmark, bench, case, memory_format, provider, mode, bench_device, bench_threads, QUICK
    )
