"""pytest-benchmark view of bench_token_transformer: the same cases, providers, modes and setup.

Run with ``pytest benchmarks --benchmark-only`` (see conftest.py for the environment variables).
Results are grouped per case and mode, so each group compares the providers; providers that
cannot run here (and the modes an eval case does not time) are skipped with the reason ``setup``
gives.
"""

import re

import _harness as h
import bench_token_transformer as bench
import pytest

QUICK = h.env_flag("HRNAS_BENCH_QUICK", True)
CASES = bench.QUICK_CASES if QUICK else bench.CASES


def _case_id(case: dict) -> str:
    return re.sub(r"[^\w/.]+", "-", bench.label(case))


@pytest.mark.parametrize("mode", h.MODES)
@pytest.mark.parametrize("provider", bench.PROVIDERS)
@pytest.mark.parametrize("memory_format", bench.MEMORY_FORMATS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_token_transformer(
    benchmark, bench_device, bench_threads, case, memory_format, provider, mode
):
    h.run_pytest_case(
        benchmark, bench, case, memory_format, provider, mode, bench_device, bench_threads, QUICK
    )
